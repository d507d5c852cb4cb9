"""Final-answer extraction and equivalence grading for math benchmarks (GSM8K, MATH500, AIME).

    extract_answer(response)   the last \\boxed{...} / \\fbox{...}, else the text after the last "answer is",
                               else the number after the last "#### ", else None
    is_correct(response, gold) extract, then math equivalence with math-verify, with plain-string fallbacks
    equivalent(answer, gold)   the same equivalence for an answer already extracted (multiple-choice options)

Equivalence goes through math-verify (`parse` turns both sides into SymPy objects, `verify` compares them): 1/2, 0.5,
\\frac{1}{2} and \\dfrac12 agree; 3\\sqrt{2} equals \\sqrt{18}; (1,2) and [1,2] are different intervals; `x = 5`
matches 5; 1,000 and 1{,}000 are 1000; units in \\text{} are dropped; 50\\% is 50/100. Matrices and vectors
(pmatrix, bmatrix, array) compare entry by entry and tuples in order, whatever the spacing, `\\left( … \\right)` or
`\\dfrac` vs `\\frac`; a transposed vector, a reordered tuple or one changed entry is wrong (and so is a column vector
written as a tuple: math-verify reads (1,2) as an interval, not a pmatrix). Both sides are
normalised first: spacing commands (`\\,` `\\!` `\\;` `\\ `) out, while a matrix row break `\\\\` is kept (read as `\\ `
it would merge the rows), and a control word as a bare `\\frac` argument braced (`\\frac\\pi2` → `\\frac{\\pi}{2}`:
math-verify reads only a single character there). Before math-verify, two cheap checks: identical normalised
strings (text answers such as "(C)" or "Monday"), and after it one fallback: a plain number followed only by words
("18 dollars") against a numeric gold answer.

math-verify bounds each parse/compare with SIGALRM, which only the main thread may set; elsewhere (a thread pool, a
grain worker thread) the timeout is switched off rather than letting math-verify raise, so grading works wherever it
runs (there, a pathological SymPy comparison is not interrupted). Nothing here raises on bad input: `is_correct`
and `equivalent` return False.
"""
from __future__ import annotations

import logging
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException  # a BaseException: `except Exception` alone misses it

_TIMEOUT_S = 5  # per math-verify parse / comparison, main thread only
_MAX_ANSWER_CHARS = 2000  # longer "answers" are runaway text; SymPy on them only burns the timeout

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"answer\s+is", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")
# a number, a space, then only words of 2+ letters ("18 dollars", "5 cm"); "2x" or "2 x" is an expression, not units
_NUMBER_WITH_WORDS_RE = re.compile(r"([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s+[A-Za-z]{2,}\.?)+")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# LaTeX spacing commands. A matrix row break, two backslashes (with an optional extra space such as [2pt] after
# them), is matched first so that its second backslash is never read as the start of a control space (backslash,
# space), which would merge the matrix's rows.
_SPACING_RE = re.compile(r"\\\\(?:\[\s*-?[\d.]+\s*(?:pt|em|ex|mm|cm|in|mu)\s*\])?|\\[!,:; ]")
_SPACING = {"\\!": "", "\\,": "", "\\:": " ", "\\;": " ", "\\ ": " "}
_FRAC_RE = re.compile(r"\\[dt]?frac(?![A-Za-z])")


# ----------------------------------------------------------------------------------------------------------- extract
def _braced(text: str, start: int) -> str | None:
  """Content of the brace group opening at text[start] == "{", or None when it never closes (a truncated reply)."""
  depth, i = 0, start
  while i < len(text):
    c = text[i]
    if c == "\\":  # a control sequence: an escaped brace \{ or \} is content, not structure
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1: i]
    i += 1
  return None


def _last_box(text: str) -> str | None:
  for m in reversed(list(_BOX_RE.finditer(text))):
    i = m.end()
    while i < len(text) and text[i] == " ":
      i += 1
    if i < len(text) and text[i] == "{":
      content = _braced(text, i)
      if content is not None:
        return content.strip()
      continue  # unclosed box (generation cut off): an earlier complete one is the answer
    if i > m.end():  # "\boxed 5": the argument is the next run of non-space characters
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        return token.group(0).rstrip(".")
  return None


def _clean_tail(text: str) -> str:
  """The answer phrase after "answer is": this line only, without ":", markdown bold, `$` and a final period."""
  line = text.split("\n", 1)[0]
  line = line.strip().lstrip(":").strip()
  line = line.strip("*").strip()
  while line and line[-1] in ".$ *":
    line = line[:-1]
  return line.lstrip("$ ").strip()


def extract_answer(response: str) -> str | None:
  """The final answer a response gives, as text (see the module doc for the order of the rules)."""
  if not isinstance(response, str) or not response:
    return None
  box = _last_box(response)
  if box is not None:
    return box
  hits = list(_ANSWER_IS_RE.finditer(response))
  if hits:
    tail = _clean_tail(response[hits[-1].end():])
    if tail:
      return tail
  hashes = list(_HASH_RE.finditer(response))
  if hashes:
    return hashes[-1].group(1).replace(",", "")
  return None


