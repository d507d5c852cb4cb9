"""Per-device memory of an RL run (`train.run`) on a chip and mesh, from shapes alone: no weights, devices or network.

  python -m rlt_jax.plan --config configs/rlt_qwen2.5_7b.py --chip h100 [--mesh data=1,fsdp=8,tensor=1] [--json]
      [--model 7b] [--usable 0.9] [--config.batch_size=256 ...]

Shapes come from the teacher's/student's `config.json` when the config's path is a local HF directory, else from the
Qwen2.5 presets below (`--model 7b`, or a preset name such as "7B" in the model path or the config file name), or
from the config's `tiny` fields when `tiny_models=True`. Without `--mesh` it also searches the smallest device counts
(powers of two up to 2048) whose data×fsdp×tensor meshes fit.

What lives on each device (sharding rules of the config, `sharding.DEFAULT_RULES` by default: params over
fsdp (embed) × tensor (vocab, heads, mlp), activations' batch over data × fsdp, their heads/mlp/vocab over tensor;
a dimension a mesh axis does not divide is replicated, as `sharding.logical_to_spec` does):
  resident, all phases: teacher params, AdamW state (optax: mu and nu in the params' dtype, sharded like the params;
    step counts), reference params, student params (train.run keeps all four for the whole run).
  sample:  `sampling.prefill` (the prompt KV cache and one layer's forward temporaries), then `sampling.decode`
    (prompt cache, its heads-first copy, the generation cache, one layer's cache slices, [rows, V] fp32 logits).
  reward:  `rewards.rlt_rewards` on one `reward_micro_batch` part: teacher then student forward, one layer's
    temporaries or the fp32 [rows, chunk, V] log-prob chunks, whichever is larger.
  update:  `train._train_step` on one micro-batch: gradients (plus an accumulator with micro_batches > 1), per-layer
    residuals saved for the backward pass (remat none | dots | full), and the backward of one layer (or of the chunked
    log-prob head): the larger of its MLP and blocked-attention working sets.
The reported total is the peak phase. Per-token counts are buffers of XLA's buffer assignment for this code; the
tests compare them with `memory_analysis()` of the compiled step functions (fp32, XLA:CPU), within 15%.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys

import jax
import numpy as np
from jax.sharding import AbstractMesh

from rlt_jax import grpo, run_setup, sharding, tiny
from rlt_jax.models import qwen2
from rlt_jax.models.config import ModelConfig

MiB, GiB = 2**20, 2**30
F32 = 4


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int   # memory of one JAX device
  note: str


CHIPS = {  # one JAX device = one chip (a TPU v4/v5p chip's two TensorCores are one device)
    "tpu-v4": Chip(32 * GiB, "TPU v4: 32 GiB HBM2 a chip"),
    "tpu-v5e": Chip(16 * GiB, "TPU v5e: 16 GiB HBM2 a chip"),
    "tpu-v5p": Chip(95 * GiB, "TPU v5p: 95 GiB HBM2e a chip; a v5p-N slice counts N TensorCores = N/2 chips"),
    "tpu-v6e": Chip(32 * GiB, "TPU v6e (Trillium): 32 GiB HBM a chip"),
    "a100-40g": Chip(40960 * MiB, "A100 40GB: 40,960 MiB as nvidia-smi reports it"),
    "a100-80g": Chip(81920 * MiB, "A100 80GB: 81,920 MiB (80 GiB) as nvidia-smi reports it"),
    "h100": Chip(81559 * MiB, "H100 SXM 80GB: 81,559 MiB (79.6 GiB) as nvidia-smi reports it"),
    "h200": Chip(143771 * MiB, "H200 141GB: 143,771 MiB (140.4 GiB) as nvidia-smi reports it"),
}

# Published Qwen2.5 config.json values (base and Instruct share them): hidden, intermediate, layers, heads, kv heads,
# vocab, tied embeddings. Every size has rope_theta 1e6 and head_dim = hidden / heads.
QWEN25 = {
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "3b": (2048, 11008, 36, 16, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
    "14b": (5120, 13824, 48, 40, 8, 152064, False),
    "32b": (5120, 27648, 64, 40, 8, 152064, False),
}


def preset_config(name: str) -> ModelConfig:
  D, F, L, H, K, V, tied = QWEN25[name]
  return ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                     head_dim=D // H, rope_theta=1e6, tie_word_embeddings=tied)


def preset_in(text: str) -> str | None:
  """The Qwen2.5 preset a name mentions ("Qwen2.5-7B-Instruct", "rlt_qwen2.5_7b.py" -> "7b"), or None."""
  found = [m.lower() for m in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", text)]
  found = [f + "b" for f in found if f + "b" in QWEN25]
  return found[-1] if found else None


def model_configs(cfg, *, model: str | None = None, config_path: str = "") -> tuple[ModelConfig, ModelConfig, str]:
  """(teacher, student, where the shapes came from), with the config's dtypes and remat."""
  kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
  if model is not None and model.lower() not in QWEN25:
    raise ValueError(f"--model={model!r}: expected one of {sorted(QWEN25)} (Qwen2.5 sizes)")
  if cfg.tiny_models and not cfg.teacher_path and model is None:
    t = cfg.tiny
    c = tiny.tiny_config(t.vocab_size, hidden=t.hidden, layers=t.layers, heads=t.heads, kv_heads=t.kv_heads,
                         intermediate=t.intermediate).replace(**kw)
    return c, c, f"tiny models from config.tiny (vocab {t.vocab_size}, hidden {t.hidden}, {t.layers} layers)"
  out, where = [], []
  for field in ("teacher_path", "student_path"):
    path = cfg[field]
    if path and os.path.isfile(os.path.join(path, "config.json")):
      out.append(ModelConfig.from_hf(path, **kw))
      where.append(f"{field.split('_')[0]} {path}/config.json")
      continue
    name = (model.lower() if model else None) or preset_in(path) or preset_in(cfg.teacher_path) or preset_in(
        config_path)
    if name is None:
      raise ValueError(f"config.{field}={path!r} is not a local HF directory and names no Qwen2.5 size: pass "
                       f"--model (one of {sorted(QWEN25)})")
    out.append(preset_config(name).replace(**kw))
    where.append(f"{field.split('_')[0]} Qwen2.5-{name.upper()} preset")
  return out[0], out[1], ", ".join(where)


