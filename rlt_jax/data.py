"""Input pipeline on grain: bad-row accounting, bucketed fixed-shape batches, resumable iterators (over `sources`).

    ds = make_dataset(["train.jsonl"], fmt, kind="prompt", batch_size=16, buckets=(512, 1024), seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()   # ... later: it = iter(ds); it.set_state(state)

Order of the stream: the rows of all sources (concatenated) are shuffled with `seed`, differently each epoch, then
repeated `num_epochs` times (None = forever), then dealt round-robin to processes (`process_index` takes every
`process_count`-th element of the global stream), then read, validated and tokenized, then batched. Bad rows are
dropped per process, so use num_epochs=None and a step count for multi-host training (every process then always
has a next batch).

Kinds (what one batch holds):
  "prompt"       RL prompts: `prompt_ids`/`prompt_mask` [B, T] left-padded to a bucket, plus lists `question`,
                 `solution`, `system` (the student prompt from the data, None = format default), `answer`, `where`.
  "teacher_sft"  teacher warm-up rows (explanation = `reasoning`, else the solution, as the official code does):
                 `input_ids`, `loss_mask`, `attention_mask` [B, T] right-padded.
  "student_sft"  student distillation rows (thought = `reasoning`): same arrays.
T is the smallest of `buckets` that holds the longest row of the batch, so jit sees at most len(buckets) shapes.
SFT kinds also carry `segment_ids` (1 on a row's tokens, 0 on padding) and `positions` [B, T]. With
`truncate=True` an SFT row longer than the longest bucket is cut to it (as trl's SFTTrainer does) instead of
skipped; a row left with nothing to train on (cut before its completion) is skipped as "no_target". With
`pack=True` SFT rows are packed greedily, in stream order, into sequences of the longest bucket: `segment_ids`
number the rows of a sequence 1, 2, ... and `positions` restart at 0 for each row (attention never crosses rows).

Bad rows (rows.BAD_REASONS: missing/empty field, wrong type, over the longest bucket, broken JSON or CSV,
undecodable bytes) are skipped, counted per reason in a RowStats and logged when an epoch ends; with strict=True the first one
raises BadRowError naming file and line. The counts are part of the iterator state. A one-process stream that repeats
forever (num_epochs=None) raises NoUsableRowsError when an epoch ends with no usable row, instead of reading epoch
after epoch.

Before a run, `rlt_jax.data_survey` reads every row once through this pipeline's own reading, tokenizing and
filtering code (`RowEncoder`) and counts what it would use and skip.
"""
from __future__ import annotations

import collections
import copy
import logging
import pathlib
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from rlt_jax import formats, rows, sources

_log = logging.getLogger(__name__)
SAMPLE_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "gsm8k_sample.jsonl"
KINDS = ("prompt", "teacher_sft", "student_sft")


class BadRowError(ValueError):
  """strict=True: a bad row, with file and line in the message."""


class NoUsableRowsError(ValueError):
  """No row of the data can be used: the message names the data, the skips per reason and the first skipped row."""


# ---------------------------------------------------------------------------------------------------------- padding
def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return int(b)
  raise ValueError(f"data: length {length} is over the longest bucket {max(buckets)}")


