"""Evaluation on CPU of the tiny local student (built under <workdir>/tiny_models if missing) on 8 problems of the
bundled GSM8K sample, greedy, 48 new tokens: a smoke test of the pipeline, not a meaningful score.

  python -m rlt_jax.evaluate --config configs/eval_tiny.py --workdir runs/eval_tiny
"""
from rlt_jax import tiny
from rlt_jax.evaluate import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/eval_tiny"
  c.tiny_models = True  # no model_path: the tiny student, built the same way as the tiny RL run's
  c.benchmarks = ("gsm8k=sample",)  # "sample" = rlt_jax/assets/gsm8k_sample.jsonl
  c.limit = 8
  c.num_samples = 1
  c.temperature = 0.0
  c.max_new_tokens = 48
  c.max_prompt_len = 384    # the sample's longest student prompt is 281 tokens in the tiny tokenizer: none dropped
  c.batch_size = 8
  # The tiny RL run's short system prompts (configs/tiny.py): the tiny models were warmed up on them.
  c.format.teacher_system, c.format.student_system = tiny.TEACHER_SYSTEM, tiny.STUDENT_SYSTEM
  return c
