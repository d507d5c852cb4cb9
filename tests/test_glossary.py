"""Every shape-suffixed name in rlt_jax/ (`logits_BTV`) uses only the letters of docs/architecture.md's glossary."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIX = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z0-9]+)$")


def glossary_letters() -> set[str]:
  text = (ROOT / "docs" / "architecture.md").read_text()
  table = text.split("### Shape letters", 1)[1].split("\n\n", 2)[1]
  letters = {m.group(1) for m in re.finditer(r"^\| ([A-Z]) \|", table, re.M)}
  assert len(letters) >= 15, table  # the table was found and read
  return letters | {"1"}


def shape_names(path: pathlib.Path):
  """(line, name, suffix) of each variable, argument or attribute whose name ends in a shape suffix."""
  for node in ast.walk(ast.parse(path.read_text())):
    name = (node.id if isinstance(node, ast.Name) else node.arg if isinstance(node, ast.arg)
            else node.attr if isinstance(node, ast.Attribute) else None)
    m = SUFFIX.match(name or "")
    if m:
      yield node.lineno, name, m.group(1)


def test_the_glossary_is_read_and_a_stray_letter_is_found(tmp_path):
  letters = glossary_letters()
  assert {"B", "T", "V", "G", "Q"} <= letters and "M" not in letters
  bad = tmp_path / "bad.py"
  bad.write_text("def f(q_BTKGE, logits_BMV):\n  return logits_BMV\n")
  found = [(n, s) for _, n, s in shape_names(bad) if set(s) - letters]
  assert found == [("logits_BMV", "BMV"), ("logits_BMV", "BMV")]


def test_every_shape_suffix_in_the_package_is_in_the_glossary():
  letters = glossary_letters()
  stray = [f"{p.relative_to(ROOT)}:{line} {name}" for p in sorted((ROOT / "rlt_jax").rglob("*.py"))
           for line, name, suffix in shape_names(p) if set(suffix) - letters]
  assert not stray, "shape letters not in docs/architecture.md's glossary:\n" + "\n".join(stray)
