"""GRPO training of an RLT teacher: data → sample → splice → one step program (reward → advantages → update).

  python -m rlt_jax.train --config configs/tiny.py [--workdir DIR] [--config.steps=10 ...]

One step: a batch of prompts (question + reference solution) → G explanations per prompt from the teacher
(`sampling`, on the rollout layout) → student examples spliced at the id level on the host (`formats`: tokenizer
work, the only host stage) → the step's arrays uploaded once → `rl_step`'s program: RLT rewards from teacher and
student log-probs, group advantages, one optax update, and the next sampling's inputs. A steady-state step runs
prefill + decode per sampler call and that one program; the loop (`loop.run`) reads a step's metrics back a step
late, in one transfer, under `jax.transfer_guard("disallow")`. A restart in the same workdir resumes from the last
checkpoint (params, optimizer, reference, step, data-iterator state; the sampling key is derived from the step).

With several processes (`distributed`) each reads its own shard of the data; the prompts are then gathered so that
every process holds the step's whole batch on the host (in the order one process would read it) and lays out all
rows' sequences itself, and device inputs become global arrays of the mesh. Only process 0 writes metrics.

At scale: `sample_micro_batch` prompts per sampler call, `reward_micro_batch` rows per reward part and
`grpo.micro_batches` update parts keep each phase within a device (`python -m rlt_jax.plan` sizes them).
`overlap=True` samples step k+1 from θ_k, queued before θ_k → θ_k+1, so the host splices step k+1 while the device
runs step k's program; that update takes the sampler's log-probs as the old (behaviour) log-probs, and its
PPO-clipped ratio corrects for the one-step lag.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import checkpointing, cli, data, decode, distributed, heldout, hf_checkpoint, loading, loop, metrics, \
    model_format, optim, precision, preemption, preflight, rewards, rl_step, run_config, sampling, sharding, storage

# Held-out batch i samples with the keys of this step − i: fixed for the run (every pass sees the same randomness,
# so the eval/* curve compares params, not draws) and never a training step's.
EVAL_KEY_STEP = 2**31 - 1


def decode_schedule(cfg) -> decode.Schedule:
  return decode.Schedule(**{k: int(v) for k, v in cfg.decode.items()})


def sample_step(rs: loading.RunSetup, params, batch: dict, keys) -> list:
  """Queues the step's sampling (device arrays come back at once) in calls of `config.sample_micro_batch` prompts
  (0 = all in one call), from `params` on the rollout layout, call i with `keys[i]` (`rl_step.sample_keys`). Each
  call stops when its own rows have finished and sheds finished rows as it goes (`decode.Schedule`); every call has
  the same shapes and compiles once."""
  cfg = rs.config
  rows = lambda x: distributed.global_rows(x, rs.rollout.mesh, rs.rollout.rules)  # noqa: E731
  n = len(batch["prompt_ids"])
  m = int(cfg.sample_micro_batch) or n
  outs = []
  with sharding.use_mesh(rs.rollout.mesh, rs.rollout.rules):  # (inside the training mesh's context too)
    for i in range(0, n, m):
      outs.append(sampling.sample(
          rs.teacher_config, params, rows(batch["prompt_ids"][i:i + m]), rows(batch["prompt_mask"][i:i + m]),
          keys[i // m], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
          top_p=cfg.top_p if cfg.top_p < 1 else None, eos_ids=rs.eos_ids, num_samples=cfg.group_size,
          pad_id=rs.fmt.pad_id, schedule=decode_schedule(cfg)))
  return outs


def read_samples(outs: list) -> list:
  """The sampler calls' (tokens, lengths, log-probs, row steps) as NumPy, in one transfer (waiting for them). The
  sampled ids are small: every process takes all of them (an all-gather when they span processes)."""
  return distributed.to_host([(o.tokens, o.lengths, o.logprobs, o.row_steps) for o in outs])


def finish_rollout(rs: loading.RunSetup, batch: dict, parts: list) -> dict:
  """The host half of a rollout, the splice: sampled ids (`read_samples`) → student examples and the
  teacher/student arrays of the step (NumPy, all rows of the global batch on every process)."""
  cfg, G = rs.config, rs.config.group_size
  tokens, lengths, sample_logp = (np.concatenate([p[j] for p in parts]) for j in range(3))
  row_steps = sum(float(p[3]) for p in parts)  # rows the decode loops computed (live or not), over all calls
  rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731  rows b·G … b·G+G−1 belong to prompt b
  prompt_ids, prompt_mask = np.repeat(batch["prompt_ids"], G, 0), np.repeat(batch["prompt_mask"], G, 0)
  completions = [tokens[i, :lengths[i]] for i in range(len(tokens))]
  if rs.row_prompts is not None:
    rs.row_prompts.check(batch["system"])
  examples = rs.fmt.student_examples(rep(batch["question"]), rep(batch["solution"]), completions,
                                     systems=rep(batch["system"]), prompt_lens=list(prompt_mask.sum(1)))
  student = data.collate_students(examples, (cfg.max_student_len,), rs.fmt.pad_id)
  P, N = prompt_ids.shape[1], cfg.max_new_tokens
  # The explanation is the first `explanation_len` sampled ids, i.e. columns P … P+k−1 of [prompt | completion].
  k = np.array([ex.explanation_len for ex in examples])[:, None]
  T = np.arange(P + N)[None]
  reward = rewards.RewardBatch(
      teacher_ids=np.concatenate([prompt_ids, tokens], 1).astype(np.int32),
      teacher_mask=np.concatenate([prompt_mask, np.arange(N)[None] < lengths[:, None]], 1),
      teacher_expl=(T >= P) & (T < P + k), student_ids=student["input_ids"], student_mask=student["attention_mask"],
      student_expl=student["explanation_mask"], solution_mask=student["solution_mask"], matched=student["matched"])
  return dict(reward=reward, lengths=lengths, examples=examples, decode_row_steps=row_steps,
              sample_logp=sample_logp)  # [B, N]: the sampler's log-probs of the completion tokens


def upload(rs: loading.RunSetup, ro: dict, *, off_policy: bool) -> rl_step.StepBatch:
  """The step's arrays on the mesh, each uploaded once with its rows split over the batch axes."""
  put = lambda x: distributed.global_rows(x, rs.mesh, rs.rules)  # noqa: E731
  return rl_step.StepBatch(rewards.RewardBatch(*map(put, ro["reward"])),
                           put(ro["sample_logp"]) if off_policy else None)


