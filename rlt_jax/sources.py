"""Row sources: random access to the records of a dataset file or folder (`len` and `getitem` → `RawRecord`, read on
demand), as `data.make_dataset`, `distill` and `evaluate` read them.

    src = open_source("train.jsonl"); rec = src[0]; row = rows.read_row(decode_payload(rec.payload))

Kinds: *.jsonl / *.json (one JSON object a line), *.csv (a header row, then one record a row; quoted fields may span
lines), *.parquet, *.array_record (JSON records), a Hugging Face `save_to_disk` folder (a Dataset, or the `train`
split of a DatasetDict) and "tfds:NAME:SPLIT" (TFDS in array_record format). `check_source` says why a spec cannot be
read (config validation); `decode_payload` parses one record, raising `rows.BadRow` (undecodable / broken_json /
broken_csv).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from rlt_jax import rows, storage


@dataclasses.dataclass(frozen=True)
class RawRecord:
  where: str    # "path:line" (1-based line) or "path[row i]" (0-based row)
  payload: Any  # bytes (one JSON document) or a mapping


class JsonlSource:
  """One JSON object per line; lines are read on demand (only the newline offsets are kept in memory)."""

  def __init__(self, path):
    self.path = str(path)
    data = np.fromfile(self.path, np.uint8)
    nl = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(data)]])
    blank = np.array([not data[s:e].tobytes().strip() for s, e in zip(starts, ends)], bool) if len(data) else \
        np.ones(1, bool)
    keep = np.flatnonzero(~blank)  # blank lines (a final newline) are not rows
    self._starts, self._ends, self._lines = starts[keep], ends[keep], keep + 1

  def __len__(self):
    return len(self._starts)

  def __getitem__(self, i):
    with open(self.path, "rb") as f:
      f.seek(int(self._starts[i]))
      line = f.read(int(self._ends[i] - self._starts[i]))
    return RawRecord(f"{self.path}:{int(self._lines[i])}", line)


@dataclasses.dataclass(frozen=True)
class BrokenRecord:
  """A record that cannot become a row (a CSV record with more or fewer fields than its header): `decode_payload`
  raises it as `rows.BadRow("broken_csv")`, so it is skipped and counted like any bad row."""
  detail: str


class CsvSource:
  """A CSV file (Python's `csv` module, default dialect): the first row names the columns, each later record is one
  row of {column: text}; blank lines are not rows. Records are located by the line they start on ("path:line"), since
  a quoted field may hold newlines. The file is parsed once on opening and its rows kept in memory, as the parquet
  table is; bytes that are not UTF-8 reach the row readers as bytes, which report them as an undecodable field."""

  def __init__(self, path):
    self.path = str(path)
    text = pathlib.Path(self.path).read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    self._records: list[tuple[int, list[str]]] = []  # (first line, fields)
    header, line = None, 1
    try:
      for fields in reader:
        start, line = line, reader.line_num + 1
        if not fields:
          continue
        if header is None:
          header = fields
        else:
          self._records.append((start, fields))
    except csv.Error as e:
      raise ValueError(f"data: {self.path}:{line}: not readable as CSV ({e})") from None
    self.columns = tuple(header or ())
    duplicated = sorted({c for c in self.columns if self.columns.count(c) > 1})
    if duplicated:
      raise ValueError(f"data: {self.path}:1: the header names column(s) {duplicated} more than once")

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    line, fields = self._records[i]
    where = f"{self.path}:{line}"
    if len(fields) != len(self.columns):
      return RawRecord(where, BrokenRecord(f"CSV record has {len(fields)} fields, the header {len(self.columns)}"))
    return RawRecord(where, {c: _undecoded_as_bytes(v) for c, v in zip(self.columns, fields)})


def _undecoded_as_bytes(text: str):
  """A field holding bytes that were not UTF-8 (kept as surrogates while parsing) goes back to those bytes."""
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-8", errors="surrogateescape")


class ParquetSource:
  def __init__(self, path):
    import pyarrow.parquet as pq
    self.path = str(path)
    self._table = pq.read_table(self.path)

  def __len__(self):
    return self._table.num_rows

  def __getitem__(self, i):
    return RawRecord(f"{self.path}[row {i}]", self._table.slice(i, 1).to_pylist()[0])


class HFDiskSource:
  """A Hugging Face `datasets` folder written by `save_to_disk` (a Dataset, or a DatasetDict with `split`)."""

  def __init__(self, path, split: str | None = None):
    import datasets
    self.path = str(path)
    ds = datasets.load_from_disk(self.path)
    if isinstance(ds, datasets.DatasetDict):
      split = split or ("train" if "train" in ds else None)  # what a Hugging Face script trains on by default
      if split is None:
        raise ValueError(f"data: {self.path} holds splits {sorted(ds)} and no 'train' split; pass split=")
      ds = ds[split]
    self._ds = ds

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, i):
    return RawRecord(f"{self.path}[row {i}]", self._ds[int(i)])


class TfdsSource:
  """A TFDS dataset prepared in array_record format (`tfds.data_source`); text features arrive as bytes."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds
    self.label = f"tfds:{name}:{split}"
    self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return RawRecord(f"{self.label}[row {i}]", self._src[int(i)])


class ArrayRecordSource:
  """A raw .array_record file whose records are JSON documents (bytes)."""

  def __init__(self, path):
    self.path = str(path)
    self._src = grain.sources.ArrayRecordDataSource([self.path])

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return RawRecord(f"{self.path}[row {i}]", self._src[int(i)])


class ConcatSource:
  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources])

  def __len__(self):
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i):
    k = int(np.searchsorted(self._ends, i, side="right"))
    return self.sources[k][int(i - (self._ends[k - 1] if k else 0))]


