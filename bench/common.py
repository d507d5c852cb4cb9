"""Shared helpers for the side-by-side benchmarks: interleaved best-of-N timing and this CPU's matmul peak."""
import os
import time

import numpy as np


def best_of(fns: dict, repeats: int = 5) -> dict:
  """Runs each callable `repeats` times, interleaved (this CPU has slow spells), and keeps each one's best time."""
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t)
  return best


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """Measured fp32 matmul FLOP/s of this machine through XLA (the ceiling our jitted code can reach)."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = best_of({"mm": lambda: f(a).block_until_ready()}, repeats)["mm"]
  return 2 * n ** 3 / t


def torch_threads() -> int:
  return int(os.environ.get("BENCH_TORCH_THREADS", os.cpu_count() or 1))
