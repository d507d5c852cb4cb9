"""storage: local paths and gs:// URLs (against the local GCS emulator of conftest's `gcs` fixture)."""
import json
import os

import pytest

from rlt_jax import storage


def test_paths_local_and_url(gcs, tmp_path):
  assert storage.is_url("gs://b/x") and storage.is_url("s3://b") and not storage.is_url("/tmp/x")
  assert not storage.is_url("runs/gs:/x") and not storage.is_url("")
  assert storage.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert storage.abspath("gs://b/run") == "gs://b/run"
  assert storage.abspath("run") == os.path.abspath("run")
  url = f"{gcs}/paths/a/b.txt"
  assert not storage.exists(url)
  storage.write_text(url, "one\n")
  assert storage.isfile(url) and storage.isdir(f"{gcs}/paths/a") and not storage.isfile(f"{gcs}/paths/a")
  assert storage.listdir(f"{gcs}/paths") == ["a"] and storage.listdir(f"{gcs}/paths/none") == []
  with storage.open_file(url) as f:
    assert f.read() == "one\n"
  storage.write_text(str(tmp_path / "t.txt"), "local")
  assert (tmp_path / "t.txt").read_text() == "local" and not (tmp_path / "t.txt.tmp").exists()


def test_a_workdir_url_is_probed(gcs):
  from rlt_jax import cli
  cli.check_workdir(f"{gcs}/probe/run", "--workdir")
  assert storage.listdir(f"{gcs}/probe/run") == []  # the probe object is gone
  with pytest.raises(cli.WorkdirError, match=r"--workdir=gs://no-such-bucket/run: cannot be written"):
    cli.check_workdir("gs://no-such-bucket/run", "--workdir")


def test_local_model_dir_cache_reused(gcs, tmp_path, assets):
  """A model directory in a bucket is copied file by file into the cache once; a second call downloads nothing,
  a changed file (another size) is downloaded again; other weight formats are left in the bucket."""
  url = f"{gcs}/cache_test/teacher"
  for name in os.listdir(assets["teacher"]):
    storage.upload(os.path.join(assets["teacher"], name), f"{url}/{name}")
  storage.write_text(f"{url}/pytorch_model.bin", "not needed")
  cache = str(tmp_path / "cache")
  local = storage.local_model_dir(url, cache)
  assert local.startswith(cache)
  assert sorted(os.listdir(local)) == sorted(os.listdir(assets["teacher"]))
  for name in os.listdir(local):
    assert open(os.path.join(local, name), "rb").read() == open(os.path.join(assets["teacher"], name), "rb").read()
  stamps = {n: os.stat(os.path.join(local, n)).st_mtime_ns for n in os.listdir(local)}
  storage.write_text(f"{url}/config.json", open(os.path.join(local, "config.json")).read() + " ")
  assert storage.local_model_dir(url, cache) == local
  changed = {n for n in os.listdir(local) if os.stat(os.path.join(local, n)).st_mtime_ns != stamps[n]}
  assert changed == {"config.json"}
  with pytest.raises(FileNotFoundError, match="no model files"):
    storage.local_model_dir(f"{gcs}/cache_test/missing", cache)
  assert storage.local_model_dir(str(tmp_path), cache) == str(tmp_path)


def test_mirror_uploads_whole_objects(gcs, tmp_path):
  """A Mirror of a URL starts from the object's lines and uploads the whole file on sync (never a partial line)."""
  url = f"{gcs}/mirror/out.jsonl"
  storage.write_text(url, '{"i": 0}\n')
  m = storage.Mirror(url, scratch=str(tmp_path))
  assert open(m.local).read() == '{"i": 0}\n'
  with open(m.local, "a") as f:
    f.write('{"i": 1}\n')
  with storage.open_file(url) as f:
    assert f.read() == '{"i": 0}\n'  # not synced yet: the object is the old whole file
  m.sync()
  with storage.open_file(url) as f:
    assert f.read() == '{"i": 0}\n{"i": 1}\n'
  local = storage.Mirror(str(tmp_path / "x.jsonl"))
  assert local.local == str(tmp_path / "x.jsonl")


def _upload_tree(local, url):
  for name in os.listdir(local):
    storage.upload(os.path.join(local, name), f"{url}/{name}")


def _rows(path):
  with storage.open_file(path) as f:
    return [json.loads(line) for line in f]


