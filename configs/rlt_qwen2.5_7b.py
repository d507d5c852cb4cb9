"""The paper's RL recipe: a Qwen2.5-7B teacher (after the SFT warm-up) scored by a frozen 7B student.

  python -m rlt_jax.train --config configs/rlt_qwen2.5_7b.py --workdir runs/rlt_7b \
      --config.teacher_path=/ckpt/teacher_sft --config.student_path=/ckpt/Bespoke-Stratos-7B \
      --config.data.path=/data/bespoke_stratos_17k

16 prompts × 64 samples a step at T = 0.7, up to 16,384 new tokens, AdamW 1e-6 constant, β = 0.04 (k3 on
T-scaled log-probs), reference mix-up α = 0.9 every 32 steps, 125 steps, reward coefficients (1, 0.01) / (3, 0.03).
Mixed precision: fp32 master weights and AdamW moments, bf16 matmuls and activations (the official run's DeepSpeed
bf16); the student, the reference and the per-step copy that sampling and the reward read are bf16.

This file is the recipe, for any device count (fsdp over every device). The hardware targets the docs name have
their own files, with the mesh and micro-batches sized for them by `python -m rlt_jax.plan`:
configs/rlt_qwen2.5_7b_8xh100.py, configs/rlt_qwen2.5_7b_4x8xh100.py, configs/rlt_qwen2.5_7b_v5p64.py. Elsewhere the
preflight plans the run for your devices before loading weights and names the fields to change if it does not fit.
"""
from rlt_jax.run_config import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/rlt_qwen2.5_7b"
  c.seed = 42
  c.teacher_path = ""  # required: the SFT-warmed Qwen2.5-7B-Instruct teacher (HF directory)
  c.student_path = ""  # required: bespokelabs/Bespoke-Stratos-7B (HF directory)
  c.data.path = ""     # required: Bespoke-Stratos-17k (jsonl, parquet, a save_to_disk folder or tfds:NAME:SPLIT)
  c.data.required = True  # an empty data.path stops the run (never the bundled tiny sample)
  c.param_dtype = "float32"  # master weights and AdamW moments
  c.dtype = "bfloat16"       # matmuls, activations, student, reference, sampling copy
  c.remat = "full"
  c.batch_size = 1024   # 16 prompts × 64
  c.group_size = 64
  c.max_prompt_len = 16384
  c.max_new_tokens = 16384
  c.max_student_len = 32768
  c.temperature = 0.7
  c.top_p = 1.0
  c.steps = 125
  c.grpo.learning_rate = 1e-6
  c.grpo.lr_schedule = "constant"
  c.grpo.beta = 0.04
  c.grpo.ref_mixup_alpha = 0.9
  c.grpo.ref_sync_steps = 32
  c.grpo.weight_decay = 0.0
  c.grpo.max_grad_norm = 1.0
  c.grpo.loss_aggregation = "sequence_mean"
  c.grpo.micro_batches = 128   # update in parts of 8 rows
  c.sample_micro_batch = 4     # prompts (× 64 samples) per sampler call
  c.reward_micro_batch = 64    # rows per reward part
  c.reward.answer_log_prob_coeff = (1.0, 0.01)
  c.reward.kl_penalty_coeff = (3.0, 0.03)
  c.reward.not_matched_penalty = -1.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.checkpoint_every = 25
  c.checkpoint_every_minutes = 30  # at 7B a step is minutes: bounds what a kill without warning (no SIGTERM) loses
  # Held-out reward (eval/*) at step 0 and every 25 steps: 16 prompts of data.path set aside at start (one step's
  # sampling each time), or --config.eval.path=<file> for prompts of their own.
  c.eval_every = 25
  c.eval.num_prompts = 16
  return c
