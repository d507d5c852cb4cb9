"""loading.make_format: the config's explicit fields over the models' recorded formats over the style's defaults;
an explicit prompt or style that differs from a model's is used and warned about, naming both; system prompts from
files. (setup and load_model run in every test that trains: test_train, test_sft, test_pipeline.)"""
import logging

import pytest

from rlt_jax import formats, loading, model_format, run_config


def config(**fields):
  cfg = run_config.default_config()
  for k, v in fields.items():
    cfg.format[k] = v
  return cfg


@pytest.fixture
def models(tok, tmp_path):
  """A teacher trained in the r1 style with its own prompt, and a student with the prompt its rows carried."""
  teacher = formats.RLTFormat(tok, style="r1", teacher_system="Teacher prompt of the warm-up.")
  model_format.write(str(tmp_path / "teacher"), teacher, "teacher")
  model_format.write(str(tmp_path / "student"), formats.RLTFormat(tok, style="r1"), "student",
                     student_system="Student prompt of the distillation rows.")
  (tmp_path / "hub").mkdir()  # a hub checkpoint: no record
  return {k: str(tmp_path / k) for k in ("teacher", "student", "hub")}


def test_each_model_gives_its_own_fields(tok, models, caplog):
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    fmt = loading.make_format(config(), tok, teacher_dir=models["teacher"], student_dir=models["student"])
  assert fmt.style == "r1" and fmt.explanation_tags == ("<explanation>", "</explanation>")
  assert fmt.teacher_system == "Teacher prompt of the warm-up."
  assert fmt.student_system == "Student prompt of the distillation rows."
  assert fmt.student_prompt_text("q").startswith("<|im_start|>system\nStudent prompt of the distillation rows.<|")
  assert not caplog.records
  # Only a student (evaluate): its prompt; the teacher's fields are the style's.
  fmt = loading.make_format(config(), tok, student_dir=models["student"])
  assert fmt.student_system == "Student prompt of the distillation rows."
  assert fmt.teacher_system == formats.RLTFormat(tok, style="r1").teacher_system
  # Hub checkpoints (no record): today's defaults.
  fmt = loading.make_format(config(), tok, teacher_dir=models["hub"], student_dir=models["hub"])
  default = formats.RLTFormat(tok)
  assert (fmt.style, fmt.teacher_system, fmt.student_system) == ("stratos", default.teacher_system,
                                                                  default.student_system)


def test_an_explicit_prompt_wins_and_is_warned_about_naming_both(tok, models, caplog):
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    fmt = loading.make_format(config(student_system="My own prompt."), tok, teacher_dir=models["teacher"],
                              student_dir=models["student"])
  assert fmt.student_system == "My own prompt." and fmt.teacher_system == "Teacher prompt of the warm-up."
  (warning,) = [r.getMessage() for r in caplog.records]
  assert "config.format.student_system overrides the prompt the student in " + models["student"] in warning
  assert "recorded: 'Student prompt of the distillation rows.'" in warning and "config:   'My own prompt.'" in warning
  # The same prompt as the record: nothing to warn about.
  caplog.clear()
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    loading.make_format(config(teacher_system="Teacher prompt of the warm-up."), tok, teacher_dir=models["teacher"])
  assert not caplog.records


def test_an_explicit_other_style_sets_the_record_aside(tok, models, caplog):
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    fmt = loading.make_format(config(style="stratos"), tok, teacher_dir=models["teacher"])
  assert fmt.explanation_tags == formats.STYLES["stratos"]["explanation_tags"]
  assert fmt.teacher_system == formats.RLTFormat(tok).teacher_system
  (warning,) = [r.getMessage() for r in caplog.records]
  assert f"config.format.style='stratos', but the teacher in {models['teacher']} was trained in the 'r1' style" \
      in warning


def test_system_prompts_from_files(tok, models, tmp_path):
  (tmp_path / "teacher.txt").write_text("A teacher prompt\nover two lines.\n\n")
  (tmp_path / "student.txt").write_text("Ünïcode student prompt.")
  fmt = loading.make_format(config(teacher_system_file=str(tmp_path / "teacher.txt"),
                                   student_system_file=str(tmp_path / "student.txt")), tok,
                            student_dir=models["student"])
  assert fmt.teacher_system == "A teacher prompt\nover two lines."  # trailing newlines dropped
  assert fmt.student_system == "Ünïcode student prompt."  # the file wins over the student's record
  assert fmt.teacher_prompt(q := "2+2?", "4").tolist() == tok(fmt.teacher_prompt_text(q, "4"))["input_ids"]
  with pytest.raises(run_config.ConfigError, match="config.format.teacher_system_file='.*': set "
                                                   "config.format.teacher_system or this, not both"):
    loading.make_format(config(teacher_system="x", teacher_system_file=str(tmp_path / "teacher.txt")), tok)
  with pytest.raises(run_config.ConfigError, match=r"config.format.student_system_file='.*nope.txt': cannot be read "
                                                   r"\(\[Errno 2\] No such file"):
    loading.make_format(config(student_system_file=str(tmp_path / "nope.txt")), tok)
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(run_config.ConfigError, match="holds no prompt"):
    loading.make_format(config(student_system_file=str(tmp_path / "empty.txt")), tok)


def test_a_damaged_record_is_a_config_error_naming_the_model_field(tok, tmp_path):
  (tmp_path / "rlt_format.json").write_text("{")
  with pytest.raises(run_config.ConfigError, match=f"config.student_path: {tmp_path / 'rlt_format.json'}: cannot"):
    loading.make_format(config(), tok, student_dir=str(tmp_path))
  with pytest.raises(run_config.ConfigError, match=f"config.model_path: {tmp_path / 'rlt_format.json'}: cannot"):
    loading.make_format(config(), tok, teacher_dir=str(tmp_path), path_field="model_path")
