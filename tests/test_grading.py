"""rlt_jax.grading on hand-written cases: answer extraction, math equivalence (right and wrong answers of every kind
the benchmarks use), garbage input, and grading outside the main thread (math-verify's SIGALRM timeout)."""
import threading

import pytest

from rlt_jax.grading import extract_answer, is_correct

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
