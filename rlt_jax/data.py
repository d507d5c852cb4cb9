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

Before a run, `survey` reads every row once through the same reading, tokenizing and filtering code (`encode_rows`,
`batch_rows` rows a tokenizer call) and returns a `DataSummary`: rows used and skipped per reason, where the first
skipped ones are (file order) and the prompt or row lengths. It logs one line (`DataSummary.line`) and raises
NoUsableRowsError when no row is usable; with several processes each reads every process_count-th row and the counts
are summed, so every process logs and raises alike.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import pathlib
import time
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
class _Encode:
  """RawRecord → {epoch, where, example | bad, length, fields}. Runs in grain workers; must not raise on data.

  `many` does a list of records with one tokenizer call for the prompts of all of them (the pipeline calls it with
  one record, `encode_rows` with a batch): reading, tokenizing and filtering are this one code either way.
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
    ids, mask = pad_left([r["prompt_ids"] for r in rows], self.buckets, self.pad_id)
    out = {"prompt_ids": ids, "prompt_mask": mask}
    for k in ("question", "solution", "system", "answer", "where"):
      out[k] = [r[k] for r in rows]
    return out


def _concat(specs: list, data_dir: str | None) -> sources.ConcatSource:
  """One source over the rows of every spec, in order (`sources.open_source` opens each)."""
  return sources.ConcatSource([sources.open_source(s, data_dir=data_dir) for s in specs])


def make_dataset(sources, fmt: formats.RLTFormat, *, kind: str = "prompt", batch_size: int,
                 buckets: Sequence[int] = (256, 512, 1024, 2048), seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                 reader: str = "auto", strict: bool = False, stats: RowStats | None = None,
                 drop_remainder: bool = True, worker_count: int = 0, truncate: bool = False,
                 pack: bool = False, data_dir: str | None = None,
                 length_field: str | None = None) -> grain.IterDataset:
  """A grain IterDataset of fixed-shape batches (see the module doc). `sources`: one or more paths/specs/sources.
  `stats`: a RowStats the iterator counts into (one iterator per RowStats). `data_dir`: where TFDS looks for
  "tfds:NAME:SPLIT" sources (None: TFDS's default). `length_field`: the config field the longest bucket comes from,
  named in too_long details."""
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
  src = _concat(specs, data_dir)
  if len(src) == 0:
    raise ValueError(f"data: no rows in {specs}")
  ds = grain.MapDataset.source(src)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)  # reseeds the shuffle each epoch
  ds = ds.map_with_index(_Encode(fmt, kind, reader, max(buckets), len(src), truncate, length_field))
  ds = ds[process_index::process_count]
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  forever = _label(specs) if num_epochs is None and process_count == 1 else None
  it_ds = _RowFilter(it_ds, stats, strict, forever)
  if pack:
    it_ds = _Pack(it_ds, max(buckets), fmt.pad_id)
  return it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_Collate(kind, buckets, fmt.pad_id))


# ---------------------------------------------------------------------------------------------------------- survey
def encode_rows(source, fmt: formats.RLTFormat, *, kind: str = "prompt", max_len: int, indices=None,
                reader: str = "auto", truncate: bool = False, length_field: str | None = None,
                batch_rows: int = 256) -> Iterator[dict]:
  """{index, where, example | bad, length, fields} of the records of `source` (an opened source) at `indices`
  (default: all, in file order), through the pipeline's own reading, tokenizing and filtering (`_Encode`), with one
  tokenizer call per `batch_rows` prompts. `bad` is (reason, detail); `length` the tokens before any cut (None when
  the row could not be read); `fields` the names a row that could not be read has."""
  if kind not in KINDS:
    raise ValueError(f"data: unknown kind {kind!r}; choose one of {KINDS}")
  enc = _Encode(fmt, kind, reader, max_len, 1, truncate, length_field)
  idx = range(len(source)) if indices is None else indices
  for start in range(0, len(idx), batch_rows):
    part = idx[start:start + batch_rows]
    for i, out in zip(part, enc.many([(int(i), source[int(i)]) for i in part])):
      out.pop("epoch")
      out["index"] = int(i)
      yield out


_LAYOUTS = ("each row needs the fields of one layout: Stratos 'conversations'; GSM8K 'question' + 'answer'; MATH "
            "'problem' + 'solution'; GPQA 'Question', 'Correct Answer', 'Incorrect Answer 1'..'3'; or 'question' "
            "(or 'prompt') + 'solution'")
_HINTS = {"missing_field": _LAYOUTS, "empty_field": _LAYOUTS, "wrong_type": _LAYOUTS,
          "broken_json": "each line of a .jsonl file must be one JSON object",
          "broken_csv": "each CSV record must have as many fields as the header",
          "undecodable": "the text must be UTF-8",
          "no_answer": "evaluation needs each row's gold answer: a GSM8K 'answer' ending in '#### N', an 'answer' "
                       "field (MATH, AIME, custom rows) or GPQA's 'Correct Answer'"}


@dataclasses.dataclass
class DataSummary:
  """Rows of a dataset counted before a run (`survey`, `encode_rows` + `add`): used, skipped per reason, where the
  first skipped rows are (file order) and the token lengths of the rows that were tokenized."""
  data: str                    # the data as named in messages
  kind: str = "prompt"         # a make_dataset kind ("prompt": the lengths are prompts')
  max_len: int = 0             # the length limit, named `length_field` in messages
  length_field: str = ""
  rows: int = 0
  used: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)   # reason -> rows
  examples: dict = dataclasses.field(default_factory=dict)  # reason -> [(index, where)]: its first 3 in file order
  first: tuple | None = None   # (index, where, reason, detail, fields) of the first skipped row
  shortest: int | None = None  # tokens of the shortest and the longest tokenized row (used or too long)
  longest: int | None = None
  cut: int = 0                 # rows used cut to max_len (SFT truncation)
  seconds: float = 0.0

  def add(self, r: dict) -> None:
    """Counts one `encode_rows` result (rows come in file order)."""
    self.rows += 1
    n = r.get("length")
    if n is not None:
      self.shortest = n if self.shortest is None else min(self.shortest, n)
      self.longest = n if self.longest is None else max(self.longest, n)
    if r["bad"] is None:
      self.used += 1
      self.cut += int(n is not None and n > self.max_len)
      return
    reason, detail = r["bad"]
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    places = self.examples.setdefault(reason, [])
    if len(places) < 3:
      places.append((r["index"], r["where"]))
    if self.first is None or r["index"] < self.first[0]:
      self.first = (r["index"], r["where"], reason, detail, r.get("fields"))

  @classmethod
  def merge(cls, parts: Sequence[DataSummary]) -> DataSummary:
    """One summary from the parts that processes counted (each a share of the rows)."""
    out = dataclasses.replace(parts[0], rows=0, used=0, skipped={}, examples={}, first=None, shortest=None,
                              longest=None, cut=0, seconds=max(p.seconds for p in parts))
    for p in parts:
      out.rows, out.used, out.cut = out.rows + p.rows, out.used + p.used, out.cut + p.cut
      for reason, n in p.skipped.items():
        out.skipped[reason] = out.skipped.get(reason, 0) + n
        out.examples[reason] = sorted(out.examples.get(reason, []) + list(p.examples[reason]))[:3]
      if p.first is not None and (out.first is None or p.first[0] < out.first[0]):
        out.first = p.first
      for f, pick in (("shortest", min), ("longest", max)):
        values = [v for v in (getattr(out, f), getattr(p, f)) if v is not None]
        setattr(out, f, pick(values) if values else None)
    return out

  @property
  def _what(self) -> str:
    return "prompt" if self.kind == "prompt" else "row"

  def _field(self) -> str:
    return f"config.{self.length_field}" if self.length_field else "the length limit"

  def _limit(self) -> str:
    return f"config.{self.length_field}={self.max_len}" if self.length_field else f"the limit {self.max_len}"

  def line(self) -> str:
    """One line for the start of a run: `data: 300 rows in a.jsonl: 296 used, 4 skipped (too_long 4, e.g.
    a.jsonl:17); the longest prompt has 542 tokens (config.max_prompt_len=512); read in 0.1 s`."""
    s = f"data: {self.rows} rows in {self.data}: {self.used} used, "
    if self.skipped:
      s += f"{sum(self.skipped.values())} skipped (" + "; ".join(
          f"{r} {n}, e.g. {self.examples[r][0][1]}" for r, n in sorted(self.skipped.items())) + ")"
    else:
      s += "none skipped"
    if self.longest is not None:
      s += f"; the longest {self._what} has {self.longest} tokens ({self._limit()}"
      s += f"; {self.cut} rows cut to it)" if self.cut else ")"
    return s + (f"; read in {self.seconds:.1f} s" if self.seconds else "")

  def error(self) -> str:
    """Why no row is usable, with the first skipped row and what to change."""
    if not self.rows:
      return f"no rows in {self.data}"
    counts = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
    _, where, reason, detail, fields = self.first
    msg = (f"no usable row in {self.data}: all {self.rows} rows skipped ({counts}); first skipped: {where} "
           f"({reason}: {detail}")
    msg += f"; its fields: {', '.join(fields)})" if fields is not None else ")"
    return f"{msg}; {self.hint()}" if self.hint() else msg

  def hint(self) -> str:
    """What to change, for the most common reason."""
    reason = max(sorted(self.skipped), key=lambda r: (self.skipped[r], r == self.first[2])) if self.skipped else ""
    if reason == "too_long":
      return (f"raise {self._field()} to at least {self.longest} to keep every {self._what} (the "
              f"{self._what}s have {self.shortest} to {self.longest} tokens)")
    if reason == "no_target":
      return (f"raise {self._field()}: every row's completion starts after its first {self.max_len} "
              f"tokens (the rows have {self.shortest} to {self.longest} tokens)")
    if reason == "missing_field" and self.kind == "student_sft" and self.first[3].endswith("reasoning trace"):
      return ("student rows need a reasoning trace: rlt_jax.distill's distill.jsonl, Stratos 'conversations' with a "
              "thought section, or a 'reasoning_trace' field")
    return _HINTS.get(reason, "")


def _label(specs: Sequence) -> str:
  return ", ".join(str(s) for s in specs)


def scan(sources, fmt: formats.RLTFormat, *, kind: str = "prompt", max_len: int, length_field: str | None = None,
         reader: str = "auto", truncate: bool = False, data_dir: str | None = None, process_index: int = 0,
         process_count: int = 1, batch_rows: int = 256) -> DataSummary:
  """One process's share of `survey`: rows process_index, process_index + process_count, ... counted."""
  t0 = time.perf_counter()
  specs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
  src = _concat(specs, data_dir)
  out = DataSummary(_label(specs), kind, max_len, length_field or "")
  for r in encode_rows(src, fmt, kind=kind, max_len=max_len, indices=range(process_index, len(src), process_count),
                       reader=reader, truncate=truncate, length_field=length_field, batch_rows=batch_rows):
    out.add(r)
  out.seconds = time.perf_counter() - t0
  return out


def survey(sources, fmt: formats.RLTFormat, *, strict: bool = False, **kw) -> DataSummary:
  """Every row read once before a run (the module doc): the summary, its line logged by process 0. Raises
  BadRowError with strict=True and a bad row, NoUsableRowsError when no row is usable; every process alike.
  `kw`: those of `scan` but the process share."""
  import jax

  from rlt_jax import distributed
  summary = DataSummary.merge(distributed.allgather_objects(
      scan(sources, fmt, process_index=jax.process_index(), process_count=jax.process_count(), **kw)))
  if strict and summary.first is not None:
    _, where, reason, detail, _ = summary.first
    raise BadRowError(f"{where}: bad row ({reason}): {detail} (config.data.strict=True)")
  if not summary.used:
    raise NoUsableRowsError(summary.error())
  if jax.process_index() == 0:
    _log.log(logging.WARNING if summary.skipped else logging.INFO, "%s", summary.line())
  return summary
