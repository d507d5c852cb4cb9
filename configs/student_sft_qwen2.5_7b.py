"""Stage 4 of the paper's pipeline: distil a Qwen2.5-7B-Instruct student on the RLT explanations (rlt_jax.distill).

  python -m rlt_jax.sft --config configs/student_sft_qwen2.5_7b.py --workdir runs/student_sft_7b \
      --config.model_path=/ckpt/Qwen2.5-7B-Instruct --config.data.path=runs/distill_7b/dataset

Loss on the assistant turn (thought = explanation, then the solution). The SkyThought recipe the paper's students
follow (METHOD_SPEC §5.2): lr 1e-5, 3 epochs, 96 rows a step, cosine with 10% warm-up, 16,384-token cutoff, AdamW
with the Hugging Face defaults (betas (0.9, 0.999), no weight decay).
"""
from rlt_jax.sft import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/student_sft_qwen2.5_7b"
  c.kind = "student"
  c.model_path = ""          # required: Qwen/Qwen2.5-7B-Instruct (HF directory)
  c.data.path = ""           # required: <distill workdir>/dataset or distill.jsonl
  c.data.required = True     # an empty data.path stops the run (never the bundled tiny sample)
  c.param_dtype = "float32"
  c.dtype = "bfloat16"
  c.remat = "full"
  c.max_len = 16384
  c.pack = False             # 96 rows a step as in the recipe
  c.batch_size = 96
  c.micro_batches = 12
  c.epochs = 3
  c.learning_rate = 1e-5
  c.lr_schedule = "cosine"
  c.warmup_ratio = 0.1
  c.b1, c.b2, c.adam_eps = 0.9, 0.999, 1e-8
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint_every = 200
  c.checkpoint_every_minutes = 30  # at 7B a step is minutes: bounds what a kill without warning (no SIGTERM) loses
  return c
