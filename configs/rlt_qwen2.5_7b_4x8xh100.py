"""The paper's 7B RL recipe (configs/rlt_qwen2.5_7b.py) on 4 nodes × 8 H100 80 GB (32 GPUs), through Slurm:

  sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sbatch --config configs/rlt_qwen2.5_7b_4x8xh100.py \
      --workdir /shared/runs/rlt_7b --config.teacher_path=/shared/teacher_sft \
      --config.student_path=/shared/Bespoke-Stratos-7B --config.data.path=/shared/bespoke_stratos_17k

Each node then runs `python -m rlt_jax.train --config configs/rlt_qwen2.5_7b_4x8xh100.py --distributed=slurm ...`
with XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (the launcher's default). FSDP within a node (fsdp=8, NVLink) and data
parallel across the 4 nodes (data=4), so weights are all-gathered inside a node only; the rows of every phase split
over all 32 GPUs. Sized with `python -m rlt_jax.plan --config configs/rlt_qwen2.5_7b_4x8xh100.py --chip h100
--mesh data=4,fsdp=8,tensor=1`; the README's "Running the 7B recipe" has its table.
"""
from rlt_jax.run_config import config_file


def get_config():
  c = config_file("rlt_qwen2.5_7b.py", relative_to=__file__)
  c.workdir = "runs/rlt_qwen2.5_7b_4x8xh100"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 8, 1
  c.sample_micro_batch = 8     # prompts (× 64 samples) per sampler call: 512 rows, 64 a 4-GPU tensor group
  c.reward_micro_batch = 128   # rows per reward part: 4 a GPU
  c.grpo.micro_batches = 32    # update parts of 32 rows: 1 a GPU
  return c
