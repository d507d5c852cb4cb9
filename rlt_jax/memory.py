"""Bytes a device holds for each buffer of an RL or SFT step, from shapes alone (no weights, devices or network):
the formulas `plan` adds up into per-phase peaks.

What lives on each device (sharding rules of the config, `sharding.DEFAULT_RULES` by default: params over
fsdp (embed) × tensor (vocab, heads, mlp), activations' batch over data × fsdp, their heads/mlp/vocab over tensor;
a dimension a mesh axis does not divide is replicated, as `sharding.logical_to_spec` does):
  resident, all phases: the trained params in `param_dtype` (the fp32 masters of a mixed-precision run), the AdamW
    state (optax keeps mu and nu in the params' dtype, sharded like the params; step counts), and, in the compute
    dtype, the reference params, the student params and the once-a-step compute copy of the trained params
    (`precision.compute_copy`, absent when param_dtype = dtype) that sampling and the reward read (freed before a
    synchronous update).
  sample:  `sampling.prefill` (the prompt KV cache and one layer's forward temporaries), then `sampling.decode`
    (prompt cache, its heads-first copy, the generation cache, one layer's cache slices, [rows, V] fp32 logits).
  reward:  `rewards.rlt_rewards` on one `reward_micro_batch` part: teacher then student forward, one layer's
    temporaries or the fp32 [rows, chunk, V] log-prob chunks, whichever is larger.
  update:  `train._train_step` (or `sft._sft_step`) on one micro-batch: gradients in the params' dtype (plus an
    accumulator with micro-batches > 1), per-layer residuals saved for the backward pass (remat none | dots | full),
    and the backward of one layer (or of the chunked log-prob head): the larger of its MLP and blocked-attention
    working sets.
Per-token counts are buffers of XLA's buffer assignment for this code; tests/test_plan.py compares them with
`memory_analysis()` of the compiled step functions (fp32, XLA:CPU), within 15%.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from rlt_jax import decode, optim, sharding
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

MiB, GiB = 2**20, 2**30
F32 = 4


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int     # memory of one JAX device
  note: str
  host_devices: int  # devices one host (process) holds: a rollout copy's tensor group stays within it


CHIPS = {  # one JAX device = one chip (a TPU v4/v5p chip's two TensorCores are one device)
    "tpu-v4": Chip(32 * GiB, "TPU v4: 32 GiB HBM2 a chip", 4),
    "tpu-v5e": Chip(16 * GiB, "TPU v5e: 16 GiB HBM2 a chip", 4),
    "tpu-v5p": Chip(95 * GiB, "TPU v5p: 95 GiB HBM2e a chip; a v5p-N slice counts N TensorCores = N/2 chips", 4),
    "tpu-v6e": Chip(32 * GiB, "TPU v6e (Trillium): 32 GiB HBM a chip", 4),
    "a100-40g": Chip(40960 * MiB, "A100 40GB: 40,960 MiB as nvidia-smi reports it", 8),
    "a100-80g": Chip(81920 * MiB, "A100 80GB: 81,920 MiB (80 GiB) as nvidia-smi reports it", 8),
    "h100": Chip(81559 * MiB, "H100 SXM 80GB: 81,559 MiB (79.6 GiB) as nvidia-smi reports it", 8),
    "h200": Chip(143771 * MiB, "H200 141GB: 143,771 MiB (140.4 GiB) as nvidia-smi reports it", 8),
}

CHIP_NAMES = tuple(CHIPS)


def rollout_mesh_sizes(config: ModelConfig, mesh_sizes: dict, host_devices: int, requested: int = 0) -> dict:
  """The (data, 1, tensor) mesh `sharding.rollout_mesh` makes of these devices, for hosts of `host_devices`."""
  n = math.prod(mesh_sizes.values())
  t = sharding.rollout_tensor_size(n, host_devices, config.num_heads, config.num_kv_heads, requested)
  return dict(data=n // t, fsdp=1, tensor=t)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


@contextlib.contextmanager
def quiet_sharding():  # replicated params are reported in the plan's notes, not logged once per leaf
  log = logging.getLogger(sharding.__name__)
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def _local_size(shape, names, mesh, rules) -> int:
  spec = sharding.logical_to_spec(names, rules, mesh=mesh, shape=shape, what="param")
  split = [math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())) for s in spec]
  return math.prod(n // k for n, k in zip(shape, split))


def params_device_bytes(config: ModelConfig, mesh, rules) -> int:
  """Bytes of one device's shard of the params, as `hf_checkpoint.load_hf(..., mesh=mesh)` places them."""
  with quiet_sharding():
    sizes = jax.tree.map(lambda names, s: _local_size(s.shape, names, mesh, rules) * s.dtype.itemsize,
                         decoder.param_logical_axes(config), decoder.param_shapes(config),
                         is_leaf=lambda x: isinstance(x, tuple))
  return sum(jax.tree.leaves(sizes))


