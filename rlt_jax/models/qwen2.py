"""A pure-functional Qwen2-family decoder (Qwen2, Qwen2.5, Llama-style configs).

Params are a plain nested dict. Per-layer weights are stacked on a leading `layers` axis so the decoder is one
`lax.scan` (compile time independent of depth). Shape letters: docs/architecture.md's glossary
(in attention T queries, S keys; C tokens of a tile, X tiles).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------------------- params
def param_logical_axes(config: ModelConfig) -> dict:
  """The params tree with, at each leaf, the tuple of logical axis names of that array."""
  attn = {
      "q_proj": {"kernel": ("layers", "embed", "q_heads", "head_dim")},
      "k_proj": {"kernel": ("layers", "embed", "kv_heads", "head_dim")},
      "v_proj": {"kernel": ("layers", "embed", "kv_heads", "head_dim")},
      "o_proj": {"kernel": ("layers", "q_heads", "head_dim", "embed")},
  }
  if config.qkv_bias:
    attn["q_proj"]["bias"] = ("layers", "q_heads", "head_dim")
    attn["k_proj"]["bias"] = ("layers", "kv_heads", "head_dim")
    attn["v_proj"]["bias"] = ("layers", "kv_heads", "head_dim")
  if config.o_bias:
    attn["o_proj"]["bias"] = ("layers", "norm")
  tree = {
      "embed": {"embedding": ("vocab", "embed")},
      "layers": {
          "input_norm": {"scale": ("layers", "norm")},
          "attn": attn,
          "post_attn_norm": {"scale": ("layers", "norm")},
          "mlp": {
              "gate_proj": {"kernel": ("layers", "embed", "mlp")},
              "up_proj": {"kernel": ("layers", "embed", "mlp")},
              "down_proj": {"kernel": ("layers", "mlp", "embed")},
          },
      },
      "final_norm": {"scale": ("norm",)},
  }
  if not config.tie_word_embeddings:
    tree["lm_head"] = {"kernel": ("embed", "vocab")}
  return tree


def _dims(config: ModelConfig) -> dict[str, int]:
  return {"layers": config.num_layers, "embed": config.hidden_size, "norm": config.hidden_size,
          "q_heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "mlp": config.intermediate_size, "vocab": config.vocab_size}


def param_shapes(config: ModelConfig) -> dict:
  """ShapeDtypeStructs of every param (no allocation)."""
  dims = _dims(config)
  return jax.tree.map(lambda names: jax.ShapeDtypeStruct(tuple(dims[n] for n in names), config.jnp_param_dtype),
                      param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))


def init_params(config: ModelConfig, rng: jax.Array, std: float = 0.02) -> dict:
  """Random params (normal(std) weights, zero biases, unit norms). Works under `jax.eval_shape`."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, s), key in zip(leaves, keys):
    kind = path[-1].key
    if kind == "scale":
      out.append(jnp.ones(s.shape, s.dtype))
    elif kind == "bias":
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      out.append((std * jax.random.normal(key, s.shape, jnp.float32)).astype(s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def num_params(params_or_shapes) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params_or_shapes))


# ------------------------------------------------------------------------------------------------------- components
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


