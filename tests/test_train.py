"""The RL loop end to end on tiny local models: one step, learning, compile-once, sharding, config errors, and a
real SIGKILL + resume that must reproduce the uninterrupted run bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import data, rewards, run_setup, train


def small_config(assets, **overrides):
  cfg = tiny_module_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  cfg.batch_size, cfg.group_size, cfg.max_new_tokens = 8, 4, 16
  cfg.steps, cfg.checkpoint_every, cfg.tensorboard, cfg.export_dir = 2, 100, False, ""
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
              "clip_fraction", "grad_norm", "lr", "tokens_per_s", "time_sample", "time_reward", "time_update",
              "decode_live_fraction"):
    assert key in row, key
  assert row["step"] == 1 and np.isfinite(row["reward_mean"]) and row["reward_mean"] == last["reward_mean"]
  assert row["lr"] == pytest.approx(cfg.grpo.learning_rate)
  assert 0 < row["decode_live_fraction"] <= 1
  assert len(row["rows"]) == 2 and all(":" in r for r in row["rows"])  # 8 completions = 2 prompts × 4
  completions = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
  assert len(completions) == 8 and {"explanation", "reward", "r_ss", "r_kl", "matched"} <= set(completions[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "checkpoints" / "1").is_dir()  # the last step is always saved


def test_update_compiles_once(assets, tmp_path):
  compiles, after_first = [], {}

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.run(small_config(assets, steps=4), str(tmp_path),
              on_step=lambda step, m: after_first.setdefault(step, len(compiles)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after_first[1] > 0  # the first step compiles sampler, reward and update ...
  assert after_first[4] == after_first[1], f"recompiled after step 1: {after_first}"  # ... and nothing after


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
  # A moving policy: step 1 is on-policy (its loss is taken before any update, so it is the lr = 0 run's); later
  # steps are sampled one update behind.
  assert runs["over"][0]["loss"] == runs["sync0"][0]["loss"] and runs["over"][0]["off_policy_logp_gap"] == 0
  assert all(m["off_policy_logp_gap"] == 0 for m in runs["sync0"])
  assert all(abs(m["off_policy_logp_gap"]) > 1e-4 for m in runs["over"][1:])


def test_micro_batched_sampling_and_reward_equal_one_call(assets, tmp_path):
  """Near-greedy sampling (T → 0): the sampler's calls of one prompt each give the one call's tokens; the reward in
  parts of 2 rows gives the one call's rewards."""
  cfg = small_config(assets, temperature=1e-4, **{"reward.teacher_temperature": 1e-4})
  rs = run_setup.setup(cfg, str(tmp_path))
  batch = next(iter(rs.dataset))
  whole = train.finish_rollout(rs, batch, train.sample_step(rs, rs.teacher_params, batch, 0))
  rs.config.sample_micro_batch = 1
  parts = train.finish_rollout(rs, batch, train.sample_step(rs, rs.teacher_params, batch, 0))
  np.testing.assert_array_equal(parts["teacher_ids"], whole["teacher_ids"])
  np.testing.assert_allclose(parts["sample_logp"], whole["sample_logp"], atol=1e-5)
  st = whole["student"]
  args = (rs.teacher_config, rs.teacher_params, rs.student_config, rs.student_params, whole["teacher_ids"],
          whole["teacher_mask"], whole["teacher_expl"], st["input_ids"], st["attention_mask"],
          st["explanation_mask"], st["solution_mask"], st["matched"], rs.reward_config)
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
])
def test_bad_config_fails_at_start_naming_the_field(assets, tmp_path, overrides, message):
  with pytest.raises(run_setup.ConfigError, match=message):
    train.run(small_config(assets, **overrides), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def _command(assets, workdir, steps):
  return [sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
          str(workdir), f"--config.teacher_path={assets['teacher']}", f"--config.student_path={assets['student']}",
          f"--config.tokenizer_path={assets['tokenizer']}", "--config.batch_size=8", "--config.group_size=4",
          "--config.max_new_tokens=16", f"--config.steps={steps}", "--config.checkpoint_every=2",
          "--config.tensorboard=False", "--config.export_dir=export"]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(assets, tmp_path):
  steps, env = 7, dict(os.environ, PYTHONUNBUFFERED="1")
  subprocess.run(_command(assets, tmp_path / "straight", steps), check=True, env=env, capture_output=True)
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

  a, b = metrics_rows(tmp_path / "straight"), metrics_rows(killed)
  assert [r["step"] for r in b] == list(range(1, steps + 1))
  assert [r["rows"] for r in a] == [r["rows"] for r in b]  # every data row consumed exactly as often
  assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
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
  from rlt_jax import checkpoint
  _, initial = checkpoint.load_hf(assets["teacher"])
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored["params"], initial)
