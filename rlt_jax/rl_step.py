"""The RL step after the splice, as one jitted program: the RLT reward → group advantages → the GRPO update.

`train.run` uploads a step's arrays once (`StepBatch`, every leaf with its sharding) and calls `make_step`'s program
on them; everything between the splice (host tokenizer work) and the next sampling stays on the devices. The same
program also lays out the next sampling's inputs (the rollout copy of the new params and the sampler keys), so a
steady-state step runs prefill + decode per sampler call and this one program, nothing else.

Old (behaviour) log-probs: synchronous, the policy's own log-probs, stopped (the ratio is exactly 1, as in the
official code); `off_policy` (overlap mode: step k+1 is sampled from θ_k while θ_k → θ_k+1 runs), the sampler's.
The reference forward runs inside each update micro-batch, so only one part's activations are live.

Letters (docs/architecture.md's glossary): B rows (prompts × G, the group size), P prompt length, N completion
length (`max_new_tokens`), T = P + N teacher sequence, S student sequence.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlt_jax import grpo, optim, precision, rewards
from rlt_jax.models import logprobs
from rlt_jax.models.config import ModelConfig


class StepBatch(NamedTuple):
  """A step's device inputs: the reward's arrays and, off-policy, the sampler's log-probs of the completions."""
  reward: rewards.RewardBatch
  behaviour_logp_BN: jax.Array | None = None  # [B, N]; None when synchronous (the policy's own are used)


class UpdateBatch(NamedTuple):
  """What one GRPO update reads (split into `grpo.micro_batches` parts along B)."""
  ids_BT: jax.Array
  mask_BT: jax.Array
  advantages_B: jax.Array
  behaviour_logp_BN: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static in the step program (hashable)."""
  teacher: ModelConfig
  student: ModelConfig
  grpo: grpo.GRPOConfig
  reward: rewards.RewardConfig
  dtype: str                # compute dtype: the reward reads the params cast to it once a step
  group_size: int
  completion_len: int       # N
  chunk_size: int
  reward_micro_batch: int
  off_policy: bool = False
  seed: int = 0
  sample_calls: int = 1     # sampler calls a step (keys made for each)


def sample_keys(seed: int, step, calls: int) -> tuple:
  """The sampler keys of `step` (one per sampler call): fold_in(key(seed), step), then the call index when there
  are several. Traced inside the step program from its step counter: no host work, no transfer."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return (key,) if calls == 1 else tuple(jax.random.fold_in(key, i) for i in range(calls))


