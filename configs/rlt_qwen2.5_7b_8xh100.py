"""The paper's 7B RL recipe (configs/rlt_qwen2.5_7b.py) on one node of 8 × H100 80 GB:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m rlt_jax.train --config configs/rlt_qwen2.5_7b_8xh100.py \
      --workdir runs/rlt_7b --config.teacher_path=/ckpt/teacher_sft \
      --config.student_path=/ckpt/Bespoke-Stratos-7B --config.data.path=/data/bespoke_stratos_17k

FSDP over the 8 GPUs (NVLink). Sized with
`python -m rlt_jax.plan --config configs/rlt_qwen2.5_7b_8xh100.py --chip h100 --mesh data=1,fsdp=8,tensor=1`; the
README's "Running the 7B recipe" has its table. (JAX on GPU takes 75% of each GPU unless
XLA_PYTHON_CLIENT_MEM_FRACTION says more; the preflight plans against what the allocator really has.)
"""
from rlt_jax.run_config import config_file


def get_config():
  c = config_file("rlt_qwen2.5_7b.py", relative_to=__file__)
  c.workdir = "runs/rlt_qwen2.5_7b_8xh100"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  c.sample_micro_batch = 4     # prompts (× 64 samples) per sampler call: 256 rows, 128 a 4-GPU tensor group
  c.reward_micro_batch = 64    # rows per reward part: 8 a GPU
  c.grpo.micro_batches = 128   # update parts of 8 rows: 1 a GPU
  return c
