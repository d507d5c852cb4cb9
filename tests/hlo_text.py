"""Reading XLA's compiled HLO text (`jit(...).lower(...).compile().as_text()`): computations and what loops run."""
import re


def computations(hlo: str) -> dict[str, list[str]]:
  """Each computation's name and its instruction lines."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None and line.strip() and line != "}":
      comps[name].append(line.strip())
  return comps


def while_bodies(comps: dict[str, list[str]]) -> list[str]:
  return [b for ls in comps.values() for line in ls for b in re.findall(r"\bbody=%([\w.\-]+)", line)]


def reachable(comps: dict[str, list[str]], roots) -> set[str]:
  """`roots` and every computation they call (fusions, loops, reductions, branches), transitively."""
  calls = {c: set(re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)", "\n".join(ls)))
           for c, ls in comps.items()}
  inside, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c not in inside:
      inside.add(c)
      todo.extend(calls.get(c, ()))
  return inside
