"""Stage 1 of the paper's pipeline: the teacher warm-up (SFT on the teacher format) of Qwen2.5-7B-Instruct.

  python -m rlt_jax.sft --config configs/teacher_sft_qwen2.5_7b.py --workdir runs/teacher_sft_7b \
      --config.model_path=/ckpt/Qwen2.5-7B-Instruct --config.data.path=/data/bespoke_stratos_17k

Loss on the explanation, its end tag and <|im_end|> only (METHOD_SPEC §4). 16 rows a step (unpacked, as the official
trl run), 16,384-token context (longer rows cut), AdamW lr 1e-5 cosine with 5% warm-up, betas (0.9, 0.95), weight
decay 1e-4, grad-norm 1.0. The official run allows 10 epochs with a checkpoint each; the paper calls the warm-up
brief, so `--config.epochs` is the knob to turn. The export (<workdir>/export) is the RL config's teacher_path.
"""
from rlt_jax.sft import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/teacher_sft_qwen2.5_7b"
  c.kind = "teacher"
  c.model_path = ""          # required: Qwen/Qwen2.5-7B-Instruct (HF directory)
  c.data.path = ""           # required: Bespoke-Stratos-17k (jsonl, parquet or datasets folder)
  c.data.required = True     # an empty data.path stops the run (never the bundled tiny sample)
  c.param_dtype = "float32"  # fp32 master weights and Adam moments, bf16 compute
  c.dtype = "bfloat16"
  c.remat = "full"
  c.max_len = 16384
  c.pack = False             # 16 rows a step as in the paper; True packs rows into fewer, fuller sequences
  c.batch_size = 16
  c.micro_batches = 2
  c.epochs = 10
  c.learning_rate = 1e-5
  c.lr_schedule = "cosine"
  c.warmup_ratio = 0.05
  c.b1, c.b2, c.adam_eps = 0.9, 0.95, 1e-8
  c.weight_decay = 1e-4
  c.max_grad_norm = 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint_every = 500
  c.checkpoint_every_minutes = 30  # at 7B a step is minutes: bounds what a kill without warning (no SIGTERM) loses
  return c
