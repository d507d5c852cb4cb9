"""data_survey: the start-of-run pass counts exactly what the grain pipeline skips (same reasons, same first file:line),
several processes' shares merge into the whole, strict mode stops at the first bad row, and data with no usable row
stops both the survey and an endless stream with one message naming the file, the counts and what to change."""
import json
import logging

import pytest
from test_data import _bad_file, _jsonl, _prompt_ds, _wheres, rows  # noqa: F401 -- `rows` is a fixture

from rlt_jax import data, data_survey


def test_survey_counts_what_the_pipeline_skips_and_logs_one_line(tmp_path, fmt, rows, caplog):
  path, bad = _bad_file(tmp_path, rows)
  stats = data.RowStats()
  _wheres(_prompt_ds(path, fmt, batch_size=1, shuffle=False, stats=stats))
  with caplog.at_level(logging.INFO, logger="rlt_jax.data"):
    s = data_survey.survey([path], fmt, max_len=1024, length_field="max_prompt_len", batch_rows=3)
  assert (s.rows, s.used, s.skipped) == (10, stats.total_ok, dict(stats.total_bad))
  assert s.first[:3] == (1, f"{path}:2", "missing_field") and s.first[4] == ["answer"]  # what the row did have
  assert s.examples["too_long"] == [(5, f"{path}:6")]
  lens = [len(fmt.teacher_prompt(r["question"], r["answer"])) for r in rows[:4]]
  assert s.longest > 1024 and s.shortest == min(lens)                  # the too-long row was measured too
  (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: 10 rows in")]
  assert line.startswith(f"data: 10 rows in {path}: 4 used, 6 skipped (broken_json 1, e.g. {path}:7; empty_field 1, "
                         f"e.g. {path}:4; missing_field 1, e.g. {path}:2; too_long 1, e.g. {path}:6; ")
  assert f"the longest prompt has {s.longest} tokens (config.max_prompt_len=1024); read in" in line
  one = data_survey.scan([path], fmt, max_len=1024, batch_rows=1)  # one row a tokenizer call: the same counts
  assert (one.used, one.skipped, one.first, one.longest) == (s.used, s.skipped, s.first, s.longest)
  with pytest.raises(data.BadRowError, match=rf"{path}:2: bad row \(missing_field\)"):
    data_survey.survey([path], fmt, max_len=1024, strict=True)


def test_survey_shares_of_several_processes_merge_into_the_whole(tmp_path, fmt, rows):
  path, _ = _bad_file(tmp_path, rows)
  whole = data_survey.scan([path], fmt, max_len=1024)
  parts = [data_survey.scan([path], fmt, max_len=1024, process_index=p, process_count=3) for p in range(3)]
  assert sum(p.rows for p in parts) == 10 and parts[0].first[0] != whole.first[0]  # each process reads its share
  merged = data_survey.DataSummary.merge(parts)
  for f in ("rows", "used", "skipped", "examples", "first", "shortest", "longest", "cut"):
    assert getattr(merged, f) == getattr(whole, f), f


def _within(seconds, fn):
  """fn() under an alarm: a loop that never ends fails the test instead of hanging it."""
  import signal

  def stop(*_):
    raise TimeoutError(f"still running after {seconds} s")
  old = signal.signal(signal.SIGALRM, stop)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    return fn()
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


CAUSES = ("other_columns", "missing_fields", "too_long")


def unusable_data(directory, cause, n=6):
  """(path, first row's location) of data none of whose n rows is usable for `cause` (tests of every command use
  it): the bundled sample's rows with other column names (parquet), without a solution, or whole (too long for a
  limit of 32 tokens)."""
  sample = [json.loads(line) for line in data.SAMPLE_PATH.read_text().splitlines()[:n]]
  if cause == "other_columns":
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = directory / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": r["question"], "response": r["answer"]} for r in sample]), path)
    return path, f"{path}[row 0]"
  path = _jsonl(directory / f"{cause}.jsonl", [{"question": r["question"]} for r in sample]
                if cause == "missing_fields" else sample)
  return path, f"{path}:1"


@pytest.mark.parametrize("cause", CAUSES)
def test_no_usable_row_stops_the_survey_and_the_endless_stream(tmp_path, fmt, cause):
  path, first = unusable_data(tmp_path, cause)
  reason, max_len = ("too_long", 32) if cause == "too_long" else ("missing_field", 1024)
  with pytest.raises(data.NoUsableRowsError) as e:
    data_survey.survey([path], fmt, max_len=max_len, length_field="max_prompt_len")
  msg = str(e.value)
  assert msg.startswith(f"no usable row in {path}: all 6 rows skipped ({reason} 6); first skipped: {first} ({reason}: ")
  if cause == "other_columns":
    assert "field 'question' is missing; its fields: query, response)" in msg and "one layout" in msg
  if cause == "too_long":
    assert "over max_prompt_len=32)" in msg and "raise config.max_prompt_len to at least" in msg
  # The RL stream repeats forever: it stops at the end of the first epoch instead of reading epoch after epoch.
  ds = _prompt_ds(path, fmt, buckets=(max_len,), num_epochs=None)
  with pytest.raises(data.NoUsableRowsError, match=rf"no usable row in {path}: epoch 0 skipped all 6 rows: {reason} 6"):
    _within(20, lambda: next(iter(ds)))


def test_every_process_decides_on_the_whole_data(tmp_path, fmt, monkeypatch):
  """Two processes (simulated): each reads every other row and decides on the gathered sum, so a share without a
  usable row does not stop a run the other share feeds, and with no usable row anywhere both raise the same error."""
  import jax

  from rlt_jax import distributed
  sample = [json.loads(line) for line in data.SAMPLE_PATH.read_text().splitlines()[:6]]
  mixed = _jsonl(tmp_path / "mixed.jsonl", [{"question": r["question"]} if i % 2 == 0 else r
                                            for i, r in enumerate(sample)])   # process 0's rows are all bad
  none, _ = unusable_data(tmp_path, "missing_fields")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for path in (mixed, none):
    shares = [data_survey.scan([path], fmt, max_len=1024, process_index=p, process_count=2) for p in (0, 1)]
    monkeypatch.setattr(distributed, "allgather_objects", lambda part: shares)  # what the gather returns everywhere
    outcomes = []
    for p in (0, 1):
      monkeypatch.setattr(jax, "process_index", lambda p=p: p)
      try:
        s = data_survey.survey([path], fmt, max_len=1024)
        outcomes.append((s.rows, s.used, s.skipped, s.first[:3]))
      except data.NoUsableRowsError as e:
        outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    if path == mixed:
      assert outcomes[0] == (6, 3, {"missing_field": 3}, (0, f"{path}:1", "missing_field"))
    else:
      assert outcomes[0].startswith(f"no usable row in {path}: all 6 rows skipped (missing_field 6)")
