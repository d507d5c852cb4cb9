"""GRPO pieces, pure and jittable: group advantages, the clipped policy loss with a k3 KL to a reference and the
reference mix-up (the optimizer and gradient accumulation over micro-batches are `optim`'s).

Arrays of the loss are [B, N] over completion tokens; `mask` marks the tokens that count. Log-probs are of the sampled
tokens under logits divided by the sampling temperature, as the paper's code does (METHOD_SPEC §3).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlt_jax import optim

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "dr_grpo")
ADVANTAGE_SCALES = ("std", "none")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(optim.OptimConfig):
  """Defaults are the paper's RL recipe (METHOD_SPEC §3 and §8). The optimizer's fields (learning_rate ...
  max_grad_norm) are `optim.OptimConfig`'s, inherited, so a run config sets them as `config.grpo.learning_rate`."""
  beta: float = 0.04                     # weight of the k3 KL to the reference; 0 skips the reference forward
  clip_eps: float = 0.2                  # PPO clip; binds only off-policy (overlap: the sampler's are old)
  num_iterations: int = 1                # updates per sampled batch: 1 (the paper's; the RL run accepts only 1)
  loss_aggregation: str = "sequence_mean"
  advantage_scale: str = "std"
  advantage_eps: float = 1e-4
  ref_mixup_alpha: float = 0.9           # ref <- alpha * policy + (1 - alpha) * ref ...
  ref_sync_steps: int = 32               # ... every this many optimizer steps (0: never)
  micro_batches: int = 1                 # gradient accumulation: the update's batch is split into this many parts

  def __post_init__(self):
    super().__post_init__()

    def check(field, ok):
      if getattr(self, field) not in ok:
        raise ValueError(f"GRPOConfig.{field}={getattr(self, field)!r}: expected one of {ok}")
    check("loss_aggregation", LOSS_AGGREGATIONS)
    check("advantage_scale", ADVANTAGE_SCALES)
    for field in ("num_iterations", "micro_batches"):
      if getattr(self, field) < 1:
        raise ValueError(f"GRPOConfig.{field}={getattr(self, field)}: must be >= 1")
    if self.beta < 0 or self.clip_eps < 0:
      raise ValueError("GRPOConfig: beta and clip_eps must be >= 0")

  @property
  def optim(self) -> optim.OptimConfig:
    """The optimizer's fields (learning_rate ... max_grad_norm) as the `optim.OptimConfig` of the run."""
    fields = dataclasses.fields(optim.OptimConfig)
    return optim.OptimConfig(**{f.name: getattr(self, f.name) for f in fields})


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
  sees one micro-batch of it: the loss and every metric are then this part's share of the whole batch's value, so
  the parts' values add up to it (`optim.accumulate_gradients` sums them).

  Metrics: `kl_to_ref` is the official code's KL (trl's GRPO): each sequence's mean k3 over its completion tokens,
  averaged over sequences; `kl_to_ref_token` the mean over all completion tokens of the batch (long completions
  weigh more). `clip_fraction` and `ratio_mean` are token means.
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
  seq_tokens = jnp.maximum(mask.sum(axis=1), 1.0)
  tokens = jnp.maximum(n_tok, 1.0)
  if config.loss_aggregation == "sequence_mean":
    loss = jnp.sum((per_token * mask).sum(axis=1) / seq_tokens) / n_seq
  elif config.loss_aggregation == "token_mean":
    loss = (per_token * mask).sum() / tokens
  else:  # dr_grpo: a constant normaliser (sequences × max completion length), free of length bias
    loss = (per_token * mask).sum() / (n_seq * mask.shape[1])
  is_clipped = (jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32)
  metrics = {
      "loss": loss,
      "kl_to_ref": jnp.sum((kl * mask).sum(axis=1) / seq_tokens) / n_seq,
      "kl_to_ref_token": (kl * mask).sum() / tokens,
      "clip_fraction": (is_clipped * mask).sum() / tokens,
      "ratio_mean": (ratio * mask).sum() / tokens,
  }
  return loss, metrics


def mix_reference(ref_params, policy_params, alpha: float):
  """TR-DPO-style reference update: ref ← α·policy + (1−α)·ref (kept in the reference's dtype)."""
  return jax.tree.map(lambda r, p: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32))
                      .astype(r.dtype), ref_params, policy_params)
