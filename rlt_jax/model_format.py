"""A model's chat format, kept beside its weights: `rlt_format.json` in every directory an SFT or RL run exports
(and in the tiny local models), read back by every run that loads the model (`loading.make_format`).

Why: a student is scored fairly (the RL reward) or graded fairly (evaluate) only under the system prompt it was
trained with, and a teacher writes well only in the prompt and tags of its warm-up. A Hugging Face directory holds
the weights and the tokenizer but not these, so without this file a distilled student would be asked benchmark
questions under the format's default prompt, one it never saw.

The file: {"rlt_jax_format": 1, "role": "teacher" | "student", "style": ..., and every `formats.STYLES` field}, as
the run that wrote it used them. A student's `student_system` is the prompt its training rows carried
(distillation rows carry their own `system`), which need not be the config's.

A run takes `TEACHER_FIELDS` from its teacher's file, `STUDENT_FIELDS` from its student's, and `SHARED_FIELDS`
(both prompts must end the same way for the splice) from the teacher's when it has one. A model directory without
the file (a hub checkpoint) contributes nothing: the style's defaults apply, as before.
"""
from __future__ import annotations

import collections
import json
import logging
import os

import jax

from rlt_jax import formats, rows, sources, storage

FILE = "rlt_format.json"
VERSION = 1
ROLES = ("teacher", "student")
TEACHER_FIELDS = ("teacher_system", "solution_tags", "explanation_tags")
STUDENT_FIELDS = ("student_system", "thought_tags", "student_solution_tags", "think_prefix")
SHARED_FIELDS = ("delimiter", "padding")
FIELDS = {"teacher": TEACHER_FIELDS + SHARED_FIELDS, "student": STUDENT_FIELDS + SHARED_FIELDS}
assert set(TEACHER_FIELDS + STUDENT_FIELDS + SHARED_FIELDS) == set(formats.STYLES["stratos"]), \
    "every RLTFormat field belongs to one role"


def record(fmt: formats.RLTFormat, role: str, *, student_system: str | None = None) -> dict:
  """The file's content for a model trained as `role` in `fmt` (`student_system`: the prompt its rows carried)."""
  if role not in ROLES:
    raise ValueError(f"model_format: role must be one of {ROLES}, got {role!r}")
  out = {"rlt_jax_format": VERSION, "role": role, "style": fmt.style}
  for f in formats.STYLES[fmt.style]:
    v = getattr(fmt, f)
    out[f] = list(v) if isinstance(v, tuple) else v
  if student_system:
    out["student_system"] = student_system
  return out


def write(directory: str, fmt: formats.RLTFormat, role: str, *, student_system: str | None = None) -> str:
  """Writes `directory/rlt_format.json` (process 0; atomically, so a reader never sees half a file); its path."""
  path = storage.join(directory, FILE)  # a URL: one object upload
  if jax.process_index() == 0:
    storage.makedirs(directory)
    storage.write_text(path, json.dumps(record(fmt, role, student_system=student_system), indent=2,
                                        ensure_ascii=False))
  return path


def read(directory: str) -> dict | None:
  """The format recorded in a model directory, or None when it has none. A file that cannot be used raises a
  ValueError naming it and what is wrong."""
  path = os.path.join(directory, FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot be read as JSON ({e}); fix or delete it") from None
  if not isinstance(rec, dict) or rec.get("rlt_jax_format") != VERSION:
    raise ValueError(f"{path}: not an rlt_jax format record of version {VERSION}")
  if rec.get("role") not in ROLES or rec.get("style") not in formats.STYLES:
    raise ValueError(f"{path}: role must be one of {ROLES} and style one of {sorted(formats.STYLES)}")
  missing = [f for f in FIELDS[rec["role"]] if f not in rec]
  if missing:
    raise ValueError(f"{path}: fields {missing} are missing")
  return rec


def fields(rec: dict, role: str) -> dict:
  """The RLTFormat fields a model recorded as `rec` gives a run that uses it as `role` (lists back to tuples)."""
  return {f: tuple(rec[f]) if isinstance(rec[f], list) else rec[f] for f in FIELDS[role] if f in rec}


def data_system_prompt(path: str, *, reader: str = "auto", data_dir: str | None = None,
                       limit: int = 4096) -> tuple[str | None, int]:
  """(the most common `system` prompt of the first `limit` usable rows of a dataset, how many distinct ones they
  carry): what a student trained on those rows was trained with (None when no row carries one)."""
  src = sources.open_source(path, data_dir=data_dir)
  counts = collections.Counter()
  for i in range(min(len(src), limit)):
    try:
      row = rows.read_row(sources.decode_payload(src[i].payload), reader)
    except rows.BadRow:
      continue
    if row["system"]:
      counts[row["system"]] += 1
  return (counts.most_common(1)[0][0] if counts else None), len(counts)


class RowPrompts:
  """A data row's own `system` prompt wins for that row (Bespoke-Stratos rows carry their student's prompt); when a
  student recorded another one, `check(systems)` warns once per such prompt, naming both."""

  def __init__(self, student_dir: str | None):
    rec = read(student_dir) if student_dir else None
    self.directory, self.recorded = student_dir, rec and rec.get("student_system")
    self.seen: set[str] = set()

  def check(self, systems) -> None:
    if not self.recorded:
      return
    for system in set(s for s in systems if s) - self.seen:
      self.seen.add(system)
      if system != self.recorded:
        logging.getLogger("rlt_jax").warning(
            "a data row's system prompt is used for its row, but the student in %s was trained with another:\n"
            "  recorded: %r\n  row:      %r", self.directory, shorten(self.recorded), shorten(system))


def shorten(text: str, limit: int = 300) -> str:
  """A prompt for a log line: whole up to `limit` characters."""
  return text if len(text) <= limit else text[:limit] + " …"
