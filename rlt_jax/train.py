"""GRPO training of an RLT teacher: data → sample → reward → update, each stage compiled once.

  python -m rlt_jax.train --config configs/tiny.py [--workdir DIR] [--config.steps=10 ...]

One step: a batch of prompts (question + reference solution) → G explanations per prompt from the current teacher
(`sampling`) → student examples spliced at the id level (`formats`) → RLT rewards from teacher and student log-probs
(`rewards`, whose teacher log-probs are reused as GRPO's old log-probs) → group advantages → one optax update
(`grpo`). Teacher, reference and student live on one mesh. A restart in the same workdir resumes from the last
checkpoint (params, optimizer, reference, step, data-iterator state; the sampling key is derived from the step).

With several processes (`distributed`) each reads its own shard of the data; the prompts are then gathered so that
every process holds the step's whole batch on the host (in the order one process would read it) and lays out all
rows' sequences itself, and device inputs become global arrays of the mesh. Only process 0 writes metrics.

At scale: `sample_micro_batch` prompts per sampler call, `reward_micro_batch` rows per reward part and
`grpo.micro_batches` update parts keep each phase within a device (`python -m rlt_jax.plan` sizes them).
`overlap=True` samples step k+1 from θ_k while the update θ_k → θ_k+1 runs; that update then takes the sampler's
log-probs as the old (behaviour) log-probs, so its PPO-clipped ratio corrects for the one-step lag.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlt_jax import checkpoint, data, decode, distributed, grpo, metrics, precision, preflight, rewards, run_setup, \
    sampling, sharding


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static in the compiled update (hashable)."""
  teacher: object
  grpo: grpo.GRPOConfig
  temperature: float
  completion_len: int
  chunk_size: int


