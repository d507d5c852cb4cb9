"""rlt_jax.grading on hand-written cases: answer extraction, math equivalence (right and wrong answers of every kind
the benchmarks use, matrices, vectors and tuples among them), garbage input, and grading outside the main thread
(math-verify's SIGALRM timeout); on MATH500: every matrix / vector / tuple answer graded equal to its own solution's
\\boxed{}, also when either side is rewritten in another form MATH solutions use."""
import json
import re
import threading

import pytest

from rlt_jax.grading import equivalent, extract_answer, is_correct

EXTRACT = [
    # \boxed / \fbox, nested braces, the last box wins, unclosed boxes are skipped
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}} is it", r"\frac{\sqrt{3}}{2}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),
    (r"\boxed{3} and a cut-off \boxed{\frac{4", "3"),
    (r"the answer is 9, i.e. \boxed{10}", "10"),  # a box beats "answer is"
    (r"\boxed 5$ done", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    (r"\boxed{}", ""),
    # "answer is": the last one, to the end of its line, without ":", "**", "$" and the final period
    ("The answer is 42.", "42"),
    ("The answer is 41. No wait, the answer is 42.", "42"),
    ("So the answer is: $\\frac{3}{4}$.\nThanks", r"\frac{3}{4}"),
    ("The final answer is **18**.", "18"),
    ("so the answer is $18.", "18"),
    # GSM8K "#### N", commas dropped
    ("Total 1234 apples\n#### 1,234", "1234"),
    ("#### 5\n#### -12.5", "-12.5"),
    # nothing
    ("I do not know.", None),
    ("", None),
    ("<|begin_of_thought|>\n\n<|begin_of_thought|>", None),
]


@pytest.mark.parametrize("response, expected", EXTRACT)
def test_extract_answer(response, expected):
  assert extract_answer(response) == expected


