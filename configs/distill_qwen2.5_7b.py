"""Stage 3 of the paper's pipeline: the RL-trained 7B teacher explains every Bespoke-Stratos-17k row.

  python -m rlt_jax.distill --config configs/distill_qwen2.5_7b.py --workdir runs/distill_7b \
      --config.teacher_path=runs/rlt_qwen2.5_7b/export --config.student_path=/ckpt/Bespoke-Stratos-7B \
      --config.data.path=/data/bespoke_stratos_17k

The RL sampling settings (T = 0.7, up to 16,384 new tokens, the RL prompt) and one candidate an item, as the paper's
main results (no filtering). For 32B students (paper App. B.1) use `--config.distill.candidates=4`: the kept trace is
the best one that closed its explanation and fits `distill.student_context` tokens, ranked by the RLT reward.
"""
from rlt_jax.distill import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/distill_qwen2.5_7b"
  c.teacher_path = ""        # required: the RL export
  c.student_path = ""        # required: the student that scores candidates (the RL run's student)
  c.data.path = ""           # required: the rows to explain (Bespoke-Stratos-17k)
  c.data.required = True     # an empty data.path stops the run (never the bundled tiny sample)
  c.param_dtype = "bfloat16"
  c.dtype = "bfloat16"
  c.max_prompt_len = 16384
  c.max_new_tokens = 16384
  c.max_student_len = 32768
  c.temperature = 0.7
  c.distill.candidates = 1
  c.distill.items_per_batch = 64
  c.distill.student_context = 16384  # the student SFT cutoff
  return c
