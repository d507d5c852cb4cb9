"""The command line of every entry point (`python -m rlt_jax.<module> --config FILE ...`) and the end-of-run
summary of an RL run."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlt_jax import distributed, run_config


def print_summary(workdir: str, start: int, steps: int) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  if not rows:
    return
  first, last = rows[:5], rows[-5:]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs if r.get(k) is not None]))  # noqa: E731
  times = {k: mean(rows, f"time_{k}") for k in ("sample", "splice", "program", "step")}
  print(f"\nrlt_jax: {steps - start} steps this run, {len(rows)} in {workdir}\n"
        f"  reward  first 5: {mean(first, 'reward_mean'):+.4f}   last 5: {mean(last, 'reward_mean'):+.4f}\n"
        f"  match rate last 5: {mean(last, 'match_rate'):.2f}   completion length last 5: "
        f"{mean(last, 'completion_len_mean'):.1f}\n"
        f"  seconds a step: {times['step']:.2f} (waiting for samples {times['sample']:.2f}, splice {times['splice']:.2f}, "
        f"the step program {times['program']:.2f})\n"
        f"  metrics: {path}")


def cli(run) -> None:
  """The command line of every entry point: `--config FILE [--workdir DIR] [--config.field=value ...]`, then
  `run(config, workdir)`; a ConfigError ends the program with its message, not a traceback."""
  import sys

  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (default: the config's `workdir`).")
  flags.mark_flag_as_required("config")
  dist = distributed.define_flags()

  def main(argv):
    del argv
    try:
      # Before anything touches JAX devices; a no-op for one process.
      distributed.initialize(**{k: v.value for k, v in dist.items()})
      run(config.value, workdir.value or config.value.workdir)
    except (run_config.ConfigError, distributed.DistributedError) as e:
      sys.exit(f"error: {e}")

  app.run(main)
