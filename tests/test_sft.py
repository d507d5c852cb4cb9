"""SFT: packing (data invariants, resumable packer, packed loss/gradients = unpacked), truncation and skipped rows,
the step count, and a run that crashes (or is stopped by SIGTERM), resumes and ends where an uninterrupted run ends."""
import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from conftest import REPO, set_fields
from rlt_jax import data, formats, hf_checkpoint, preemption, rows, run_config, sft
from rlt_jax.models import decoder


@pytest.fixture(scope="module")
def tiny(assets):
  tok = hf_checkpoint.load_tokenizer(assets["tokenizer"])
  config, params = hf_checkpoint.load_hf(assets["teacher"])
  return formats.RLTFormat(tok), config, params


def _rows(n, start=0):
  with open(data.SAMPLE_PATH) as f:
    return [rows.read_row(json.loads(line)) for line in f.readlines()[start:start + n]]


def _sft_ds(fmt, path, **kw):
  kw = {**dict(kind="teacher_sft", batch_size=1, buckets=(1024,), num_epochs=1, process_index=0, process_count=1,
              seed=3, truncate=True, drop_remainder=False), **kw}
  return data.make_dataset([str(path)], fmt, **kw)


def test_packing_keeps_every_row_once_in_order_and_restores_mid_stream(tiny):
  fmt = tiny[0]
  plain = [(b["input_ids"][0][b["attention_mask"][0]], b["loss_mask"][0][b["attention_mask"][0]])
           for b in _sft_ds(fmt, data.SAMPLE_PATH)]
  packed = list(_sft_ds(fmt, data.SAMPLE_PATH, pack=True))
  got = []
  for b in packed:
    seg, pos = b["segment_ids"][0], b["positions"][0]
    assert b["input_ids"].shape == (1, 1024)
    ids = sorted(set(seg[seg > 0]))
    assert ids == list(range(1, len(ids) + 1))                      # segments 1, 2, ... then padding
    assert (np.diff(seg[seg > 0]) >= 0).all() and (seg[np.argmax(seg == 0):] == 0).all() if (seg == 0).any() else True
    for s in ids:
      at = seg == s
      assert (pos[at] == np.arange(at.sum())).all()                  # positions restart per row
      got.append((b["input_ids"][0][at], b["loss_mask"][0][at]))
  assert len(got) == len(plain)
  for (a, am), (p, pm) in zip(got, plain):
    np.testing.assert_array_equal(a, p)
    np.testing.assert_array_equal(am, pm)
  # Greedy packing oracle from the row lengths alone.
  n_seq, used = 0, 1024
  for a, _ in plain:
    if used + len(a) > 1024:
      n_seq, used = n_seq + 1, 0
    used += len(a)
  assert len(packed) == n_seq
  # A restored iterator (state taken while a row is carried over) continues with the same sequences.
  it = iter(_sft_ds(fmt, data.SAMPLE_PATH, pack=True))
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [b["input_ids"] for b in it]
  it2 = iter(_sft_ds(fmt, data.SAMPLE_PATH, pack=True))
  it2.set_state(state)
  rest2 = [b["input_ids"] for b in it2]
  assert len(rest) == len(rest2) == len(packed) - 3
  for a, b in zip(rest, rest2):
    np.testing.assert_array_equal(a, b)


def test_truncation_keeps_partial_completions_and_skips_rows_without_target(tmp_path, tiny):
  fmt = tiny[0]
  row = _rows(1)[0]
  prompt_len = len(fmt.teacher_prompt(row["question"], row["solution"]))
  full = fmt.teacher_sft_example(row["question"], row["solution"], row["solution"])
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps({"question": row["question"], "solution": row["solution"]}) + "\n")
  stats = data.RowStats()
  cut = prompt_len + 5                                               # 5 completion tokens survive the cut
  (b,) = list(_sft_ds(fmt, path, buckets=(cut,), stats=stats))
  np.testing.assert_array_equal(b["input_ids"][0], full.input_ids[:cut])
  assert b["loss_mask"][0].sum() == 5
  stats = data.RowStats()
  assert list(_sft_ds(fmt, path, buckets=(prompt_len,), stats=stats)) == []
  assert stats.total_bad == {"no_target": 1}
  with pytest.raises(data.BadRowError, match="rows.jsonl:1.*no_target"):
    list(_sft_ds(fmt, path, buckets=(prompt_len,), strict=True))


