"""The optimizer of every training run (RL and SFT): global-norm clipping then AdamW on a constant or cosine schedule,
its state laid out like the params, and gradient accumulation over micro-batches. Pure and jittable.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Defaults are the paper's RL recipe (METHOD_SPEC §3 and §8); `grpo.GRPOConfig.optim` gives an RL run's."""
  learning_rate: float = 1e-6
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 125                 # horizon of the cosine schedule
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"{type(self).__name__}.lr_schedule={self.lr_schedule!r}: expected one of {LR_SCHEDULES}")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  if config.lr_schedule == "constant":
    if config.warmup_steps:
      return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.constant_schedule(config.learning_rate)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 0),
                                            max(config.total_steps, config.warmup_steps + 1))


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW."""
  return optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay),
  )


def init_state(optimizer: optax.GradientTransformation, params):
  """`optimizer.init(params)` with every params-shaped leaf (Adam's mu and nu) sharded like its param and the other
  leaves (step counts) replicated on the params' mesh. A plain `jit(optimizer.init)` puts the state on one device,
  and replicating it from there would hold two full copies of the model per device (28 GiB each for a 7B model)."""
  leaf = jax.tree.leaves(params)[0]
  replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
  shardings = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params),
                                    jax.tree.map(lambda p: p.sharding, params),
                                    transform_non_params=lambda _: replicated)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def accumulate_gradients(loss_fn: Callable, params, batch, micro_batches: int):
  """Sum of `grad(loss_fn)(params, micro_batch)` over `micro_batches` equal splits of the batch's leading axis.

  `loss_fn(params, micro_batch) -> (loss, metrics)` must scale its loss, and its metrics, so that the parts add up
  to the full batch (see `grpo.policy_loss`'s `denominators`): metrics are summed over the parts. One `lax.scan`:
  memory of one part.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (_, metrics), grads = grad_fn(params, batch)
    return grads, metrics
  lead = jax.tree.leaves(batch)[0].shape[0]
  if lead % micro_batches:
    raise ValueError(f"accumulate_gradients: batch of {lead} does not split into {micro_batches} micro-batches")
  parts = jax.tree.map(lambda x: x.reshape(micro_batches, lead // micro_batches, *x.shape[1:]), batch)

  def body(acc, part):
    (_, metrics), grads = grad_fn(params, part)
    return jax.tree.map(jnp.add, acc, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(body, zeros, parts)
  return grads, jax.tree.map(lambda m: m.sum(axis=0), metrics)
