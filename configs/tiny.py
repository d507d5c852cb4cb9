"""The default CPU run: tiny random teacher and student built locally, the bundled GSM8K sample, a few minutes.

  python -m rlt_jax.train --config configs/tiny.py --workdir runs/tiny
"""
from rlt_jax import tiny
from rlt_jax.run_config import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/tiny"
  c.tiny_models = True  # teacher and student built on the spot (no paths needed)
  c.seed = 0
  # Short system prompts keep the tiny model's sequences short; the formats stay those of the paper.
  c.format.teacher_system, c.format.student_system = tiny.TEACHER_SYSTEM, tiny.STUDENT_SYSTEM
  c.batch_size = 32
  c.group_size = 8
  # The bundled sample whole: its longest teacher prompt is 542 tokens in the tiny tokenizer (the start-of-run data
  # line gives it); max_student_len is what loading._check_student_len asks for with 48 new tokens.
  c.max_prompt_len = 544
  c.max_new_tokens = 48
  c.max_student_len = 608
  c.steps = 30
  c.grpo.learning_rate = 3e-4
  c.grpo.ref_sync_steps = 10
  c.logprob_chunk_size = 128
  c.checkpoint_every = 10
  # Held-out reward (eval/*) at step 0 and every 10 steps, on 32 rows of the sample set aside at start (never
  # trained on): does the reward rise on prompts the teacher never trained on?
  c.eval_every = 10
  c.eval.num_prompts = 32
  return c
