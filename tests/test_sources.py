"""Row sources: every kind of file, folder and TFDS spec reads the same rows, and the configs accept them; CSV records
located by the line they start on, bad CSV records and files reported as bad rows or clear errors."""
import csv
import io
import json
import re

import pytest

from rlt_jax import rows, run_config, sft, sources


@pytest.fixture(scope="module")
def gsm8k_rows(shared_data):
  lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines[:20]]


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _csv(path, records, *, columns=None):
  """Writes records as CSV with the stdlib writer; returns the 1-based line each record starts on (fields holding
  newlines are quoted and span several lines)."""
  columns = columns or list(records[0])
  text, starts = io.StringIO(), []
  w = csv.writer(text, lineterminator="\n")
  w.writerow(columns)
  for r in records:
    starts.append(text.getvalue().count("\n") + 1)
    w.writerow([r.get(c, "") for c in columns])
  path.write_text(text.getvalue())
  return starts


def test_every_source_kind_reads_the_same_rows(tmp_path, gsm8k_rows):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter

  sample = gsm8k_rows[:6]
  _jsonl(tmp_path / "r.jsonl", sample)
  _csv(tmp_path / "r.csv", sample)
  pq.write_table(pa.Table.from_pylist(sample), tmp_path / "r.parquet")
  datasets.Dataset.from_list(sample).save_to_disk(str(tmp_path / "hf"))
  w = ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
  for r in sample:
    w.write(json.dumps(r).encode())
  w.close()

  class GsmRowsTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, r in enumerate(sample):
        yield i, r

  GsmRowsTiny(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()

  want = sorted((r["question"], r["answer"]) for r in sample)
  specs = [tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.parquet", tmp_path / "hf",
           tmp_path / "r.array_record", "tfds:gsm_rows_tiny:train"]
  for spec in specs:
    src = sources.open_source(spec, data_dir=str(tmp_path / "tfds"))
    got = [rows.read_row(sources.decode_payload(src[i].payload)) for i in range(len(src))]
    assert sorted((g["question"], g["solution"]) for g in got) == want, spec
    assert all(g["answer"] == r["answer"].split("####")[1].strip() for g, r in zip(
        sorted(got, key=lambda g: g["question"]), sorted(sample, key=lambda r: r["question"]))), spec
  # The RL and SFT configs accept every one of them (validation opens the source as the run will).
  for spec in specs:
    rl = run_config.default_config()
    rl.tiny_models, rl.data.path, rl.data.tfds_data_dir = True, str(spec), str(tmp_path / "tfds")
    run_config.validate(rl)
    s = sft.default_config()
    s.tiny_models, s.data.path, s.data.tfds_data_dir = True, str(spec), str(tmp_path / "tfds")
    sft.validate(s)
  for bad, why in ((tmp_path / "nope.jsonl", "no such data file"), ("tfds:gsm_rows_tiny", "tfds:NAME:SPLIT"),
                   (tmp_path, "not a Hugging Face save_to_disk folder")):
    rl.data.path = str(bad)
    with pytest.raises(run_config.ConfigError, match=rf"^config\.data\.path='{re.escape(str(bad))}': cannot be "
                                                    rf"read: .*{re.escape(why)}"):
      run_config.validate(rl)
  assert sources.open_source(tmp_path / "r.jsonl")[2].where.endswith("r.jsonl:3")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    sources.open_source(tmp_path / "nope.jsonl")


def test_csv_records_and_their_lines(tmp_path, gsm8k_rows):
  """Records are located by their first line (GSM8K answers span several lines), blank lines are not rows, a BOM is
  not part of the first column's name."""
  starts = _csv(tmp_path / "g.csv", gsm8k_rows[:5])
  assert starts[1] > starts[0] + 1  # the first answer spans lines
  src = sources.open_source(tmp_path / "g.csv")
  assert len(src) == 5
  for i, (rec, line) in enumerate(zip((src[i] for i in range(5)), starts)):
    assert rec.where == f"{tmp_path / 'g.csv'}:{line}"
    assert rec.payload == {"question": gsm8k_rows[i]["question"], "answer": gsm8k_rows[i]["answer"]}
  (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbfquestion,solution\r\n\r\nQ1,S1\r\n\nQ2,\"S\r\n2\"\r\n")
  src = sources.open_source(tmp_path / "b.csv")
  assert [(r.where.rsplit(":", 1)[1], r.payload) for r in (src[0], src[1])] == [
      ("3", {"question": "Q1", "solution": "S1"}), ("5", {"question": "Q2", "solution": "S\r\n2"})]


def test_bad_csv_records_are_bad_rows_and_bad_files_clear_errors(tmp_path):
  (tmp_path / "r.csv").write_bytes(b"question,solution\nQ1,S1\nQ2,S2,extra\nQ3\n\"Q\xff\",S4\nQ5,S5\n")
  src = sources.open_source(tmp_path / "r.csv")
  got = []
  for i in range(len(src)):
    rec = src[i]
    try:
      got.append((rec.where.rsplit(":", 1)[1], rows.read_row(sources.decode_payload(rec.payload))["question"]))
    except rows.BadRow as e:
      got.append((rec.where.rsplit(":", 1)[1], e.reason, e.detail))
  assert got == [("2", "Q1"), ("3", "broken_csv", "CSV record has 3 fields, the header 2"),
                 ("4", "broken_csv", "CSV record has 1 fields, the header 2"),
                 ("5", "undecodable", "field 'question' is not UTF-8 (invalid start byte at byte 1)"), ("6", "Q5")]
  (tmp_path / "empty.csv").write_text("")
  (tmp_path / "header_only.csv").write_text("question,solution\n")
  (tmp_path / "twice.csv").write_text("question,question\nQ,S\n")
  assert sources.check_source(tmp_path / "empty.csv") == "holds no rows"
  assert sources.check_source(tmp_path / "header_only.csv") == "holds no rows"
  assert sources.check_source(tmp_path / "twice.csv") == \
      f"{tmp_path / 'twice.csv'}:1: the header names column(s) ['question'] more than once"
  assert sources.check_source(tmp_path / "r.csv") is None