def _numpy_nll(config, params, example):
  """−Σ log p of the trained tokens of one unpadded row, from the model's logits with a NumPy log-softmax."""
  logits = np.asarray(decoder.forward(config, params, example.input_ids[None]), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  t = np.flatnonzero(example.loss_mask)
  return -logp[t - 1, example.input_ids[t]].sum(), len(t)


@pytest.mark.parametrize("attention_impl", [None, "xla"])  # blocked tiles with segment ids | one dense mask
def test_packed_loss_and_gradients_equal_unpacked(tiny, attention_impl):
  fmt, config, params = tiny
  config = config.replace(attention_impl=attention_impl)
  examples = [fmt.teacher_sft_example(r["question"], r["solution"], r["solution"].split("\n")[0]) for r in _rows(5)]
  rows = [dict(input_ids=e.input_ids, loss_mask=e.loss_mask) for e in examples]
  unpacked = data.pad_right(rows, (512,), fmt.pad_id)
  unpacked["segment_ids"] = unpacked.pop("attention_mask").astype(np.int32)
  unpacked["positions"] = np.tile(np.arange(512, dtype=np.int32), (5, 1))
  groups, used = [[]], 0
  for r in rows:  # greedy, as the pipeline packs
    if used + len(r["input_ids"]) > 1024:
      groups, used = groups + [[]], 0
    groups[-1].append(r)
    used += len(r["input_ids"])
  assert max(len(g) for g in groups) >= 2
  packed = [data.pack_rows(g, 1024, fmt.pad_id) for g in groups]
  packed = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
  denominator = float(sum(e.loss_mask.sum() for e in examples))

  def loss(batch):
    fn = lambda p: sft.sequence_loss(config, p, batch, chunk_size=256, denominator=denominator)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(fn))(params)

  (lu, gu), (lp, gp) = loss(unpacked), loss(packed)
  nll = sum(_numpy_nll(config, params, e)[0] for e in examples) / denominator
  np.testing.assert_allclose(float(lu), nll, rtol=1e-5)
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)
  # Without segment ids the packed rows would see each other: the loss changes (the test can fail).
  leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  assert abs(float(loss(leaky)[0]) - float(lu)) > 1e-3


def _config(assets, **overrides):
  cfg = sft.default_config()
  cfg.model_path, cfg.tokenizer_path = assets["teacher"], assets["tokenizer"]
  cfg.max_len, cfg.batch_size, cfg.epochs, cfg.steps, cfg.num_devices = 1024, 2, 1, 0, 2
  cfg.learning_rate, cfg.logprob_chunk_size, cfg.tensorboard = 1e-3, 256, False
  cfg.data.path = str(REPO / "rlt_jax" / "assets" / "gsm8k_sample.jsonl")
  return set_fields(cfg, overrides)


