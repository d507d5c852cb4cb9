"""SFT on CPU with the tiny local model: the teacher warm-up by default, `--config.kind=student` for distillation.

  python -m rlt_jax.sft --config configs/sft_tiny.py --workdir runs/sft_tiny
  python -m rlt_jax.sft --config configs/sft_tiny.py --workdir runs/student_tiny --config.kind=student \\
      --config.data.path=runs/distill_tiny/distill.jsonl --config.model_path=runs/sft_tiny/tiny_models/student
"""
from rlt_jax import tiny
from rlt_jax.sft import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/sft_tiny"
  c.tiny_models = True  # start from the tiny local model unless model_path is set
  c.format.teacher_system, c.format.student_system = tiny.TEACHER_SYSTEM, tiny.STUDENT_SYSTEM
  c.max_len = 1024
  c.batch_size = 4
  c.epochs = 1
  c.steps = 20
  c.learning_rate = 1e-3
  c.warmup_ratio = 0.1
  c.logprob_chunk_size = 256
  c.checkpoint_every = 10
  return c
