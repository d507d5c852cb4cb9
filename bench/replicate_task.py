"""The miniature task of `bench/replicate.py`: the last digit of a sum, where an explanation can carry the work.

A problem is N random digits; its reference solution is the final answer only ("Answer: \\boxed{6}"), the way a
textbook's last line is. Computing it in one step is a parity-like function of all N digits, which a two-layer
model does not learn in a few thousand SFT steps; written out as running last digits ("Running 6 2 2 6.") every step
is one addition of two digits, which it does. So what the student is shown as its thought decides what it can learn,
which is the paper's premise at a size a CPU trains in minutes.

The teacher's warm-up rows (and the reward student's) explain each problem in one of two styles, drawn with equal
odds per row: `steps` (the running last digits) or `answer` (a sentence that states the final digit). Both end in
the right answer and both let the reward student predict the solution, but only `steps` can be predicted by a
student that sees the question alone; the RLT reward's KL term (r_KL) is what tells them apart (paper, Appendix D).

Splits are made by construction: a digit string is held out when the SHA-256 of its text is 0 mod 5, so no held-out
question is ever a training question, whatever the sizes.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

STYLES = ("steps", "answer")
TEACHER_SYSTEM = "Explain the solution."
STUDENT_SYSTEM = "Solve."
FORMAT = dict(style="r1", teacher_system=TEACHER_SYSTEM, student_system=STUDENT_SYSTEM)
# The tiny models' shape: big enough to learn one-digit additions and where to read them, small enough for 2 cores.
MODEL_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256)


def question(digits) -> str:
  return "Sum mod 10:" + "".join(f" {d}" for d in digits)


def answer(digits) -> int:
  return int(sum(digits) % 10)


def solution(digits) -> str:
  return f"Answer: \\boxed{{{answer(digits)}}}"


def explanation(digits, style: str) -> str:
  """An explanation in one of STYLES (the warm-up corpus's two ways of explaining a problem)."""
  if style == "steps":
    return "Running" + "".join(f" {d}" for d in np.cumsum(digits) % 10) + "."
  if style == "answer":
    return f"It ends in {answer(digits)}."
  raise ValueError(f"replicate_task: unknown style {style!r}; styles are {STYLES}")


def style_of(text: str) -> str:
  """Which style an explanation follows ("other" for neither), read from its first word."""
  text = text.strip()
  return "steps" if text.startswith("Running") else "answer" if text.startswith("It ends") else "other"


def steps_correct(digits, text: str) -> bool:
  """True when a `steps` explanation's running digits are all right (its work, not only its last digit)."""
  return text.strip() == explanation(digits, "steps")


def digits_of(question_text: str) -> tuple[int, ...] | None:
  """The digits of a question this module wrote (None for any other text)."""
  head = "Sum mod 10:"
  if not question_text.startswith(head):
    return None
  parts = question_text[len(head):].split()
  return tuple(int(p) for p in parts) if parts and all(len(p) == 1 and p.isdigit() for p in parts) else None


def is_held_out(digits) -> bool:
  return int(hashlib.sha256(question(digits).encode()).hexdigest(), 16) % 5 == 0


def problems(n: int, *, held_out: bool, num_digits: int, seed: int) -> list[tuple[int, ...]]:
  """`n` distinct digit strings from one side of the split, in a seeded order."""
  space = 10 ** num_digits
  rng = np.random.RandomState(seed)
  out, seen = [], set()
  for code in rng.permutation(space):
    digits = tuple(int(c) for c in f"{code:0{num_digits}d}")
    if is_held_out(digits) == held_out and digits not in seen:
      seen.add(digits)
      out.append(digits)
      if len(out) == n:
        return out
  raise ValueError(f"replicate_task: only {len(out)} {'held-out' if held_out else 'training'} problems exist with "
                   f"{num_digits} digits; {n} asked")


def task_row(digits) -> dict:
  """A custom row ({question, solution, answer}): what RL, distillation and evaluation read."""
  return dict(question=question(digits), solution=solution(digits), answer=str(answer(digits)))


def warmup_row(digits, style: str) -> dict:
  """A warm-up row: the task row with an explanation (`reasoning_trace`) in `style`."""
  return dict(task_row(digits), reasoning_trace=explanation(digits, style))


def no_thought_row(digits) -> dict:
  """The solutions-only baseline's row: an empty thought, then the solution."""
  return dict(task_row(digits), reasoning_trace="")


def write_jsonl(path: str, rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def tokenizer_texts(train: list[tuple[int, ...]]) -> list[str]:
  """What the tiny tokenizer is trained on: every kind of text the runs write, tags and system prompts included."""
  chat = "system user assistant <solution> </solution> <explanation> </explanation> <think> </think> \\boxed{"
  texts = [f"{TEACHER_SYSTEM}\n{STUDENT_SYSTEM}\n{chat}"] * 200
  for d in train:
    texts.append("\n".join([question(d), solution(d)] + [explanation(d, s) for s in STYLES]))
  return texts