def rollout(rs: loading.RunSetup, params, batch: dict, step: int) -> dict:
  """Samples G completions per prompt from `params` with the keys of `step` and splices them: the rollout of one
  batch on its own (distillation, tests), outside the RL loop's programs."""
  keys = rl_step.sample_keys(int(rs.config.seed), step, len(batch["prompt_ids"]) // (
      int(rs.config.sample_micro_batch) or len(batch["prompt_ids"])))
  copy = precision.compute_copy(params, rs.config.dtype, rs.rollout.shardings)
  return finish_rollout(rs, batch, read_samples(sample_step(rs, copy, batch, keys)))


def rollout_rewards(rs: loading.RunSetup, params, ro: dict):
  """(reward, metrics, teacher log-probs) of a rollout under `params` (cast to the compute dtype), one jitted call."""
  put = lambda x: distributed.global_rows(x, rs.mesh, rs.rules)  # noqa: E731
  with sharding.use_mesh(rs.mesh, rs.rules):
    return rewards.rlt_rewards(rs.teacher_config, precision.compute_copy(params, rs.config.dtype),
                               rs.student_config, rs.student_params, rewards.RewardBatch(*map(put, ro["reward"])),
                               rs.reward_config, chunk_size=rs.config.logprob_chunk_size,
                               micro_batch=rs.config.reward_micro_batch)


class HeldOutEval:
  """The held-out pass (`heldout`): every held-out prompt sampled G times at the run's temperature with fixed keys,
  spliced and scored by the RLT reward (`rollout_rewards`), in batches of the training step's shape: the sampler
  programs are the step's own, the reward program compiles once, and every transfer is explicit (it runs inside
  the loop's transfer guard). `dispatch` waits for the samples (the splice needs them) and queues the rewards;
  `read` brings them back and gives the `eval/*` means."""

  def __init__(self, rs: loading.RunSetup):
    cfg, self.rs = rs.config, rs
    prompts = cfg.batch_size // cfg.group_size
    self.batches = heldout.batches(rs.heldout, prompts, int(cfg.max_prompt_len), rs.fmt.pad_id)
    calls = prompts // (int(cfg.sample_micro_batch) or prompts)
    # Replicated on the rollout mesh, as the step program hands the sampler its keys (the same compiled sampler),
    # made by one program on every process: a global array, which a device_put from one process's host cannot make.
    on_rollout = jax.sharding.NamedSharding(rs.rollout.mesh, jax.sharding.PartitionSpec())
    make = jax.jit(lambda: [rl_step.sample_keys(int(cfg.seed), EVAL_KEY_STEP - i, calls)
                            for i in range(len(self.batches))], out_shardings=on_rollout)
    self.keys = make()  # once, before the loop

  def dispatch(self, params) -> list:
    rs = self.rs
    copy = precision.compute_copy(params, rs.config.dtype, rs.rollout.shardings)
    sampled = [sample_step(rs, copy, b, k) for (b, _), k in zip(self.batches, self.keys)]
    out = []
    for (batch, n), s in zip(self.batches, sampled):
      ro = finish_rollout(rs, batch, read_samples(s))
      reward, m, _ = rollout_rewards(rs, params, ro)
      out.append((dict(prompts=n, matched=ro["reward"].matched, lengths=ro["lengths"]),
                  dict(reward=reward, r_ss=m["r_ss"], r_kl=m["r_kl"])))
    return out

  def read(self, queued: list) -> dict:
    rows = distributed.to_host([dev for _, dev in queued])  # one transfer
    return heldout.summary([dict(host, **r) for (host, _), r in zip(queued, rows)], int(self.rs.config.group_size))


