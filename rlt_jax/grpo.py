"""GRPO pieces, pure and jittable: group advantages, the clipped policy loss with a k3 KL to a reference, the
reference mix-up, the optimizer, and gradient accumulation over micro-batches.

Arrays of the loss are [B, T] over completion tokens; `mask` marks the tokens that count. Log-probs are of the sampled
tokens under logits divided by the sampling temperature, as the paper's code does (METHOD_SPEC §3).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "dr_grpo")
ADVANTAGE_SCALES = ("std", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Defaults are the paper's RL recipe (METHOD_SPEC §3 and §8)."""
  beta: float = 0.04                     # weight of the k3 KL to the reference; 0 skips the reference forward
  clip_eps: float = 0.2                  # PPO clip; binds only when num_iterations > 1
  num_iterations: int = 1                # updates per sampled batch (1 in the paper: the ratio is then exactly 1)
  loss_aggregation: str = "sequence_mean"
  advantage_scale: str = "std"
  advantage_eps: float = 1e-4
  ref_mixup_alpha: float = 0.9           # ref <- alpha * policy + (1 - alpha) * ref ...
  ref_sync_steps: int = 32               # ... every this many optimizer steps (0: never)
  learning_rate: float = 1e-6
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 125                 # horizon of the cosine schedule
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0
  micro_batches: int = 1                 # gradient accumulation: the update's batch is split into this many parts

  def __post_init__(self):
    def check(field, ok):
      if getattr(self, field) not in ok:
        raise ValueError(f"GRPOConfig.{field}={getattr(self, field)!r}: expected one of {ok}")
    check("loss_aggregation", LOSS_AGGREGATIONS)
    check("advantage_scale", ADVANTAGE_SCALES)
    check("lr_schedule", LR_SCHEDULES)
    for field in ("num_iterations", "micro_batches"):
      if getattr(self, field) < 1:
        raise ValueError(f"GRPOConfig.{field}={getattr(self, field)}: must be >= 1")
    if self.beta < 0 or self.clip_eps < 0:
      raise ValueError("GRPOConfig: beta and clip_eps must be >= 0")


def group_advantages(rewards, group_size: int, *, eps: float = 1e-4, scale: str = "std"):
  """(r - mean_group(r)) / (std_group(r) + eps), rows b·G … b·G+G−1 forming a group; std with ddof=1 (torch's)."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(f"group_advantages: {rewards.shape[0]} rewards do not split into groups of {group_size}")
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"group_advantages: scale={scale!r}: expected one of {ADVANTAGE_SCALES}")
  r = rewards.reshape(-1, group_size)
  centred = r - r.mean(axis=1, keepdims=True)
  if scale == "std":
    std = jnp.std(r, axis=1, ddof=1, keepdims=True) if group_size > 1 else jnp.zeros_like(r[:, :1])
    centred = centred / (std + eps)
  return centred.reshape(-1)


def k3_kl(logp, ref_logp):
  """Schulman's k3 estimator of KL(policy || ref) per sampled token: e^(ref−logp) − (ref−logp) − 1 ≥ 0."""
  delta = ref_logp - logp
  return jnp.exp(delta) - delta - 1.0


def policy_loss(logp, old_logp, ref_logp, advantages, mask, config: GRPOConfig, *, denominators=None):
  """The GRPO loss and its metrics.

  Per token: −[min(ρ·A, clip(ρ, 1±ε)·A) − β·k3(logp, ref_logp)] with ρ = exp(logp − old_logp). `ref_logp` may be
  None when β = 0. `denominators` = (number of sequences, number of mask tokens) of the whole batch when this call
  sees one micro-batch of it, so that the micro-batch losses add up to the full batch's loss.
  """
  mask = jnp.asarray(mask, jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps)
  objective = jnp.minimum(ratio * adv, clipped * adv)
  per_token = -objective
  kl = jnp.zeros_like(logp)
  if config.beta > 0:
    if ref_logp is None:
      raise ValueError("policy_loss: ref_logp is required when beta > 0")
    kl = k3_kl(logp, ref_logp)
    per_token = per_token + config.beta * kl
  n_seq, n_tok = denominators if denominators is not None else (mask.shape[0], mask.sum())
  seq_tokens = mask.sum(axis=1)
  if config.loss_aggregation == "sequence_mean":
    loss = jnp.sum((per_token * mask).sum(axis=1) / jnp.maximum(seq_tokens, 1.0)) / n_seq
  elif config.loss_aggregation == "token_mean":
    loss = (per_token * mask).sum() / jnp.maximum(n_tok, 1.0)
  else:  # dr_grpo: a constant normaliser (sequences × max completion length), free of length bias
    loss = (per_token * mask).sum() / (n_seq * mask.shape[1])
  tokens = jnp.maximum(mask.sum(), 1.0)
  is_clipped = (jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32)
  metrics = {
      "loss": loss,
      "kl_to_ref": (kl * mask).sum() / tokens,
      "clip_fraction": (is_clipped * mask).sum() / tokens,
      "ratio_mean": (ratio * mask).sum() / tokens,
  }
  return loss, metrics


def mix_reference(ref_params, policy_params, alpha: float):
  """TR-DPO-style reference update: ref ← α·policy + (1−α)·ref (kept in the reference's dtype)."""
  return jax.tree.map(lambda r, p: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32))
                      .astype(r.dtype), ref_params, policy_params)


def learning_rate_schedule(config: GRPOConfig) -> optax.Schedule:
  if config.lr_schedule == "constant":
    if config.warmup_steps:
      return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.constant_schedule(config.learning_rate)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 0),
                                            max(config.total_steps, config.warmup_steps + 1))


def make_optimizer(config: GRPOConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW."""
  return optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay),
  )


def init_optimizer_state(optimizer: optax.GradientTransformation, params):
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

  `loss_fn(params, micro_batch) -> (loss, metrics)` must scale its loss so that the parts add up to the full batch
  (see `policy_loss`'s `denominators`). Metrics are averaged over the parts. One `lax.scan`: memory of one part.
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
  return grads, jax.tree.map(lambda m: m.mean(axis=0), metrics)
