"""Multi-process runs: how the setup is read from flags and the environment (Slurm node lists, TPU pods, explicit
flags), and real RL runs of 2 processes × 4 CPU devices on localhost, started with launch/local_multiprocess.sh,
against this process's 8 devices: the same losses, rows and params; checkpoints that move between 1 and 2 processes
bit for bit; every row read once. (The re-dealing of data positions across process counts: test_checkpointing.py.)"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import distributed, hf_checkpoint, sharding, train
from rlt_jax.distributed import DistributedError, Plan


# ------------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("a1,b2", "a1"), ("gpu[07-09,12],cpu1", "gpu07"), ("gpu[12,07-09]", "gpu12"),
    ("rack[2-3]-n[001-004]", "rack2-n001"), ("tpu-vm-0", "tpu-vm-0"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
  assert distributed.first_host(nodelist) == host


def test_slurm_variables_give_the_coordinator_size_and_rank():
  env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "gpu[07-09,12]",
         "SLURM_JOB_NODELIST": "other[1-9]", "SLURM_JOB_ID": "1234"}
  # Port 61440 + 1234 mod 4096: one per job, above Linux's ephemeral range.
  assert distributed.plan(env=env) == Plan("slurm", "gpu07:62674", 4, 2, "SLURM_* variables")
  env2 = dict(env, RLT_COORDINATOR_PORT="9000")
  del env2["SLURM_STEP_NODELIST"]  # sbatch without srun's step variables: the job's node list
  assert distributed.plan(env=env2).coordinator == "other1:9000"
  assert distributed.plan(env=dict(env, SLURM_NTASKS="1")).mode == "single"
  assert distributed.plan(env={"SLURM_NTASKS": "4"}).mode == "single"  # the batch script itself, not an srun task
  with pytest.raises(DistributedError, match=r"SLURM_PROCID=4: must be in \[0, SLURM_NTASKS=4\)"):
    distributed.plan(env=dict(env, SLURM_PROCID="4"))
  with pytest.raises(DistributedError, match=r"SLURM_NTASKS='four': expected an integer"):
    distributed.plan("slurm", env=dict(env, SLURM_NTASKS="four"))


def test_explicit_flags_win_over_the_environment_and_are_checked():
  env = {"RLT_COORDINATOR": "10.0.0.2:8476", "RLT_NUM_PROCESSES": "2", "RLT_PROCESS_ID": "1",
         "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "n1"}
  assert distributed.plan(env=env) == Plan("explicit", "10.0.0.2:8476", 2, 1,
                                           "--coordinator/--num_processes/--process_id")
  assert distributed.plan(process_id=0, env=env).process_id == 0
  assert distributed.plan("off", env=env).mode == "single"
  assert distributed.plan(env={}).mode == "single"
  assert distributed.plan(num_processes=1, env={}).mode == "single"
  with pytest.raises(DistributedError, match=r"missing --coordinator \(or RLT_COORDINATOR\), --process_id"):
    distributed.plan(num_processes=2, env={})
  with pytest.raises(DistributedError, match=r"--coordinator='10.0.0.2': expected HOST:PORT"):
    distributed.plan(coordinator="10.0.0.2", num_processes=2, process_id=0, env={})
  with pytest.raises(DistributedError, match=r"--process_id=2: must be in \[0, --num_processes=2\)"):
    distributed.plan(coordinator="h:1", num_processes=2, process_id=2, env={})
  with pytest.raises(DistributedError, match=r"RLT_NUM_PROCESSES='two'"):
    distributed.plan(env={"RLT_NUM_PROCESSES": "two"})
  with pytest.raises(DistributedError, match=r"--distributed='mpi'"):
    distributed.plan("mpi", env={})


def test_tpu_pod_environment_lets_jax_find_the_workers():
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}).mode == "auto"
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "10.0.0.1"}).mode == "single"  # one host
  assert distributed.plan("auto", env={}).mode == "auto"


def test_one_process_needs_no_initialization_and_keeps_host_data_as_it_is():
  assert distributed.initialize(env={}) == Plan("single", source="no multi-process environment found")
  batch = {"ids": np.arange(6).reshape(3, 2), "where": ["a", "b", "c"]}
  assert distributed.gather_rows(batch) is batch
  assert distributed.allgather_objects({"x": 1}) == [{"x": 1}]
  # One process: rows are uploaded explicitly (jax.device_put), split over the mesh's batch axes.
  x = np.arange(16).reshape(8, 2)
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  with jax.transfer_guard("disallow"):
    y = distributed.global_rows(x, mesh)
  assert isinstance(y, jax.Array) and y.sharding.spec == sharding.batch_sharding(mesh, 2).spec
  np.testing.assert_array_equal(np.asarray(y), x)


_SLURM_TASK = """
import json
import numpy as np
from rlt_jax import distributed, sharding
plan = distributed.initialize("slurm")
import jax
i = jax.process_index()
batch = {"ids": np.array([[10 * i + j] * 3 for j in range(2)]), "where": [f"p{i}r{j}" for j in range(2)]}
merged = distributed.gather_rows(batch)
host = np.arange(16).reshape(8, 2)
rows = distributed.global_rows(host, sharding.make_mesh({"fsdp": -1}), sharding.DEFAULT_RULES)
print(json.dumps({"plan": [plan.mode, plan.coordinator, plan.num_processes, plan.process_id],
                  "count": jax.process_count(), "devices": jax.device_count(),
                  "objects": distributed.allgather_objects({"i": i, "s": "x" * (i + 1)}),
                  "ids": merged["ids"].tolist(), "where": merged["where"],
                  "shards": [list(s.data.shape) for s in rows.addressable_shards],
                  "doubled": distributed.to_host(rows * 2).tolist()}))