@functools.lru_cache(maxsize=16)
def _opt_state_leaves(config: ModelConfig, optim_config: optim.OptimConfig) -> tuple:
  """(logical axes or None, shape, itemsize) of every AdamW state leaf, from optax's own init traced abstractly."""
  state = jax.eval_shape(optim.make_optimizer(optim_config).init, decoder.param_shapes(config))
  axes = {tuple(k.key for k in path): names for path, names in jax.tree_util.tree_flatten_with_path(
      decoder.param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))[0]}
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))  # mu/nu mirror the params tree
    names = next((axes[keys[i:]] for i in range(len(keys)) if keys[i:] in axes), None)
    out.append((names, tuple(leaf.shape), leaf.dtype.itemsize))
  return tuple(out)


def opt_state_device_bytes(config: ModelConfig, optim_config: optim.OptimConfig, mesh, rules) -> int:
  """One device's AdamW state as `optim.init_state` lays it out: moment leaves sharded like their params,
  scalars (step counts) replicated."""
  with quiet_sharding():
    return sum((_local_size(shape, names, mesh, rules) if names else math.prod(shape)) * itemsize
               for names, shape, itemsize in _opt_state_leaves(config, optim_config))


@dataclasses.dataclass(frozen=True)
class Dims:
  """One device's share of a model's activation dimensions (D is never split; the rest as the rules say)."""
  L: int
  D: int
  F: int
  H: int
  K: int
  E: int
  V: int
  c: int        # compute dtype itemsize
  p: int        # param dtype itemsize (of the weights the program reads: masters in the update, the copy elsewhere)
  tied: bool
  layer_params: int  # one layer's params on a device after an fsdp all-gather (split over tensor only)
  fsdp: int


def local(name: str, n: int, mesh, rules) -> int:
  """One device's share of an activation dimension of size n with logical name `name` (all of it if indivisible)."""
  spec = sharding.logical_to_spec((name,), rules, mesh=mesh, shape=(n,), what="activation")
  return n // math.prod(mesh.shape[a] for a in ((spec[0],) if isinstance(spec[0], str) else spec[0] or ()))


