"""metrics.RunWriter's W&B logging, in wandb's offline mode (no network): the run's scalars and completions table as
W&B stores them (read back from the offline run's .wandb file), the same W&B run continued on resume, nothing
imported when it is off, and a bad `wandb` field named before any work."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import metrics, run_config, train


def wandb_records(workdir, timeout: float = 60.0) -> list:
  """The protobuf records of every offline W&B run under `workdir`/wandb, in order, once each run file holds its
  closing `exit` record (wandb's writer may still be flushing when `finish` returns)."""
  deadline = time.time() + timeout
  while True:
    paths = sorted(pathlib.Path(workdir, "wandb").glob("offline-run-*/run-*.wandb"))
    records = [r for p in paths for r in _read_wandb_file(p)]
    exits = sum(r.WhichOneof("record_type") == "exit" for r in records)
    if (paths and exits == len(paths)) or time.time() > deadline:
      return records
    time.sleep(0.1)


def _read_wandb_file(path) -> list:
  """A .wandb file: a LevelDB-style log after a 7-byte header, 32 KiB blocks (counted from the file's start) of
  records (crc32c 4, length 2, type 1: full / first / middle / last), each a wandb_internal_pb2.Record."""
  from wandb.proto import wandb_internal_pb2
  out, data, pos, parts = [], path.read_bytes(), 7, b""
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if pos + 7 + length > len(data):  # still being written
      break
    parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 4):  # a full record, or the last part of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      out.append(record)
      parts = b""
  return out


def history(workdir) -> dict:
  """{step: {key: value}} of the logged W&B history (tables as their JSON description)."""
  steps = {}
  for r in wandb_records(workdir):
    if r.WhichOneof("record_type") == "history":
      row = {}
      for item in r.history.item:  # a table is stored flattened: nested_key ("completions", "nrows"), ...
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        node = row
        for k in parents:
          node = node.setdefault(k, {})
        node[leaf] = json.loads(item.value_json)
      steps.setdefault(row.pop("_step"), {}).update(row)
  return steps


def _config(**wandb):
  cfg = tiny_module_config()
  cfg.tensorboard = False
  return set_fields(cfg, {"wandb.mode": "offline", **{f"wandb.{k}": v for k, v in wandb.items()}})


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_MODE", raising=False)


def test_scalars_and_completions_reach_wandb_and_a_resume_continues_the_same_run(tmp_path):
  cfg = _config(project="rlt-test", name="tiny", tags=("a", "b"))
  writer = metrics.RunWriter(str(tmp_path), config=cfg)
  writer.write(1, {"reward_mean": -1.5, "skipped": False}, rows=["x:1"])
  writer.write_completions([{"step": 2, "question": "q?", "explanation": "e", "reward": 0.25}])
  writer.write(2, {"reward_mean": -1.25, "eval/reward_mean": -2.0})
  writer.close()
  run_id = (tmp_path / metrics.WANDB_ID_FILE).read_text().strip()
  logged = history(tmp_path)
  assert logged[1]["reward_mean"] == -1.5 and logged[2]["reward_mean"] == -1.25
  assert logged[2]["eval/reward_mean"] == -2.0
  assert "skipped" in logged[1] and "rows" not in logged[1]  # scalars only (a bool is a number to W&B)
  table = logged[2]["completions"]
  assert table["_type"] == "table-file" and table["nrows"] == 1
  files = list(tmp_path.glob(f"wandb/offline-run-*{run_id}/files/{table['path']}"))
  assert json.loads(files[0].read_text())["columns"] == ["step", "question", "explanation", "reward"]
  runs = [r.run for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"]
  assert runs[0].run_id == run_id and runs[0].project == "rlt-test" and runs[0].display_name == "tiny"
  assert list(runs[0].tags) == ["a", "b"]
  config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
  assert config["group_size"] == cfg.group_size and config["wandb"]["project"] == "rlt-test"

  again = metrics.RunWriter(str(tmp_path), resume_step=2, config=cfg)  # a resumed run: the same W&B run id
  again.write(3, {"reward_mean": -1.0})
  again.close()
  ids = {r.run.run_id for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"}
  assert ids == {run_id} and history(tmp_path)[3]["reward_mean"] == -1.0


def test_an_rl_run_logs_its_step_metrics_to_wandb(assets, tmp_path):
  cfg = _config(project="rlt-test")
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  set_fields(cfg, {"batch_size": 8, "group_size": 4, "max_new_tokens": 16, "steps": 2, "checkpoint_every": 100,
                   "export_dir": "", "log_completions_fraction": 1.0, "eval_every": 0, "eval.num_prompts": 0})
  train.run(cfg, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  logged = history(tmp_path)
  assert sorted(logged) == [1, 2]
  for line in lines:
    assert logged[line["step"]]["reward_mean"] == pytest.approx(line["reward_mean"])
    assert logged[line["step"]]["completions"]["nrows"] == cfg.batch_size


def test_wandb_off_imports_nothing_and_bad_fields_are_named():
  code = ("import sys; from rlt_jax import metrics, run_config; import tempfile\n"
          "cfg = run_config.default_config(); d = tempfile.mkdtemp()\n"
          "w = metrics.RunWriter(d, config=cfg); w.write(1, {'a': 1.0}); w.close()\n"
          "assert 'wandb' not in sys.modules, 'wandb imported'\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  cfg = _config(project="p", mode="cloud")
  with pytest.raises(run_config.ConfigError, match=r"config.wandb.mode='cloud': must be one of"):
    run_config.check_logging(run_config.Checker(cfg).need, cfg)
