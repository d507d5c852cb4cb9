"""The baseline of bench/forward.py and bench/sampling.py: the decoder as it was before the Flax modules (rlt_jax
0.x up to the Flax port), plain functions over the params dict with one `lax.scan`, registered as the family
"functional" so the same sampler and log-prob code runs it. Same params tree and math (`models.layers`); only the
module machinery differs, which is what the benches measure. Kept while the comparison is of interest.

  config.replace(family="functional")   # the same params, run by these functions
"""
import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models import layers, qwen2
from rlt_jax.models.family import Family, register


def _dense(x, p, spec: str, dtype):
  y = jnp.einsum(spec, x, p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


def decoder_block(config, lp, x_BTD, cos_BTE, sin_BTE, attend):
  dt = config.jnp_dtype
  h = layers.rms_norm(x_BTD, lp["input_norm"]["scale"], config.rms_norm_eps)
  a = lp["attn"]
  q = _dense(h, a["q_proj"], "btd,dhe->bthe", dt)
  k = _dense(h, a["k_proj"], "btd,dke->btke", dt)
  v = _dense(h, a["v_proj"], "btd,dke->btke", dt)
  q = sharding.constrain(layers.apply_rope(q, cos_BTE, sin_BTE), ("batch", "length", "act_heads", None))
  k = sharding.constrain(layers.apply_rope(k, cos_BTE, sin_BTE), ("batch", "length", "act_kv_heads", None))
  v = sharding.constrain(v, ("batch", "length", "act_kv_heads", None))
  B, T, _, E = q.shape
  out = attend(q.reshape(B, T, config.num_kv_heads, -1, E), k, v)
  x_BTD = x_BTD + _dense(out, a["o_proj"], "bthe,hed->btd", dt)
  h = layers.rms_norm(x_BTD, lp["post_attn_norm"]["scale"], config.rms_norm_eps)
  m = lp["mlp"]
  gate = jnp.einsum("btd,df->btf", h, m["gate_proj"]["kernel"].astype(dt))
  up = jnp.einsum("btd,df->btf", h, m["up_proj"]["kernel"].astype(dt))
  g = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
  x_BTD = x_BTD + jnp.einsum("btf,fd->btd", g, m["down_proj"]["kernel"].astype(dt))
  return sharding.constrain(x_BTD, ("batch", "length", "act_embed")), k, v


def embed_tokens(config, params, ids_BT):
  table_VD = sharding.constrain(params["embed"]["embedding"], ("vocab", None))
  x = jnp.take(table_VD, ids_BT, axis=0).astype(config.jnp_dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed"))


def forward_hidden(config, params, ids_BT, mask_BT=None, pos_BT=None, seg_BT=None):
  B, T = ids_BT.shape
  mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT
  pos_BT = layers.positions_from_mask(mask_BT) if pos_BT is None else pos_BT
  mask = layers.self_attention_mask(config, mask_BT, seg_BT)
  cos, sin = layers.rope_cos_sin(pos_BT, config.head_dim, config.rope_theta)

  def one(lp, x, cos, sin, mask):
    return decoder_block(config, lp, x, cos, sin, lambda q, k, v: layers.self_attention(config, q, k, v, mask))[0]

  if config.remat != "none":
    one = jax.checkpoint(one, policy=layers.CHECKPOINT_POLICIES[config.remat])
  x, _ = jax.lax.scan(lambda x, lp: (one(lp, x, cos, sin, mask), None), embed_tokens(config, params, ids_BT),
                      params["layers"])
  return layers.rms_norm(x, params["final_norm"]["scale"], config.rms_norm_eps)


def output_kernel(config, params):
  return params["embed"]["embedding"].T if config.tie_word_embeddings else params["lm_head"]["kernel"]


def head(config, params, x_BTD):
  h = layers.rms_norm(x_BTD, params["final_norm"]["scale"], config.rms_norm_eps)
  logits = jnp.einsum("btd,dv->btv", h, output_kernel(config, params).astype(config.jnp_dtype),
                      preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("batch", "length", "act_vocab"))


class _Functions:
  """Stands where a linen module would (`apply(variables, *args, method=...)`), calling the functions above."""

  def __init__(self, config):
    self.config = config

  def apply(self, variables, *args, method="__call__", **kw):
    params = variables.get("params")
    if method == "rope":
      return layers.rope_cos_sin(args[0], self.config.head_dim, self.config.rope_theta)
    if method == "layer":
      return decoder_block(self.config, params, *args)
    fn = {"__call__": forward_hidden, "embed_tokens": embed_tokens, "output_kernel": output_kernel,
          "head": head}[method]
    return fn(self.config, params, *args, **kw)


FAMILY = register(Family("functional", _Functions, _Functions, qwen2.hf_tensors))


def functional(config):
  """The same model run by these functions."""
  return config.replace(family="functional")
