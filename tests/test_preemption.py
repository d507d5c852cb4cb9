"""Preemption: SIGTERM / SIGUSR1 make a run finish its step, checkpoint and exit with status 75; a restart resumes
exactly where an uninterrupted run stands; `checkpoint_every_minutes` adds checkpoints by the clock. Real signals to
real runs: in this process, a `python -m rlt_jax.train` child, and one of the two processes of a 2-process run (both
must stop at the same step)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import preemption, train

STEPS = 6  # the uninterrupted reference run: a checkpoint after every step (by the clock)
BASE = {"batch_size": 8, "group_size": 4, "max_new_tokens": 16, "checkpoint_every": 100, "keep_checkpoints": 100,
        "tensorboard": False, "export_dir": "",
        # Keeps Adam from amplifying float32 noise, so a 2-process run stays within 1e-6 of one process (as in
        # test_distributed.py: cross-process reductions add in another order).
        "grpo.adam_eps": 1e-3, "eval_every": 0, "eval.num_prompts": 0}


def _config(assets, **overrides):
  cfg = tiny_module_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  return set_fields(cfg, {**BASE, **overrides})


def _flags(assets, **overrides):
  return [f"--config.teacher_path={assets['teacher']}", f"--config.student_path={assets['student']}",
          f"--config.tokenizer_path={assets['tokenizer']}",
          *(f"--config.{k}={v}" for k, v in {**BASE, **overrides}.items())]


def _metrics(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in open(path)] if path.exists() else []


def _steps(workdir):
  return sorted(int(d.name) for d in (pathlib.Path(workdir) / "checkpoints").iterdir() if d.name.isdigit())


def _params(workdir, step):
  """The params of checkpoint `step`, read onto one device whatever topology wrote them."""
  ckptr, one = ocp.StandardCheckpointer(), jax.sharding.SingleDeviceSharding(jax.devices()[0])
  item = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), ckptr.metadata(item).item_metadata)
  return jax.tree.map(np.asarray, ckptr.restore(item, target)["params"])


def _same_run(ref, other, upto, *, atol=0.0):
  """`other`'s metrics rows (data rows read, reward) and the params of its checkpoint `upto` are the reference's."""
  a, b = _metrics(ref)[:upto], _metrics(other)
  assert [r["step"] for r in b] == list(range(1, upto + 1))
  assert [r["rows"] for r in b] == [r["rows"] for r in a]  # the data position resumed exactly
  if atol == 0:
    assert [r["reward_mean"] for r in b] == [r["reward_mean"] for r in a]
    jax.tree.map(np.testing.assert_array_equal, _params(other, upto), _params(ref, upto))
  else:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), _params(other, upto),
                 _params(ref, upto))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
  """STEPS uninterrupted steps; checkpoint_every_minutes ~0 gives a checkpoint after every one of them although
  checkpoint_every=100."""
  workdir = tmp_path_factory.mktemp("reference")
  train.run(_config(assets, steps=STEPS, checkpoint_every_minutes=1e-9), str(workdir))
  return workdir


def test_the_clock_adds_a_checkpoint_after_every_step_when_due(reference):
  assert _steps(reference) == list(range(1, STEPS + 1))


def test_watch_handles_both_signals_and_counts_minutes_from_the_last_checkpoint():
  now = [0.0]
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watch(2.0, clock=lambda: now[0]) as watch:
    assert watch.poll(0) == preemption.Verdict(None, False)
    now[0] = 119.0
    assert not watch.poll(1).checkpoint_due
    now[0] = 120.0
    assert watch.poll(2).checkpoint_due
    watch.checkpointed()
    assert not watch.poll(3).checkpoint_due
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still stopping on the first
    assert watch.poll(4) == preemption.Verdict("SIGUSR1", False)
  assert signal.getsignal(signal.SIGTERM) is before  # handlers put back
  assert not preemption.Watch(0.0, clock=lambda: 1e9).poll(0).checkpoint_due  # 0 = off


def test_a_signal_checkpoints_the_step_in_flight_and_the_restart_matches_the_uninterrupted_run(assets, reference,
                                                                                              tmp_path):
  def signal_after(step, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGUSR1)

  with pytest.raises(preemption.Stopped, match="stopped on SIGUSR1 after step 3") as stopped:
    train.run(_config(assets, steps=STEPS), str(tmp_path), on_step=signal_after)
  # Step 2 was reported while step 3 ran: step 3 finishes, is checkpointed and logged, nothing after it starts.
  assert stopped.value.step == 3 and _steps(tmp_path) == [3] and len(_metrics(tmp_path)) == 3
  _same_run(reference, tmp_path, 3)
  train.run(_config(assets, steps=STEPS), str(tmp_path))
  _same_run(reference, tmp_path, STEPS)


def _wait_for_rows(workdir, rows, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and len(_metrics(workdir)) < rows:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be signalled"


def test_sigterm_to_a_command_line_run_exits_75_after_its_checkpoint_and_resumes_bitwise(assets, reference,
                                                                                          tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
                           "--workdir", str(tmp_path), *_flags(assets, steps=100)],
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_rows(tmp_path, 1, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.STOPPED_STATUS, err[-3000:]
  stopped_at = _steps(tmp_path)[-1]
  assert f"stopped on SIGTERM after step {stopped_at}" in err
  assert 2 <= stopped_at < STEPS and len(_metrics(tmp_path)) == stopped_at
  _same_run(reference, tmp_path, stopped_at)
  train.run(_config(assets, steps=stopped_at + 1), str(tmp_path))  # steps may change on resume (RL)
  _same_run(reference, tmp_path, stopped_at + 1)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(assets, reference, tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  logs.mkdir()
  command = [str(REPO / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4", "-l", str(logs), "--",
             sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
             str(workdir), *_flags(assets, steps=100)]
  with open(logs / "process_0.log", "w") as out:
    launcher = subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
      _wait_for_rows(workdir, 1, launcher)
      children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
      second = [int(p) for p in children
                if b"RLT_PROCESS_ID=1\0" in pathlib.Path(f"/proc/{p}/environ").read_bytes()]
      assert len(second) == 1, children
      os.kill(second[0], signal.SIGTERM)  # process 1 only: process 0 learns of it through the coordinator
      rc = launcher.wait(300)
    finally:
      if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
  text = {p.name: p.read_text() for p in logs.glob("process_*.log")}
  assert rc == preemption.STOPPED_STATUS, "\n".join(t[-2000:] for t in text.values())
  stopped_at = _steps(workdir)[-1]
  for name in ("process_0.log", "process_1.log"):  # the same step in both, though only process 1 was signalled
    assert f"stopped on SIGTERM after step {stopped_at}" in text[name], text[name][-2000:]
  assert "SIGTERM received" in text["process_1.log"] and "SIGTERM received" not in text["process_0.log"]
  assert 2 <= stopped_at < STEPS
  # The 2-process checkpoint resumes in one process where the uninterrupted one-process run stands.
  train.run(_config(assets, steps=stopped_at + 1), str(workdir))
  _same_run(reference, workdir, stopped_at + 1, atol=1e-6)


@pytest.mark.parametrize("srun_status,sigterm,requeued", [(75, False, True), (75, True, False), (1, False, False),
                                                          (0, False, False)])
def test_the_slurm_script_requeues_after_the_time_limit_warning_only(tmp_path, srun_status, sigterm, requeued):
  """launch/gpu_slurm.sbatch with stand-ins for srun and scontrol: status 75 after SIGUSR1 (the time-limit warning,
  which only the tasks get) requeues the job; after a SIGTERM to the batch shell too (scancel, a preemption) it
  does not; the tasks' status is the script's."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(f"#!/bin/bash\n{'kill -TERM $PPID' if sigterm else ':'}\nexit {srun_status}\n")
  (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO))
  out = subprocess.run(["bash", str(REPO / "launch" / "gpu_slurm.sbatch"), "--config", "configs/tiny.py"], env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == srun_status, out.stderr
  log = tmp_path / "scontrol.log"
  assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else "")
