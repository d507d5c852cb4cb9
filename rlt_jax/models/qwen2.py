"""The Qwen2 / Qwen2.5 and Llama-style decoder as Flax linen modules (tied or untied embeddings, with or without
q/k/v and o biases), and its Hugging Face name map: the built-in family `"qwen2"` (`models.family`).

Pre-norm blocks: x + attn(norm(x)), then + mlp(norm(x)); SwiGLU MLP; grouped-query attention with half-rotation
RoPE. Shape letters: docs/architecture.md's glossary.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models import layers
from rlt_jax.models.config import ModelConfig
from rlt_jax.models.family import Family, HFTensor, register


class Attention(nn.Module):
  """q/k/v/o projections ([D, H, E] kernels, heads kept as an axis so they shard by name) and RoPE."""
  config: ModelConfig

  def setup(self):
    c = self.config
    D, H, K, E = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    qkv = lambda spec, heads, name: layers.Dense(  # noqa: E731
        c, spec, (D, heads, E), ("embed", name, "head_dim"), (name, "head_dim") if c.qkv_bias else None)
    self.q_proj = qkv("btd,dhe->bthe", H, "q_heads")
    self.k_proj = qkv("btd,dke->btke", K, "kv_heads")
    self.v_proj = qkv("btd,dke->btke", K, "kv_heads")
    self.o_proj = layers.Dense(c, "bthe,hed->btd", (H, E, D), ("q_heads", "head_dim", "embed"),
                               ("norm",) if c.o_bias else None)

  def qkv(self, x_BTD, cos_BTE, sin_BTE):
    """Rotated q [B,T,K,Q,E], k [B,T,K,E] and v [B,T,K,E] of the tokens in `x`."""
    q = sharding.constrain(layers.apply_rope(self.q_proj(x_BTD), cos_BTE, sin_BTE),
                           ("batch", "length", "act_heads", None))
    k = sharding.constrain(layers.apply_rope(self.k_proj(x_BTD), cos_BTE, sin_BTE),
                           ("batch", "length", "act_kv_heads", None))
    v = sharding.constrain(self.v_proj(x_BTD), ("batch", "length", "act_kv_heads", None))
    B, T, _, E = q.shape
    return q.reshape(B, T, self.config.num_kv_heads, -1, E), k, v

  def out(self, out_BTHE):
    return self.o_proj(out_BTHE)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) · up(x))."""
  config: ModelConfig

  def setup(self):
    c = self.config
    D, F = c.hidden_size, c.intermediate_size
    self.gate_proj = layers.Dense(c, "btd,df->btf", (D, F), ("embed", "mlp"))
    self.up_proj = layers.Dense(c, "btd,df->btf", (D, F), ("embed", "mlp"))
    self.down_proj = layers.Dense(c, "btf,fd->btd", (F, D), ("mlp", "embed"))

  def __call__(self, x_BTD):
    h = sharding.constrain(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD), ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class Block(nn.Module):
  """One pre-norm decoder layer."""
  config: ModelConfig

  def setup(self):
    self.input_norm = layers.RMSNorm(self.config)
    self.attn = Attention(self.config)
    self.post_attn_norm = layers.RMSNorm(self.config)
    self.mlp = MLP(self.config)

  def layer(self, x_BTD, cos_BTE, sin_BTE, attend):
    """x + attn(norm(x)), then + mlp(norm(x)), with the attention as `attend(q, k, v)`; the new x and this layer's
    rotated k and v (the sampler caches them; the forward drops them)."""
    q, k, v = self.attn.qkv(self.input_norm(x_BTD), cos_BTE, sin_BTE)
    x_BTD = x_BTD + self.attn.out(attend(q, k, v))
    x_BTD = x_BTD + self.mlp(self.post_attn_norm(x_BTD))
    return sharding.constrain(x_BTD, ("batch", "length", "act_embed")), k, v

  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask):
    """The layer with causal self-attention (`mask`: [B, T, S] bool or a `layers.CausalMask`): the scan body."""
    return self.layer(x_BTD, cos_BTE, sin_BTE, functools.partial(layers.self_attention, self.config, mask=mask))[0], None