"""


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_a_two_task_slurm_job_on_localhost_connects_and_gathers_rows_in_stream_order():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("RLT_", "SLURM_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", SLURM_NTASKS="2",
             SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="7", RLT_COORDINATOR_PORT=str(_free_port()))
  procs = [subprocess.Popen([sys.executable, "-c", _SLURM_TASK], cwd=REPO, env=dict(env, SLURM_PROCID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  for i, g in enumerate(got):
    assert g["plan"] == ["slurm", f"localhost:{env['RLT_COORDINATOR_PORT']}", 2, i]
    assert g["count"] == 2 and g["devices"] == 4
    assert g["objects"] == [{"i": 0, "s": "x"}, {"i": 1, "s": "xx"}]
    # Process p's row j is element 2j + p of the stream (data.make_dataset deals round-robin).
    assert g["ids"] == [[0] * 3, [10] * 3, [1] * 3, [11] * 3]
    assert g["where"] == ["p0r0", "p1r0", "p0r1", "p1r1"]
    assert g["shards"] == [[2, 2], [2, 2]]  # 8 rows over fsdp=4: each device receives its 2 rows only
    assert g["doubled"] == (np.arange(16).reshape(8, 2) * 2).tolist()


# ----------------------------------------------------------------------------------------- real 2-process runs
# Adam's first step is lr·g/(|g| + eps): with the default eps (1e-8) it turns the float32 summation-order noise of a
# near-zero gradient (gloo adds across processes in another order than one process does) into a step of up to lr
# (measured: 43 weights 1.7e-4 apart after step 1). eps = 1e-3 bounds that gain by lr/eps, so the runs below must
# agree to float32 noise (measured 6e-8) while the params still move by ~3e-4 a step.
# The held-out pass runs too (2 prompts set aside, at steps 0 and 2): its rows gathered and scored across processes.
OVERRIDES = {"batch_size": 8, "group_size": 4, "max_new_tokens": 8, "steps": 2, "checkpoint_every": 1,
             "keep_checkpoints": 5, "tensorboard": False, "export_dir": "", "grpo.adam_eps": 1e-3, "eval_every": 2,
             "eval.num_prompts": 2}


def _config(assets, **overrides):
  cfg = tiny_module_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  return set_fields(cfg, {**OVERRIDES, **overrides})


def _start_two_processes(assets, workdir, log, **overrides):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
  command = [str(REPO / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4", "-l", str(log), "--",
             sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
             str(workdir), f"--config.teacher_path={assets['teacher']}", f"--config.student_path={assets['student']}",
             f"--config.tokenizer_path={assets['tokenizer']}", *flags]
  log.mkdir(parents=True, exist_ok=True)
  out = open(log / "process_0.log", "w")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log


def _finish(started, timeout=400):
  proc, log = started
  try:
    rc = proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGINT)  # the launcher kills its own two processes (SIGTERM would let them checkpoint)
    proc.wait(30)
    rc = "timeout"
  if rc != 0:
    logs = "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(log.glob("*.log")))
    pytest.fail(f"2-process run failed ({rc}):\n{logs}")


def _resume_copy(src, dst, step):
  """`src` as it was after `step`: later checkpoints removed (the writer drops later metrics lines on resume)."""
  shutil.copytree(src, dst)
  for d in (dst / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > step:
      shutil.rmtree(d)


def _lines(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _metrics(workdir):
  """The training steps' lines (the held-out baseline, step 0, left out)."""
  return [r for r in _lines(workdir) if r["step"] > 0]