RIGHT = [
    # fractions and decimals
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac12}", "0.5"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\tfrac{1}{2}}", "1/2"),
    (r"\boxed{-\frac{1}{2}}", "-0.5"),
    # radicals and expressions
    (r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
    (r"\boxed{3\sqrt{2}}", r"3\sqrt{2}"),
    (r"\boxed{2}", r"\sqrt{4}"),
    (r"\boxed{x^2+1}", "1+x^2"),
    (r"\boxed{\infty}", r"\infty"),
    # intervals, tuples and sets
    (r"\boxed{(1,2)}", "(1,2)"),
    (r"\boxed{[1, 2)}", r"\left[1,2\right)"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\{2,1\}}", r"\{1,2\}"),
    # matrices and vectors: spacing, pmatrix / bmatrix / array, \dfrac / \frac / a/b entries, products as entries
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    (r"\boxed{\begin{pmatrix}2\\-1\end{pmatrix}}", r"\begin{pmatrix} 2 \\ -1 \end{pmatrix}"),
    (r"\boxed{\begin{bmatrix} 1 \\ 2 \end{bmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix}-1&0\\0&-1\end{pmatrix}}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}"),
    (r"\boxed{\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}"),
    (r"\boxed{\left(\begin{array}{c} 1 \\ 2 \end{array}\right)}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix} \dfrac{1}{5} \\ -\dfrac{18}{5} \end{pmatrix}}",
     r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix} -\frac13 \\ \frac{2}{3} \\ \frac 53 \end{pmatrix}}",
     r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix} 0.2 \\[2pt] -3.6 \end{pmatrix}}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix} 2 \cdot 3 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 6 \\ 1 \end{pmatrix}"),
    (r"so $\mathbf{v} = \boxed{\begin{pmatrix} -7 \\ 16 \\ 5 \end{pmatrix}}.$",
     r"\begin{pmatrix}-7\\16\\5\end{pmatrix}"),
    # tuples: \left( … \right), spacing commands, a control word as a bare \frac argument
    (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\left(3,\frac\pi2\right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\left( 3, \dfrac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),
    (r"\boxed{( 6 , 31 , -1 )}", "(6,31,-1)"),
    (r"\boxed{(1,\,2)}", "(1,2)"),
    (r"\boxed{\left(1.5,\;-13\right)}", r"\left( \frac{3}{2}, -13 \right)"),
    (r"\boxed{(x, y) = (1, 2)}", "(1,2)"),
    # an equation against its value
    (r"\boxed{x = 5}", "5"),
    ("The answer is x=5.", "5"),
    # thousands separators
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    ("The answer is 1,000.", "1000"),
    ("#### 1,234", "1234"),
    # units and currency
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{5}", r"5\text{ cm}"),
    ("The answer is 18 dollars.", "18"),
    (r"\boxed{\$18}", "18"),
    ("The answer is $18.00.", "18"),
    # percentages (math-verify reads 50\% as 50/100 and also accepts the bare 50)
    (r"\boxed{50\%}", "50"),
    (r"\boxed{0.1}", r"10\%"),
    # negatives, integers as in GSM8K and AIME
    (r"\boxed{-3}", "-3"),
    ("#### -7", "-7"),
    (r"\boxed{204}", "204"),
    (r"\boxed{3.0}", "3"),
    # text answers
    (r"\boxed{\text{(C)}}", "(C)"),
    (r"\boxed{\text{Monday}}", r"\text{Monday}"),
    # a gold answer given as a worked solution grades against its own box
    (r"\boxed{6}", r"Since $2 \cdot 3 = 6$, the result is $\boxed{6}$."),
]

WRONG = [
    (r"\boxed{0.5}", "1/3"),
    (r"\boxed{0.333}", r"\frac{1}{3}"),  # rounded too early
    (r"\boxed{\sqrt{2}}", "2"),
    (r"\boxed{(1,2)}", "[1,2]"),  # open vs closed interval
    (r"\boxed{[1,2)}", "(1,2]"),
    (r"\boxed{1000}", "100"),
    (r"\boxed{1,2}", "1000"),  # a pair, not a thousands separator
    (r"\boxed{12}", "1,2"),
    (r"\boxed{3}", "-3"),
    (r"\boxed{-\frac{1}{2}}", "0.5"),
    ("The answer is 19 dollars.", "18"),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{2x}", "2"),
    ("The answer is 2 x.", "2"),
    ("The answer is 2 and 3.", "2"),
    (r"\boxed{\text{(B)}}", "(C)"),
    (r"\boxed{}", "5"),
    ("I think it is 5", "5"),  # no final answer given: not graded as right
    (r"\boxed{6} then \boxed{5}", "6"),  # the last box counts
    # matrices, vectors and tuples with one thing changed
    (r"\boxed{\begin{pmatrix} -1 & 0 \\ 0 & 1 \end{pmatrix}}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}"),  # one entry
    (r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}",
     r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}"),  # transposed
    (r"\boxed{\begin{pmatrix} 1 & 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),  # row vs column vector
    (r"\boxed{\begin{pmatrix}1\\2\\3\end{pmatrix}}", r"\begin{pmatrix} 1 & 2 & 3 \end{pmatrix}"),
    (r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),  # entries swapped
    (r"\boxed{\begin{pmatrix} 6 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 6 \\ 1 \\ 0 \end{pmatrix}"),  # a missing entry
    (r"\boxed{\begin{pmatrix} 1/5 \\ 18/5 \end{pmatrix}}",
     r"\begin{pmatrix} \frac15 \\ -\frac{18}{5} \end{pmatrix}"),  # a sign
    (r"\boxed{(2,1)}", "(1,2)"),  # tuple in another order
    (r"\boxed{(6,-1,31)}", "(6, 31, -1)"),
    (r"\boxed{(6,31,1)}", "(6, 31, -1)"),
    (r"\boxed{(1,2,3)}", "(1,2)"),
    (r"\boxed{\left(3,\frac\pi3\right)}", r"\left( 3, \frac{\pi}{2} \right)"),
]


@pytest.mark.parametrize("response, gold", RIGHT)
def test_right_answers(response, gold):
  assert is_correct(response, gold)


@pytest.mark.parametrize("response, gold", WRONG)
def test_wrong_answers(response, gold):
  assert not is_correct(response, gold)


@pytest.mark.parametrize("response, gold", [
    (None, "5"), (r"\boxed{5}", None), (r"\boxed{5}", ""), (b"\x00\xff", "5"), ({"a": 1}, "5"), (r"\boxed{\frac{", "1"),
    (r"\boxed{\frac{1}{0}}", "x"), (r"\boxed{a", "a"), ("answer is " + "9" * 5000, "5"),
    (r"\boxed{" + "(" * 40 + "}", "1"), (r"\boxed{\begin{pmatrix} 1 \\", r"\begin{pmatrix} 1 \end{pmatrix}"),
])
def test_garbage_is_wrong_and_never_raises(response, gold):
  assert is_correct(response, gold) is False


def test_numeric_gold_given_as_number():
  assert is_correct(r"\boxed{5}", 5) and not is_correct(r"\boxed{6}", 5)


def test_grading_outside_the_main_thread():
  """math-verify's SIGALRM timeout cannot be set off the main thread; grading must still work there."""
  out = []
  cases = [(r"\boxed{\sqrt{18}}", r"3\sqrt{2}"), (r"\boxed{(1,2)}", "[1,2]"), (r"\boxed{0.5}", r"\frac{1}{2}")]
  t = threading.Thread(target=lambda: out.extend(is_correct(r, g) for r, g in cases))
  t.start()
  t.join(timeout=60)
  assert out == [True, False, True]


# ---------------------------------------------------------------------------------------------------- MATH500 oracle
_MATRIX_RE = re.compile(r"\\begin\{[pbvBV]?matrix\}")


def _structured(answer: str) -> bool:
  """A matrix / vector (a matrix environment) or a tuple: one bracket pair around the whole answer with a comma at
  its top level (open and half-open intervals share the tuple's syntax, and are kept: math-verify tells them apart)."""
  s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", answer).strip()
  if _MATRIX_RE.search(answer):
    return True
  if s[:1] not in "([" or s[-1:] not in ")]":
    return False
  depth = 0
  for c in s:
    depth += c in "([{"
    depth -= c in ")]}"
    if c == "," and depth == 1:
      return True
  return False


@pytest.fixture(scope="module")
def math500_structured(shared_data):
  rows = [json.loads(line) for line in (shared_data / "math500" / "test.jsonl").read_text().splitlines()]
  return [r for r in rows if _structured(r["answer"])]


def test_math500_structured_answers_equal_their_own_solution(math500_structured):
  """Every MATH500 matrix / vector / tuple answer equals the \\boxed{} of its own gold solution."""
  assert len(math500_structured) == 26  # 7 pmatrix vectors and matrices, 19 tuples and intervals in the file
  assert sum(bool(_MATRIX_RE.search(r["answer"])) for r in math500_structured) == 7
  failed = [r["unique_id"] for r in math500_structured if not is_correct(r["solution"], r["answer"])]
  assert failed == []


# Rewrites of an answer into other forms MATH solutions use, each meaning the same thing.
REWRITES = {
    "tight": lambda s: re.sub(r"\s*(\\\\|&|,|\(|\)|\[|\])\s*", r"\1", s),
    "loose": lambda s: re.sub(r"(\\\\|&|,)", r" \1 ", s),
    "bmatrix": lambda s: s.replace("pmatrix", "bmatrix"),
    "dfrac": lambda s: s.replace("\\frac", "\\dfrac"),
    "unbraced_frac": lambda s: re.sub(  # \frac{\pi}{2} → \frac\pi 2, \frac{3}{2} → \frac 3 2
        r"\\frac\{(\\[a-zA-Z]+|\w)\}\{(\\[a-zA-Z]+|\w)\}",
        lambda m: "\\frac" + "".join(a if a.startswith("\\") else " " + a for a in m.groups()), s),
    "no_left_right": lambda s: re.sub(r"\\(?:left|right)(?![A-Za-z])\s*", "", s),
    "thin_spaces": lambda s: s.replace(",", r",\,"),
}


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_math500_structured_answers_in_other_forms(math500_structured, rewrite):
  """Each rewrite of the answer field equals the gold solution's box, both ways round (as a response and as gold)."""
  failed, changed = [], 0
  for r in math500_structured:
    other = REWRITES[rewrite](r["answer"])
    changed += other != r["answer"]
    if not is_correct(r"\boxed{" + other + "}", r["answer"]) or not is_correct(r["solution"], other):
      failed.append((r["unique_id"], other))
  assert changed > 0  # the rewrite applies to some answers in the file
  assert failed == []


def test_equivalent_compares_extracted_answers():
  assert equivalent(r"\frac12", "0.5") and equivalent("(C)", r"\text{(C)}")
  assert equivalent(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}")
  assert not equivalent("3", "2") and not equivalent("the answer is 2", "3")
  assert not equivalent("(2,1)", "(1,2)")
  assert equivalent(None, "1") is False and equivalent("1", 1) is False and equivalent("", "") is False