def _dense(x, p, spec: str, dtype):
  y = jnp.einsum(spec, x, p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


def project_qkv(config: ModelConfig, attn_params, x_BTD, cos_BTE, sin_BTE):
  """Rotated q [B,T,K,Q,E], k [B,T,K,E] and v [B,T,K,E] of the tokens in `x`."""
  dt = config.jnp_dtype
  q = _dense(x_BTD, attn_params["q_proj"], "btd,dhe->bthe", dt)
  k = _dense(x_BTD, attn_params["k_proj"], "btd,dke->btke", dt)
  v = _dense(x_BTD, attn_params["v_proj"], "btd,dke->btke", dt)
  q = sharding.constrain(apply_rope(q, cos_BTE, sin_BTE), ("batch", "length", "act_heads", None))
  k = sharding.constrain(apply_rope(k, cos_BTE, sin_BTE), ("batch", "length", "act_kv_heads", None))
  v = sharding.constrain(v, ("batch", "length", "act_kv_heads", None))
  B, T, _, E = q.shape
  return q.reshape(B, T, config.num_kv_heads, -1, E), k, v


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


def attention_output(config: ModelConfig, attn_params, out_BTHE):
  return _dense(out_BTHE, attn_params["o_proj"], "bthe,hed->btd", config.jnp_dtype)


def mlp(config: ModelConfig, p, x_BTD):
  dt = config.jnp_dtype
  gate = jnp.einsum("btd,df->btf", x_BTD, p["gate_proj"]["kernel"].astype(dt))
  up = jnp.einsum("btd,df->btf", x_BTD, p["up_proj"]["kernel"].astype(dt))
  h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
  return jnp.einsum("btf,fd->btd", h, p["down_proj"]["kernel"].astype(dt))


def decoder_block(config: ModelConfig, lp, x_BTD, cos_BTE, sin_BTE, attend):
  """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)), with the attention as `attend(q, k, v)`.

  Returns the new x and this block's rotated k and v (the sampler caches them; `forward` drops them)."""
  h = rms_norm(x_BTD, lp["input_norm"]["scale"], config.rms_norm_eps)
  q, k, v = project_qkv(config, lp["attn"], h, cos_BTE, sin_BTE)
  x_BTD = x_BTD + attention_output(config, lp["attn"], attend(q, k, v))
  h = rms_norm(x_BTD, lp["post_attn_norm"]["scale"], config.rms_norm_eps)
  x_BTD = x_BTD + mlp(config, lp["mlp"], h)
  return sharding.constrain(x_BTD, ("batch", "length", "act_embed")), k, v


def decoder_layer(config: ModelConfig, lp, x_BTD, cos_BTE, sin_BTE, mask):
  """`decoder_block` with causal self-attention. `mask`: [B, T, S] bool or a `CausalMask`."""
  return decoder_block(config, lp, x_BTD, cos_BTE, sin_BTE, lambda q, k, v: self_attention(config, q, k, v, mask))[0]


def self_attention_mask(config: ModelConfig, mask_BT, segment_ids_BT=None):
  """The mask `self_attention` takes for these tokens: a `CausalMask` (blocked attention, O(T) to store) when the
  sequence is longer than one block and no fused kernel is configured, else the dense [B, T, T] bool mask."""
  mask = CausalMask(mask_BT, segment_ids_BT)
  T = mask_BT.shape[1]
  if T <= attention_block_size(config) or config.attention_impl is not None:
    return _visible_BTS(mask, jnp.arange(T), segment_ids_BT)
  return mask


def remat(config: ModelConfig, fn):
  """Wraps a per-layer function in activation checkpointing as `config.remat` says."""
  if config.remat == "none":
    return fn
  policy = (jax.checkpoint_policies.nothing_saveable if config.remat == "full"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.checkpoint(fn, policy=policy)


# ---------------------------------------------------------------------------------------------------------- forward
def positions_from_mask(mask_BT):
  """0, 1, 2, ... over the real tokens of each row (padding on either side gets a clamped position)."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def embed_tokens(config: ModelConfig, params, ids_BT):
  # The table is sharded [vocab: tensor, embed: fsdp] and the ids on batch (which also uses fsdp). Gathered as is, the
  # output comes out embed-sharded on fsdp and XLA can only reach batch-on-fsdp by replicating everything ("Involuntary
  # full rematerialization"). All-gathering the embed axis first (what FSDP does to every weight before use) leaves a
  # vocab-parallel lookup: each tensor shard gathers the rows it holds, zeros elsewhere, and one all-reduce sums them.
  table_VD = sharding.constrain(params["embed"]["embedding"], ("vocab", None))
  x = jnp.take(table_VD, ids_BT, axis=0).astype(config.jnp_dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def forward_hidden(config: ModelConfig, params, input_ids, attention_mask=None, *, positions=None,
                   segment_ids=None):
  """Final-normed hidden states [B, T, D] in the compute dtype.

  `attention_mask` is 1 on real tokens (padding may be left or right); positions come from it unless given.
  `segment_ids` (packed sequences) restrict attention to tokens of the same segment.
  Sequences longer than `attention_block_size(config)` use `blocked_attention` (memory O(block·T), not O(T²))
  unless `config.attention_impl` names a fused kernel; shorter ones use one dense masked softmax.
  """
  ids_BT = jnp.asarray(input_ids, jnp.int32)
  B, T = ids_BT.shape
  mask_BT = jnp.ones((B, T), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  pos_BT = positions_from_mask(mask_BT) if positions is None else jnp.asarray(positions, jnp.int32)
  seg_BT = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  mask = self_attention_mask(config, mask_BT, seg_BT)
  cos, sin = rope_cos_sin(pos_BT, config.head_dim, config.rope_theta)

  layer = remat(config, functools.partial(decoder_layer, config))

  def body(x, lp):
    return layer(lp, x, cos, sin, mask), None

  x, _ = jax.lax.scan(body, embed_tokens(config, params, ids_BT), params["layers"])
  return rms_norm(x, params["final_norm"]["scale"], config.rms_norm_eps)


def output_kernel(config: ModelConfig, params):
  """The [D, V] output projection (the transposed embedding when tied)."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def lm_head(config: ModelConfig, params, hidden_BTD):
  """Logits [B, T, V] in fp32 (accumulated in fp32 whatever the compute dtype)."""
  w = output_kernel(config, params).astype(config.jnp_dtype)
  logits = jnp.einsum("btd,dv->btv", hidden_BTD, w, preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def forward(config: ModelConfig, params, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
  """Logits [B, T, V] (fp32). See `forward_hidden` for the arguments."""
  h = forward_hidden(config, params, input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
  return lm_head(config, params, h)