def test_step_count_is_one_pass_of_packed_batches(assets, tiny, tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps({"question": r["question"], "solution": r["solution"]}) + "\n"
                          for r in _rows(24)))
  cfg = _config(assets, **{"data.path": str(path), "epochs": 2})
  sequences = len(list(_sft_ds(tiny[0], path, pack=True, seed=cfg.seed, num_epochs=2)))
  assert sft.count_steps(cfg, tiny[0]) == -(-sequences // 2)
  assert sequences < 2 * 24                                          # packing did merge rows


def test_crash_and_resume_end_where_an_uninterrupted_run_ends(assets, tmp_path):
  cfg = _config(assets, steps=5, checkpoint_every=2, lr_schedule="cosine", warmup_ratio=0.2)
  straight = []
  sft.run(cfg, str(tmp_path / "a"), on_step=lambda s, m: straight.append(m["loss"]))

  def crash(step, m):
    if step == 3:
      raise KeyboardInterrupt("killed")

  with pytest.raises(KeyboardInterrupt):
    sft.run(cfg, str(tmp_path / "b"), on_step=crash)
  resumed = []
  sft.run(cfg, str(tmp_path / "b"), on_step=lambda s, m: resumed.append(m["loss"]))
  assert len(resumed) == 3 and resumed == straight[2:]              # resumed after the step-2 checkpoint
  a = (tmp_path / "a" / "export" / "model.safetensors").read_bytes()
  assert a == (tmp_path / "b" / "export" / "model.safetensors").read_bytes()
  rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_signal_stops_sft_after_the_step_in_flight_and_the_restart_ends_as_the_uninterrupted_run(assets, tmp_path):
  """SIGTERM during step 3 (step 2 is reported while it runs): step 3 finishes and is checkpointed (not a
  checkpoint_every step), the run raises preemption.Stopped; the restart's export is the uninterrupted run's."""
  cfg = _config(assets, steps=5, checkpoint_every=100, lr_schedule="cosine", warmup_ratio=0.2)
  sft.run(cfg, str(tmp_path / "a"))

  def signal_at(step, m):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(preemption.Stopped, match="stopped on SIGTERM after step 3"):
    sft.run(cfg, str(tmp_path / "b"), on_step=signal_at)
  assert [d.name for d in (tmp_path / "b" / "checkpoints").iterdir() if d.name.isdigit()] == ["3"]
  sft.run(cfg, str(tmp_path / "b"))
  a = (tmp_path / "a" / "export" / "model.safetensors").read_bytes()
  assert a == (tmp_path / "b" / "export" / "model.safetensors").read_bytes()


def test_bad_config_names_the_field(assets, tmp_path):
  with pytest.raises(sft.ConfigError, match="config.kind"):
    sft.run(_config(assets, kind="judge"), str(tmp_path))
  with pytest.raises(sft.ConfigError, match="config.model_path"):
    sft.run(_config(assets, model_path=str(tmp_path)), str(tmp_path))
  with pytest.raises(sft.ConfigError, match="config.micro_batches"):
    sft.run(_config(assets, micro_batches=3), str(tmp_path))
  with pytest.raises(sft.ConfigError, match="config.batch_size=2: .* 8 devices"):
    sft.run(_config(assets, num_devices=8), str(tmp_path))


@pytest.mark.parametrize("cause", ["other_columns", "missing_fields", "too_long"])
def test_data_without_a_usable_row_stops_sft_at_once(assets, tmp_path, cause):
  """Other column names, rows missing their fields, a max_len that cuts every row before its completion: SFT
  stops before counting or training (with steps > 0 it used to loop forever), naming the data, the skips per reason
  and the first offending row."""
  import re

  from test_data_survey import unusable_data
  path, first = unusable_data(tmp_path, cause)
  reason, max_len = ("no_target", 32) if cause == "too_long" else ("missing_field", 1024)
  with pytest.raises(sft.ConfigError, match=re.escape(
      f"config.data.path: no usable row in {path}: all 6 rows skipped ({reason} 6); first skipped: {first} ({reason}")):
    sft.run(_config(assets, steps=3, max_len=max_len, **{"data.path": str(path)}), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sft_logs_its_data_line_at_start(assets, tmp_path, monkeypatch, caplog):
  """The sample's teacher rows fit the tiny SFT context whole: none skipped, none cut; said before the step count."""
  monkeypatch.setattr(sft, "count_steps", lambda cfg, fmt: (_ for _ in ()).throw(RuntimeError("stopped")))
  with caplog.at_level("INFO", logger="rlt_jax"), pytest.raises(RuntimeError, match="stopped"):
    sft.run(_config(assets), str(tmp_path))
  (line,) = [m for m in caplog.messages if m.startswith("data: ")]
  assert line.startswith(f"data: 300 rows in {data.SAMPLE_PATH}: 300 used, none skipped; the longest row has 847 "
                         "tokens (config.max_len=1024); read in"), line


def test_resume_stops_on_a_changed_field_or_fewer_steps(assets, tmp_path):
  """SFT saves its config with each checkpoint too; its cosine schedule spans config.steps, so steps is compared."""
  sft.run(_config(assets, steps=2, checkpoint_every=1), str(tmp_path))
  with pytest.raises(sft.ConfigError, match=r"what a step computes: learning_rate 0.001 → 0.01; set them back"):
    sft.run(_config(assets, steps=2, learning_rate=1e-2, logprob_chunk_size=128), str(tmp_path))
  with pytest.raises(sft.ConfigError, match=r"^config.steps=1: fewer than the 2 steps the checkpoint in "):
    sft.run(_config(assets, steps=1), str(tmp_path))
  with pytest.raises(sft.ConfigError, match=r": steps 2 → 3 \(an SFT run's learning-rate schedule"):
    sft.run(_config(assets, steps=3), str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]


def test_profile_steps_write_a_trace_of_those_steps(assets, tmp_path):
  """`profile_steps="2,3"`: a jax.profiler trace (xplane.pb, readable by TensorBoard / XProf) under <workdir>/profile,
  and the run's steps and losses unchanged by it; a bad window names the field before any work."""
  plain, traced = [], []
  sft.run(_config(assets, steps=4), str(tmp_path / "plain"), on_step=lambda s, m: plain.append(m["loss"]))
  sft.run(_config(assets, steps=4, profile_steps="2,3"), str(tmp_path / "traced"),
          on_step=lambda s, m: traced.append(m["loss"]))
  assert traced == plain
  traces = list((tmp_path / "traced" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert not (tmp_path / "plain" / "profile").exists()
  for bad, msg in (("3", "expected 'START,END'"), ("4,2", "needs 1 <= START <= END"), ("0,1", "needs 1 <= START")):
    with pytest.raises(run_config.ConfigError, match=rf"config\.profile_steps='{bad}': {re.escape(msg)}"):
      sft.run(_config(assets, profile_steps=bad), str(tmp_path / "bad"))
