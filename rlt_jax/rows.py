"""Dataset row readers: one dataset row (Bespoke-Stratos conversations, GSM8K, MATH / AIME, GPQA or custom fields) to
the canonical row {question, solution, reasoning, system, answer}; a row that cannot be used raises `BadRow` with a
reason from BAD_REASONS. `gpqa_options` reads a GPQA row's four answer options (multiple choice: `rlt_jax.choices`).

The Stratos tags (`STRATOS_TAGS`) are the ones `formats.STYLES["stratos"]` writes; formats takes them from here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BAD_REASONS = ("missing_field", "empty_field", "wrong_type", "too_long", "broken_json", "broken_csv", "undecodable",
               "no_target")
STRATOS_TAGS = dict(thought=("<|begin_of_thought|>", "<|end_of_thought|>"),
                    solution=("<|begin_of_solution|>", "<|end_of_solution|>"))


class BadRow(ValueError):
  """A row that cannot be used; `reason` is one of BAD_REASONS."""

  def __init__(self, reason: str, detail: str):
    assert reason in BAD_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def _text(row: Mapping, key: str, *, required: bool = True) -> str | None:
  v = row.get(key)
  if v is None:
    if required:
      raise BadRow("missing_field", f"field {key!r} is missing")
    return None
  if isinstance(v, np.ndarray) and v.ndim == 0:
    v = v.item()
  if isinstance(v, (bytes, bytearray)):
    try:
      v = bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRow("undecodable", f"field {key!r} is not UTF-8 ({e.reason} at byte {e.start})") from None
  if not isinstance(v, str):
    raise BadRow("wrong_type", f"field {key!r} is {type(v).__name__}, expected text")
  if not v.strip():
    if required:
      raise BadRow("empty_field", f"field {key!r} is empty")
    return None
  return str(v)


def _between(text: str, tags: tuple[str, str], where: str) -> str:
  i = text.find(tags[0])
  j = text.find(tags[1], i + len(tags[0])) if i >= 0 else -1
  if j < 0:
    raise BadRow("missing_field", f"{where} has no {tags[0]}…{tags[1]} section")
  return text[i + len(tags[0]): j]


def read_stratos(row: Mapping) -> dict:
  """Bespoke-Stratos `conversations` row: [user question, assistant thought + solution]; `system` kept if present.

  The thought keeps its text between the tags minus one leading "\n\n" (the padding the formats add back); the
  solution content keeps its "\n\n" padding, as in the data."""
  conv = row.get("conversations")
  if conv is None:
    raise BadRow("missing_field", "field 'conversations' is missing")
  if not isinstance(conv, (list, tuple)) or not all(isinstance(c, Mapping) for c in conv):
    raise BadRow("wrong_type", "field 'conversations' must be a list of {from, value} messages")
  role = [c.get("from", c.get("role")) for c in conv]
  value = [c.get("value", c.get("content")) for c in conv]
  turns = [v for r, v in zip(role, value) if r != "system"]
  if len(turns) < 2:
    raise BadRow("missing_field", "field 'conversations' needs a user and an assistant message")
  question = _text({"conversations[0]": turns[0]}, "conversations[0]")
  answer = _text({"conversations[1]": turns[1]}, "conversations[1]")
  thought = _between(answer, STRATOS_TAGS["thought"], "conversations[1]")
  solution = _between(answer, STRATOS_TAGS["solution"], "conversations[1]")
  if not solution.strip():
    raise BadRow("empty_field", "conversations[1] has an empty solution section")
  reasoning = thought[2:] if thought.startswith("\n\n") else thought
  system = _text(row, "system", required=False)
  if system is None and "system" in role:  # some exports keep the system prompt as a first message
    system = _text({"system": value[role.index("system")]}, "system", required=False)
  return dict(question=question, solution=solution, reasoning=reasoning or None, system=system, answer=None)


def read_custom(row: Mapping) -> dict:
  """Custom rows: `question` (alias `prompt`), `solution`, optional `reasoning_trace`, `system`, `answer`.

  `reasoning_trace: ""` (present and empty) is an empty thought: a student trained on solutions only."""
  qkey = "question" if row.get("question") is not None else "prompt" if row.get("prompt") is not None else "question"
  reasoning = "" if row.get("reasoning_trace") == "" else _text(row, "reasoning_trace", required=False)
  return dict(question=_text(row, qkey), solution=_text(row, "solution"), reasoning=reasoning,
              system=_text(row, "system", required=False), answer=_answer(row))


def _answer(row: Mapping) -> str | None:
  v = row.get("answer")
  return None if v is None else _text(row, "answer", required=False) if not isinstance(v, (int, float)) else str(v)


def read_gsm8k(row: Mapping) -> dict:
  """GSM8K: `question` + `answer` (worked solution ending in "#### N"); solution = the whole worked answer."""
  sol = _text(row, "answer")
  final = sol.rsplit("####", 1)[1].strip().replace(",", "") if "####" in sol else None
  return dict(question=_text(row, "question"), solution=sol, reasoning=None, system=None, answer=final or None)


def read_math(row: Mapping) -> dict:
  """MATH / MATH500 / AIME: `problem`, `solution`, optional `answer`."""
  return dict(question=_text(row, "problem"), solution=_text(row, "solution"), reasoning=None, system=None,
              answer=_answer(row))


GPQA_OPTION_FIELDS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def gpqa_options(row: Mapping) -> tuple[str, ...]:
  """A GPQA row's four options in the release's column order (GPQA_OPTION_FIELDS: the correct one first), stripped;
  a missing or empty option raises BadRow naming its column. Numbers (a JSON or parquet conversion) become text."""
  out = []
  for key in GPQA_OPTION_FIELDS:
    v = row.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      v = str(v)
    out.append(_text({key: v}, key).strip())
  return tuple(out)


def read_gpqa(row: Mapping) -> dict:
  """GPQA (the release's columns: `Question`, `Correct Answer`, `Incorrect Answer 1..3`, optional `Explanation`) as
  a free-response row: question = the question alone, solution = answer = the correct option's text, reasoning = the
  expert `Explanation` when present. The options are not put into the question: the release always lists the correct
  one first, so a fixed order would teach its position; `rlt_jax.evaluate` asks the multiple-choice question itself,
  shuffled per problem (`rlt_jax.choices`). All four options are required, so a broken row is caught here."""
  question = _text(row, "Question").strip()
  correct = gpqa_options(row)[0]
  return dict(question=question, solution=correct, reasoning=_text(row, "Explanation", required=False),
              system=None, answer=correct)


READERS = {"stratos": read_stratos, "custom": read_custom, "gsm8k": read_gsm8k, "math": read_math, "gpqa": read_gpqa}


def detect_reader(row: Mapping) -> str:
  if "conversations" in row:
    return "stratos"
  if "Correct Answer" in row:  # the GPQA release's column; no other layout uses capitalised names
    return "gpqa"
  if "problem" in row:
    return "math"
  if "solution" in row or "reasoning_trace" in row:
    return "custom"
  if "answer" in row:
    return "gsm8k"
  return "custom"


def read_row(row: Any, reader: str = "auto") -> dict:
  """Canonical row {question, solution, reasoning, system, answer} from a dataset row; raises BadRow."""
  if not isinstance(row, Mapping):
    raise BadRow("wrong_type", f"a row must be an object, got {type(row).__name__}")
  if reader == "auto":
    reader = detect_reader(row)
  if reader not in READERS:
    raise ValueError(f"formats: unknown reader {reader!r}; choose one of {['auto', *READERS]}")
  return READERS[reader](row)
