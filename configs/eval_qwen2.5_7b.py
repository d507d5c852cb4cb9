"""The paper's evaluation of a distilled 7B student: MATH500, AIME24 and GSM8K test, greedy, up to 32,768 new tokens,
bf16. Benchmark paths default to ../shared/data (run from the repository root); override them as needed.

  python -m rlt_jax.evaluate --config configs/eval_qwen2.5_7b.py --workdir runs/eval_7b \
      --config.model_path=/ckpt/student_7b

Other benchmark files: --config.benchmarks="('math500=/data/math500.jsonl','aime24=/data/aime24.jsonl')".
"""
from rlt_jax.evaluate import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/eval_qwen2.5_7b"
  c.model_path = ""  # required: the distilled student (HF directory, e.g. Qwen2.5-7B-Instruct after distill)
  c.benchmarks = ("math500=../shared/data/math500/test.jsonl",
                  "aime24=../shared/data/aime24/test.jsonl",
                  "gsm8k=../shared/data/gsm8k/test.jsonl")
  c.limit = 0
  c.num_samples = 1
  c.temperature = 0.0
  c.max_new_tokens = 32768
  c.max_prompt_len = 2048
  # KV cache in bf16: 28 layers × 4 kv heads × 128 dims × 2 (k, v) × 2 bytes = 56 KiB a token slot, so 32 problems
  # × (2,048 + 32,768) slots ≈ 60 GiB beside the 15 GiB of weights on one 141 GiB GPU.
  c.batch_size = 32
  c.param_dtype = "bfloat16"
  c.dtype = "bfloat16"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