def initial_state(rs: loading.RunSetup, optimizer) -> dict:
  """params, AdamW state, reference, step and bad-step counters, everything on the mesh."""
  replicated = jax.sharding.NamedSharding(rs.mesh, jax.sharding.PartitionSpec())
  # Mixed precision (precision.py): params and AdamW moments in param_dtype, the reference (forward only) in the
  # compute dtype, as the student is.
  ref_params = precision.compute_copy(rs.teacher_params, rs.config.dtype)
  if ref_params is rs.teacher_params:  # same dtype: no copy was made, and the reference needs buffers of its own
    ref_params = jax.tree.map(jnp.copy, ref_params)
  zero = jax.device_put(np.zeros((), np.int32), replicated)
  state = {"params": rs.teacher_params, "opt_state": optim.init_state(optimizer, rs.teacher_params),
           "ref_params": ref_params, "step": zero, "bad_steps": jax.device_put(np.zeros((), np.int32), replicated)}
  # Everything on the mesh (scalars such as Adam's count replicated).
  return jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                      else jax.device_put(x, replicated), state)


class RLTrainer:
  """`loop.Trainer` for RL. The sampling of step k+1 is queued right after step k's program (synchronous: from
  θ_k+1, which that program lays out for it) or right before it (overlap: from θ_k), so the host splices each step
  while the devices work and never holds them up between steps."""

  def __init__(self, rs: loading.RunSetup, state: dict, it, total: int, writer: metrics.RunWriter,
               ckpt: checkpointing.Checkpointer, held: HeldOutEval | None = None):
    cfg = rs.config
    self.rs, self.state, self.it, self.total, self.writer, self.ckpt = rs, state, it, total, writer, ckpt
    self.held, self.eval_every = held, int(cfg.get("eval_every", 0)) if held is not None else 0
    self.overlap = bool(cfg.overlap)
    prompts = cfg.batch_size // cfg.group_size
    self.sc = rl_step.StepConfig(
        rs.teacher_config, rs.student_config, rs.grpo_config, rs.reward_config, cfg.dtype, int(cfg.group_size),
        int(cfg.max_new_tokens), int(cfg.logprob_chunk_size), int(cfg.reward_micro_batch), self.overlap,
        int(cfg.seed), prompts // (int(cfg.sample_micro_batch) or prompts))
    shardings = jax.tree.map(lambda x: x.sharding, state)  # fixed in and out: the program compiles once
    self.program = rl_step.make_step(self.sc, optim.make_optimizer(rs.grpo_config.optim), shardings,
                                     jax.tree.map(lambda x: x.sharding, rs.student_params), rs.rollout.shardings,
                                     rs.mesh)
    self.first = rl_step.make_first_sampling(self.sc, shardings["params"], rs.rollout.shardings,
                                             steps_ahead=int(self.overlap))
    self.next = None     # (batch, its queued sampling) of the step to run next
    self.ahead = None    # overlap: (rollout params, keys) the step after the next one samples from
    self._data_state = None

  def _sample_next(self, rollout, keys):
    batch = distributed.gather_rows(next(self.it))  # one process: its batch as it is
    return batch, sample_step(self.rs, rollout, batch, keys)

  def dispatch(self, step: int):
    rs, more = self.rs, step + 1 < self.total
    t0 = time.perf_counter()
    if self.next is None:  # the run's first step (or a resumed run's): lay out its sampling
      with sharding.use_mesh(rs.mesh, rs.rules):
        rollout, keys = self.first(self.state["params"], self.state["step"])
      self.next, self.ahead = self._sample_next(rollout, keys[0]), (rollout, keys[-1])
    batch, sampled = self.next
    parts = read_samples(sampled)  # waits for this step's sampling only
    t1 = time.perf_counter()
    ro = finish_rollout(rs, batch, parts)
    dev = upload(rs, ro, off_policy=self.overlap)
    self._data_state, self.next = self.it.get_state(), None  # before any batch of a later step is read
    if self.overlap and more:  # step k+1 from θ_k, queued before θ_k → θ_k+1: its splice overlaps the update
      self.next = self._sample_next(*self.ahead)
    with sharding.use_mesh(rs.mesh, rs.rules):
      self.state, out, ahead = self.program(self.state, rs.student_params, dev)
    if self.overlap:
      self.ahead = ahead
    elif more:  # step k+1 from θ_k+1, queued behind the update
      self.next = self._sample_next(*ahead)
    times = dict(time_sample=t1 - t0, time_splice=time.perf_counter() - t1)
    # The held-out pass of θ_k+1, queued behind the step (and the next sampling); its means join step k+1's line.
    due = self.eval_every and (step + 1) % self.eval_every == 0
    return out, batch, ro, times, self.held.dispatch(self.state["params"]) if due else None

  def report(self, step: int, out, seconds: float):
    device, batch, ro, times, held = out
    m = distributed.to_host(device)  # the step's metrics: one transfer, a step late
    s, cfg = m["scalars"], self.rs.config
    last = {k: float(v) for k, v in s.items() if k not in ("skipped", "bad_steps")}
    lengths = ro["lengths"]
    last.update(skipped=bool(s["skipped"]), completion_len_mean=float(lengths.mean()),
                completion_len_max=int(lengths.max()),
                # Share of the rows the decode loop computed that were still generating (1 = no work on finished rows).
                decode_live_fraction=float((lengths - 1).sum()) / max(ro["decode_row_steps"], 1.0),
                truncated_fraction=float(np.mean(~ro["reward"].matched & (lengths >= cfg.max_new_tokens))),
                tokens_per_s=float(lengths.sum()) / max(seconds, 1e-9), time_step=seconds,
                time_program=max(seconds - times["time_sample"] - times["time_splice"], 0.0), **times)
    self.writer.write_completions(metrics.completion_rows(
        step + 1, batch, ro["examples"], lengths, m["rows"], cfg.group_size, cfg.log_completions_fraction))
    last["bad_steps"] = int(s["bad_steps"])
    if held is not None:
      last.update(self.held.read(held))
    return last, batch["where"]

  def check(self, step: int, metrics: dict) -> None:
    if metrics["bad_steps"] >= self.rs.config.max_bad_steps:
      raise FloatingPointError(
          f"{metrics['bad_steps']} steps in a row had a non-finite loss or gradient (last at step {step + 1}); "
          f"stopped. The last good checkpoint is in {self.ckpt.directory} (step {self.ckpt.latest_step()}).")

  def data_state(self) -> dict:
    return self._data_state


def run(cfg, workdir: str, *, on_step=None) -> dict:
  """Trains for `cfg.steps` steps in `workdir` (resuming there if it holds checkpoints); returns the last metrics.

  `on_step(step, metrics)`, if given, is called after every step (tests and notebooks use it).
  """
  rs = loading.setup(cfg, workdir, before_loading=preflight.check)
  state = initial_state(rs, optim.make_optimizer(rs.grpo_config.optim))
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), cfg.keep_checkpoints, config=cfg)
  state, data_state = ckpt.restore_latest(state, resume=cfg.resume, steps=cfg.steps)
  it = iter(rs.dataset)
  if data_state is not None:
    it.set_state(data_state)
  start = int(jax.device_get(state["step"]))
  writer = metrics.RunWriter(workdir, resume_step=start, config=cfg)
  held = HeldOutEval(rs) if rs.heldout is not None else None
  trainer = RLTrainer(rs, state, it, cfg.steps, writer, ckpt, held)
  if held is not None and cfg.eval_every and start == 0:  # the baseline the eval/* curve starts from: step 0
    with jax.transfer_guard("disallow"):
      writer.write(0, held.read(held.dispatch(state["params"])))
  last = loop.run(trainer, start=start, total=cfg.steps, checkpoint_every=cfg.checkpoint_every, ckpt=ckpt,
                  writer=writer, bar=loop.progress(cfg.steps, start), on_step=on_step,
                  postfix=lambda m: dict(reward=f"{m['reward_mean']:.3f}", match=f"{m['match_rate']:.2f}"),
                  profile=loop.Profile(run_config.profile_window(cfg), os.path.join(workdir, "profile")),
                  watch=preemption.Watch(cfg.checkpoint_every_minutes))
  if cfg.export_dir:  # every process joins the gather; process 0 writes, with the format the teacher trained in
    hf_checkpoint.save_hf(rs.teacher_config, trainer.state["params"], storage.join(workdir, cfg.export_dir),
                          tokenizer=rs.tokenizer, dtype=cfg.export_dtype or None)
    model_format.write(storage.join(workdir, cfg.export_dir), rs.fmt, "teacher")
  cli.print_summary(workdir, start, cfg.steps)
  return last


if __name__ == "__main__":
  cli.cli(run)
