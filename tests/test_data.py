"""grain pipeline: shuffling/epochs/process shards, bucketed batches, resumable state, bad-row accounting."""
import json
import logging

import numpy as np
import pytest

from rlt_jax import data

END = "<|end_of_explanation|>"


@pytest.fixture(scope="module")
def rows(shared_data):
  lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines[:20]]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _prompt_ds(path, fmt, **kw):
  kw = {"batch_size": 2, "buckets": (256, 512, 1024), "num_epochs": 1, "process_index": 0, "process_count": 1, **kw}
  return data.make_dataset(path, fmt, **kw)


def _wheres(ds):
  return [w for b in ds for w in b["where"]]


def test_shuffle_epochs_and_process_shards(tmp_path, fmt, rows):
  path = _jsonl(tmp_path / "r.jsonl", rows)
  every = [f"{path}:{i + 1}" for i in range(len(rows))]
  stream = _wheres(_prompt_ds(path, fmt, num_epochs=2, seed=3))
  e0, e1 = stream[:20], stream[20:]
  assert sorted(e0) == sorted(every) and sorted(e1) == sorted(every)  # each epoch is a permutation
  assert e0 != every and e0 != e1  # shuffled, differently each epoch
  assert _wheres(_prompt_ds(path, fmt, num_epochs=2, seed=3)) == stream  # seeded
  assert _wheres(_prompt_ds(path, fmt, num_epochs=2, seed=4)) != stream
  assert _wheres(_prompt_ds(path, fmt, shuffle=False)) == every
  # process p gets elements p, p + n, ... of the global stream
  shards = [_wheres(_prompt_ds(path, fmt, num_epochs=2, seed=3, process_index=p, process_count=2)) for p in (0, 1)]
  assert shards[0] == stream[0::2] and shards[1] == stream[1::2]
  with pytest.raises(ValueError, match="process_index 2"):
    _prompt_ds(path, fmt, process_index=2, process_count=2)


def test_prompt_batches_left_padded_to_buckets(tmp_path, fmt, rows):
  path = _jsonl(tmp_path / "r.jsonl", rows)
  by_where = {f"{path}:{i + 1}": r for i, r in enumerate(rows)}
  lens = sorted(len(fmt.teacher_prompt(r["question"], r["answer"])) for r in rows)
  buckets = (lens[0] - 1, lens[8], lens[-1])  # the smallest fits nothing; the longest fits every row
  shapes = set()
  for b in _prompt_ds(path, fmt, batch_size=2, buckets=buckets):
    ids, mask = b["prompt_ids"], b["prompt_mask"]
    shapes.add(ids.shape)
    assert ids.dtype == np.int32 and mask.dtype == bool
    lens = []
    for i, w in enumerate(b["where"]):
      r = by_where[w]
      want = fmt.teacher_prompt(r["question"], r["answer"])
      n = int(mask[i].sum())
      lens.append(n)
      assert mask[i, ids.shape[1] - n:].all()  # right-aligned
      np.testing.assert_array_equal(ids[i, ids.shape[1] - n:], want)
      assert (ids[i, : ids.shape[1] - n] == fmt.pad_id).all()
      assert b["question"][i] == r["question"] and b["solution"][i] == r["answer"] and b["system"][i] is None
    assert ids.shape[1] == min(L for L in buckets if L >= max(lens))  # smallest bucket that fits
  assert shapes == {(2, buckets[1]), (2, buckets[2])}


def _bad_file(tmp_path, rows):
  """Good rows with one bad row of each kind; returns path and {line: reason}."""
  long_q = " ".join(["word"] * 1000)
  lines = [json.dumps(rows[0]), json.dumps({"answer": "x\n#### 1"}), json.dumps(rows[1]),
           json.dumps({"question": "", "answer": "x\n#### 1"}), json.dumps({"question": ["a"], "answer": "x"}),
           json.dumps({"question": long_q, "answer": "x\n#### 1"}), '{"question": "Q", "answer": ',
           '', json.dumps(rows[2])]
  raw = ("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9", "answer": "a"}\n' + \
      (json.dumps(rows[3]) + "\n").encode()
  path = tmp_path / "bad.jsonl"
  path.write_bytes(raw)
  bad = {2: "missing_field", 4: "empty_field", 5: "wrong_type", 6: "too_long", 7: "broken_json", 10: "undecodable"}
  return path, bad


def test_bad_rows_skipped_counted_and_reported(tmp_path, fmt, rows, caplog):
  path, bad = _bad_file(tmp_path, rows)
  stats = data.RowStats()
  with caplog.at_level(logging.WARNING, logger="rlt_jax.data"):
    got = _wheres(_prompt_ds(path, fmt, batch_size=1, shuffle=False, stats=stats))
  assert got == [f"{path}:{n}" for n in (1, 3, 9, 11)]  # every good row, none of the bad ones; blank line ignored
  assert dict(stats.total_bad) == {r: 1 for r in bad.values()} and stats.total_ok == 4
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert "epoch 0: 4 rows used, 6 skipped" in msg
  for line, reason in bad.items():
    assert f"{reason}: 1 (e.g. {path}:{line})" in msg
  with pytest.raises(data.BadRowError, match=r"bad\.jsonl:2: bad row \(missing_field\)"):
    _wheres(_prompt_ds(path, fmt, batch_size=1, shuffle=False, strict=True))


