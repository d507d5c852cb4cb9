"""Row sources: every kind of file, folder and TFDS spec reads the same rows, and the configs accept them."""
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


def test_every_source_kind_reads_the_same_rows(tmp_path, gsm8k_rows):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter

  sample = gsm8k_rows[:6]
  _jsonl(tmp_path / "r.jsonl", sample)
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
  specs = [tmp_path / "r.jsonl", tmp_path / "r.parquet", tmp_path / "hf", tmp_path / "r.array_record",
           "tfds:gsm_rows_tiny:train"]
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