def test_a_run_entirely_on_gs_killed_and_resumed_ends_as_on_local_disk(gcs, assets, tmp_path):
  """Workdir, data, teacher, student and tokenizer all gs:// URLs: a tiny RL run stopped after its step-1 checkpoint
  and resumed ends with the metrics, data rows and exported weights of the same run on local disk; the checkpoints,
  metrics, TensorBoard events and export are in the bucket."""
  from conftest import set_fields, tiny_module_config
  from rlt_jax import data, train
  base = f"{gcs}/e2e"
  for role in ("teacher", "student", "tokenizer"):
    _upload_tree(assets[role], f"{base}/{role}")
  storage.upload(str(data.SAMPLE_PATH), f"{base}/data/sample.jsonl")

  def config(prefix, data_path):
    cfg = tiny_module_config()
    cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = (f"{prefix}/{r}" for r in ("teacher", "student",
                                                                                          "tokenizer"))
    return set_fields(cfg, {"batch_size": 8, "group_size": 4, "max_new_tokens": 16, "steps": 3, "checkpoint_every": 1,
                            "export_dir": "export", "data.path": data_path, "eval_every": 0, "eval.num_prompts": 0})

  local = tmp_path / "local"
  train.run(config(os.path.dirname(assets["teacher"]), str(data.SAMPLE_PATH)), str(local))
  run = f"{base}/run"

  def stop(step, m):
    if step == 2:
      raise RuntimeError("killed after the step-1 checkpoint")
  cfg = config(base, f"{base}/data/sample.jsonl")
  with pytest.raises(RuntimeError, match="killed"):
    train.run(cfg, run, on_step=stop)
  assert storage.listdir(f"{run}/checkpoints") == ["1"] and not storage.exists(f"{run}/export")
  assert [r["step"] for r in _rows(f"{run}/metrics.jsonl")] == [1, 2]
  train.run(cfg, run)

  a, b = _rows(local / "metrics.jsonl"), _rows(f"{run}/metrics.jsonl")
  assert [r["step"] for r in b] == [1, 2, 3]
  assert all(w.startswith(f"{base}/data/sample.jsonl:") for r in b for w in r["rows"])  # located in the bucket
  line = lambda rows: [[w.rsplit(":", 1)[1] for w in r["rows"]] for r in rows]  # noqa: E731
  assert line(a) == line(b)  # the same data rows, step by step
  for key in ("reward_mean", "loss", "match_rate"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  with storage.open_file(f"{run}/export/model.safetensors", "rb") as f:
    assert f.read() == (local / "export" / "model.safetensors").read_bytes(), "resumed params differ"
  assert set(storage.listdir(f"{run}/checkpoints")) >= {"3"}
  assert "rlt_format.json" in storage.listdir(f"{run}/export") and storage.listdir(f"{run}/tensorboard")
  assert len(_rows(f"{run}/completions.jsonl")) == len(_rows(local / "completions.jsonl"))


def test_a_missing_url_is_a_config_error_naming_the_field(gcs, assets):
  from conftest import set_fields, tiny_module_config
  from rlt_jax import run_config
  cfg = tiny_module_config()
  cfg.teacher_path, cfg.student_path = f"{gcs}/nowhere/teacher", assets["student"]
  with pytest.raises(run_config.ConfigError, match=r"teacher_path.*not a directory"):
    run_config.validate(cfg)
  cfg = set_fields(tiny_module_config(), {"data.path": f"{gcs}/nowhere/train.jsonl"})
  with pytest.raises(run_config.ConfigError, match=r"data\.path.*cannot be read.*no such file"):
    run_config.validate(cfg)


def test_distill_writes_whole_jsonl_objects_to_gs_and_resumes_from_them(gcs, assets, tmp_path):
  """distill with a gs:// workdir and data: distill.jsonl / skipped.jsonl in the bucket hold every item once (whole
  objects, every line parseable); a second run reads them back and explains nothing again."""
  from test_distill import _config
  from rlt_jax import data, distill
  sample = open(data.SAMPLE_PATH).read().splitlines()[:4]
  sample[1] = json.dumps({"question": "no solution here"})
  storage.write_text(f"{gcs}/distill/items.jsonl", "\n".join(sample) + "\n")
  cfg = _config(assets, workdir_items=4, **{"data.path": f"{gcs}/distill/items.jsonl",
                                            "distill.export_dataset": False})
  out = f"{gcs}/distill/out"
  counts = distill.run(cfg, out)
  written, skipped = _rows(f"{out}/distill.jsonl"), _rows(f"{out}/skipped.jsonl")
  assert counts == {"rows": len(written), "skipped": 1, "total": 4} and skipped[0]["index"] == 1
  assert sorted(r["index"] for r in written + skipped) == [0, 1, 2, 3]
  assert distill.run(cfg, out) == counts
  assert _rows(f"{out}/distill.jsonl") == written


def test_evaluate_reads_the_model_and_benchmark_from_gs_and_writes_its_results_there(gcs, assets, tmp_path):
  """evaluate with model, tokenizer, benchmark file and workdir in the bucket: the same results and per-problem
  rows as the run on local paths."""
  from test_evaluate import config_for
  from rlt_jax import data, evaluate
  base = f"{gcs}/evaluate"
  for role in ("student", "tokenizer"):
    _upload_tree(assets[role], f"{base}/{role}")
  storage.upload(str(data.SAMPLE_PATH), f"{base}/gsm8k.jsonl")
  kw = dict(limit=4, batch_size=2, max_new_tokens=16)
  local = evaluate.run(config_for(assets["student"], assets["tokenizer"], **kw), str(tmp_path))
  remote = evaluate.run(config_for(f"{base}/student", f"{base}/tokenizer", benchmarks=(f"gsm8k={base}/gsm8k.jsonl",),
                                   **kw), f"{base}/out")
  assert remote["model_path"] == f"{base}/student"
  assert remote["benchmarks"]["gsm8k"]["pass@1"] == local["benchmarks"]["gsm8k"]["pass@1"]
  with storage.open_file(f"{base}/out/results.json") as f:
    assert json.load(f)["benchmarks"]["gsm8k"]["n_problems"] == 4
  strip = lambda rows: [{k: v for k, v in r.items() if k != "where"} for r in rows]  # noqa: E731
  assert strip(_rows(f"{base}/out/gsm8k.jsonl")) == strip(_rows(tmp_path / "gsm8k.jsonl"))
  assert storage.isfile(f"{base}/out/results.md")