class Subset:
  """The records of `source` except those at the indices `drop` (a run's held-out rows), in their order."""

  def __init__(self, source, drop: Sequence[int]):
    self.source = source
    self._keep = np.setdiff1d(np.arange(len(source)), np.asarray(list(drop), np.int64))

  def __len__(self):
    return len(self._keep)

  def __getitem__(self, i):
    return self.source[int(self._keep[i])]


class _Located:
  """A source read from a local copy whose records are located by the original path (a bucket's URL)."""

  def __init__(self, source, local: str, name: str):
    self.source, self.local, self.name = source, local, name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = self.source[i]
    return RawRecord(rec.where.replace(self.local, self.name, 1), rec.payload)


def open_source(spec, *, split: str | None = None, data_dir: str | None = None):
  """A source from a path or spec: *.jsonl, *.csv, *.parquet, *.array_record, a `save_to_disk` folder,
  "tfds:NAME:SPLIT"."""
  if not isinstance(spec, (str, os.PathLike)):
    return spec  # already a source (len + getitem → RawRecord)
  s = str(spec)
  if s.startswith("tfds:"):
    parts = s.split(":")
    if len(parts) != 3:
      raise ValueError(f"data: TFDS spec must be tfds:NAME:SPLIT, got {s!r}")
    return TfdsSource(parts[1], parts[2], data_dir)
  if storage.is_url(s):  # a bucket's file or save_to_disk folder: read from its copy in the local cache
    local = storage.local_copy(s)
    return _Located(open_source(local, split=split), local, s)
  p = pathlib.Path(s)
  if p.is_dir():
    if any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
      return HFDiskSource(p, split)
    raise ValueError(f"data: {p} is a folder but not a Hugging Face save_to_disk folder")
  if not p.exists():
    raise FileNotFoundError(f"data: no such data file {p}")
  if p.suffix in (".jsonl", ".json"):
    return JsonlSource(p)
  if p.suffix == ".csv":
    return CsvSource(p)
  if p.suffix == ".parquet":
    return ParquetSource(p)
  if ".array_record" in p.name:
    return ArrayRecordSource(p)
  raise ValueError(f"data: cannot tell the format of {p} (expected .jsonl, .csv, .parquet, .array_record, a folder)")


def check_source(spec, *, data_dir: str | None = None) -> str | None:
  """Why `spec` cannot be read (opening it as `make_dataset` will, without reading rows), or None when it can."""
  try:
    src = open_source(spec, data_dir=data_dir)
    if len(src) == 0:
      return "holds no rows"
  except Exception as e:  # noqa: BLE001  every reader's own error, reported against the config field
    return str(e).removeprefix("data: ") or type(e).__name__
  return None


def decode_payload(payload) -> Any:
  """bytes → parsed JSON (raises BadRow undecodable / broken_json); a `BrokenRecord` raises BadRow broken_csv;
  mappings pass through."""
  if isinstance(payload, BrokenRecord):
    raise rows.BadRow("broken_csv", payload.detail)
  if isinstance(payload, (bytes, bytearray)):
    try:
      text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as e:
      raise rows.BadRow("undecodable", f"line is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise rows.BadRow("broken_json", f"broken JSON ({e.msg} at column {e.colno})") from None
  return payload