class Decoder(nn.Module):
  """Embedding, `config.num_layers` `Block`s (one `nn.scan`, remat per `config.remat`), final norm, output head."""
  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed = layers.Embed(c)
    self.layers = layers.scanned_layers(Block, c)
    self.final_norm = layers.RMSNorm(c)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Dense(c, "btd,dv->btv", (c.hidden_size, c.vocab_size), ("embed", "vocab"))

  def __call__(self, ids_BT, mask_BT=None, positions_BT=None, segment_ids_BT=None):
    B, T = ids_BT.shape
    mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
    pos_BT = layers.positions_from_mask(mask_BT) if positions_BT is None else positions_BT
    cos, sin = self.rope(pos_BT)
    x, _ = self.layers(self.embed_tokens(ids_BT), cos, sin, layers.self_attention_mask(self.config, mask_BT,
                                                                                        segment_ids_BT))
    return self.final_norm(x)

  def embed_tokens(self, ids_BT):
    return self.embed(ids_BT)

  def rope(self, positions_BT):
    return layers.rope_cos_sin(positions_BT, self.config.head_dim, self.config.rope_theta)

  def output_kernel(self):
    """The [D, V] output projection (the transposed embedding when tied)."""
    return self.embed.embedding.T if self.config.tie_word_embeddings else self.lm_head.kernel

  def head(self, x_BTD):
    """Logits [B, T, V] of un-normed hidden states, fp32 (accumulated in fp32 whatever the compute dtype)."""
    w = self.output_kernel().astype(self.config.jnp_dtype)
    logits = jnp.einsum("btd,dv->btv", self.final_norm(x_BTD), w, preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
  """Our params <-> transformers' Qwen2ForCausalLM / LlamaForCausalLM tensors (HF's [heads·E, D] q_proj is our
  [D, heads, E] kernel; HF's Linear weights are [out, in], ours [in, out])."""
  H, K, E, D = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
  ident = lambda w: w  # noqa: E731
  tr = lambda w: w.T  # noqa: E731
  L = "model.layers.{}."
  out = [HFTensor(("embed", "embedding"), "model.embed_tokens.weight", False, ident, ident),
         HFTensor(("final_norm", "scale"), "model.norm.weight", False, ident, ident),
         HFTensor(("layers", "input_norm", "scale"), L + "input_layernorm.weight", True, ident, ident),
         HFTensor(("layers", "post_attn_norm", "scale"), L + "post_attention_layernorm.weight", True, ident, ident)]
  for name, heads in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
    out.append(HFTensor(("layers", "attn", name, "kernel"), L + f"self_attn.{name}.weight", True,
                        lambda w, n=heads: w.reshape(n, E, D).transpose(2, 0, 1),
                        lambda a, n=heads: a.transpose(1, 2, 0).reshape(n * E, D)))
    if config.qkv_bias:
      out.append(HFTensor(("layers", "attn", name, "bias"), L + f"self_attn.{name}.bias", True,
                          lambda w, n=heads: w.reshape(n, E), lambda a, n=heads: a.reshape(n * E)))
  out.append(HFTensor(("layers", "attn", "o_proj", "kernel"), L + "self_attn.o_proj.weight", True,
                      lambda w: w.reshape(D, H, E).transpose(1, 2, 0),
                      lambda a: a.transpose(2, 0, 1).reshape(D, H * E)))
  if config.o_bias:
    out.append(HFTensor(("layers", "attn", "o_proj", "bias"), L + "self_attn.o_proj.bias", True, ident, ident))
  for name in ("gate_proj", "up_proj", "down_proj"):
    out.append(HFTensor(("layers", "mlp", name, "kernel"), L + f"mlp.{name}.weight", True, tr, tr))
  if not config.tie_word_embeddings:
    out.append(HFTensor(("lm_head", "kernel"), "lm_head.weight", False, tr, tr))
  return out


FAMILY = register(Family("qwen2", Decoder, Block, hf_tensors))