def pad_left(seqs: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts for sampling: ids [B, T] right-aligned (padding on the left) and a bool mask; T is a bucket."""
  T = pick_bucket(max(len(s) for s in seqs), buckets)
  ids = np.full((len(seqs), T), pad_id, np.int32)
  mask = np.zeros((len(seqs), T), bool)
  for i, s in enumerate(seqs):
    if len(s):
      ids[i, T - len(s):] = s
      mask[i, T - len(s):] = True
  return ids, mask


def pad_right(rows: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
  """Equal-length per-row arrays → [B, T] arrays padded on the right ("input_ids" with pad_id, others with 0/False);
  adds "attention_mask"."""
  T = pick_bucket(max(len(r["input_ids"]) for r in rows), buckets)
  out = {}
  for k, v in rows[0].items():
    v = np.asarray(v)
    out[k] = np.full((len(rows), T), pad_id if k == "input_ids" else 0, v.dtype)
  out["attention_mask"] = np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):
    n = len(r["input_ids"])
    for k, v in r.items():
      out[k][i, :n] = v
    out["attention_mask"][i, :n] = True
  return out


def collate_students(examples: Sequence[formats.StudentExample], buckets: Sequence[int], pad_id: int) -> dict:
  """Student sequences for the reward: input_ids, explanation_mask, solution_mask, attention_mask [B, T];
  matched [B]."""
  out = pad_right([dict(input_ids=e.input_ids, explanation_mask=e.explanation_mask, solution_mask=e.solution_mask)
                   for e in examples], buckets, pad_id)
  out["matched"] = np.array([e.matched for e in examples], bool)
  return out


# ---------------------------------------------------------------------------------------------------------- bad rows
class RowStats:
  """Rows used and skipped per reason, for the current epoch and in total; where this epoch's first bad rows were."""

  def __init__(self):
    self.epoch, self.ok, self.bad = 0, 0, collections.Counter()
    self.total_ok, self.total_bad = 0, collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self._reported = -1

  def add_bad(self, reason: str, where: str):
    self.bad[reason] += 1
    self.total_bad[reason] += 1
    if len(self.examples[reason]) < 3:
      self.examples[reason].append(where)

  def add_ok(self):
    self.ok += 1
    self.total_ok += 1

  def end_epoch(self, next_epoch: int | None = None):
    """Log the finished epoch's counts once, then start counting `next_epoch`."""
    if self._reported < self.epoch:
      self._reported = self.epoch
      if self.bad:
        detail = ", ".join(f"{r}: {n} (e.g. {', '.join(self.examples[r])})" for r, n in sorted(self.bad.items()))
        _log.warning("data: epoch %d: %d rows used, %d skipped: %s", self.epoch, self.ok, sum(self.bad.values()),
                     detail)
      else:
        _log.info("data: epoch %d: %d rows used, none skipped", self.epoch, self.ok)
    if next_epoch is not None:
      self.epoch, self.ok, self.bad = next_epoch, 0, collections.Counter()
      self.examples = collections.defaultdict(list)

  def state(self) -> dict:
    return dict(epoch=self.epoch, ok=self.ok, bad=dict(self.bad), total_ok=self.total_ok,
                total_bad=dict(self.total_bad), examples=dict(self.examples), reported=self._reported)

  def load(self, s: dict):
    self.epoch, self.ok, self.bad = int(s["epoch"]), int(s["ok"]), collections.Counter(s["bad"])
    self.total_ok, self.total_bad = int(s["total_ok"]), collections.Counter(s["total_bad"])
    self.examples = collections.defaultdict(list, {k: list(v) for k, v in s["examples"].items()})
    self._reported = int(s["reported"])


class _RowFilterIterator(grain.DatasetIterator):
  def __init__(self, parent, stats: RowStats, strict: bool, forever: str | None = None):
    super().__init__(parent)
    self._rows, self._strict, self._forever = stats, strict, forever

  def _check_epoch(self):
    """A stream that repeats forever on one process (`forever`: the data's name) would read epoch after epoch
    without end when an epoch yields no usable row: it stops instead."""
    r = self._rows
    if self._forever is not None and r.ok == 0 and r.bad:
      detail = "; ".join(f"{k} {n} (e.g. {', '.join(r.examples[k])})" for k, n in sorted(r.bad.items()))
      raise NoUsableRowsError(f"data: no usable row in {self._forever}: epoch {r.epoch} skipped all "
                              f"{sum(r.bad.values())} rows: {detail}")

  def __next__(self):
    while True:
      try:
        item = next(self._parent)
      except StopIteration:
        self._rows.end_epoch()
        raise
      if item["epoch"] != self._rows.epoch:
        self._check_epoch()
        self._rows.end_epoch(item["epoch"])
      if item["bad"] is None:
        self._rows.add_ok()
        return item["example"]
      reason, detail = item["bad"]
      if self._strict:
        raise BadRowError(f"{item['where']}: bad row ({reason}): {detail}")
      self._rows.add_bad(reason, item["where"])

  def get_state(self):
    return {"parent": self._parent.get_state(), "rows": self._rows.state()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._rows.load(state["rows"])


class _RowFilter(grain.IterDataset):
  def __init__(self, parent, stats: RowStats | None, strict: bool, forever: str | None = None):
    super().__init__(parent)
    self._rows, self._strict, self._forever = stats, strict, forever

  def __iter__(self):
    return _RowFilterIterator(self._parent.__iter__(), self._rows or RowStats(), self._strict, self._forever)


# ---------------------------------------------------------------------------------------------------------- packing
def pack_rows(rows: Sequence[dict[str, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows (input_ids, loss_mask, ...) laid end to end in one sequence of `length`: `segment_ids` 1, 2, ... per row
  (0 = padding), `positions` restarting at 0 for each row."""
  out = {k: np.full(length, pad_id if k == "input_ids" else 0, np.asarray(v).dtype) for k, v in rows[0].items()}
  out["segment_ids"] = np.zeros(length, np.int32)
  out["positions"] = np.zeros(length, np.int32)
  at = 0
  for i, r in enumerate(rows):
    n = len(r["input_ids"])
    if at + n > length:
      raise ValueError(f"data: rows of {[len(x['input_ids']) for x in rows]} tokens do not fit in {length}")
    for k, v in r.items():
      out[k][at:at + n] = v
    out["segment_ids"][at:at + n] = i + 1
    out["positions"][at:at + n] = np.arange(n)
    at += n
  return out


class _PackIterator(grain.DatasetIterator):
  """Greedy packing in stream order: rows are added while they fit; the first row that does not fit starts the
  next sequence. The state is the parent's state before that carried row was read, so a restore reads it again."""

  def __init__(self, parent, length: int, pad_id: int):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id
    self._carry, self._carry_state = None, None

  def __next__(self):
    rows, used = [], 0
    if self._carry is not None:
      rows, used, self._carry, self._carry_state = [self._carry], len(self._carry["input_ids"]), None, None
    while True:
      state = self._parent.get_state()
      try:
        row = next(self._parent)
      except StopIteration:
        if rows:
          return pack_rows(rows, self._length, self._pad_id)
        raise
      if used + len(row["input_ids"]) > self._length:
        self._carry, self._carry_state = row, copy.deepcopy(state)
        return pack_rows(rows, self._length, self._pad_id)
      rows.append(row)
      used += len(row["input_ids"])

  def get_state(self):
    return {"parent": self._carry_state if self._carry is not None else self._parent.get_state()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._carry, self._carry_state = None, None


class _Pack(grain.IterDataset):
  def __init__(self, parent, length: int, pad_id: int):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self._length, self._pad_id)


# ---------------------------------------------------------------------------------------------------------- pipeline
class RowEncoder:
  """RawRecord → {epoch, where, example | bad, length, fields}. Runs in grain workers; must not raise on data.

  `many` does a list of records with one tokenizer call for the prompts of all of them (the pipeline calls it with
  one record, `data_survey.encode_rows` with a batch): reading, tokenizing and filtering are this one code either way.
  `length_field` names max_len in the too_long detail (e.g. "max_prompt_len"; default: the longest bucket)."""

  def __init__(self, fmt: formats.RLTFormat, kind: str, reader: str, max_len: int, epoch_len: int,
               truncate: bool = False, length_field: str | None = None):
    self.fmt, self.kind, self.reader, self.max_len, self.epoch_len = fmt, kind, reader, max_len, epoch_len
    self.truncate, self.length_field = truncate, length_field

  def __call__(self, index: int, rec: sources.RawRecord) -> dict:
    return self.many([(index, rec)])[0]

  def many(self, records: Sequence[tuple[int, sources.RawRecord]]) -> list[dict]:
    outs, todo = [], []
    for index, rec in records:
      out = {"epoch": index // self.epoch_len, "where": rec.where, "example": None, "bad": None, "length": None}
      payload = None
      try:
        payload = sources.decode_payload(rec.payload)
        todo.append((out, self._read(payload)))
      except rows.BadRow as e:
        out["bad"] = (e.reason, e.detail)
        if isinstance(payload, dict):  # what the row has, for a message about missing fields
          out["fields"] = [str(k) for k in list(payload)[:12]]
      outs.append(out)
    for (out, _), (ex, n) in zip(todo, self._tokenize([row for _, row in todo], [o["where"] for o, _ in todo])):
      out["length"] = n
      try:
        out["example"] = self._fit(ex, n)
      except rows.BadRow as e:
        out["bad"] = (e.reason, e.detail)
    return outs

  def _read(self, payload) -> dict:
    row = rows.read_row(payload, self.reader)
    if self.kind == "student_sft" and row["reasoning"] is None:
      raise rows.BadRow("missing_field", "a student distillation row needs a reasoning trace")
    return row

  def _tokenize(self, rs: list[dict], wheres: list[str]):
    """(example, its length) of each row: one tokenizer call for all prompts; SFT rows one by one (formats)."""
    f = self.fmt
    if self.kind == "prompt":
      prompts = f.teacher_prompts([r["question"] for r in rs], [r["solution"] for r in rs]) if rs else []
      for r, ids, where in zip(rs, prompts, wheres):
        yield dict(prompt_ids=ids, where=where, **{k: r[k] for k in ("question", "solution", "system", "answer")}), \
            len(ids)
      return
    for r in rs:
      if self.kind == "teacher_sft":
        sft = f.teacher_sft_example(r["question"], r["solution"], r["reasoning"] or r["solution"])
      else:
        sft = f.student_sft_example(r["question"], r["reasoning"], r["solution"], r["system"])
      yield dict(input_ids=sft.input_ids, loss_mask=sft.loss_mask), len(sft.input_ids)

  def _fit(self, ex: dict, n: int) -> dict:
    if n > self.max_len:
      if not self.truncate:  # (make_dataset allows truncate for the SFT kinds only)
        limit = f"{self.length_field}={self.max_len}" if self.length_field else f"the longest bucket {self.max_len}"
        raise rows.BadRow("too_long", f"{n} tokens, over {limit}")
      ex = {k: v[:self.max_len] for k, v in ex.items()}
    if self.kind != "prompt" and not ex["loss_mask"].any():
      raise rows.BadRow("no_target", f"nothing to train on in the first {self.max_len} tokens "
                           "(the completion starts after the cut)")
    return ex


class _Collate:
  def __init__(self, kind: str, buckets: Sequence[int], pad_id: int):
    self.kind, self.buckets, self.pad_id = kind, tuple(buckets), pad_id

  def __call__(self, rows: Sequence[dict]) -> dict:
    if self.kind != "prompt":
      if "segment_ids" in rows[0]:  # packed: every row already has the longest bucket's length
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        out["attention_mask"] = out["segment_ids"] > 0
        return out
      out = pad_right(rows, self.buckets, self.pad_id)
      out["segment_ids"] = out["attention_mask"].astype(np.int32)
      out["positions"] = np.broadcast_to(np.arange(out["input_ids"].shape[1], dtype=np.int32),
                                         out["input_ids"].shape).copy()
      return out
    return collate_prompts(rows, self.buckets, self.pad_id)


def collate_prompts(rows: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
  """A "prompt" batch (the module doc) from encoded rows (`RowEncoder` examples)."""
  ids, mask = pad_left([r["prompt_ids"] for r in rows], buckets, pad_id)
  out = {"prompt_ids": ids, "prompt_mask": mask}
  for k in ("question", "solution", "system", "answer", "where"):
    out[k] = [r[k] for r in rows]
  return out


def concat_sources(specs: list, data_dir: str | None, exclude: Sequence[int] = ()):
  """One source over the rows of every spec, in order (`sources.open_source` opens each), less the rows at the
  indices `exclude` (a run's held-out prompts: never in its stream)."""
  src = sources.ConcatSource([sources.open_source(s, data_dir=data_dir) for s in specs])
  return sources.Subset(src, exclude) if len(exclude) else src


def make_dataset(sources, fmt: formats.RLTFormat, *, kind: str = "prompt", batch_size: int,
                 buckets: Sequence[int] = (256, 512, 1024, 2048), seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                 reader: str = "auto", strict: bool = False, stats: RowStats | None = None,
                 drop_remainder: bool = True, worker_count: int = 0, truncate: bool = False,
                 pack: bool = False, data_dir: str | None = None,
                 length_field: str | None = None, exclude: Sequence[int] = ()) -> grain.IterDataset:
  """A grain IterDataset of fixed-shape batches (see the module doc). `sources`: one or more paths/specs/sources.
  `stats`: a RowStats the iterator counts into (one iterator per RowStats). `data_dir`: where TFDS looks for
  "tfds:NAME:SPLIT" sources (None: TFDS's default). `length_field`: the config field the longest bucket comes from,
  named in too_long details. `exclude`: indices of rows (of all sources, in order) left out of the stream."""
  if kind not in KINDS:
    raise ValueError(f"data: unknown kind {kind!r}; choose one of {KINDS}")
  if (truncate or pack) and kind == "prompt":
    raise ValueError("data: truncate and pack apply to the SFT kinds only (an RL prompt cannot be cut)")
  if batch_size <= 0 or not buckets or min(buckets) <= 0:
    raise ValueError(f"data: batch_size ({batch_size}) and every bucket ({buckets}) must be positive")
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"data: process_index {process_index} must be in [0, process_count={process_count})")
  specs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
  src = concat_sources(specs, data_dir, exclude)
  if len(src) == 0:
    raise ValueError(f"data: no rows in {specs}")
  ds = grain.MapDataset.source(src)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)  # reseeds the shuffle each epoch
  ds = ds.map_with_index(RowEncoder(fmt, kind, reader, max(buckets), len(src), truncate, length_field))
  ds = ds[process_index::process_count]
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  forever = sources_label(specs) if num_epochs is None and process_count == 1 else None
  it_ds = _RowFilter(it_ds, stats, strict, forever)
  if pack:
    it_ds = _Pack(it_ds, max(buckets), fmt.pad_id)
  return it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_Collate(kind, buckets, fmt.pad_id))


def sources_label(specs: Sequence) -> str:
  """How messages name a list of data sources."""
  return ", ".join(str(s) for s in specs)
