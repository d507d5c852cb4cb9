"""The paper's 7B RL recipe (configs/rlt_qwen2.5_7b.py) on a Cloud TPU v5p-64 slice (32 chips, 8 workers × 4):

  launch/tpu_pod.sh my-v5p-64 us-east5-a -- --config configs/rlt_qwen2.5_7b_v5p64.py \
      --workdir /mnt/shared/runs/rlt_7b --config.teacher_path=/mnt/shared/teacher_sft \
      --config.student_path=/mnt/shared/Bespoke-Stratos-7B --config.data.path=/mnt/shared/bespoke_stratos_17k

Every worker then runs `python -m rlt_jax.train --config configs/rlt_qwen2.5_7b_v5p64.py --distributed=auto ...`.
FSDP over all 32 chips (the slice's ICI torus links every chip). Sized with `python -m rlt_jax.plan --config
configs/rlt_qwen2.5_7b_v5p64.py --chip tpu-v5p --mesh data=1,fsdp=32,tensor=1`; the README's "Running the 7B recipe"
has its table.
"""
from rlt_jax.run_config import config_file


def get_config():
  c = config_file("rlt_qwen2.5_7b.py", relative_to=__file__)
  c.workdir = "runs/rlt_qwen2.5_7b_v5p64"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 32, 1
  c.sample_micro_batch = 16    # the step's 16 prompts (× 64 samples) in one call: 1,024 rows, 128 a 4-chip group
  c.reward_micro_batch = 256   # rows per reward part: 8 a chip
  c.grpo.micro_batches = 32    # update parts of 32 rows: 1 a chip
  return c
