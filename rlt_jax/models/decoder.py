"""A decoder of any registered family (`models.family`) as functions of (config, params, ...): what the sampler,
the reward, GRPO, SFT, the planner and checkpoints call. Each applies the family's Flax module to a plain params
pytree (`module.apply({"params": params}, ...)`), so params stay nested dicts of arrays that optax, orbax and the
sharding rules use as they are. The tree, its shapes and its logical axes come from the module's own init, traced
abstractly (`jax.eval_shape`), once per config.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models import qwen2  # noqa: F401  registers the built-in family
from rlt_jax.models.config import ModelConfig
from rlt_jax.models.family import Family, family_of
from rlt_jax.models.layers import (  # noqa: F401  the attention helpers callers pick masks and tiles with
    attention_block_size,
    positions_from_mask,
    self_attention,
    self_attention_mask,
)


def _apply(config: ModelConfig, params, *args, method, **kw):
  return family_of(config).decoder(config).apply({"params": params}, *args, method=method, **kw)


# ----------------------------------------------------------------------------------------------------------- params
@functools.lru_cache(maxsize=64)
def _traced_init(config: ModelConfig, family: Family):
  """The module's params as `nn.LogicallyPartitioned` boxes of ShapeDtypeStructs and their logical axes, from the
  module's own init traced abstractly: no device is touched (the planner runs on machines without accelerators, or
  beside a job that holds them) and nothing is allocated. Every param must name each of its dimensions."""
  # attention_block set: the default asks jax.default_backend(), which would start the backend (shapes don't use it).
  module = family.decoder(config.replace(attention_block=1))
  # The forward and the output projection between them touch every param (`__call__` alone misses an untied head).
  every_param = lambda m, ids: (m(ids), m.output_kernel())  # noqa: E731
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                             method=every_param))["params"]
  axes = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for (path, names), shape in zip(jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_names)[0],
                                  jax.tree.leaves(nn.unbox(boxed))):
    if len(names) != len(shape.shape):
      where = "/".join(str(k.key) for k in path)
      raise ValueError(f"model family {config.family!r}: param {where} {shape.shape} has logical axes {names}; "
                       "create every param with nn.with_logical_partitioning(init, names), one name a dimension")
  return boxed, axes


def _is_names(x) -> bool:
  return isinstance(x, tuple)


def param_logical_axes(config: ModelConfig) -> dict:
  """The params tree with, at each leaf, the tuple of logical axis names the module gave that array."""
  return jax.tree.map(tuple, _traced_init(config, family_of(config))[1], is_leaf=_is_names)  # a copy of the cached


def param_shapes(config: ModelConfig) -> dict:
  """ShapeDtypeStructs of every param (no allocation)."""
  return nn.unbox(_traced_init(config, family_of(config))[0])


def init_params(config: ModelConfig, rng: jax.Array, std: float = 0.02) -> dict:
  """Random params in the module's tree: normal(std) weights, zero biases, unit norm scales, one key per leaf in
  tree order (so a seed gives the same model whatever the family's own initialisers). Works under `jax.eval_shape`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
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


# ---------------------------------------------------------------------------------------------------------- forward
def forward_hidden(config: ModelConfig, params, input_ids, attention_mask=None, *, positions=None,
                   segment_ids=None):
  """Final-normed hidden states [B, T, D] in the compute dtype.

  `attention_mask` is 1 on real tokens (padding may be left or right); positions come from it unless given.
  `segment_ids` (packed sequences) restrict attention to tokens of the same segment.
  Sequences longer than `attention_block_size(config)` use the blocked attention (memory O(block·T), not O(T²))
  unless `config.attention_impl` names a fused kernel; shorter ones use one dense masked softmax.
  """
  ids_BT = jnp.asarray(input_ids, jnp.int32)
  mask_BT = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  pos_BT = None if positions is None else jnp.asarray(positions, jnp.int32)
  seg_BT = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  return _apply(config, params, ids_BT, mask_BT, pos_BT, seg_BT, method="__call__")


def output_kernel(config: ModelConfig, params):
  """The [D, V] output projection of final-normed hidden states (the transposed embedding when tied)."""
  return _apply(config, params, method="output_kernel")


def lm_head(config: ModelConfig, params, hidden_BTD):
  """Logits [B, T, V] (fp32) of final-normed hidden states."""
  w = output_kernel(config, params).astype(config.jnp_dtype)
  logits = jnp.einsum("btd,dv->btv", hidden_BTD, w, preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def forward(config: ModelConfig, params, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
  """Logits [B, T, V] (fp32). See `forward_hidden` for the arguments."""
  h = forward_hidden(config, params, input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
  return lm_head(config, params, h)


# ------------------------------------------------------------------------------- one layer at a time (the sampler)
def embed_tokens(config: ModelConfig, params, ids_BT):
  return _apply(config, params, ids_BT, method="embed_tokens")


def rope(config: ModelConfig, positions_BT):
  """(cos, sin) position tables [B, T, E] that `layer` takes."""
  return family_of(config).decoder(config).apply({}, positions_BT, method="rope")


def layer(config: ModelConfig, layer_params, x_BTD, cos_BTE, sin_BTE, attend):
  """One layer (params: one slice of `params["layers"]`) with the attention as `attend(q, k, v)`: (x, k, v)."""
  return family_of(config).block(config).apply({"params": layer_params}, x_BTD, cos_BTE, sin_BTE, attend,
                                               method="layer")


def head(config: ModelConfig, params, x_BTD):
  """Next-token logits [B, T, V] (fp32) of the last layer's output (final norm, then the output projection)."""
  return _apply(config, params, x_BTD, method="head")
