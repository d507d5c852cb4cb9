"""The pieces every decoder family is built from: the math as pure functions (RMSNorm, RoPE, grouped-query attention,
the blocked causal attention) and the Flax linen modules that hold params (`RMSNorm`, `Dense`, `Embed`).

Each module's params carry logical axis names (`nn.with_logical_partitioning`); the config's rules map them to the
mesh (`sharding.tree_shardings`). Weights are stored in `param_dtype` and cast to the compute `dtype` where they are
used. Shape letters: docs/architecture.md's glossary (in attention T queries, S keys; C tokens of a tile, X tiles).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models.config import ModelConfig

INIT_STD = 0.02  # normal(std) weights, as HF's `initializer_range`

# --------------------------------------------------------------------------------------------------------- the math
def rms_norm(x, scale, eps: float):
  """RMSNorm in fp32, cast back before the scale (as transformers' Qwen2RMSNorm does)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(positions_BT, head_dim: int, theta: float):
  """cos/sin tables [B, T, E] (fp32) for the half-rotation RoPE layout used by Qwen2 and Llama."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTHE, cos_BTE, sin_BTE):
  x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x_BTHE.astype(jnp.float32) * cos_BTE[:, :, None] + rotated * sin_BTE[:, :, None]
  return out.astype(x_BTHE.dtype)


def attention(q_BTKQE, k_BSKE, v_BSKE, mask_BTS, implementation: str | None = None):
  """Grouped-query softmax attention (logits and softmax in fp32). `mask` is True where a key is visible.

  `implementation` is passed to `jax.nn.dot_product_attention` (None: XLA; "cudnn": fused flash attention on GPU).
  A query row with no visible key (a padding token) gets a finite uniform softmax, never NaN.
  """
  B, T, K, Q, E = q_BTKQE.shape
  out = jax.nn.dot_product_attention(q_BTKQE.reshape(B, T, K * Q, E), k_BSKE, v_BSKE, mask=mask_BTS[:, None],
                                     implementation=implementation)
  return out


class CausalMask(NamedTuple):
  """Causal self-attention visibility, stored in O(T): query t sees key s iff s <= t (index order), key s is a real
  token, and (with segment ids) t and s are in the same segment. `blocked_attention` builds each [B, C, C] tile of
  it on the fly, so a [B, T, T] array never exists."""
  valid_BT: jax.Array                 # bool, True on real tokens
  segment_ids_BT: jax.Array | None    # int, or None for one segment per row


def _visible_BTS(mask: CausalMask, qidx_T, seg_BT):
  kidx_S = jnp.arange(mask.valid_BT.shape[1])
  vis = (qidx_T[:, None] >= kidx_S[None, :])[None] & mask.valid_BT[:, None, :]
  if mask.segment_ids_BT is not None:
    vis = vis & (seg_BT[:, :, None] == mask.segment_ids_BT[:, None, :])
  return vis


def blocked_attention(q_BTKQE, k_BTKE, v_BTKE, mask: CausalMask, block_size: int):
  """Causal self-attention (`attention`'s math) in [C, C] tiles (C = `block_size`), skipping the causal future.

  Memory: the sequence is cut into X blocks (X even; the tail is padded with dummy queries and invalid keys) and
  the score tiles [B, K, Q, C, C] are folded into the running max / sum / output of an online softmax, with each
  tile's visibility built from `mask` inside the step. So no [B, T, T] array exists, and under autodiff the only
  per-tile residuals are those of one pair of query blocks at a time (the pair body is under `jax.checkpoint`):
  O(C·T) per head. Time: query block i needs key blocks 0..i only. Pairing query block p with X−1−p gives every
  pair exactly X+1 tiles, so a static `lax.map` over the X/2 pairs with a `lax.scan` over X+1 tiles computes the
  X(X+1)/2 lower-triangle tiles and nothing above the diagonal (no `lax.cond`, no dynamic shapes).

  Scores and softmax are fp32; a masked score is the same large finite negative number `jax.nn.dot_product_attention`
  uses, so a query row with no visible key (padding) gets a finite uniform average over the keys of its tiles,
  never NaN (NaNs in padding rows would reach real rows through 0·NaN in later layers). Rows with a visible key
  match `attention` with the dense mask up to fp32 rounding.
  """
  B, T, K, Q, E = q_BTKQE.shape
  C = min(int(block_size), T)
  X = 2 * -(-T // (2 * C))
  pairs = X // 2
  pad = X * C - T

  def blocks(x, fill=0):  # [B, T, ...] -> [X, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(B, X, C, *x.shape[2:]).swapaxes(0, 1)

  # Heads before positions once here, so that every tile's two einsums are plain batched matmuls (no transposes).
  q_XBKQCE = blocks(q_BTKQE).transpose(0, 1, 3, 4, 2, 5)
  k_XBKCE, v_XBKCE = (blocks(x).transpose(0, 1, 3, 2, 4) for x in (k_BTKE, v_BTKE))
  valid_XBC = blocks(mask.valid_BT, False)
  seg_XBC = None if mask.segment_ids_BT is None else blocks(mask.segment_ids_BT, -1)
  scale = jnp.asarray(1.0 / math.sqrt(E), jnp.float32)
  masked = jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, jnp.float32)
  arange_C = jnp.arange(C)

  @jax.checkpoint
  def pair(p):
    """Query blocks p and X-1-p: running max, sum and output of both, stacked on a leading axis of 2."""

    def tile(carry, t):
      is_a = t <= p                   # tiles 0..p: block p vs key blocks 0..p; then block X-1-p vs 0..X-1-p
      ab = jnp.where(is_a, 0, 1)
      qi, kj = jnp.where(is_a, p, X - 1 - p), jnp.where(is_a, t, t - p - 1)
      vis_BCS = (((qi * C + arange_C)[:, None] >= (kj * C + arange_C)[None, :])[None]
                 & valid_XBC[kj][:, None, :])
      if seg_XBC is not None:
        vis_BCS = vis_BCS & (seg_XBC[qi][:, :, None] == seg_XBC[kj][:, None, :])
      s = jnp.einsum("bkqte,bkse->bkqts", q_XBKQCE[qi], k_XBKCE[kj], preferred_element_type=jnp.float32) * scale
      s = jnp.where(vis_BCS[:, None, None], s, masked)
      m_old, l_old, acc_old = (x[ab] for x in carry)
      m_new = jnp.maximum(m_old, s.max(axis=-1))
      w = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m_old - m_new)
      acc_new = acc_old * corr[..., None] + jnp.einsum("bkqts,bkse->bkqte", w.astype(v_BTKE.dtype), v_XBKCE[kj],
                                                       preferred_element_type=jnp.float32)
      new = (m_new, l_old * corr + w.sum(axis=-1), acc_new)
      return tuple(x.at[ab].set(y) for x, y in zip(carry, new)), None

    init = (jnp.full((2, B, K, Q, C), masked), jnp.zeros((2, B, K, Q, C), jnp.float32),
            jnp.zeros((2, B, K, Q, C, E), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(tile, init, jnp.arange(X + 1))
    return (acc / l[..., None]).astype(v_BTKE.dtype)   # [2, B, K, Q, C, E]

  out_pairs = jax.lax.map(pair, jnp.arange(pairs))
  out_XBKQCE = jnp.concatenate([out_pairs[:, 0], out_pairs[::-1, 1]], axis=0)
  out_BTHE = out_XBKQCE.transpose(1, 0, 4, 2, 3, 5).reshape(B, X * C, K * Q, E)[:, :T]
  return sharding.constrain(out_BTHE, ("batch", "length", "act_heads", None))


def attention_block_size(config: ModelConfig) -> int:
  """`config.attention_block`, or when None the default of the backend: on CPU, 64-row tiles stay in cache (2.5x
  faster than the dense softmax at B=64, T=512); on GPU/TPU each tile is a loop step, so bigger tiles, fewer steps."""
  if config.attention_block is not None:
    return config.attention_block
  return 64 if jax.default_backend() == "cpu" else 512


def self_attention(config: ModelConfig, q_BTKQE, k_BTKE, v_BTKE, mask):
  """`blocked_attention` for a `CausalMask`, else `attention` with a dense [B, T, S] bool mask."""
  if isinstance(mask, CausalMask):
    return blocked_attention(q_BTKQE, k_BTKE, v_BTKE, mask, attention_block_size(config))
  return attention(q_BTKQE, k_BTKE, v_BTKE, mask, implementation=config.attention_impl)




def self_attention_mask(config: ModelConfig, mask_BT, segment_ids_BT=None):
  """The mask `self_attention` takes for these tokens: a `CausalMask` (blocked attention, O(T) to store) when the
  sequence is longer than one block and no fused kernel is configured, else the dense [B, T, T] bool mask."""
  mask = CausalMask(mask_BT, segment_ids_BT)
  T = mask_BT.shape[1]
  if T <= attention_block_size(config) or config.attention_impl is not None:
    return _visible_BTS(mask, jnp.arange(T), segment_ids_BT)
  return mask


def positions_from_mask(mask_BT):
  """0, 1, 2, ... over the real tokens of each row (padding on either side gets a clamped position)."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------------------------------------- param modules
def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str]):
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      module.config.jnp_param_dtype)


