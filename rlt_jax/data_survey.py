"""The start-of-run pass over the data: every row read once, before any model loads, through the input pipeline's own
reading, tokenizing and filtering code (`data.RowEncoder`, `batch_rows` rows a tokenizer call).

    summary = survey(["train.jsonl"], fmt, kind="prompt", max_len=16384, length_field="max_prompt_len")

`survey` returns a `DataSummary`: rows used and skipped per reason, where the first skipped ones are (file order) and
the prompt or row lengths. It logs one line (`DataSummary.line`), raises `data.NoUsableRowsError` when no row is
usable (with the first skipped row and what to change) and, with strict=True, `data.BadRowError` at the first bad
row. With several processes each reads every process_count-th row (`scan`) and the counts are merged, so every
process logs and raises alike. `encode_rows` is the same reading for callers that keep the encoded rows (distill,
evaluate).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

from rlt_jax import data, formats

_log = logging.getLogger("rlt_jax.data")  # the survey line keeps the logger name it always had


def encode_rows(source, fmt: formats.RLTFormat, *, kind: str = "prompt", max_len: int, indices=None,
                reader: str = "auto", truncate: bool = False, length_field: str | None = None,
                batch_rows: int = 256) -> Iterator[dict]:
  """{index, where, example | bad, length, fields} of the records of `source` (an opened source) at `indices`
  (default: all, in file order), through the pipeline's own reading, tokenizing and filtering (`data.RowEncoder`),
  with one tokenizer call per `batch_rows` prompts. `bad` is (reason, detail); `length` the tokens before any cut
  (None when the row could not be read); `fields` the names a row that could not be read has."""
  if kind not in data.KINDS:
    raise ValueError(f"data: unknown kind {kind!r}; choose one of {data.KINDS}")
  enc = data.RowEncoder(fmt, kind, reader, max_len, 1, truncate, length_field)
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


def scan(sources, fmt: formats.RLTFormat, *, kind: str = "prompt", max_len: int, length_field: str | None = None,
         reader: str = "auto", truncate: bool = False, data_dir: str | None = None, process_index: int = 0,
         process_count: int = 1, batch_rows: int = 256) -> DataSummary:
  """One process's share of `survey`: rows process_index, process_index + process_count, ... counted."""
  t0 = time.perf_counter()
  specs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
  src = data.concat_sources(specs, data_dir)
  out = DataSummary(data.sources_label(specs), kind, max_len, length_field or "")
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
    raise data.BadRowError(f"{where}: bad row ({reason}): {detail} (config.data.strict=True)")
  if not summary.used:
    raise data.NoUsableRowsError(summary.error())
  if jax.process_index() == 0:
    _log.log(logging.WARNING if summary.skipped else logging.INFO, "%s", summary.line())
  return summary