# ----------------------------------------------------------------------------------------------------- sharding
def parse_mesh(text: str) -> dict[str, int]:
  """"data=1,fsdp=8,tensor=1" -> sizes of the three mesh axes (missing axes are 1)."""
  sizes = {a: 1 for a in sharding.MESH_AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"--mesh={text!r}: expected axis=size pairs with axes {sharding.MESH_AXES} and sizes >= 1, "
                       f"e.g. data=1,fsdp=8,tensor=1")
    sizes[name] = int(value)
  return sizes


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


@contextlib.contextmanager
def _quiet_sharding():  # replicated params are reported in the plan's notes, not logged once per leaf
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
  """Bytes of one device's shard of the params, as `checkpoint.load_hf(..., mesh=mesh)` places them."""
  with _quiet_sharding():
    sizes = jax.tree.map(lambda names, s: _local_size(s.shape, names, mesh, rules) * s.dtype.itemsize,
                         qwen2.param_logical_axes(config), qwen2.param_shapes(config),
                         is_leaf=lambda x: isinstance(x, tuple))
  return sum(jax.tree.leaves(sizes))


@functools.lru_cache(maxsize=16)
def _opt_state_leaves(config: ModelConfig, grpo_config: grpo.GRPOConfig) -> tuple:
  """(logical axes or None, shape, itemsize) of every AdamW state leaf, from optax's own init traced abstractly."""
  state = jax.eval_shape(grpo.make_optimizer(grpo_config).init, qwen2.param_shapes(config))
  axes = {tuple(k.key for k in path): names for path, names in jax.tree_util.tree_flatten_with_path(
      qwen2.param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))[0]}
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))  # mu/nu mirror the params tree
    names = next((axes[keys[i:]] for i in range(len(keys)) if keys[i:] in axes), None)
    out.append((names, tuple(leaf.shape), leaf.dtype.itemsize))
  return tuple(out)


def opt_state_device_bytes(config: ModelConfig, grpo_config: grpo.GRPOConfig, mesh, rules) -> int:
  """One device's AdamW state as `grpo.init_optimizer_state` lays it out: moment leaves sharded like their params,
  scalars (step counts) replicated."""
  with _quiet_sharding():
    return sum((_local_size(shape, names, mesh, rules) if names else math.prod(shape)) * itemsize
               for names, shape, itemsize in _opt_state_leaves(config, grpo_config))


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
  tied: bool
  layer_params: int  # one layer's params on a device after an fsdp all-gather (split over tensor only)
  fsdp: int


