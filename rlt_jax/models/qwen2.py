"""A pure-functional Qwen2-family decoder (Qwen2, Qwen2.5, Llama-style configs).

Params are a plain nested dict. Per-layer weights are stacked on a leading `layers` axis so the decoder is one
`lax.scan` (compile time independent of depth). Shape suffixes: B batch, T query length, S key length, D hidden,
H query heads, K kv heads, G = H/K query heads per kv head, E head dim, F MLP width, V vocab, L layers.
"""
from __future__ import annotations

import functools

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


def apply_rope(x_BTNE, cos_BTE, sin_BTE):
  x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x_BTNE.astype(jnp.float32) * cos_BTE[:, :, None] + rotated * sin_BTE[:, :, None]
  return out.astype(x_BTNE.dtype)


def _dense(x, p, spec: str, dtype):
  y = jnp.einsum(spec, x, p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


def project_qkv(config: ModelConfig, attn_params, x_BTD, cos_BTE, sin_BTE):
  """Rotated q [B,T,K,G,E], k [B,T,K,E] and v [B,T,K,E] of the tokens in `x`."""
  dt = config.jnp_dtype
  q = _dense(x_BTD, attn_params["q_proj"], "btd,dhe->bthe", dt)
  k = _dense(x_BTD, attn_params["k_proj"], "btd,dke->btke", dt)
  v = _dense(x_BTD, attn_params["v_proj"], "btd,dke->btke", dt)
  q = sharding.constrain(apply_rope(q, cos_BTE, sin_BTE), ("batch", "length", "act_heads", None))
  k = sharding.constrain(apply_rope(k, cos_BTE, sin_BTE), ("batch", "length", "act_kv_heads", None))
  v = sharding.constrain(v, ("batch", "length", "act_kv_heads", None))
  B, T, _, E = q.shape
  return q.reshape(B, T, config.num_kv_heads, -1, E), k, v


def attention(q_BTKGE, k_BSKE, v_BSKE, mask_BTS, implementation: str | None = None):
  """Grouped-query softmax attention (logits and softmax in fp32). `mask` is True where a key is visible.

  `implementation` is passed to `jax.nn.dot_product_attention` (None: XLA; "cudnn": fused flash attention on GPU).
  A query row with no visible key (a padding token) gets a finite uniform softmax, never NaN.
  """
  B, T, K, G, E = q_BTKGE.shape
  out = jax.nn.dot_product_attention(q_BTKGE.reshape(B, T, K * G, E), k_BSKE, v_BSKE, mask=mask_BTS[:, None],
                                     implementation=implementation)
  return out


def attention_output(config: ModelConfig, attn_params, out_BTHE):
  return _dense(out_BTHE, attn_params["o_proj"], "bthe,hed->btd", config.jnp_dtype)


def mlp(config: ModelConfig, p, x_BTD):
  dt = config.jnp_dtype
  gate = jnp.einsum("btd,df->btf", x_BTD, p["gate_proj"]["kernel"].astype(dt))
  up = jnp.einsum("btd,df->btf", x_BTD, p["up_proj"]["kernel"].astype(dt))
  h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
  return jnp.einsum("btf,fd->btd", h, p["down_proj"]["kernel"].astype(dt))


def decoder_layer(config: ModelConfig, lp, x_BTD, cos_BTE, sin_BTE, mask_BTS):
  """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""
  h = rms_norm(x_BTD, lp["input_norm"]["scale"], config.rms_norm_eps)
  q, k, v = project_qkv(config, lp["attn"], h, cos_BTE, sin_BTE)
  out = attention(q, k, v, mask_BTS, implementation=config.attention_impl)
  x_BTD = x_BTD + attention_output(config, lp["attn"], out)
  h = rms_norm(x_BTD, lp["post_attn_norm"]["scale"], config.rms_norm_eps)
  x_BTD = x_BTD + mlp(config, lp["mlp"], h)
  return sharding.constrain(x_BTD, ("batch", "length", "act_embed"))


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
  x = jnp.take(params["embed"]["embedding"], ids_BT, axis=0).astype(config.jnp_dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def forward_hidden(config: ModelConfig, params, input_ids, attention_mask=None, *, positions=None,
                   segment_ids=None):
  """Final-normed hidden states [B, T, D] in the compute dtype.

  `attention_mask` is 1 on real tokens (padding may be left or right); positions come from it unless given.
  `segment_ids` (packed sequences) restrict attention to tokens of the same segment.
  """
  ids_BT = jnp.asarray(input_ids, jnp.int32)
  B, T = ids_BT.shape
  mask_BT = jnp.ones((B, T), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  pos_BT = positions_from_mask(mask_BT) if positions is None else jnp.asarray(positions, jnp.int32)
  idx = jnp.arange(T)
  visible_BTS = (idx[None, :, None] >= idx[None, None, :]) & mask_BT[:, None, :]
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    visible_BTS = visible_BTS & (seg[:, :, None] == seg[:, None, :])
  cos, sin = rope_cos_sin(pos_BT, config.head_dim, config.rope_theta)

  layer = remat(config, functools.partial(decoder_layer, config))

  def body(x, lp):
    return layer(lp, x, cos, sin, visible_BTS), None

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
