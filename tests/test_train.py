"""The RL loop end to end on tiny local models: one step, learning, compile-once, sharding, config errors, and a
real SIGKILL + resume that must reproduce the uninterrupted run bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import data, heldout, loading, rewards, rl_step, run_config, train


def small_config(assets, **overrides):
  cfg = tiny_module_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  cfg.batch_size, cfg.group_size, cfg.max_new_tokens = 8, 4, 16
  cfg.steps, cfg.checkpoint_every, cfg.tensorboard, cfg.export_dir = 2, 100, False, ""
  cfg.eval_every, cfg.eval.num_prompts = 0, 0  # the tests that evaluate turn it on
  return set_fields(cfg, overrides)


def metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_one_step_writes_metrics_completions_and_tensorboard(assets, tmp_path):
  cfg = small_config(assets, steps=1, tensorboard=True, log_completions_fraction=1.0)
  last = train.run(cfg, str(tmp_path))
  (row,) = metrics_rows(tmp_path)
  for key in ("step", "reward_mean", "reward_std", "r_ss", "solution_logp_min", "r_kl", "kl_max", "match_rate",
              "advantage_std", "kl_to_ref", "completion_len_mean", "completion_len_max", "truncated_fraction",
              "clip_fraction", "grad_norm", "lr", "tokens_per_s", "time_sample", "time_splice", "time_program",
              "time_step", "ratio_mean", "reward_std_batch", "kl_to_ref_token",
              "decode_live_fraction"):
    assert key in row, key
  assert row["step"] == 1 and np.isfinite(row["reward_mean"]) and row["reward_mean"] == last["reward_mean"]
  assert row["lr"] == pytest.approx(cfg.grpo.learning_rate)
  # Synchronous, one update per batch: old log-probs are the policy's own, stopped, so the ratio is exactly 1.
  assert row["ratio_mean"] == 1.0 and row["clip_fraction"] == 0.0
  assert 0 < row["decode_live_fraction"] <= 1
  assert len(row["rows"]) == 2 and all(":" in r for r in row["rows"])  # 8 completions = 2 prompts × 4
  completions = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
  assert len(completions) == 8 and {"explanation", "reward", "r_ss", "r_kl", "matched"} <= set(completions[0])
  # reward_std is the official one: the unbiased std within each group of 4, averaged; reward_std_batch the std of
  # all 8 (completions.jsonl holds every row, in batch order, here).
  r = np.array([c["reward"] for c in completions])
  assert [c["row"] for c in completions] == [c["row"] for c in completions[:8:4] for _ in range(4)]
  assert row["reward_std"] == pytest.approx(r.reshape(2, 4).std(axis=1, ddof=1).mean(), rel=1e-5)
  assert row["reward_std_batch"] == pytest.approx(r.std(), rel=1e-5)
  assert row["reward_std"] != pytest.approx(row["reward_std_batch"], rel=1e-3)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "checkpoints" / "1").is_dir()  # the last step is always saved


@pytest.mark.parametrize("overlap", [False, True])
def test_a_steady_step_runs_prefill_decode_and_one_program_compiled_once(assets, tmp_path, overlap):
  """Compile events name every executable: nothing compiles after step 1 (the update compiles once, in both modes),
  and once the caches are cleared, one steady-state step runs exactly prefill + decode (its sampler call) + the step
  program: no eager one-op programs (key fold-ins, scalar conversions, advantages) on the step path."""
  compiles, after, counting, window = [], {}, [False], []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kw.get("fun_name"))
      if counting[0]:
        window.append(kw.get("fun_name"))

  def on_step(step, m):
    after[step] = len(compiles)
    counting[0] = step == 3
    if step == 3:  # from here to the next report: one step's dispatch (its sampling, splice, upload, program)
      jax.clear_caches()

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.run(small_config(assets, steps=6, overlap=overlap), str(tmp_path), on_step=on_step)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after[1] > 0 and after[3] == after[1], f"recompiled after step 1: {after}, {compiles[after[1]:]}"
  assert sorted(window) == ["jit(decode)", "jit(prefill)", "jit(rl_step_program)"], window


def test_the_loop_allows_no_implicit_transfer(assets, tmp_path, monkeypatch):
  """The loop runs under jax.transfer_guard("disallow"): a step batch handed to the program as NumPy (an implicit
  upload) stops the run instead of passing silently."""
  monkeypatch.setattr(train, "upload", lambda rs, ro, off_policy: rl_step.StepBatch(ro["reward"]))
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train.run(small_config(assets, steps=1), str(tmp_path))


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_splices_the_next_step_while_the_program_runs(assets, tmp_path, monkeypatch, overlap):
  """Timestamps: when each step program's outputs are ready (watched from a thread) and when each splice starts.
  Overlapped, the splice of step k+1 starts before step k's program has finished; synchronous, after it (its
  samples come from θ_k+1)."""
  done, spliced = {}, []
  make_step, finish_rollout = rl_step.make_step, train.finish_rollout

  def watched_make_step(*args, **kw):
    program = make_step(*args, **kw)

    def run(*a):
      out = program(*a)
      k = len(done)
      done[k] = None
      threading.Thread(target=lambda: done.__setitem__(k, (jax.block_until_ready(out[1]), time.perf_counter())[1])
                       ).start()
      return out
    return run

  def timed_finish(*a, **kw):
    spliced.append(time.perf_counter())
    return finish_rollout(*a, **kw)

  monkeypatch.setattr(rl_step, "make_step", watched_make_step)
  monkeypatch.setattr(train, "finish_rollout", timed_finish)
  # Long student rows and short completions: the step program outweighs a sampler call.
  train.run(small_config(assets, steps=5, overlap=overlap, max_new_tokens=8, max_student_len=1024,
                         batch_size=16), str(tmp_path))
  time.sleep(0.5)
  for k in range(1, 4):  # splice k+1 vs program k
    before = spliced[k + 1] < done[k]
    assert before == overlap, (k, spliced, done)


def test_eight_devices_give_the_single_device_loss(assets, tmp_path):
  losses = {}
  for name, overrides in {"one": dict(num_devices=1), "eight": dict(mesh={"data": 2, "fsdp": 2, "tensor": 2})}.items():
    rows = []
    train.run(small_config(assets, steps=2, **overrides), str(tmp_path / name), on_step=lambda s, m: rows.append(m))
    losses[name] = rows
  # The GRPO loss is a sum of O(1) terms (advantage × ratio) that nearly cancel, so float32 reduction order
  # differences across layouts show up at ~1e-5 absolute.
  for one, eight in zip(losses["one"], losses["eight"]):
    assert one["reward_mean"] == pytest.approx(eight["reward_mean"], abs=1e-4)
    assert one["loss"] == pytest.approx(eight["loss"], abs=5e-5)
    assert one["grad_norm"] == pytest.approx(eight["grad_norm"], rel=1e-3)
    assert one["kl_to_ref"] == pytest.approx(eight["kl_to_ref"], abs=1e-6)


def test_a_fixed_batch_is_learned(assets, tmp_path):
  """Two prompts, seen every step: the teacher learns to close its explanations on them and the reward rises."""
  src = tmp_path / "two.jsonl"
  src.write_text("".join(open(data.SAMPLE_PATH).readlines()[:2]))
  seen = []
  cfg = small_config(assets, steps=30, batch_size=16, group_size=8, max_new_tokens=48,
                     **{"data.path": str(src), "grpo.learning_rate": 3e-4, "grpo.warmup_steps": 3})
  train.run(cfg, str(tmp_path / "run"), on_step=lambda s, m: seen.append(m))
  reward = [m["reward_mean"] for m in seen]
  match = [m["match_rate"] for m in seen]
  assert np.mean(reward[-5:]) > np.mean(reward[:5]) + 0.1, reward
  assert np.mean(match[-5:]) > np.mean(match[:5]) + 0.15, match


def test_overlap_mode_equals_synchronous_while_the_policy_does_not_move(assets, tmp_path):
  """Overlapped, step k+1 is sampled from θ_k while θ_k → θ_k+1 is computed, and its update uses the sampler's
  log-probs as the behaviour policy. With lr = 0 the policy never moves: every step equals the synchronous one."""
  runs = {}
  for name, lr, overlap in (("sync0", 0.0, False), ("over0", 0.0, True), ("over", 3e-3, True)):
    rows = []
    train.run(small_config(assets, steps=3, overlap=overlap, **{"grpo.learning_rate": lr}), str(tmp_path / name),
              on_step=lambda s, m: rows.append(m))
    runs[name] = rows
  for a, b in zip(runs["sync0"], runs["over0"]):
    assert a["reward_mean"] == b["reward_mean"] and a["completion_len_mean"] == b["completion_len_mean"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and abs(b["off_policy_logp_gap"]) < 1e-4
  # A moving policy: step 1 is sampled from the params it updates (its loss is the lr = 0 run's, the behaviour
  # log-probs being the sampler's); later steps are sampled one update behind.
  assert runs["over"][0]["loss"] == pytest.approx(runs["sync0"][0]["loss"], abs=1e-5)
  assert abs(runs["over"][0]["off_policy_logp_gap"]) < 1e-4
  assert all(m["off_policy_logp_gap"] == 0 for m in runs["sync0"])
  assert all(abs(m["off_policy_logp_gap"]) > 1e-4 for m in runs["over"][1:])


def test_micro_batched_sampling_and_reward_equal_one_call(assets, tmp_path):
  """Near-greedy sampling (T → 0): the sampler's calls of one prompt each give the one call's tokens; the reward in
  parts of 2 rows gives the one call's rewards."""
  cfg = small_config(assets, temperature=1e-4, **{"reward.teacher_temperature": 1e-4})
  rs = loading.setup(cfg, str(tmp_path))
  batch = next(iter(rs.dataset))
  whole = train.rollout(rs, rs.teacher_params, batch, 0)
  rs.config.sample_micro_batch = 1
  parts = train.rollout(rs, rs.teacher_params, batch, 0)
  np.testing.assert_array_equal(parts["reward"].teacher_ids, whole["reward"].teacher_ids)
  np.testing.assert_allclose(parts["sample_logp"], whole["sample_logp"], atol=1e-5)
  args = (rs.teacher_config, rs.teacher_params, rs.student_config, rs.student_params, whole["reward"],
          rs.reward_config)
  one = rewards.rlt_rewards(*args, chunk_size=128)[0]
  split = rewards.rlt_rewards(*args, chunk_size=128, micro_batch=2)[0]
  np.testing.assert_allclose(np.asarray(split), np.asarray(one), atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(batch_size=10), r"config.batch_size=10: must be a positive multiple of config.group_size=4"),
    (dict(teacher_path="/no/such/model"), r"config.teacher_path='/no/such/model': is not a directory"),
    (dict(teacher_path="", student_path="", tiny_models=False), r"config.teacher_path='': is required"),
    ({"reward.kl_penalty_reductions": ("mean", "median")}, r"config.reward: .*unknown reduction\(s\) \['median'\]"),
    ({"grpo.micro_batches": 3}, r"config.batch_size=8: must be divisible by config.grpo.micro_batches=3"),
    ({"reward.teacher_temperature": 1.0}, r"config.reward.teacher_temperature"),
    (dict(sample_micro_batch=3), r"config.sample_micro_batch=3: must be 0 or divide the 2 prompts"),
    (dict(reward_micro_batch=3), r"config.reward_micro_batch=3: must be 0 or divide config.batch_size=8"),
    ({"data.path": "/no/such.jsonl"}, r"^config.data.path='/no/such.jsonl': cannot be read: no such data file"),
    (dict(export_dtype="fp8"), r"config.export_dtype='fp8': must be one of"),
    ({"decode.buckets": 0}, r"config.decode.buckets=0: must be >= 1"),
    (dict(rollout_tensor=3), r"config.rollout_tensor: rollout tensor size 3 does not divide the mesh's 8 devices"),
    (dict(eval_every=-1), r"config.eval_every=-1: must be an integer >= 0"),
    (dict(eval_every=5), r"config.eval.num_prompts=0: must be >= 1 with config.eval_every=5"),
    ({"eval.num_prompts": -2}, r"config.eval.num_prompts=-2: must be an integer >= 0"),
    ({"eval.num_prompts": 2, "eval.path": "/no/such.jsonl"}, r"^config.eval.path='/no/such.jsonl': cannot be read"),
    ({"eval.num_prompts": 300}, r"config.eval.num_prompts=300: sets aside 300 of the 300 usable rows"),
    ({"eval.num_prompts": 400}, r"config.eval.num_prompts=400: .* has only 300 usable prompts"),
])
def test_bad_config_fails_at_start_naming_the_field(assets, tmp_path, overrides, message):
  with pytest.raises(run_config.ConfigError, match=message):
    train.run(small_config(assets, **overrides), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def test_held_out_eval_at_its_steps_never_trained_on_and_recomputable(assets, tmp_path):
  """eval_every=2 on 3 of 6 rows set aside: eval/* at steps 0, 2, 4 only, finite; the training batches hold exactly
  the other 3 rows (without the set-aside every row would show up in 8 draws); the step-0 means equal train.rollout +
  rollout_rewards on the held-out rows with the eval keys (NumPy means of the real rows); the eval's sampler calls
  are the step's programs (one prefill and one decode compile in the run) and nothing compiles after step 1."""
  src = tmp_path / "six.jsonl"
  src.write_text("".join(open(data.SAMPLE_PATH).readlines()[:6]))
  cfg = small_config(assets, steps=4, eval_every=2, tensorboard=True,
                     **{"data.path": str(src), "eval.num_prompts": 3})
  compiles, after = [], {}

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kw.get("fun_name"))

  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.run(cfg, str(tmp_path / "run"), on_step=lambda s, m: after.__setitem__(s, len(compiles)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  rows = metrics_rows(tmp_path / "run")
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  for r in rows:
    assert ("eval/reward_mean" in r) == (r["step"] % 2 == 0), r
    if r["step"] % 2 == 0:
      assert all(np.isfinite(r[k]) for k in heldout.KEYS)
  assert "reward_mean" not in rows[0]  # the baseline line holds the held-out means only
  assert compiles.count("jit(prefill)") == 1 and compiles.count("jit(decode)") == 1, compiles
  assert after[4] == after[1], compiles[after[1]:after[4]]  # the step-4 pass compiled nothing
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  tb = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
  tb.Reload()
  assert [e.step for e in tb.Scalars("eval/reward_mean")] == [0, 2, 4]

  rs = loading.setup(cfg, str(tmp_path / "again"))
  wheres = [r["where"] for r in rs.heldout.rows]
  lines = [f"{src}:{i}" for i in range(1, 7)]
  assert len(set(wheres)) == 3 and set(wheres) < set(lines)
  trained = {w for r in rows[1:] for w in r["rows"]}
  assert trained == set(lines) - set(wheres), (trained, wheres)
  G, per_row = cfg.group_size, {k: [] for k in ("reward", "r_ss", "r_kl", "matched")}
  held = rs.heldout.rows
  for i, part in enumerate([held[0:2], [held[2], held[2]]]):  # 2 prompts a step; the repeat is left out
    batch = data.collate_prompts(part, (cfg.max_prompt_len,), rs.fmt.pad_id)
    ro = train.rollout(rs, rs.teacher_params, batch, train.EVAL_KEY_STEP - i)
    reward, m, _ = train.rollout_rewards(rs, rs.teacher_params, ro)
    real = (2 if i == 0 else 1) * G
    for k, v in (("reward", reward), ("r_ss", m["r_ss"]), ("r_kl", m["r_kl"]), ("matched", ro["reward"].matched)):
      per_row[k].append(np.asarray(v)[:real])
  want = {k: np.concatenate(v).mean() for k, v in per_row.items()}
  assert rows[0]["eval/reward_mean"] == pytest.approx(want["reward"], rel=1e-5, abs=1e-6)
  assert rows[0]["eval/r_ss_mean"] == pytest.approx(want["r_ss"], rel=1e-5, abs=1e-6)
  assert rows[0]["eval/r_kl_mean"] == pytest.approx(want["r_kl"], rel=1e-5, abs=1e-6)
  assert rows[0]["eval/match_rate"] == pytest.approx(want["matched"])


def _command(assets, workdir, steps):
  return [sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
          str(workdir), f"--config.teacher_path={assets['teacher']}", f"--config.student_path={assets['student']}",
          f"--config.tokenizer_path={assets['tokenizer']}", "--config.batch_size=8", "--config.group_size=4",
          "--config.max_new_tokens=16", f"--config.steps={steps}", "--config.checkpoint_every=2",
          "--config.tensorboard=False", "--config.export_dir=export", "--config.eval_every=3",
          "--config.eval.num_prompts=3"]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(assets, tmp_path):
  steps, env = 7, dict(os.environ, PYTHONUNBUFFERED="1")
  # The uninterrupted run goes alongside the one that is killed (compilation is mostly single-threaded: 2 cores).
  straight = subprocess.Popen(_command(assets, tmp_path / "straight", steps), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
  killed = tmp_path / "killed"
  rng = random.Random(0)
  kill_after = rng.randint(1, steps - 2)  # steps completed before the kill, then a random extra delay
  proc = subprocess.Popen(_command(assets, killed, steps), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (killed / "metrics.jsonl").exists() and len(metrics_rows(killed)) >= kill_after:
      break
    time.sleep(0.05)
  time.sleep(rng.uniform(0, 1.0))
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "export").exists()
  subprocess.run(_command(assets, killed, steps), check=True, env=env, capture_output=True)
  _, err = straight.communicate(timeout=300)
  assert straight.returncode == 0, err[-3000:]

  a, b = metrics_rows(tmp_path / "straight"), metrics_rows(killed)
  assert [r["step"] for r in b] == list(range(0, steps + 1))  # step 0: the held-out baseline
  assert [r.get("rows") for r in a] == [r.get("rows") for r in b]  # every data row consumed exactly as often
  assert [r.get("reward_mean") for r in a] == [r.get("reward_mean") for r in b]
  evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in b]  # at steps 0, 3, 6, as uninterrupted
  assert [bool(e) for e in evals] == [s % 3 == 0 for s in range(steps + 1)]
  assert evals == [{k: v for k, v in r.items() if k.startswith("eval/")} for r in a]
  same = (tmp_path / "straight" / "export" / "model.safetensors").read_bytes() == \
      (killed / "export" / "model.safetensors").read_bytes()
  assert same, "resumed params differ from the uninterrupted run"


def test_non_finite_updates_are_skipped_then_the_run_stops(assets, tmp_path):
  """A NaN reward (injected through the penalty of unmatched completions) makes every loss NaN: each update is
  skipped and logged, and after max_bad_steps in a row the run stops, its checkpoint still the initial params."""
  cfg = small_config(assets, steps=5, checkpoint_every=1, max_bad_steps=2, **{"reward.not_matched_penalty": float("nan")})
  with pytest.raises(FloatingPointError, match=r"2 steps in a row had a non-finite loss or gradient .*step 2"):
    train.run(cfg, str(tmp_path))
  rows = metrics_rows(tmp_path)
  assert [r["skipped"] for r in rows] == [True, True]
  import orbax.checkpoint as ocp
  from rlt_jax import hf_checkpoint
  _, initial = hf_checkpoint.load_hf(assets["teacher"])
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored["params"], initial)


@pytest.mark.parametrize("cause", ["other_columns", "missing_fields", "too_long"])
def test_data_without_a_usable_row_stops_the_run_at_once(assets, tmp_path, cause):
  """Other column names, rows missing their fields, every prompt over max_prompt_len: the run stops before any
  weights load, naming the data, the skips per reason and the first offending row (it used to loop forever)."""
  import re

  from test_data_survey import unusable_data
  path, first = unusable_data(tmp_path, cause)
  reason, limit = ("too_long", 32) if cause == "too_long" else ("missing_field", 544)
  t0 = time.perf_counter()
  with pytest.raises(run_config.ConfigError, match=re.escape(
      f"config.data.path: no usable row in {path}: all 6 rows skipped ({reason} 6); first skipped: {first} ({reason}")):
    train.run(small_config(assets, max_prompt_len=limit, **{"data.path": str(path)}), str(tmp_path / "run"))
  assert time.perf_counter() - t0 < 30 and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_tiny_config_keeps_the_sample_and_says_so_before_the_weights_load(assets, tmp_path, monkeypatch, caplog):
  """configs/tiny.py's max_prompt_len holds the bundled sample's longest prompt (in the tiny tokenizer); the run's
  first data line says so, before the mesh and weights; its max_student_len passes loading's check."""
  monkeypatch.setattr(loading, "make_mesh", lambda cfg: (_ for _ in ()).throw(RuntimeError("stopped before the mesh")))
  with caplog.at_level("INFO", logger="rlt_jax"), pytest.raises(RuntimeError, match="stopped before the mesh"):
    train.run(small_config(assets), str(tmp_path))
  (line,) = [m for m in caplog.messages if m.startswith("data: ")]
  assert line.startswith(f"data: 300 rows in {data.SAMPLE_PATH}: 300 used, none skipped; the longest prompt has 542 "
                         "tokens (config.max_prompt_len=544)"), line
  from rlt_jax import hf_checkpoint
  cfg = tiny_module_config()
  loading._check_student_len(cfg, loading.make_format(cfg, hf_checkpoint.load_tokenizer(assets["tokenizer"])))


def test_resume_checks_config_and_steps_then_passes_a_damaged_step_and_stops_at_a_full_disk(assets, tmp_path, caplog,
                                                                                          monkeypatch):
  """The run config is saved with each checkpoint (JSON); a resume with a field that changes the computation, or with
  fewer steps than done, stops before any step, naming it; a damaged latest step is set aside and the one before
  resumed; a full disk at the next write stops the run in one line, the earlier steps intact and readable."""
  import glob
  import logging
  import re

  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  from rlt_jax import checkpointing
  train.run(small_config(assets, steps=2, checkpoint_every=1), str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  saved = json.loads((ckpts / "2" / "config" / checkpointing.CONFIG_FILE).read_text())
  assert saved["batch_size"] == 8 and saved["teacher_path"] == assets["teacher"]
  with pytest.raises(run_config.ConfigError, match=r"^config.steps=1: fewer than the 2 steps the checkpoint in "):
    train.run(small_config(assets, steps=1), str(tmp_path))
  with pytest.raises(run_config.ConfigError, match=r"wrote the checkpoint at step 2 in .* what a step computes: "
                                                   r"batch_size 8 → 16, max_new_tokens 16 → 8; set them back"):
    train.run(small_config(assets, steps=3, batch_size=16, max_new_tokens=8, sample_micro_batch=2), str(tmp_path))
  assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2]  # nothing written by the refused resumes

  for path in glob.glob(str(ckpts / "2" / "state" / "ocdbt.process_0" / "d" / "*")):  # truncated, one file deleted
    os.truncate(path, os.path.getsize(path) // 2)
  os.remove(ckpts / "2" / "data" / "metadata")
  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def full_disk_at_step_3(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith("3."):
      raise OSError(28, "No space left on device")
    return await write(self, x, directory)
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk_at_step_3)
  with caplog.at_level(logging.WARNING), pytest.raises(checkpointing.CheckpointError) as e:
    train.run(small_config(assets, steps=3, checkpoint_every=1), str(tmp_path))
  assert re.search(rf"checkpoint step 2 in {re.escape(str(ckpts))} cannot be read \(.+\); trying step 1", caplog.text)
  assert str(e.value) == (f"cannot write the checkpoint of step 3 in {ckpts}: [Errno 28] No space left on device; the "
                          "run stopped, and the checkpoints before it (steps 1, 2) are intact: free space or make the "
                          "directory writable, then run the same command again to resume from step 2")
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name != "rlt_jax"]  # no orbax wall
  assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]
  assert sorted(n for n in os.listdir(ckpts) if n.isdigit()) == ["1", "2"]
  assert os.listdir(str(ckpts) + checkpointing.UNREADABLE_SUFFIX) == ["2"]
  for step in (1, 2):  # the steps before the failed write read back (step 2: the one the resumed run wrote)
    assert int(ocp.StandardCheckpointer().restore(ckpts / str(step) / "state")["step"]) == step