class RMSNorm(nn.Module):
  """`rms_norm` with a learned scale (param `scale`, logical axis "norm")."""
  config: ModelConfig

  def setup(self):
    self.scale = _param(self, "scale", nn.initializers.ones, (self.config.hidden_size,), ("norm",))

  def __call__(self, x):
    return rms_norm(x, self.scale, self.config.rms_norm_eps)


class Dense(nn.Module):
  """`einsum(spec, x, kernel)` (+ bias over the kernel's last `len(bias_axes)` dims), the kernel cast to the
  compute dtype where it is used. `kernel_axes` name the kernel's dims; `bias_axes` (None: no bias) the bias's."""
  config: ModelConfig
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...] | None = None

  def setup(self):
    self.kernel = _param(self, "kernel", nn.initializers.normal(INIT_STD), self.kernel_shape, self.kernel_axes)
    if self.bias_axes is not None:
      self.bias = _param(self, "bias", nn.initializers.zeros, self.kernel_shape[-len(self.bias_axes):],
                         self.bias_axes)

  def __call__(self, x):
    dt = self.config.jnp_dtype
    y = jnp.einsum(self.spec, x, self.kernel.astype(dt))
    if self.bias_axes is not None:
      y = y + self.bias.astype(dt)
    return y


class Embed(nn.Module):
  """The token embedding table [V, D] (param `embedding`)."""
  config: ModelConfig

  def setup(self):
    c = self.config
    self.embedding = _param(self, "embedding", nn.initializers.normal(INIT_STD), (c.vocab_size, c.hidden_size),
                            ("vocab", "embed"))

  def __call__(self, ids_BT):
    # The table is sharded [vocab: tensor, embed: fsdp] and the ids on batch (which also uses fsdp). Gathered as is,
    # the output comes out embed-sharded on fsdp and XLA can only reach batch-on-fsdp by replicating everything
    # ("Involuntary full rematerialization"). All-gathering the embed axis first (what FSDP does to every weight
    # before use) leaves a vocab-parallel lookup: each tensor shard gathers the rows it holds, zeros elsewhere, and
    # one all-reduce sums them.
    table_VD = sharding.constrain(self.embedding, ("vocab", None))
    x = jnp.take(table_VD, ids_BT, axis=0).astype(self.config.jnp_dtype)
    return sharding.constrain(x, ("batch", "length", "act_embed"))


CHECKPOINT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def scanned_layers(block: type[nn.Module], config: ModelConfig) -> nn.Module:
  """`config.num_layers` copies of `block` as one `nn.scan` (compile time independent of depth), their params
  stacked on a leading "layers" axis, each layer under `nn.remat` with `config.remat`'s policy (none: no remat).
  The layer is called as `block(config)(x, *broadcast) -> (x, None)`."""
  if config.remat != "none":
    block = nn.remat(block, policy=CHECKPOINT_POLICIES[config.remat])
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                 length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(config)
