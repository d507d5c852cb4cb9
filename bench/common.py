"""Shared helpers for the side-by-side benchmarks: interleaved best-of-N timing, this CPU's matmul peak (through XLA
and through PyTorch) and its model name."""
import os
import time

import numpy as np

PEAK_SIZES = (1024, 2048)  # square fp32 matmuls whose best rate is taken as the peak


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


def torch_matmul_peak_flops(n: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
  """Measured fp32 matmul FLOP/s of this machine through PyTorch with `threads` threads (the peers' ceiling)."""
  import torch
  if threads:
    torch.set_num_threads(threads)
  a = torch.from_numpy(np.random.RandomState(0).randn(n, n).astype(np.float32))
  a @ a
  t = best_of({"mm": lambda: a @ a}, repeats)["mm"]
  return 2 * n ** 3 / t


def cpu_model() -> str:
  """This CPU as every figure is labelled with: /proc/cpuinfo's model name, the CPU count and its widest fp32 SIMD
  (the same model name covers machines with different vector units)."""
  name, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
          name = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  simd = next((s for s in ("avx512f", "avx2", "avx", "sse2") if s in flags), None)
  extra = [s for s in ("amx_tile",) if s in flags]
  return f"{name}, {os.cpu_count()} CPUs" + (f", {'+'.join([simd] + extra)}" if simd else "")


def torch_threads() -> int:
  return int(os.environ.get("BENCH_TORCH_THREADS", os.cpu_count() or 1))
