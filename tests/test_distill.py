"""rlt_jax.distill: the candidate rule, Stratos rows that read back, every item exactly once (also across a real
SIGKILL and restart), the datasets folder, torn last lines."""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, set_fields
from rlt_jax import data, distill, formats, hf_checkpoint, rows, tiny


def test_choose_prefers_matched_then_fitting_then_reward_lowest_index_on_ties():
  assert distill.choose([False, True, True], [True, False, True], [9.0, 5.0, 1.0]) == 2   # matched and fits
  assert distill.choose([False, True, True], [True, False, False], [9.0, 1.0, 2.0]) == 2  # matched, best reward
  assert distill.choose([False, False], [True, False], [-3.0, 4.0]) == 0                 # none matched: fits first
  assert distill.choose([True, True, True], [True, True, True], [1.0, 2.0, 2.0]) == 1     # tie: lowest index
  assert distill.choose([True, True], [True, True], [float("nan"), -50.0]) == 1           # NaN ranks last


def _config(assets, workdir_items=8, **overrides):
  cfg = distill.default_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  cfg.format.teacher_system, cfg.format.student_system = tiny.TEACHER_SYSTEM, tiny.STUDENT_SYSTEM
  cfg.max_prompt_len, cfg.max_new_tokens, cfg.max_student_len, cfg.logprob_chunk_size = 384, 24, 448, 128
  cfg.distill.candidates, cfg.distill.items_per_batch, cfg.distill.limit = 2, 4, workdir_items
  return set_fields(cfg, overrides)


def _lines(path):
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_rows_read_back_and_every_item_is_written_once(assets, tmp_path):
  src = tmp_path / "items.jsonl"
  sample = open(data.SAMPLE_PATH).read().splitlines()[:8]
  sample[3] = json.dumps({"question": "no solution here"})           # a bad row: skipped, counted, recorded
  src.write_text("\n".join(sample) + "\n")
  cfg = _config(assets, **{"data.path": str(src), "distill.student_context": 300})
  counts = distill.run(cfg, str(tmp_path / "out"))
  written, skipped = _lines(tmp_path / "out" / "distill.jsonl"), _lines(tmp_path / "out" / "skipped.jsonl")
  assert sorted([r["index"] for r in written] + [s["index"] for s in skipped]) == list(range(8))
  assert counts == {"rows": len(written), "skipped": len(skipped), "total": 8}
  assert {"index": 3, "reason": "missing_field"}.items() <= skipped[0].items() and skipped[0]["where"].endswith(":4")
  fmt = formats.RLTFormat(hf_checkpoint.load_tokenizer(assets["tokenizer"]), teacher_system=cfg.format.teacher_system,
                          student_system=cfg.format.student_system)
  for r in written:
    original = rows.read_row(json.loads(sample[r["index"]]))
    back = rows.read_row(r)                                       # the Stratos reader (auto-detected)
    assert (back["question"], back["solution"], back["reasoning"] or "") == \
        (original["question"], original["solution"], r["reasoning_trace"])
    assert back["system"] == fmt.student_system
    # The kept candidate follows the documented rule on the recorded flags and rewards.
    assert r["candidate"] == distill.choose(r["candidate_matched"], r["candidate_fits"], r["candidate_rewards"])
    assert r["reward"] == r["candidate_rewards"][r["candidate"]] and r["fits"] == (r["student_len"] <= 300)
    np.testing.assert_allclose(r["reward"], r["r_ss"] - r["r_kl"] - (0 if r["matched"] else 1), atol=1e-4)
  # The datasets folder holds the same written and feeds student SFT batches.
  import datasets
  ds = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
  assert sorted(ds["index"]) == sorted(r["index"] for r in written)
  batch = next(iter(data.make_dataset([str(tmp_path / "out" / "dataset")], fmt, kind="student_sft", batch_size=2,
                                      buckets=(1024,), num_epochs=1, process_index=0, process_count=1)))
  assert batch["loss_mask"].any(axis=1).all()
  # A second run with the same command finds nothing left to do and writes nothing twice.
  distill.run(cfg, str(tmp_path / "out"))
  assert len(_lines(tmp_path / "out" / "distill.jsonl")) == len(written)


def test_drop_rule_and_torn_last_line(assets, tmp_path):
  cfg = _config(assets, workdir_items=4, **{"distill.on_all_failed": "drop", "max_new_tokens": 2,
                                            "distill.export_dataset": False})
  distill.run(cfg, str(tmp_path))                                    # 2 new tokens: no end tag anywhere
  skipped = _lines(tmp_path / "skipped.jsonl")
  assert _lines(tmp_path / "distill.jsonl") == [] and {s["reason"] for s in skipped} <= {"no_end_tag", "too_long"}
  assert sorted(s["index"] for s in skipped) == [0, 1, 2, 3]
  with open(tmp_path / "skipped.jsonl", "a") as f:
    f.write('{"index": 7, "reas')                                    # killed mid-write
  assert distill._jsonl_done(str(tmp_path / "skipped.jsonl")) == {0, 1, 2, 3}
  assert open(tmp_path / "skipped.jsonl").read().endswith("\n")


def test_bad_distill_config_names_the_field(assets, tmp_path):
  with pytest.raises(distill.ConfigError, match="config.distill.candidates"):
    distill.run(_config(assets, **{"distill.candidates": 0}), str(tmp_path))
  with pytest.raises(distill.ConfigError, match="config.distill.on_all_failed"):
    distill.run(_config(assets, **{"distill.on_all_failed": "retry"}), str(tmp_path))