def _local(name: str, n: int, mesh, rules) -> int:
  """One device's share of an activation dimension of size n with logical name `name` (all of it if indivisible)."""
  spec = sharding.logical_to_spec((name,), rules, mesh=mesh, shape=(n,), what="activation")
  return n // math.prod(mesh.shape[a] for a in ((spec[0],) if isinstance(spec[0], str) else spec[0] or ()))


def dims(config: ModelConfig, mesh, rules) -> Dims:
  local = functools.partial(_local, mesh=mesh, rules=rules)
  gathered = AbstractMesh(tuple(1 if a == "fsdp" else mesh.shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  layer = config.replace(num_layers=1)
  with _quiet_sharding():
    per_layer = sum(_local_size(s.shape, n, gathered, rules) for n, s in zip(
        jax.tree.leaves(qwen2.param_logical_axes(layer)["layers"], is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(qwen2.param_shapes(layer)["layers"])))
  return Dims(config.num_layers, config.hidden_size, local("act_mlp", config.intermediate_size),
              local("act_heads", config.num_heads), local("act_kv_heads", config.num_kv_heads), config.head_dim,
              local("act_vocab", config.vocab_size), np.dtype(config.jnp_dtype).itemsize, config.tie_word_embeddings,
              per_layer, mesh.shape["fsdp"])


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
  checkpointed pair of query blocks holds, for each of its n+1 tile steps, four fp32 [C, C] tiles (scores, masked
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
  """Temporaries of `rewards.token_logprobs` (no gradients): the larger of one layer's and the log-prob head's (the
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
  head = chunks + 2 * d.D * d.V * d.c + 2 * tok * d.D * F32
  gather = (3 * d.layer_params + d.D * d.V) * d.c if d.fsdp > 1 else 0  # + a layer's unreduced gradients
  return dict(temp=saved + max(mlp, attention, head) + gather, saved=saved, chunks=chunks)


def sample_bytes(d: Dims, prompts: int, rows: int, P: int, N: int, block: int) -> dict:
  """`sampling.prefill` + `sampling.decode` for `prompts` prompts (on this device) and `rows` = prompts × samples."""
  slot = 2 * d.L * d.K * d.E * d.c
  prompt, gen = slot * prompts * P, slot * rows * max(N - 1, 1)
  prefill = prompt + _layer_forward(d, prompts, P, block) + prompts * d.V * F32
  # decode: the prompt cache (prefill's output), its heads-first copy, the generation cache, one layer's slices of
  # both caches, [rows, V] fp32 logits / scaled logits / log-softmax / sample, tokens and log-probs.
  decode = 2 * prompt + gen + (prompt + gen) // d.L + 4 * rows * d.V * F32 + rows * N * 8
  return dict(kv_cache=prompt + gen, prefill=prefill, decode=decode, temp=max(prefill, decode))


# ------------------------------------------------------------------------------------------------------ the plan
def _check(cfg) -> grpo.GRPOConfig:
  for f in ("batch_size", "group_size", "max_prompt_len", "max_new_tokens", "max_student_len", "logprob_chunk_size"):
    if int(cfg[f]) < 1:
      raise run_setup.ConfigError(f"config.{f}={cfg[f]!r}: must be >= 1")
  if cfg.batch_size % cfg.group_size:
    raise run_setup.ConfigError(f"config.batch_size={cfg.batch_size}: must be a multiple of config.group_size="
                                f"{cfg.group_size}")
  g = run_setup._field("grpo", grpo.GRPOConfig, **cfg.grpo.to_dict())
  if cfg.batch_size % g.micro_batches:
    raise run_setup.ConfigError(f"config.batch_size={cfg.batch_size}: must be divisible by config.grpo.micro_batches="
                                f"{g.micro_batches}")
  return g


def plan(cfg, teacher: ModelConfig, student: ModelConfig, mesh_sizes: dict, device_bytes: int, *,
         usable: float = 0.9, attention_block: int = 512, prompts: int | None = None) -> dict:
  """The per-device plan (bytes) of `cfg` on a `mesh_sizes` mesh of devices with `device_bytes` each.

  `attention_block`: `qwen2.attention_block_size` of the target (512 on accelerators, 64 on CPU). `prompts`:
  prompts in one sampling call (default: the whole step's batch_size / group_size, as `train.rollout` does)."""
  g = _check(cfg)
  rules = sharding.normalize_rules(cfg.sharding_rules or sharding.DEFAULT_RULES)
  mesh = abstract_mesh(mesh_sizes)
  G, block, chunk = cfg.group_size, attention_block, cfg.logprob_chunk_size
  if prompts is None:  # prompts per sampler call and rows per reward call, as train.run splits the step
    prompts = int(cfg.sample_micro_batch) or cfg.batch_size // G
  reward_rows = int(cfg.reward_micro_batch) or cfg.batch_size
  P, N, S = cfg.max_prompt_len, cfg.max_new_tokens, cfg.max_student_len
  td, sd = dims(teacher, mesh, rules), dims(student, mesh, rules)
  resident = dict(params=params_device_bytes(teacher, mesh, rules),
                  opt_state=opt_state_device_bytes(teacher, g, mesh, rules),
                  ref_params=params_device_bytes(teacher, mesh, rules),
                  student_params=params_device_bytes(student, mesh, rules))
  resident_total = sum(resident.values()) + 8  # + step counters
  rows, prompts_dev = _local("batch", cfg.batch_size, mesh, rules), _local("batch", prompts, mesh, rules)
  samp = sample_bytes(td, prompts_dev, _local("batch", prompts * G, mesh, rules), P, N, block)
  fw_rows = _local("batch", reward_rows, mesh, rules)  # one reward micro-batch's rows on a device
  t_fw, s_fw = forward_bytes(td, fw_rows, P + N, block, chunk), forward_bytes(sd, fw_rows, S, block, chunk)
  reward_inputs = rows * ((P + N) * 6 + S * 7 + 1)  # int32 ids, bool masks
  # The two forwards are independent, so XLA may start one while the other runs: allow for the other's embedded
  # input and residual stream (2·D a token) beside each, and the teacher's [rows, P+N] fp32 log-probs.
  stream = lambda d, T: 2 * fw_rows * T * d.D * d.c  # noqa: E731
  reward_temp = max(t_fw["temp"] + stream(sd, S), s_fw["temp"] + stream(td, P + N)) + rows * (P + N) * F32
  if reward_rows < cfg.batch_size:  # in parts (a lax.map), XLA keeps both output kernels live across the loop
    reward_temp += sum(d.D * d.V * d.c for d in (td, sd) if d.tied or d.fsdp > 1)
  mb_rows = _local("batch", cfg.batch_size // g.micro_batches, mesh, rules)
  by_remat = {r: update_bytes(td, mb_rows, P + N, r, block, chunk)
              for r in ("none", "dots", "full")}
  upd = by_remat[cfg.remat]
  grads = resident["params"] * (2 if g.micro_batches > 1 else 1)  # + the scan's accumulator
  # After the backward pass: the gradients, and the clipped gradients and Adam's updates in flight before the
  # non-finite check selects the new state (2.5× the params in XLA's buffer assignment of a step with tiny batches).
  optimizer_step = int(2.5 * resident["params"])
  update_inputs = rows * (P + N) * 9 + rows * F32
  phases = {
      "sample": dict(temp=samp["temp"], inputs=prompts_dev * P * 5, kv_cache=samp["kv_cache"],
                     prefill=samp["prefill"], decode=samp["decode"]),
      "reward": dict(temp=reward_temp, inputs=reward_inputs, teacher_forward=t_fw["temp"],
                     student_forward=s_fw["temp"], logprob_chunks=max(t_fw["chunks"], s_fw["chunks"])),
      "update": dict(temp=max(grads + upd["temp"], optimizer_step), inputs=update_inputs, grads=grads,
                     activations=upd["temp"], saved_residuals=upd["saved"], logprob_chunks=upd["chunks"]),
  }
  for p in phases.values():
    p["total"] = resident_total + p["inputs"] + p["temp"]
  peak = max(phases, key=lambda k: phases[k]["total"])
  total = phases[peak]["total"]
  notes = _notes(cfg, teacher, td, mesh_sizes, prompts, mb_rows, g.micro_batches)
  if peak == "reward" and reward_rows == cfg.batch_size:
    notes.append(f"the reward scores all {cfg.batch_size} rows of a step at once ({rows} a device); set "
                 "config.reward_micro_batch to score them in parts")
  return dict(
      mesh=dict(mesh_sizes), devices=math.prod(mesh_sizes.values()), params_bytes=resident["params"],
      opt_state_bytes=resident["opt_state"], ref_params_bytes=resident["ref_params"],
      student_params_bytes=resident["student_params"], resident_bytes=resident_total, kv_cache_bytes=samp["kv_cache"],
      activation_bytes=upd["temp"], activation_bytes_by_remat={r: v["temp"] for r, v in by_remat.items()},
      logprob_chunk_bytes=max(phases["reward"]["logprob_chunks"], upd["chunks"]), phases=phases, peak_phase=peak,
      total_bytes=total, device_bytes=device_bytes, usable_bytes=int(device_bytes * usable),
      fits=total <= device_bytes * usable, sampling_prompts=prompts, notes=notes)


def _notes(cfg, teacher, td: Dims, mesh_sizes, prompts, mb_rows, micro_batches) -> list[str]:
  notes = []
  df = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if df > 1 and (cfg.batch_size // micro_batches) % df:
    notes.append(f"an update micro-batch has {cfg.batch_size // micro_batches} rows (batch_size / grpo.micro_batches),"
                 f" which data×fsdp={df} does not divide: every device computes all {mb_rows} of them")
  if df > 1 and prompts % df:
    notes.append(f"{prompts} prompts a sampling call do not split over data×fsdp={df}: every device holds every "
                 "prompt's KV cache")
  t = mesh_sizes["tensor"]
  if t > 1 and td.K == teacher.num_kv_heads:
    notes.append(f"num_kv_heads={teacher.num_kv_heads} does not split over tensor={t}: k/v weights and the KV cache "
                 "are replicated over tensor")
  return notes


def max_sampling_prompts(cfg, teacher, student, mesh_sizes, device_bytes, **kw) -> int:
  """The most prompts (each with group_size samples) one sampling call can take on this mesh; 0 if not even one."""
  lo, hi = 0, cfg.batch_size // cfg.group_size
  while lo < hi:  # sampling memory grows with the prompt count
    mid = (lo + hi + 1) // 2
    p = plan(cfg, teacher, student, mesh_sizes, device_bytes, prompts=mid, **kw)
    ok = p["resident_bytes"] + p["phases"]["sample"]["inputs"] + p["phases"]["sample"]["temp"] <= p["usable_bytes"]
    lo, hi = (mid, hi) if ok else (lo, mid - 1)
  return lo


def search_meshes(cfg, teacher, student, device_bytes, *, max_devices: int = 2048, counts: int = 2, **kw):
  """The `counts` smallest power-of-two device counts (≤ max_devices) with a fitting data×fsdp×tensor mesh (tensor
  a power of two dividing num_kv_heads): ([(devices, [(mesh, total_bytes), ...] best first)], the mesh with the
  lowest total of all tried, fitting or not)."""
  found, n, closest = [], 1, None
  tensors = [t for t in (2**i for i in range(12)) if teacher.num_kv_heads % t == 0]
  while n <= max_devices and len(found) < counts:
    fits = []
    for t in (t for t in tensors if n % t == 0):
      for f in (2**i for i in range(int(math.log2(n // t)) + 1)):
        mesh = dict(data=n // t // f, fsdp=f, tensor=t)
        p = plan(cfg, teacher, student, mesh, device_bytes, **kw)
        closest = min(closest or (mesh, p["total_bytes"]), (mesh, p["total_bytes"]), key=lambda x: x[1])
        if p["fits"]:
          fits.append((mesh, p["total_bytes"]))
    if fits:
      found.append((n, sorted(fits, key=lambda x: x[1])))
    n *= 2
  return found, closest


# ------------------------------------------------------------------------------------------------------------ CLI
def report(p: dict, *, header: list[str]) -> str:
  ph = p["phases"]
  s, r, u = ph["sample"], ph["reward"], ph["update"]
  gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
  row = lambda label, b, extra="": f"  {label:<40}{gib(b):>9}  {extra}".rstrip()  # noqa: E731
  by_remat = ", ".join(f"{k} {gib(v)}" for k, v in p["activation_bytes_by_remat"].items())
  lines = header + ["", f"  {'per device':<40}{'GiB':>9}",
                    row("teacher params", p["params_bytes"]),
                    row("AdamW state (mu, nu, count)", p["opt_state_bytes"]),
                    row("reference params", p["ref_params_bytes"]),
                    row("student params", p["student_params_bytes"]),
                    row("resident in every phase", p["resident_bytes"]),
                    row("sample: KV cache", p["kv_cache_bytes"],
                        f"{p['sampling_prompts']} prompts x {p['group_size']} samples in one call"),
                    row("sample: prefill working set", s["prefill"]),
                    row("sample: decode working set", s["decode"], "prompt cache, its copy, generation cache"),
                    row("reward: teacher forward", r["teacher_forward"]),
                    row("reward: student forward", r["student_forward"]),
                    row("reward: log-prob chunk buffers", r["logprob_chunks"], "fp32 [rows, chunk, vocab]"),
                    row("update: gradients", u["grads"]),
                    row(f"update: activations (remat {p['remat']})", u["activations"], f"by remat: {by_remat}"),
                    row("update: of which saved residuals", u["saved_residuals"]),
                    row("update: log-prob chunk buffers", u["logprob_chunks"]),
                    ""]
  lines += [row(f"phase {k} (resident + inputs + working set)", ph[k]["total"]) for k in ph]
  lines.append(f"peak: {p['peak_phase']}, {gib(p['total_bytes'])} GiB of {gib(p['usable_bytes'])} GiB usable "
               f"({gib(p['device_bytes'])} GiB a device): " + ("fits" if p["fits"] else "does NOT fit"))
  k = p["max_sampling_prompts"]
  lines.append(f"largest sampling call that fits: {k} prompts x {p['group_size']} samples = {k * p['group_size']} "
               f"completions (the config samples {p['sampling_prompts'] * p['group_size']} in one call)")
  lines += [f"note: {n}" for n in p["notes"]]
  return "\n".join(lines)


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(cfg, config_path: str, chip: str, mesh: str | None, as_json: bool, model: str | None, usable: float,
         max_devices: int) -> None:
  try:
    if chip not in CHIPS:
      raise ValueError(f"--chip={chip!r}: unknown chip; one of {sorted(CHIPS)}")
    if not 0 < usable <= 1:
      raise ValueError(f"--usable={usable}: must be in (0, 1]")
    if max_devices < 1:
      raise ValueError(f"--max_devices={max_devices}: must be >= 1")
    device = CHIPS[chip].hbm_bytes
    teacher, student, source = model_configs(cfg, model=model, config_path=config_path)
    kw = dict(usable=usable, attention_block=512)  # qwen2.attention_block_size on accelerators
    search = None
    if mesh is None:
      search, closest = search_meshes(cfg, teacher, student, device, max_devices=max_devices, **kw)
      sizes = search[0][1][0][0] if search else closest[0]
    else:
      sizes = parse_mesh(mesh)
    p = plan(cfg, teacher, student, sizes, device, **kw)
  except (ValueError, run_setup.ConfigError) as e:
    sys.exit(f"error: {e}")
  p.update(chip=chip, config=config_path, models=source, remat=cfg.remat, group_size=cfg.group_size,
           max_sampling_prompts=max_sampling_prompts(cfg, teacher, student, sizes, device, **kw),
           teacher_params=qwen2.num_params(qwen2.param_shapes(teacher)),
           student_params=qwen2.num_params(qwen2.param_shapes(student)))
  if search is not None:
    p["mesh_search"] = [dict(devices=n, meshes=[dict(m, total_bytes=t) for m, t in fits]) for n, fits in search]
  if as_json:
    print(json.dumps(p, indent=1))
    return
  mesh_text = " ".join(f"{a}={sizes[a]}" for a in sharding.MESH_AXES)
  header = [f"rlt_jax.plan: {config_path} on {p['devices']} x {chip} (mesh {mesh_text})",
            f"  models: {source}; {_count(p['teacher_params'])} / {_count(p['student_params'])} params, "
            f"params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}",
            f"  chip: {CHIPS[chip].note}; usable {usable:.0%}"]
  if search is not None:
    header.append("  mesh search (powers of two up to %d devices):" % max_devices)
    header += [f"    {n} devices: " + "; ".join(
        f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({t / GiB:.1f} GiB)" for m, t in fits[:4])
        for n, fits in search] or ["    nothing fits; shown: the mesh with the lowest peak"]
  print(report(p, header=header))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py).",
                                            lock_config=True)
  _CHIP = flags.DEFINE_string("chip", None, f"Accelerator: one of {sorted(CHIPS)}.")
  _MESH = flags.DEFINE_string("mesh", None, "data=A,fsdp=B,tensor=C; without it, search the smallest meshes.")
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object (bytes per device).")
  _MODEL = flags.DEFINE_string("model", None, f"Qwen2.5 size when the config's paths are not local: {sorted(QWEN25)}.")
  _USABLE = flags.DEFINE_float("usable", 0.9, "Fraction of a device's memory the run may use (runtime, fragmentation; "
                               "JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says more).")
  _MAX = flags.DEFINE_integer("max_devices", 2048, "Largest device count the mesh search tries.")
  flags.mark_flags_as_required(["config", "chip"])
  app.run(lambda argv: main(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]),
                            _CHIP.value, _MESH.value, _JSON.value, _MODEL.value, _USABLE.value, _MAX.value))
