"""rlt_format.json: what a model records of the format it was trained in, read back exactly; a damaged file is an
error naming it; the system prompt a dataset's rows carry (what a student trained on them saw)."""
import json
import logging

import pytest

from rlt_jax import formats, model_format


def test_a_record_reads_back_as_the_fields_of_the_format_it_was_written_from(tok, tmp_path):
  fmt = formats.RLTFormat(tok, style="r1", teacher_system="Teach: solution first.", padding="\n\n")
  path = model_format.write(str(tmp_path / "model"), fmt, "teacher")
  rec = model_format.read(str(tmp_path / "model"))
  assert path == str(tmp_path / "model" / "rlt_format.json") and rec["role"] == "teacher" and rec["style"] == "r1"
  # Every field, as RLTFormat resolved it (the default student prompt with its tags filled in).
  assert {f: rec[f] for f in formats.STYLES["r1"]} == {
      f: list(v) if isinstance(v, tuple) else v for f, v in vars(fmt).items() if f in formats.STYLES["r1"]}
  assert "<think>" in rec["student_system"] and rec["explanation_tags"] == ["<explanation>", "</explanation>"]
  # A teacher gives its own fields and the shared ones; as a student, the student's.
  assert model_format.fields(rec, "teacher") == dict(
      teacher_system="Teach: solution first.", solution_tags=("<solution>", "</solution>"),
      explanation_tags=("<explanation>", "</explanation>"), delimiter="\n\n", padding="\n\n")
  assert set(model_format.fields(rec, "student")) == {"student_system", "thought_tags", "student_solution_tags",
                                                      "think_prefix", "delimiter", "padding"}
  # A format rebuilt from the record is the same format.
  again = formats.RLTFormat(tok, style=rec["style"], **{**model_format.fields(rec, "teacher"),
                                                       **model_format.fields(rec, "student")})
  assert again.teacher_prompt_text("q", "s") == fmt.teacher_prompt_text("q", "s")
  assert again.student_text("q", "e", "s") == fmt.student_text("q", "e", "s")
  # A student's record holds the prompt its rows carried, not the format's.
  model_format.write(str(tmp_path / "student"), fmt, "student", student_system="The rows' prompt.")
  assert model_format.read(str(tmp_path / "student"))["student_system"] == "The rows' prompt."


def test_no_file_is_none_and_a_damaged_file_is_an_error_naming_it(tok, tmp_path):
  assert model_format.read(str(tmp_path)) is None
  path = tmp_path / "rlt_format.json"
  path.write_text('{"rlt_jax_format": 1, "role": "teacher"')
  with pytest.raises(ValueError, match=f"{path}: cannot be read as JSON"):
    model_format.read(str(tmp_path))
  path.write_text(json.dumps({"rlt_jax_format": 1, "role": "judge", "style": "stratos"}))
  with pytest.raises(ValueError, match=f"{path}: role must be one of"):
    model_format.read(str(tmp_path))
  path.write_text(json.dumps({"rlt_jax_format": 1, "role": "student", "style": "stratos", "student_system": "x"}))
  with pytest.raises(ValueError, match=r"fields \['thought_tags', 'student_solution_tags', 'think_prefix', "
                                       r"'delimiter', 'padding'\] are missing"):
    model_format.read(str(tmp_path))
  with pytest.raises(ValueError, match="role must be one of"):
    model_format.record(formats.RLTFormat(tok), "judge")


def test_the_rows_system_prompt_is_the_most_common_one(tmp_path):
  rows = [{"question": f"q{i}", "solution": "s", "system": "A" if i % 3 else "B"} for i in range(9)]
  rows.insert(4, {"question": "no system", "solution": "s"})
  rows.insert(2, {"question": "", "solution": "s", "system": "C"})  # unusable (empty question): not counted
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert model_format.data_system_prompt(str(path)) == ("A", 2)
  assert model_format.data_system_prompt(str(path), limit=1) == ("B", 1)  # the first row only: q0 (B)
  path.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
  assert model_format.data_system_prompt(str(path)) == (None, 0)


def test_a_row_prompt_other_than_the_students_is_warned_about_once(tok, tmp_path, caplog):
  model_format.write(str(tmp_path), formats.RLTFormat(tok), "student", student_system="Recorded.")
  check = model_format.RowPrompts(str(tmp_path))
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    check.check(["Recorded.", None, "Row prompt.", "Row prompt."])
    check.check(["Row prompt.", "Recorded."])
  (warning,) = [r.getMessage() for r in caplog.records]
  assert f"the student in {tmp_path} was trained with another" in warning
  assert "recorded: 'Recorded.'" in warning and "row:      'Row prompt.'" in warning
  caplog.clear()
  with caplog.at_level(logging.WARNING, "rlt_jax"):  # a student without a record: nothing to compare with
    model_format.RowPrompts(str(tmp_path / "hub")).check(["Row prompt."])
    model_format.RowPrompts(None).check(["Row prompt."])
  assert not caplog.records