def dims(config: ModelConfig, mesh, rules) -> Dims:
  share = functools.partial(local, mesh=mesh, rules=rules)
  gathered = AbstractMesh(tuple(1 if a == "fsdp" else mesh.shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  layer = config.replace(num_layers=1)
  with quiet_sharding():
    per_layer = sum(_local_size(s.shape, n, gathered, rules) for n, s in zip(
        jax.tree.leaves(decoder.param_logical_axes(layer)["layers"], is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(decoder.param_shapes(layer)["layers"])))
  return Dims(config.num_layers, config.hidden_size, share("act_mlp", config.intermediate_size),
              share("act_heads", config.num_heads), share("act_kv_heads", config.num_kv_heads), config.head_dim,
              share("act_vocab", config.vocab_size), np.dtype(config.jnp_dtype).itemsize,
              np.dtype(config.jnp_param_dtype).itemsize, config.tie_word_embeddings, per_layer, mesh.shape["fsdp"])


# --------------------------------------------------------------------------------------- per-phase working sets
# Per token of one layer, in bytes. `none`: the residuals JAX saves for the backward pass without remat: the fp32
# RMSNorm inputs (2·D fp32) and, in the compute dtype, 4 D-sized values, q and the attention output (2·H·E), the
# k/v blocks (2·K·E) and 6 F-sized MLP values (gate, up, silu parts, their product). `dots` keeps the matmul outputs
# (q, k, v, o, gate, up, down); `full` keeps the layer input only.
def residuals(d: Dims, remat: str) -> int:
  if remat == "dots":
    return (2 * d.D + d.H * d.E + 2 * d.K * d.E + 2 * d.F) * d.c
  if remat == "full":
    return d.D * d.c
  return 2 * d.D * F32 + (4 * d.D + 2 * d.H * d.E + 2 * d.K * d.E + 6 * d.F) * d.c + 4 * F32


def _mlp_half(d: Dims) -> int:  # the MLP's share of `residuals(d, "none")`
  return d.D * F32 + (2 * d.D + 6 * d.F) * d.c + 2 * F32


def _attention_tiles(d: Dims, rows: int, T: int, block: int, backward: bool) -> int:
  """Blocked attention of one layer: the forward holds one fp32 [C, C] score tile a head; the backward of a
  checkpointed pair of query blocks holds, for each of its X+1 tile steps, four fp32 [C, C] tiles (scores, masked
  scores, exponentials, their cotangent) and two [C, E] ones. A sequence of one block takes the dense [T, T] softmax."""
  C = min(block, T)
  if T <= block:
    return rows * d.H * T * T * F32 * (3 if backward else 2)
  n = 2 * -(-T // (2 * C))
  if backward:
    return rows * d.H * (n + 1) * C * (4 * C + 2 * d.E) * F32
  return rows * d.H * C * C * F32


def _layer_forward(d: Dims, rows: int, T: int, block: int) -> int:
  """One layer's forward temporaries without gradients: the residual stream and the RMSNorm output (2·D) with either
  the MLP's gate, up and product (3·F) or the attention's q, its blocks and output (3·H·E), k and v and their blocks
  (4·K·E) and score tiles; the RoPE tables; with fsdp, this layer's and the next one's all-gathered weights and the
  all-gathered embedding."""
  gather = (2 * d.layer_params + d.D * d.V) * d.c if d.fsdp > 1 else 0
  mlp = rows * T * 3 * d.F * d.c
  attention = rows * T * (3 * d.H + 4 * d.K) * d.E * d.c + _attention_tiles(d, rows, T, block, False)
  return rows * T * (2 * d.D * d.c + 2 * d.E * F32) + max(mlp, attention) + gather


def forward_bytes(d: Dims, rows: int, T: int, block: int, chunk: int) -> dict:
  """Temporaries of `logprobs.token_logprobs` (no gradients): the larger of one layer's and the log-prob head's (the
  final hidden states, padded and chunk-major: 3·D; two fp32 [rows, chunk, V] buffers, the chunk's logits and a
  temporary; the transposed output kernel when tied, or the all-gathered one with fsdp)."""
  chunks = 2 * rows * min(chunk, T) * d.V * F32
  head = chunks + 3 * rows * T * d.D * d.c + (d.D * d.V * d.c if d.tied or d.fsdp > 1 else 0)
  return dict(temp=max(_layer_forward(d, rows, T, block), head), chunks=chunks)


def update_bytes(d: Dims, rows: int, T: int, remat: str, block: int, chunk: int) -> dict:
  """Activation temporaries of `train._train_step` on one micro-batch of `rows` rows × T tokens (gradients apart).

  At the peak every layer's residuals are saved and one layer is being differentiated: its MLP backward (the
  MLP's residuals sliced out of the stack, or under full remat the whole layer recomputed, plus cotangents: 2·F in
  the compute dtype and 6·D fp32), its attention backward (all of the layer's residuals and `_attention_tiles`),
  or the head's backward (three fp32 [rows, chunk, V] buffers, the transposed kernel and its gradient, fp32
  hidden-state cotangents)."""
  tok = rows * T
  saved = d.L * residuals(d, remat) * tok + tok * 2 * d.E * F32
  if T <= block and remat == "none":
    saved += d.L * rows * d.H * T * T * F32  # the dense softmax probabilities
  live = residuals(d, "none") if remat == "full" else _mlp_half(d)
  mlp = tok * (live + 2 * d.F * d.c + 6 * d.D * F32)
  attention = tok * residuals(d, "none") + _attention_tiles(d, rows, T, block, True)
  chunks = 3 * rows * min(chunk, T) * d.V * F32
  head = chunks + d.D * d.V * (d.c + d.p) + 2 * tok * d.D * F32  # the cast kernel and its gradient
  # With fsdp: this layer's and the next one's all-gathered weights (the masters, plus their compute-dtype casts when
  # the dtypes differ), this layer's unreduced gradients (params' dtype) and the all-gathered output kernel.
  weights = d.p + (d.c if d.p != d.c else 0)
  gather = (2 * weights + d.p) * d.layer_params + d.D * d.V * weights if d.fsdp > 1 else 0
  return dict(temp=saved + max(mlp, attention, head) + gather, saved=saved, chunks=chunks)


def sample_bytes(d: Dims, prompts: int, rows: int, P: int, N: int, block: int, window: int = 256) -> dict:
  """`decode.prefill` + `decode.decode` for `prompts` prompts (on this device) and `rows` = prompts × samples, the
  generation cache allocated in whole windows (`decode.windows`)."""
  slot = 2 * d.L * d.K * d.E * d.c
  prompt, gen = slot * prompts * P, slot * rows * decode.windows(max(N - 1, 1), window)[-1]
  prefill = prompt + _layer_forward(d, prompts, P, block) + prompts * d.V * F32
  # decode: the prompt cache (prefill's output), its heads-first copy, the generation cache, one layer's slices of
  # both caches, [rows, V] fp32 logits / scaled logits / log-softmax / sample, tokens and log-probs.
  loop = 2 * prompt + gen + (prompt + gen) // d.L + 4 * rows * d.V * F32 + rows * N * 8
  return dict(kv_cache=prompt + gen, prefill=prefill, decode=loop, temp=max(prefill, loop))

