"""Multiple-choice problems (GPQA): the options shuffled with a seed recorded per problem, the question that lists
them by letter, and the grading of a response's letter.

    mc = MultipleChoice.from_row(raw_row, config_seed=0, row_index=12)   # GPQA columns → 4 options, shuffled
    text = mc.question_text(question)                                    # question + "A) ..." lines + instruction
    letter = mc.pick(response)                                           # "B", or None
    correct = letter == mc.answer

The shuffle: `problem_seed(config_seed, row_index)` (the first 4 bytes of a SHA-256 of both, so it is the same on
every machine and Python version), then `random.Random(seed).sample` of the option positions. Letter k shows the
option `order[k]` of the release's column order (`rows.GPQA_OPTION_FIELDS`, the correct one first).

A response's letter: its final answer as `grading.extract_answer` finds it (\\boxed{B}, "the answer is (B)", ...) read
as a letter — "B", "(B)", "B)", "B.", "\\text{B}", "**B**", "Option B", "B) <option text>"; a lone lower-case letter
too — and when it is not a letter, the option whose text `grading.equivalent` says it is, if exactly one option is.
A letter past the options, an answer equal to no option or to several, or no final answer at all picks nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Mapping

from rlt_jax import grading, rows

LETTERS = "ABCDEFGHIJ"
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|bf)\s*\{([^{}]*)\}")
_LONE_LETTER_RE = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:]?")
_NAMED_LETTER_RE = re.compile(r"(?:option|choice)\s*:?\s*\(?([A-Z])\)?\s*[.:]?", re.IGNORECASE)
_LEADING_LETTER_RE = re.compile(r"(?:\(([A-Z])\)|([A-Z])[):]|([A-Z])\.(?=\s))\s*\S")


def problem_seed(config_seed: int, row_index: int) -> int:
  """The shuffle seed of one problem (0 ≤ seed < 2**32): a function of the run's seed and the row's 0-based index in
  its file only, so a rerun, a subset (`limit`) or another format of the same file shows each problem the same way."""
  digest = hashlib.sha256(f"rlt_jax.choices:{int(config_seed)}:{int(row_index)}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def shuffled_order(n: int, seed: int) -> tuple[int, ...]:
  """order[k] = the position (in the given options) of the option shown at letter k."""
  return tuple(random.Random(seed).sample(range(n), n))


def _unwrap(text: str) -> str:
  """\\text{..}-like wrappers, `$`, markdown `*` and outer spaces off."""
  s = text
  while (t := _WRAPPER_RE.sub(r"\1", s)) != s:
    s = t
  return s.replace("$", "").strip().strip("*").strip()


def letter_in(answer: str | None, n: int) -> str | None:
  """The letter an extracted final answer names, among the first n letters; None when it names none."""
  if not isinstance(answer, str):
    return None
  s = _unwrap(answer)
  m = _LONE_LETTER_RE.fullmatch(s) or _NAMED_LETTER_RE.fullmatch(s)
  letter = m.group(1).upper() if m else None
  if letter is None and (m := _LEADING_LETTER_RE.match(s)):  # "B) 42 kg": the letter, then its option's text
    letter = next(g for g in m.groups() if g)
  return letter if letter is not None and letter in LETTERS[:n] else None


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  seed: int
  options: tuple[str, ...]   # the option texts in the order shown: options[k] is letter k
  columns: tuple[str, ...]   # the release column each shown option came from
  answer: str                # the correct letter
  row_index: int | None = None  # the row's 0-based index in its file, which the seed was made from

  @classmethod
  def from_row(cls, row: Mapping, *, config_seed: int, row_index: int) -> MultipleChoice:
    """The shuffled problem of a GPQA row (raises rows.BadRow naming a missing or empty option column)."""
    release = rows.gpqa_options(row)  # correct first
    seed = problem_seed(config_seed, row_index)
    order = shuffled_order(len(release), seed)
    return cls(seed=seed, options=tuple(release[i] for i in order),
               columns=tuple(rows.GPQA_OPTION_FIELDS[i] for i in order), answer=LETTERS[order.index(0)],
               row_index=row_index)

  @property
  def letters(self) -> str:
    return LETTERS[:len(self.options)]

  def question_text(self, question: str) -> str:
    """The question with its options listed one a line by letter, and how to give the final answer."""
    lines = "\n".join(f"{k}) {text}" for k, text in zip(self.letters, self.options))
    letters = ", ".join(self.letters[:-1]) + " or " + self.letters[-1]
    return (f"{question.strip()}\n\n{lines}\n\nOne option is correct. End your answer with its letter ({letters}) "
            f"alone inside \\boxed{{}}.")

  def pick(self, response: str) -> str | None:
    """The letter a response chooses: its final answer read as a letter, else the one option equal to it."""
    answer = grading.extract_answer(response)
    letter = letter_in(answer, len(self.options))
    if letter is not None or answer is None:
      return letter
    same = [k for k, text in zip(self.letters, self.options) if grading.equivalent(answer, text)]
    return same[0] if len(same) == 1 else None

  def record(self) -> dict:
    """What a results line keeps of the problem: the seed and the row index it was made from, the correct letter,
    the options by letter and the release column each came from."""
    return dict(choice_seed=self.seed, row_index=self.row_index, answer_letter=self.answer,
                choices=dict(zip(self.letters, self.options)), choice_columns=dict(zip(self.letters, self.columns)))
