"""Mixed precision, as DeepSpeed bf16, MaxText and Tunix train LMs: master params and AdamW moments in
`param_dtype` (float32), matmuls and activations in the compute `dtype` (bfloat16 on accelerators).

The model code casts each weight to the compute dtype where it is used (`layers.Dense`), so a forward of fp32 params
is already a bf16 forward, and its gradients reach the fp32 masters. What stays is this module's:
- `compute_copy`: the params cast once to the compute dtype, sharded as they are. Sampling and the reward read it
  (a decode loop over fp32 masters would read twice the bytes and cast every weight again for every token).
- `moved_fraction` / `check_learning_rate`: a weight stored in bf16 (8 significant bits) ignores a step smaller than
  half its spacing, about |w|·2^-9: at lr 1e-6, 98% of N(0, 0.02) weights would never move. Runs that store the
  trained params in a low-precision dtype with such a learning rate stop before any work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPES = tuple(_NP)


def numpy_dtype(name: str) -> np.dtype:
  """The NumPy dtype of a dtype name ("bfloat16" is ml_dtypes')."""
  return np.dtype(_NP[name])
WEIGHT_SCALE = 0.02   # std of the weights the rounding check assumes (the init scale of Qwen2/Llama models)
MIN_MOVED = 0.9       # a learning rate must change at least this share of such weights in one step


@functools.partial(jax.jit, static_argnums=1)
def _cast(params, dtype: str):
  # A jitted elementwise cast keeps each leaf's sharding: no gather, one pass over the params.
  return jax.tree.map(lambda p: cast_leaf(p, dtype), params)


@functools.lru_cache(maxsize=8)
def _cast_to(dtype: str, sources: tuple, targets: tuple):
  # Cast where each leaf is, then move: the move (all-gathers within a tensor group) carries the smaller dtype.
  return jax.jit(lambda leaves: [jax.lax.with_sharding_constraint(cast_leaf(p, dtype), s)
                                 for p, s in zip(leaves, sources)], out_shardings=list(targets))


def cast_leaf(p, dtype: str):
  """A floating array in `dtype`; anything else (ids, step counts) as it is."""
  return p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p


def compute_copy(params, dtype: str, shardings=None):
  """`params` with every floating leaf in `dtype`, each sharded as its source or, given `shardings` (a pytree like
  `params`, e.g. the rollout layout), as they say: one jitted program that casts and moves. `params` itself when
  nothing changes (no copy in an all-fp32 run on the training layout)."""
  leaves, treedef = jax.tree.flatten(params)
  same_dtype = all(p.dtype == jnp.dtype(dtype) for p in leaves if jnp.issubdtype(p.dtype, jnp.floating))
  if shardings is None:
    return params if same_dtype else _cast(params, dtype)
  targets = tuple(jax.tree.leaves(shardings))
  if same_dtype and all(p.sharding == s for p, s in zip(leaves, targets)):
    return params
  return jax.tree.unflatten(treedef, _cast_to(dtype, tuple(p.sharding for p in leaves), targets)(leaves))


def moved_fraction(learning_rate: float, dtype: str, *, scale: float = WEIGHT_SCALE, n: int = 200_000,
                   seed: int = 0) -> float:
  """Share of N(0, scale²) weights stored in `dtype` that one step of size `learning_rate` changes (an AdamW step
  moves each weight by about the learning rate: m̂/√v̂ ≈ ±1), computed by doing it."""
  w = (np.random.default_rng(seed).standard_normal(n) * scale).astype(_NP[dtype])
  stepped = (w.astype(np.float64) + learning_rate).astype(_NP[dtype])
  return float(np.mean(stepped != w))


def min_learning_rate(dtype: str, *, scale: float = WEIGHT_SCALE, share: float = MIN_MOVED) -> float:
  """The smallest learning rate (to two significant digits) whose step changes `share` of N(0, scale²) weights
  stored in `dtype`."""
  lo, hi = 1e-12, 1.0
  for _ in range(60):  # bisection on a log scale; moved_fraction grows with the step
    mid = (lo * hi) ** 0.5
    lo, hi = (lo, mid) if moved_fraction(mid, dtype, scale=scale) >= share else (mid, hi)
  return float(f"{hi:.2g}")


def check_learning_rate(learning_rate: float, param_dtype: str, lr_field: str, dtype_field: str) -> str | None:
  """An error message when `learning_rate` is too small for weights stored in `param_dtype`, else None."""
  if param_dtype == "float32" or learning_rate <= 0:
    return None
  moved = moved_fraction(learning_rate, param_dtype)
  if moved >= MIN_MOVED:
    return None
  return (f"config.{dtype_field}={param_dtype!r} with config.{lr_field}={learning_rate:g}: a step of that size "
          f"changes only {moved:.1%} of N(0, {WEIGHT_SCALE}) weights stored in {param_dtype} (the rest round "
          f"away). Set config.{dtype_field}='float32' (fp32 master weights; matmuls stay in config.dtype), or a "
          f"learning rate of at least {min_learning_rate(param_dtype):g}")