def _train_step(sc: StepConfig, optimizer, state, batch):
  """One GRPO update. `batch`: teacher ids/mask [B, P+N] (left-padded prompt, then the completion), the reward's
  teacher log-probs [B, P+N] (= old log-probs), advantages [B]. Non-finite loss or gradients skip the update."""
  N = sc.completion_len
  ids, mask = batch["ids"], batch["mask"]
  completion_mask = mask[:, -N:]  # completion tokens up to and including eos (all of them when truncated)
  logp_fn = lambda p: rewards.token_logprobs(sc.teacher, p, ids, mask, temperature=sc.temperature,  # noqa: E731
                                             chunk_size=sc.chunk_size)
  old = batch["old_logp"][:, -N:]
  ref = jax.lax.stop_gradient(logp_fn(state["ref_params"])[:, -N:]) if sc.grpo.beta > 0 else old
  parts = {"ids": ids, "mask": mask, "old": old, "ref": ref, "adv": batch["advantages"], "cmask": completion_mask}
  denominators = (ids.shape[0], jnp.sum(completion_mask))

  def loss_fn(params, b):
    lp = rewards.token_logprobs(sc.teacher, params, b["ids"], b["mask"], temperature=sc.temperature,
                                chunk_size=sc.chunk_size)[:, -N:]
    return grpo.policy_loss(lp, b["old"], b["ref"], b["adv"], b["cmask"], sc.grpo, denominators=denominators)

  grads, m = grpo.accumulate_gradients(loss_fn, state["params"], parts, sc.grpo.micro_batches)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(m["loss"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
  keep = lambda new, old_: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old_)  # noqa: E731
  params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
  step = state["step"] + 1
  ref_params = state["ref_params"]
  if sc.grpo.ref_sync_steps > 0 and sc.grpo.beta > 0:
    ref_params = jax.lax.cond(step % sc.grpo.ref_sync_steps == 0,
                              lambda: grpo.mix_reference(ref_params, params, sc.grpo.ref_mixup_alpha),
                              lambda: ref_params)
  new_state = {"params": params, "opt_state": opt_state, "ref_params": ref_params, "step": step,
               "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1)}
  m = dict(m, grad_norm=grad_norm, skipped=~finite, lr=grpo.learning_rate_schedule(sc.grpo)(state["step"]))
  return new_state, m


def decode_schedule(cfg) -> decode.Schedule:
  return decode.Schedule(**{k: int(v) for k, v in cfg.decode.items()})


def rollout_params(rs: run_setup.RunSetup, params):
  """The params laid out for sampling (`run_setup.Rollout`): cast to the compute dtype and moved to the rollout
  mesh in one program, once a step; `params` itself when that layout and dtype are already theirs."""
  return precision.compute_copy(params, rs.config.dtype, rs.rollout.shardings)


def sample_step(rs: run_setup.RunSetup, params, batch: dict, step: int) -> list:
  """Dispatches the step's sampling (asynchronously: device arrays come back at once) in calls of
  `config.sample_micro_batch` prompts (0 = all in one call), from `params` on the rollout layout (`rollout_params`).
  Each call stops when its own rows have finished and sheds finished rows as it goes (`decode.Schedule`); every
  call has the same shapes and compiles once."""
  cfg, G = rs.config, rs.config.group_size
  rows = lambda x: distributed.global_rows(x, rs.rollout.mesh, rs.rollout.rules)  # noqa: E731
  n = len(batch["prompt_ids"])
  m = int(cfg.sample_micro_batch) or n
  outs = []
  with sharding.use_mesh(rs.rollout.mesh, rs.rollout.rules):  # (inside the training mesh's context too)
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    for i in range(0, n, m):
      outs.append(sampling.sample(
          rs.teacher_config, params, rows(batch["prompt_ids"][i:i + m]), rows(batch["prompt_mask"][i:i + m]),
          key if m == n else jax.random.fold_in(key, i // m), max_new_tokens=cfg.max_new_tokens,
          temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else None, eos_ids=rs.eos_ids,
          num_samples=G, pad_id=rs.fmt.pad_id, schedule=decode_schedule(cfg)))
  return outs


def rollout(rs: run_setup.RunSetup, params, batch: dict, step: int):
  """Samples G completions per prompt and lays out the teacher and student sequences (host NumPy, all rows of the
  global batch on every process)."""
  return finish_rollout(rs, batch, sample_step(rs, rollout_params(rs, params), batch, step))


def finish_rollout(rs: run_setup.RunSetup, batch: dict, outs: list):
  """The host half of a rollout: sampled ids → student examples and the teacher/student arrays of the step."""
  cfg, G = rs.config, rs.config.group_size
  # The sampled ids are small: every process takes all of them (an all-gather when they span processes).
  parts = distributed.to_host([(o.tokens, o.lengths, o.logprobs, o.row_steps) for o in outs])
  tokens, lengths, sample_logp = (np.concatenate([p[j] for p in parts]) for j in range(3))
  row_steps = sum(float(p[3]) for p in parts)  # rows the decode loops computed (live or not), over all calls
  rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731  rows b·G … b·G+G−1 belong to prompt b
  prompt_ids, prompt_mask = np.repeat(batch["prompt_ids"], G, 0), np.repeat(batch["prompt_mask"], G, 0)
  prompt_lens = prompt_mask.sum(1)
  completions = [tokens[i, :lengths[i]] for i in range(len(tokens))]
  examples = rs.fmt.student_examples(rep(batch["question"]), rep(batch["solution"]), completions,
                                     systems=rep(batch["system"]), prompt_lens=list(prompt_lens))
  student = data.collate_students(examples, (cfg.max_student_len,), rs.fmt.pad_id)
  P, N = prompt_ids.shape[1], cfg.max_new_tokens
  completion_mask = np.arange(N)[None] < lengths[:, None]
  # The explanation is the first `explanation_len` sampled ids, i.e. columns P … P+k−1 of [prompt | completion].
  k = np.array([ex.explanation_len for ex in examples])[:, None]
  teacher_expl = (np.arange(P + N)[None] >= P) & (np.arange(P + N)[None] < P + k)
  return dict(teacher_ids=np.concatenate([prompt_ids, tokens], 1).astype(np.int32),
              teacher_mask=np.concatenate([prompt_mask, completion_mask], 1), teacher_expl=teacher_expl,
              student=student, lengths=lengths, examples=examples, decode_row_steps=row_steps,
              sample_logp=np.concatenate([np.zeros((len(tokens), P), np.float32), sample_logp], 1))


def rollout_rewards(rs: run_setup.RunSetup, params, ro: dict):
  """(the rollout's arrays on the mesh, (reward, metrics, teacher log-probs)) under `params`. With several
  processes the host arrays become global arrays of the mesh; with one they go in as NumPy."""
  dev = {k: distributed.global_rows(v, rs.mesh, rs.rules) for k, v in
         [*ro["student"].items(), *((k, ro[k]) for k in ("teacher_ids", "teacher_mask", "teacher_expl"))]}
  with sharding.use_mesh(rs.mesh, rs.rules):
    out = rewards.rlt_rewards(
        rs.teacher_config, params, rs.student_config, rs.student_params, dev["teacher_ids"], dev["teacher_mask"],
        dev["teacher_expl"], dev["input_ids"], dev["attention_mask"], dev["explanation_mask"], dev["solution_mask"],
        dev["matched"], rs.reward_config, chunk_size=rs.config.logprob_chunk_size,
        micro_batch=rs.config.reward_micro_batch)
  return dev, out


def _mean_gap(teacher_logp, old_logp, mask, completion_len: int):
  """Mean over the completion tokens of current − behaviour log-probs (0 when sampling was on-policy)."""
  m = mask[:, -completion_len:]
  gap = (teacher_logp[:, -completion_len:] - old_logp[:, -completion_len:]) * m
  return jnp.sum(gap) / jnp.maximum(jnp.sum(m), 1)


def _summary_scalars(reward, rm: dict, upd: dict, ro: dict, advantages, max_new_tokens: int) -> dict:
  r = np.asarray(reward)
  mean = lambda k: float(np.mean(np.asarray(rm[k])))  # noqa: E731
  return {
      "reward_mean": float(r.mean()), "reward_std": float(r.std()),
      "r_ss": mean("r_ss"), "solution_logp_mean": mean("solution_logp_mean"),
      "solution_logp_min": mean("solution_logp_min"), "r_kl": mean("r_kl"), "kl_mean": mean("kl_mean"),
      "kl_max": mean("kl_max"), "r_kl_no_entropy": mean("r_kl_no_entropy"),
      "match_rate": float(np.mean(ro["student"]["matched"])), "advantage_std": float(np.std(advantages)),
      "kl_to_ref": float(upd["kl_to_ref"]), "loss": float(upd["loss"]), "clip_fraction": float(upd["clip_fraction"]),
      "grad_norm": float(upd["grad_norm"]), "lr": float(upd["lr"]), "skipped": bool(upd["skipped"]),
      "completion_len_mean": float(ro["lengths"].mean()), "completion_len_max": int(ro["lengths"].max()),
      # Share of the rows the decode loop computed that were still generating (1 = no work on finished rows).
      "decode_live_fraction": float((ro["lengths"] - 1).sum()) / max(ro["decode_row_steps"], 1.0),
      "truncated_fraction": float(np.mean(~ro["student"]["matched"] & (ro["lengths"] >= max_new_tokens))),
  }


def run(cfg, workdir: str, *, on_step=None) -> dict:
  """Trains for `cfg.steps` steps in `workdir` (resuming there if it holds checkpoints); returns the last metrics.

  `on_step(step, metrics)`, if given, is called after every step (tests and notebooks use it).
  """
  rs = run_setup.setup(cfg, workdir, before_loading=preflight.check)
  sc = StepConfig(rs.teacher_config, rs.grpo_config, float(cfg.temperature), int(cfg.max_new_tokens),
                  int(cfg.logprob_chunk_size))
  optimizer = grpo.make_optimizer(rs.grpo_config)
  replicated = jax.sharding.NamedSharding(rs.mesh, jax.sharding.PartitionSpec())
  # Mixed precision (precision.py): params and AdamW moments in param_dtype, the reference (forward only) in the
  # compute dtype, as the student is.
  ref_params = precision.compute_copy(rs.teacher_params, cfg.dtype)
  if ref_params is rs.teacher_params:  # same dtype: no copy was made, and the reference needs buffers of its own
    ref_params = jax.tree.map(jnp.copy, ref_params)
  state = {"params": rs.teacher_params, "opt_state": grpo.init_optimizer_state(optimizer, rs.teacher_params),
           "ref_params": ref_params, "step": jnp.zeros((), jnp.int32), "bad_steps": jnp.zeros((), jnp.int32)}
  # Everything on the mesh (scalars such as Adam's count replicated) ...
  state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                       else jax.device_put(x, replicated), state)
  # Fixed in/out shardings: the state keeps one layout from step to step, so the update compiles exactly once.
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(lambda s, b: _train_step(sc, optimizer, s, b), donate_argnums=0,
                       in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))
  ckpt = run_setup.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  state, data_state = ckpt.restore_latest(state, resume=cfg.resume)
  it = iter(rs.dataset)
  if data_state is not None:
    it.set_state(data_state)
  start = int(state["step"])
  writer = metrics.RunWriter(workdir, resume_step=start, tensorboard=cfg.tensorboard)
  bar = run_setup.progress(cfg.steps, start)
  last, pending = {}, None  # pending: the next step's batch and its sampling, dispatched before this step's update
  for step in range(start, cfg.steps):
    t0 = time.perf_counter()
    off_policy = pending is not None  # sampled from the params before the last update
    if off_policy:
      batch, sampled = pending
    else:
      batch = distributed.gather_rows(next(it))  # one process: its batch as it is
      sampled = sample_step(rs, rollout_params(rs, state["params"]), batch, step)  # the copy is freed once done
    ro = finish_rollout(rs, batch, sampled)
    t1 = time.perf_counter()
    # The reward reads the params in the compute dtype: one cast a step, sharded as the params are.
    serving = precision.compute_copy(state["params"], cfg.dtype)
    dev, (reward, rm, teacher_logp) = rollout_rewards(rs, serving, ro)
    with sharding.use_mesh(rs.mesh, rs.rules):
      advantages = grpo.group_advantages(reward, cfg.group_size, eps=rs.grpo_config.advantage_eps,
                                         scale=rs.grpo_config.advantage_scale)
      jax.block_until_ready(advantages)
      t2 = time.perf_counter()
      # Synchronous: the samples come from these params, whose log-probs the reward just computed. Overlapped: they
      # come from the params before the last update, whose log-probs the sampler returned; the update's ratio
      # exp(logp − old_logp) (PPO-clipped) then corrects for the one step the policy has moved since.
      old_logp = distributed.global_rows(ro["sample_logp"], rs.mesh, rs.rules) if off_policy else teacher_logp
      behaviour_gap = _mean_gap(teacher_logp, old_logp, dev["teacher_mask"], cfg.max_new_tokens) if off_policy \
          else 0.0
      data_state, pending = it.get_state(), None
      if cfg.overlap and step + 1 < cfg.steps:  # sample step k+1 from θ_k while θ_k → θ_k+1 is computed
        next_batch = distributed.gather_rows(next(it))
        pending = (next_batch, sample_step(rs, rollout_params(rs, state["params"]), next_batch, step + 1))
      del serving  # not needed by the update: its memory is free for it (a pending sampler call keeps its own)
      state, upd = train_step(state, {"ids": dev["teacher_ids"], "mask": dev["teacher_mask"],
                                      "old_logp": old_logp, "advantages": advantages})
      upd = distributed.to_host(upd)
    t3 = time.perf_counter()
    # Metrics from every row of the step (gathered from all processes when the arrays span several).
    reward, rm, advantages = distributed.to_host((reward, rm, advantages))
    last = _summary_scalars(reward, rm, upd, ro, advantages, cfg.max_new_tokens)
    last.update(time_sample=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2,
                tokens_per_s=float(ro["lengths"].sum()) / (t3 - t0),
                off_policy_logp_gap=float(distributed.to_host(behaviour_gap)))
    writer.write(step + 1, last, rows=batch["where"])
    writer.write_completions(run_setup.completion_rows(rs, step + 1, batch, ro, reward, rm))
    bar.update(1)
    if on_step is not None:
      on_step(step + 1, last)
    bar.set_postfix(reward=f"{last['reward_mean']:.3f}", match=f"{last['match_rate']:.2f}")
    if int(state["bad_steps"]) >= cfg.max_bad_steps:
      ckpt.wait()
      writer.close()
      raise FloatingPointError(
          f"{cfg.max_bad_steps} steps in a row had a non-finite loss or gradient (last at step {step + 1}); "
          f"stopped. The last good checkpoint is in {ckpt.directory} (step {ckpt.latest_step()}).")
    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
      # The data state from before a pending batch was read: a resume reads it again and samples it anew.
      ckpt.save(step + 1, state, data_state)
  ckpt.wait()
  bar.close()
  writer.close()
  if cfg.export_dir:  # every process joins the gather; process 0 writes
    checkpoint.save_hf(rs.teacher_config, state["params"], os.path.join(workdir, cfg.export_dir),
                       tokenizer=rs.tokenizer, dtype=cfg.export_dtype or None)
  run_setup.print_summary(workdir, start, cfg.steps)
  return last



if __name__ == "__main__":
  run_setup.cli(run)