def test_state_restores_mid_epoch(tmp_path, fmt, rows):
  path, _ = _bad_file(tmp_path, rows)
  good = _jsonl(tmp_path / "good.jsonl", rows[4:12])
  kw = dict(batch_size=3, num_epochs=3, seed=7)
  ref = list(_prompt_ds([path, good], fmt, **kw))
  assert len(ref) == (12 * 3) // 3
  for k in (2, 5):  # mid-epoch, and past the first epoch end (12 good rows per epoch)
    stats = data.RowStats()
    it = iter(_prompt_ds([path, good], fmt, stats=stats, **kw))
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    stats2 = data.RowStats()
    it2 = iter(_prompt_ds([path, good], fmt, stats=stats2, **kw))
    it2.set_state(state)
    rest = list(it2)
    assert len(rest) == len(ref) - k
    for a, b in zip(rest, ref[k:]):
      assert a["where"] == b["where"]
      np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
    assert stats2.total_ok == 36 and sum(stats2.total_bad.values()) == 18  # counts carried over


def test_sft_kinds(tmp_path, tok, fmt):
  stratos = {"system": "Stratos student prompt.", "conversations": [
      {"from": "user", "value": "What is 2+3?"},
      {"from": "assistant", "value": "<|begin_of_thought|>\n\nOkay, 2+3 is 5.\n\n<|end_of_thought|>\n\n"
                                     "<|begin_of_solution|>\n\n5\n\n<|end_of_solution|>"}]}
  custom = {"prompt": "What is 1+1?", "solution": "2", "reasoning_trace": "One and one make two."}
  path = _jsonl(tmp_path / "sft.jsonl", [stratos, custom, {"question": "No trace?", "solution": "S"}])
  b = next(iter(_prompt_ds(path, fmt, kind="teacher_sft", batch_size=3, shuffle=False)))
  assert b["input_ids"].shape == (3, 256) and b["loss_mask"].shape == (3, 256)
  assert (b["input_ids"][~b["attention_mask"]] == fmt.pad_id).all()
  expl = [tok.decode(b["input_ids"][i][b["loss_mask"][i]]) for i in range(3)]
  assert expl == ["Okay, 2+3 is 5.\n\n" + END + "<|im_end|>", "One and one make two." + END + "<|im_end|>",
                  "S" + END + "<|im_end|>"]  # no trace: the solution is the explanation (official behaviour)
  stats = data.RowStats()
  bs = list(_prompt_ds(path, fmt, kind="student_sft", batch_size=2, shuffle=False, stats=stats))
  assert len(bs) == 1 and dict(stats.total_bad) == {"missing_field": 1}
  full = tok.decode(bs[0]["input_ids"][0][bs[0]["attention_mask"][0]])
  assert full == fmt.student_text("What is 2+3?", "Okay, 2+3 is 5.\n\n", "\n\n5\n\n", system="Stratos student prompt.")
  assert tok.decode(bs[0]["input_ids"][1][bs[0]["loss_mask"][1]]).startswith("<|begin_of_thought|>\n\nOne and one")


def test_collate_students(tok, fmt, rows):
  qs, sols = [r["question"] for r in rows[:3]], [r["answer"] for r in rows[:3]]
  comps = [fmt.completion_ids("Because."), fmt.completion_ids("A longer explanation here."), np.zeros(0, np.int32)]
  exs = fmt.student_examples(qs, sols, comps)
  b = data.collate_students(exs, (128, 512), fmt.pad_id)
  assert b["input_ids"].shape == (3, 512) and b["matched"].tolist() == [True, True, False]
  for i, e in enumerate(exs):
    n = len(e.input_ids)
    np.testing.assert_array_equal(b["input_ids"][i, :n], e.input_ids)
    np.testing.assert_array_equal(b["explanation_mask"][i, :n], e.explanation_mask)
    np.testing.assert_array_equal(b["solution_mask"][i, :n], e.solution_mask)
    assert b["attention_mask"][i].sum() == n and not b["explanation_mask"][i, n:].any()
  with pytest.raises(ValueError, match="over the longest bucket 128"):
    data.collate_students(exs, (128,), fmt.pad_id)


def test_bundled_sample(shared_data, fmt):
  sample = data.SAMPLE_PATH.read_bytes()
  assert len(sample) < 300_000
  lines = sample.decode().splitlines()
  assert 200 <= len(lines) and lines == (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[: len(lines)]
  readme = (data.SAMPLE_PATH.parent / "README.md").read_text()
  assert "MIT License" in readme and "openai/grade-school-math" in readme and "Copyright (c) 2021 OpenAI" in readme
  b = next(iter(_prompt_ds(data.SAMPLE_PATH, fmt, batch_size=4, buckets=(512,))))
  assert b["prompt_ids"].shape == (4, 512)