def update(sc: StepConfig, optimizer, state: dict, batch: UpdateBatch):
  """One GRPO update of `state` (params, opt_state, ref_params, step, bad_steps); a non-finite loss or gradient
  keeps the old params and counts a bad step. Returns (state, metrics)."""
  N, g = sc.completion_len, sc.grpo
  denominators = (batch.ids_BT.shape[0], jnp.sum(batch.mask_BT[:, -N:]))

  def completion_logp(params, part: UpdateBatch):
    # Only the completion's N positions go through the vocabulary projection (the prompt's are never read).
    return logprobs.token_logprobs(sc.teacher, params, part.ids_BT, part.mask_BT, temperature=sc.reward.
                                   teacher_temperature, chunk_size=sc.chunk_size, last=N)

  def loss_fn(params, part: UpdateBatch):
    lp_BN = completion_logp(params, part)
    # Synchronous: old = the current log-probs, stopped (ratio exactly 1); off-policy: the sampler's.
    old_BN = jax.lax.stop_gradient(lp_BN) if part.behaviour_logp_BN is None else part.behaviour_logp_BN
    ref_BN = jax.lax.stop_gradient(completion_logp(state["ref_params"], part)) if g.beta > 0 else None
    return grpo.policy_loss(lp_BN, old_BN, ref_BN, part.advantages_B, part.mask_BT[:, -N:], g,
                            denominators=denominators)

  grads, m = optim.accumulate_gradients(loss_fn, state["params"], batch, g.micro_batches)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(m["loss"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
  step = state["step"] + 1
  ref_params = state["ref_params"]
  if g.ref_sync_steps > 0 and g.beta > 0:
    ref_params = jax.lax.cond(step % g.ref_sync_steps == 0,
                              lambda: grpo.mix_reference(ref_params, params, g.ref_mixup_alpha),
                              lambda: ref_params)
  new_state = {"params": params, "opt_state": opt_state, "ref_params": ref_params, "step": step,
               "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1)}
  m = dict(m, grad_norm=grad_norm, skipped=~finite, lr=optim.learning_rate_schedule(g.optim)(state["step"]))
  return new_state, m


def _sampling_inputs(sc: StepConfig, param_shardings, params, step, steps_ahead: int):
  """The rollout copy of `params` (cast where each shard is, so the move to the rollout layout — the jit's
  out_shardings — carries the compute dtype) and the keys of `step`, ..., `step + steps_ahead`."""
  rollout = jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(precision.cast_leaf(p, sc.dtype), s), params,
                         param_shardings)
  return rollout, tuple(sample_keys(sc.seed, step + i, sc.sample_calls) for i in range(steps_ahead + 1))


def step(sc: StepConfig, optimizer, param_shardings, state: dict, student_params, batch: StepBatch):
  """reward → advantages → update → the next sampling's inputs. Returns (state, metrics, (rollout params, keys)).

  Metrics are {"scalars": ..., "rows": per-row reward, r_ss, r_kl [B] (for completions.jsonl)}, all replicated so
  that one `jax.device_get` on any process reads them.
  """
  N, rb = sc.completion_len, batch.reward
  # The reward reads the params in the compute dtype: cast once, sharded as the params (dead after the reward).
  serving = jax.tree.map(lambda p: precision.cast_leaf(p, sc.dtype), state["params"])
  # The teacher's log-probs only at the completion's N positions: the explanation lies there, and the prompt's
  # positions never need the vocabulary projection.
  reward_B, rm, teacher_logp_BN = rewards.reward_rows(sc.teacher, serving, sc.student, student_params, rb,
                                                      sc.reward, chunk_size=sc.chunk_size,
                                                      micro_batch=sc.reward_micro_batch, teacher_last=N)
  advantages_B = grpo.group_advantages(reward_B, sc.group_size, eps=sc.grpo.advantage_eps,
                                       scale=sc.grpo.advantage_scale)
  behaviour_BN = batch.behaviour_logp_BN
  state, um = update(sc, optimizer, state, UpdateBatch(rb.teacher_ids, rb.teacher_mask, advantages_B, behaviour_BN))
  metrics = _metrics(reward_B, rm, um, advantages_B, rb, teacher_logp_BN, behaviour_BN, state, sc.group_size)
  # The next sampling reads the new params with the keys of the step it samples: the next one, or (off-policy,
  # sampling a step ahead) the one after it.
  rollout, keys = _sampling_inputs(sc, param_shardings, state["params"],
                                   state["step"] + (1 if sc.off_policy else 0), 0)
  return state, metrics, (rollout, keys[0])


def _metrics(reward_B, rm: dict, um: dict, advantages_B, rb: rewards.RewardBatch, teacher_logp_BN, behaviour_BN,
             state, group_size: int) -> dict:
  out = {k: jnp.mean(rm[k]) for k in ("r_ss", "solution_logp_mean", "solution_logp_min", "r_kl", "kl_mean",
                                       "kl_max", "r_kl_no_entropy")}
  # reward_std as the official code logs it: the std within each group (unbiased, as torch's), averaged over the
  # groups; the std over the whole batch is reward_std_batch.
  group_std = jnp.std(reward_B.reshape(-1, group_size), axis=1, ddof=1) if group_size > 1 else jnp.zeros(1)
  out.update(reward_mean=jnp.mean(reward_B), reward_std=jnp.mean(group_std), reward_std_batch=jnp.std(reward_B),
             match_rate=jnp.mean(rb.matched.astype(jnp.float32)), advantage_std=jnp.std(advantages_B),
             bad_steps=state["bad_steps"],
             **{k: um[k] for k in ("kl_to_ref", "kl_to_ref_token", "loss", "clip_fraction", "ratio_mean", "grad_norm",
                                   "lr", "skipped")})
  if behaviour_BN is None:
    out["off_policy_logp_gap"] = jnp.zeros((), jnp.float32)
  else:  # mean over completion tokens of current − behaviour log-probs: how far the policy moved since sampling
    m_BN = rb.teacher_mask[:, -teacher_logp_BN.shape[1]:].astype(jnp.float32)
    out["off_policy_logp_gap"] = jnp.sum((teacher_logp_BN - behaviour_BN) * m_BN) / jnp.maximum(jnp.sum(m_BN), 1)
  return {"scalars": out, "rows": {"reward": reward_B, "r_ss": rm["r_ss"], "r_kl": rm["r_kl"]}}


def make_step(sc: StepConfig, optimizer, state_shardings, student_shardings, rollout_shardings, mesh):
  """The step program, jitted with the train state's shardings in and out (the state is donated), the metrics and
  keys replicated and the rollout copy on the rollout layout: compiled once per run."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def rl_step_program(state, student_params, batch):
    return step(sc, optimizer, state_shardings["params"], state, student_params, batch)

  return jax.jit(rl_step_program, donate_argnums=0,
                 in_shardings=(state_shardings, student_shardings, None),
                 out_shardings=(state_shardings, replicated, (rollout_shardings, _key_shardings(sc, rollout_shardings))))


def _key_shardings(sc: StepConfig, rollout_shardings) -> tuple:
  # Keys replicated on the rollout mesh, where the sampler combines them with its rows.
  rmesh = jax.tree.leaves(rollout_shardings)[0].mesh
  return (jax.sharding.NamedSharding(rmesh, jax.sharding.PartitionSpec()),) * sc.sample_calls


def make_first_sampling(sc: StepConfig, param_shardings, rollout_shardings, *, steps_ahead: int):
  """The program that lays out a run's first sampling (or a resumed run's): the rollout copy of the params and the
  keys of the current step and, in overlap mode (`steps_ahead=1`), of the next, sampled from the same params."""
  def first_sampling(params, step):
    return _sampling_inputs(sc, param_shardings, params, step, steps_ahead)

  return jax.jit(first_sampling,
                 out_shardings=(rollout_shardings, (_key_shardings(sc, rollout_shardings),) * (steps_ahead + 1)))