def _held_out(workdir):
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
          for r in _lines(workdir) if "eval/reward_mean" in r}


def _params(step_dir):
  """The params of an orbax checkpoint, read onto one device whatever topology wrote them."""
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckptr.metadata(step_dir / "state").item_metadata
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
  return jax.tree.map(np.asarray, ckptr.restore(step_dir / "state", target)["params"])


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
  """Two steps with 2 processes and with 1; then each resumed from its step-1 checkpoint by the other process count:
  first with nothing left to train (the export is the restored params), then for step 2. Each 2-process run goes
  alongside a 1-process run in this process."""
  t0 = time.time()
  root = tmp_path_factory.mktemp("distributed")
  two = _start_two_processes(assets, root / "two", root / "logs_two")
  train.run(_config(assets), str(root / "one"))
  _finish(two)
  _resume_copy(root / "two", root / "two_then_one", 1)
  _resume_copy(root / "one", root / "one_then_two", 1)
  restored = dict(steps=1, export_dir="restored")
  two = _start_two_processes(assets, root / "one_then_two", root / "logs_restore", **restored)
  train.run(_config(assets, **restored), str(root / "two_then_one"))
  _finish(two)
  two = _start_two_processes(assets, root / "one_then_two", root / "logs_resume")
  train.run(_config(assets), str(root / "two_then_one"))
  _finish(two)
  print(f"2-process runs took {time.time() - t0:.0f} s")
  return root


def test_two_processes_train_like_one_process_with_eight_devices(runs):
  one, two = _metrics(runs / "one"), _metrics(runs / "two")
  assert [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    assert a["rows"] == b["rows"]  # the gathered batch is the one a single process reads, in its order
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    # Cross-process reductions (gloo) add in another order than one process does: float32 noise only.
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["completion_len_mean"] == b["completion_len_mean"]
  held_one, held_two = _held_out(runs / "one"), _held_out(runs / "two")
  assert sorted(held_two) == sorted(held_one) == [0, 2]
  for step, values in held_one.items():  # the same held-out rows, keys and scores in 1 and 2 processes
    assert held_two[step] == pytest.approx(values, abs=1e-5)
  start, p1, p2 = _params(runs / "one" / "checkpoints" / "1"), _params(runs / "one" / "checkpoints" / "2"), \
      _params(runs / "two" / "checkpoints" / "2")
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(p1)))
  assert moved > 1e-4  # the second update moved the params 100 times beyond the tolerance below
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), p1, p2)


def test_checkpoints_move_between_one_and_two_processes_bit_for_bit(runs):
  for source, resumed in (("two", "two_then_one"), ("one", "one_then_two")):
    saved = _params(runs / source / "checkpoints" / "1")
    _, exported = hf_checkpoint.load_hf(runs / resumed / "restored")
    jax.tree.map(np.testing.assert_array_equal, exported, saved)


def test_every_row_is_read_once_across_processes_and_resumes(runs):
  one = _metrics(runs / "one")
  rows = [w for r in one for w in r["rows"]]
  assert len(rows) == 4 and len(set(rows)) == 4  # 2 prompts a step, none twice
  for resumed in ("two_then_one", "one_then_two"):
    again = _metrics(runs / resumed)
    assert [r["step"] for r in again] == [1, 2]
    assert [r["rows"] for r in again] == [r["rows"] for r in one]
    assert again[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               _params(runs / "one_then_two" / "checkpoints" / "2"), _params(runs / "one" / "checkpoints" / "2"))


def test_a_bad_flag_stops_the_command_line_with_its_name(tmp_path):
  out = subprocess.run([sys.executable, "-m", "rlt_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
                        "--workdir", str(tmp_path), "--num_processes=2"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, RLT_COORDINATOR="", RLT_PROCESS_ID=""))
  assert out.returncode == 1
  assert re.search(r"error: a multi-process run needs --coordinator, --num_processes and --process_id together; "
                   r"missing --coordinator \(or RLT_COORDINATOR\), --process_id", out.stderr), out.stderr[-2000:]
  assert not os.listdir(tmp_path)
