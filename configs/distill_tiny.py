"""Distillation data on CPU: the tiny teacher explains the bundled GSM8K sample, two candidates an item.

  python -m rlt_jax.distill --config configs/distill_tiny.py --workdir runs/distill_tiny \\
      --config.teacher_path=runs/tiny/export --config.student_path=runs/tiny/tiny_models/student

With no paths it uses the tiny local models (built under <workdir>/tiny_models), like configs/tiny.py.
"""
from rlt_jax import tiny
from rlt_jax.distill import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/distill_tiny"
  c.tiny_models = True  # used only when teacher_path/student_path are empty
  c.seed = 0
  c.format.teacher_system, c.format.student_system = tiny.TEACHER_SYSTEM, tiny.STUDENT_SYSTEM
  # The bundled sample whole: its longest teacher prompt is 542 tokens in the tiny tokenizer (the start-of-run data
  # line gives it); max_student_len is what loading._check_student_len asks for with 48 new tokens.
  c.max_prompt_len = 544
  c.max_new_tokens = 48
  c.max_student_len = 608
  c.logprob_chunk_size = 128
  c.distill.candidates = 2
  c.distill.items_per_batch = 8
  c.distill.limit = 32
  return c