def test_sigkill_and_restart_write_every_item_exactly_once(assets, tmp_path):
  n = 24
  cmd = [sys.executable, "-m", "rlt_jax.distill", "--config", str(REPO / "configs" / "distill_tiny.py"),
         "--workdir", str(tmp_path), f"--config.teacher_path={assets['teacher']}",
         f"--config.student_path={assets['student']}", f"--config.tokenizer_path={assets['tokenizer']}",
         f"--config.distill.limit={n}", "--config.distill.items_per_batch=2", "--config.max_new_tokens=16"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rng, deadline = random.Random(1), time.time() + 300
  while time.time() < deadline and proc.poll() is None and len(_lines(tmp_path / "distill.jsonl")) < 2:
    time.sleep(0.05)
  time.sleep(rng.uniform(0, 1.5))
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  before = len(_lines(tmp_path / "distill.jsonl"))
  assert 0 < before
  subprocess.run(cmd, check=True, env=env, capture_output=True)
  rows, skipped = _lines(tmp_path / "distill.jsonl"), _lines(tmp_path / "skipped.jsonl")
  indices = [r["index"] for r in rows] + [s["index"] for s in skipped]
  assert sorted(indices) == list(range(n))                           # each item once: none lost, none repeated
  assert len(rows) > before


def test_damaged_lines_are_reported_with_file_and_line_and_removed(tmp_path, caplog):
  path = tmp_path / "distill.jsonl"
  lines = ['{"index": 0}', '{"index": 1, "reas', "not json", '{"index": "2"}', "[3]", '{"index": 4}', '{"index": true}']
  path.write_text("\n".join(lines) + '\n{"index": 9, "to')                     # and a torn last line
  with caplog.at_level(logging.WARNING, logger="rlt_jax"):
    assert distill._jsonl_done(str(path)) == {0, 4}
  assert [f"{path}:{n}: damaged line" in caplog.text for n in (2, 3, 4, 5, 7)] == [True] * 5
  assert path.read_text() == '{"index": 0}\n{"index": 4}\n'                    # rewritten without them
  assert not os.path.exists(f"{path}.tmp")


def test_damaged_middle_lines_are_redone_exactly_once(assets, tmp_path, caplog):
  """A damaged middle line of distill.jsonl and a damaged skipped.jsonl line: both named as file:line, their items
  done again, every item in the two files exactly once."""
  src = tmp_path / "items.jsonl"
  sample = open(data.SAMPLE_PATH).read().splitlines()[:6]
  sample[2] = sample[4] = json.dumps({"question": "no solution here"})           # two skipped bad rows
  src.write_text("\n".join(sample) + "\n")
  cfg = _config(assets, workdir_items=6, **{"data.path": str(src), "distill.export_dataset": False,
                                            "distill.items_per_batch": 2})
  out = tmp_path / "out"
  distill.run(cfg, str(out))
  written, skipped = (out / "distill.jsonl").read_text().splitlines(), (out / "skipped.jsonl").read_text().splitlines()
  assert len(written) >= 3 and len(skipped) >= 2
  lost_row, lost_skip = json.loads(written[1])["index"], json.loads(skipped[0])["index"]
  written[1] = written[1][:60]                                                   # not JSON any more
  skipped[0] = json.dumps({"reason": "missing_field"})                           # JSON without an index
  (out / "distill.jsonl").write_text("\n".join(written) + "\n")
  (out / "skipped.jsonl").write_text("\n".join(skipped) + "\n")
  with caplog.at_level(logging.WARNING, logger="rlt_jax"):
    assert distill.run(cfg, str(out))["total"] == 6
  assert f"{out / 'distill.jsonl'}:2: damaged line" in caplog.text
  assert f"{out / 'skipped.jsonl'}:1: damaged line" in caplog.text
  rows, skips = _lines(out / "distill.jsonl"), _lines(out / "skipped.jsonl")
  assert sorted([r["index"] for r in rows] + [s["index"] for s in skips]) == list(range(6))
  assert lost_row in [r["index"] for r in rows] and lost_skip in [s["index"] for s in skips]


@pytest.mark.parametrize("cause", ["other_columns", "missing_fields", "too_long"])
def test_data_without_a_usable_item_stops_distill_at_once(assets, tmp_path, cause):
  """Other column names, rows missing their fields, every prompt over max_prompt_len: distill stops before sampling
  (it used to finish with nothing written), naming the data, the skips per reason and the first offending row."""
  import re

  from test_data_survey import unusable_data
  path, first = unusable_data(tmp_path, cause)
  reason, limit = ("too_long", 32) if cause == "too_long" else ("missing_field", 384)
  with pytest.raises(distill.ConfigError, match=re.escape(
      f"config.data.path: no usable row in {path}: all 6 rows skipped ({reason} 6); first skipped: {first} ({reason}")):
    distill.run(_config(assets, max_prompt_len=limit, **{"data.path": str(path)}), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "distill.jsonl").exists()


def test_distill_tiny_keeps_every_item_and_logs_its_data_line(assets, tmp_path, caplog, monkeypatch):
  """configs/distill_tiny.py explains its items whole (none over max_prompt_len) and says so before sampling."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("distill_tiny", REPO / "configs" / "distill_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = assets["teacher"], assets["student"], assets["tokenizer"]
  cfg.distill.limit = 0
  monkeypatch.setattr(distill, "_explain", lambda *a: (_ for _ in ()).throw(RuntimeError("stopped")))
  with caplog.at_level("INFO", logger="rlt_jax"), pytest.raises(RuntimeError, match="stopped"):
    distill.run(cfg, str(tmp_path))
  (line,) = [m for m in caplog.messages if m.startswith("data: ")]
  assert line.startswith(f"data: 300 rows in {data.SAMPLE_PATH}: 300 used, none skipped; the longest prompt has 542 "
                         "tokens (config.max_prompt_len=544)"), line
  assert not (tmp_path / "skipped.jsonl").exists() or not _lines(tmp_path / "skipped.jsonl")
