"""The stages of `bench/replicate.py`: the budget of a replication, the run config of each stage (built on the
library's defaults, so each stage is the same code as its `python -m rlt_jax.<stage>` command), and the runner that
does each stage once and records its wall time."""
from __future__ import annotations

import dataclasses
import json
import os
import time

# The reward of each RL arm (rewards.RewardConfig fields); the paper's is the default.
REWARDS = {"rl": {}, "rl_no_kl": dict(kl_penalty_coeff=(0.0, 0.0)),
           "rl_no_minmax": dict(answer_log_prob_coeff=(1.0, 0.0), kl_penalty_coeff=(3.0, 0.0))}


@dataclasses.dataclass(frozen=True)
class Budget:
  """Sizes of one replication (the same for every arm)."""
  seeds: tuple[int, ...] = (0, 1, 2)
  num_digits: int = 4
  train_problems: int = 2048
  heldout_problems: int = 256
  vocab_size: int = 512
  warmup_steps: int = 2500     # teacher and reward-student SFT warm-up (shared by the seeds)
  warmup_lr: float = 3e-3
  rl_steps: int = 60
  rl_lr: float = 3e-4
  rl_batch: int = 32           # completions a step: 4 prompts × 8 samples
  group_size: int = 8
  student_steps: int = 500     # student SFT, every arm (from the warmed-up reward student: see the module doc)
  student_lr: float = 3e-3
  sft_batch: int = 32          # rows a step (unpacked: every arm sees as many rows)
  max_len: int = 72            # SFT context
  max_prompt_len: int = 56     # the teacher's prompt (RL, distill) and the student's (evaluate)
  max_new_tokens: int = 16     # explanation budget
  eval_new_tokens: int = 32


FULL = Budget()
QUICK = Budget(seeds=(0,), num_digits=3, train_problems=64, heldout_problems=32, warmup_steps=6, rl_steps=2,
               student_steps=4)


# ------------------------------------------------------------------------------------------------------------ stages
class Stages:
  """Runs named stages once: each leaves <root>/stages/<name>.done.json with its wall time and result."""

  def __init__(self, root: str):
    self.dir = os.path.join(root, "stages")
    os.makedirs(self.dir, exist_ok=True)
    self.seconds: dict[str, float] = {}

  def run(self, name: str, fn):
    marker = os.path.join(self.dir, f"{name}.done.json")
    if os.path.exists(marker):
      with open(marker) as f:
        done = json.load(f)
    else:
      print(f"\n=== replicate: {name}", flush=True)
      t = time.perf_counter()
      done = dict(result=fn(), seconds=time.perf_counter() - t)
      with open(marker + ".tmp", "w") as f:
        json.dump(done, f)
      os.replace(marker + ".tmp", marker)
    self.seconds[name] = done["seconds"]
    return done["result"]


def _common(c, seed: int, fmt: dict) -> None:
  c.seed = seed
  for k, v in fmt.items():
    c.format[k] = v
  c.tensorboard = False


def sft_config(b: Budget, fmt: dict, *, kind: str, model: str, data: str, steps: int, lr: float, seed: int):
  from rlt_jax import sft
  c = sft.default_config()
  _common(c, seed, fmt)
  c.kind, c.model_path, c.data.path = kind, model, data
  c.max_len, c.pack, c.batch_size, c.epochs, c.steps = b.max_len, False, b.sft_batch, 0, steps
  # Constant after a short warm-up: tiny models learn this task in a late jump that a decayed rate can miss.
  c.learning_rate, c.lr_schedule, c.warmup_ratio = lr, "constant", 0.02
  c.logprob_chunk_size = b.max_len
  c.checkpoint_every = max(steps // 2, 1)
  return c


def _rl_sizes(c, b: Budget) -> None:
  # The student's chat is a few tokens longer than the teacher's prompt + completion (loading._check_student_len).
  c.max_prompt_len, c.max_new_tokens = b.max_prompt_len, b.max_new_tokens
  c.max_student_len = b.max_prompt_len + b.max_new_tokens + 16
  c.logprob_chunk_size = c.max_student_len


def rl_config(b: Budget, fmt: dict, *, teacher: str, student: str, data: str, arm: str, seed: int):
  from rlt_jax import run_config
  c = run_config.default_config()
  _common(c, seed, fmt)
  c.teacher_path, c.student_path, c.data.path = teacher, student, data
  c.batch_size, c.group_size, c.steps = b.rl_batch, b.group_size, b.rl_steps
  _rl_sizes(c, b)
  c.grpo.learning_rate = b.rl_lr
  c.grpo.ref_sync_steps = max(b.rl_steps // 3, 1)
  c.checkpoint_every = max(b.rl_steps // 2, 1)
  for k, v in REWARDS[arm].items():
    c.reward[k] = v
  return c


def distill_config(b: Budget, fmt: dict, *, teacher: str, student: str, data: str, seed: int):
  from rlt_jax import distill
  c = distill.default_config()
  _common(c, seed, fmt)
  c.teacher_path, c.student_path, c.data.path = teacher, student, data
  _rl_sizes(c, b)
  c.distill.candidates, c.distill.items_per_batch, c.distill.export_dataset = 1, 64, False
  return c


# The two decodings METHOD_SPEC §5.3 names: greedy (SkyThought's default) and T = 0.7 (Sky-T1's AIME/GPQA runs),
# where pass@1 is the mean over `samples` responses a problem.
DECODINGS = {"greedy": dict(temperature=0.0, samples=1), "t07": dict(temperature=0.7, samples=4)}


def eval_config(b: Budget, fmt: dict, *, model: str, heldout: str, seed: int, decoding: str = "greedy"):
  from rlt_jax import evaluate
  c = evaluate.default_config()
  _common(c, seed, fmt)
  c.model_path, c.benchmarks = model, (f"heldout={heldout}",)
  d = DECODINGS[decoding]
  c.temperature, c.num_samples, c.max_new_tokens, c.max_prompt_len = (d["temperature"], d["samples"],
                                                                       b.eval_new_tokens, b.max_prompt_len)
  c.batch_size = 64
  return c