# ------------------------------------------------------------------------------------------------------------- grade
def _strip_math(text: str) -> str:
  """Outer `$`/`\\(`…`\\)` delimiters, spaces and a final period off; LaTeX spacing commands and {,} separators
  out; `\\frac` arguments braced."""
  s = text.strip()
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
      s = s[len(left): len(s) - len(right)].strip()
  s = s.replace("\\$", "").lstrip("$").rstrip(".").strip()  # "\$18": a currency sign, not math
  s = _SPACING_RE.sub(lambda m: _SPACING.get(m.group(0), "\\\\"), s.replace("{,}", ","))
  return _brace_frac_arguments(s)


def _brace_frac_arguments(text: str) -> str:
  """`\\frac\\pi2` → `\\frac{\\pi}{2}`: TeX takes a lone token (a character or a control word) as an argument,
  math-verify's parser only a single character, so a control word as a bare argument is braced here."""
  out, pos = [], 0
  for m in _FRAC_RE.finditer(text):
    if m.start() < pos:  # inside an argument already copied
      continue
    i, args = m.end(), []
    for _ in range(2):
      while i < len(text) and text[i] == " ":
        i += 1
      if i < len(text) and text[i] == "{":
        inner = _braced(text, i)
        if inner is None:
          break
        args.append("{" + _brace_frac_arguments(inner) + "}")  # a \\frac nested in a braced argument
        i += len(inner) + 2
      elif token := re.match(r"\\[A-Za-z]+|[^\s\\{}]", text[i:]):
        args.append("{" + token.group(0) + "}")
        i += len(token.group(0))
      else:
        break
    if len(args) == 2:
      out.append(text[pos: m.end()] + "".join(args))
      pos = i
  return "".join(out) + text[pos:]


def _plain(text: str) -> str:
  """A loose string key: \\text{} unwrapped, no spaces or dollar signs, lower case."""
  s = _TEXT_RE.sub(r"\1", text)
  return re.sub(r"[\s$]", "", s).lower()


def _plain_words(text: str) -> str:
  """\\text{cm} → " cm", backslashes out: "5\\text{ cm}" and "5 cm" read alike."""
  return _TEXT_RE.sub(r" \1", text).replace("\\", "").strip()


def _as_number(text: str) -> float | None:
  s = text.strip()
  if not s or not _NUMBER_RE.fullmatch(s) or not any(c.isdigit() for c in s):
    return None
  return float(s.replace(",", ""))


def _math_verify(gold: str, pred: str) -> bool:
  timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
  # Both sides come already extracted, so wrap them as one inline-math expression for the LaTeX extractor; the
  # expression extractor covers plain forms such as "1/2". Newlines would end the inline-math match.
  configs = [LatexExtractionConfig(), ExprExtractionConfig()]
  wrap = lambda s: "$" + s.replace("\n", " ").replace("$", "") + "$"  # noqa: E731
  gold_parsed = parse(wrap(gold), extraction_config=configs, parsing_timeout=timeout)
  pred_parsed = parse(wrap(pred), extraction_config=configs, parsing_timeout=timeout)
  if not gold_parsed or not pred_parsed:
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _equivalent(pred: str, gold: str) -> bool:
  p, g = _strip_math(pred), _strip_math(gold)
  if not p or not g:
    return False
  if _plain(p) == _plain(g):
    return True
  if len(p) <= _MAX_ANSWER_CHARS and _math_verify(g, p):
    return True
  # "18 dollars", "5 cm": a number followed only by words, against a plain-number gold answer.
  gold_num = _as_number(g)
  m = _NUMBER_WITH_WORDS_RE.fullmatch(_plain_words(p))
  return gold_num is not None and m is not None and abs(float(m.group(1).replace(",", "")) - gold_num) < 1e-9


def equivalent(answer: str, gold: str) -> bool:
  """Whether a final answer already taken out of its response (`extract_answer`'s output, an option's text) equals
  `gold` by the same rules as `is_correct`; False for anything but two strings, never raises."""
  try:
    return isinstance(answer, str) and isinstance(gold, str) and _equivalent(answer, gold)
  except (Exception, TimeoutException) as e:  # garbage in: not equal, never an exception
    logging.getLogger(__name__).debug("comparing %.200r with %.200r failed: %s", answer, gold, e)
    return False


def is_correct(response: str, gold: str) -> bool:
  """Whether the final answer of `response` equals the gold answer (LaTeX, an expression or a plain number)."""
  try:
    if not isinstance(gold, str):
      gold = str(gold) if isinstance(gold, (int, float)) else ""
    pred = extract_answer(response)
    if pred is None or not gold.strip():
      return False
    # Gold answers written as a solution ("... \boxed{7}") grade against their own final answer.
    gold = _last_box(gold) or gold
    return _equivalent(pred, gold)
  except (Exception, TimeoutException) as e:  # garbage in: a wrong answer out, never an exception
    logging.getLogger(__name__).debug("grading failed on %.200r: %s", response, e)
    return False
