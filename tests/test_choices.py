"""rlt_jax.choices: the per-problem shuffle (seeded, recorded, a real permutation that moves the correct option) and the
letter a response picks, on hand-made problems with hand-worked verdicts."""
import collections

import pytest

from rlt_jax import choices, rows

ROW = {"Question": "Which gas do plants take in for photosynthesis?", "Correct Answer": "Carbon dioxide",
       "Incorrect Answer 1": "Oxygen", "Incorrect Answer 2": "Nitrogen", "Incorrect Answer 3": "Helium",
       "Explanation": "Plants fix CO2.", "Record ID": "rec1"}


def test_problem_seed_is_fixed_by_config_seed_and_row():
  # Pinned: the seed (and so the order) of a problem must not change between versions, or recorded runs stop being
  # reproducible. 886669406 is the first 4 bytes (little-endian) of sha256(b"rlt_jax.choices:0:0").
  assert choices.problem_seed(0, 0) == 886669406
  seeds = {choices.problem_seed(s, i) for s in range(3) for i in range(100)}
  assert len(seeds) == 300 and all(0 <= s < 2**32 for s in seeds)
  assert choices.problem_seed(-1, 5) == choices.problem_seed(-1, 5)  # any int seed, the same each time


def test_same_seed_same_order_and_the_record_matches_the_row():
  a = choices.MultipleChoice.from_row(ROW, config_seed=3, row_index=7)
  b = choices.MultipleChoice.from_row(dict(ROW), config_seed=3, row_index=7)
  assert a == b and a.seed == choices.problem_seed(3, 7)
  rec = a.record()
  assert rec["choice_seed"] == a.seed and rec["row_index"] == 7 and rec["answer_letter"] == a.answer
  assert sorted(rec["choices"]) == ["A", "B", "C", "D"]
  for letter, text in rec["choices"].items():  # every shown option is the row's text of the column it came from
    assert ROW[rec["choice_columns"][letter]] == text
  assert rec["choice_columns"][a.answer] == "Correct Answer" and rec["choices"][a.answer] == "Carbon dioxide"


def test_the_shuffle_moves_the_correct_option_to_every_letter():
  """Over 400 problems the correct option lands on each letter about a quarter of the time (the release always has
  it first), and another config seed gives other orders."""
  answers = [choices.MultipleChoice.from_row(ROW, config_seed=0, row_index=i).answer for i in range(400)]
  counts = collections.Counter(answers)
  assert set(counts) == set("ABCD") and all(60 <= n <= 140 for n in counts.values()), counts
  other = [choices.MultipleChoice.from_row(ROW, config_seed=1, row_index=i).answer for i in range(400)]
  assert other != answers
  assert sorted(choices.shuffled_order(4, 123)) == [0, 1, 2, 3]


def test_question_text_lists_the_options_by_letter():
  mc = choices.MultipleChoice(seed=1, options=("Oxygen", "Nitrogen", "Carbon dioxide", "Helium"),
                              columns=rows.GPQA_OPTION_FIELDS, answer="C")
  text = mc.question_text("  Which gas?\n")
  assert text.startswith("Which gas?\n\nA) Oxygen\nB) Nitrogen\nC) Carbon dioxide\nD) Helium\n\n")
  assert "(A, B, C or D)" in text and "\\boxed{}" in text


# Options by letter: A) 4 m/s  B) \frac{1}{2}  C) Carbon dioxide  D) 12; the correct one is B.
MC = choices.MultipleChoice(seed=0, options=("4 m/s", "\\frac{1}{2}", "Carbon dioxide", "12"),
                            columns=rows.GPQA_OPTION_FIELDS, answer="B")
PICKS = [
    # the letter, in the forms a final answer takes
    (r"so \boxed{B}", "B"),
    ("The answer is (B).", "B"),
    (r"\boxed{\text{B}}", "B"),
    (r"\boxed{\textbf{(C)}}", "C"),
    (r"\boxed{B)}", "B"),
    (r"The answer is B) \frac12", "B"),
    (r"\boxed{D. 12}", "D"),
    (r"\boxed{Option B}", "B"),
    ("**The final answer is B**", "B"),
    (r"$\boxed{D}$.", "D"),
    (r"\boxed{(b)}", "B"),
    (r"\boxed{a}", "A"),
    (r"first \boxed{A}, then on reflection \boxed{C}", "C"),  # the last box
    # not a letter: the one option whose text the answer equals (grading's equivalence)
    (r"\boxed{0.5}", "B"),
    (r"\boxed{1/2}", "B"),
    (r"\boxed{carbon dioxide}", "C"),
    ("The answer is 12.", "D"),
    # nothing picked
    (r"\boxed{E}", None),            # past the options
    (r"\boxed{A cat}", None),        # a word that starts with a capital letter, and no option's text
    (r"\boxed{7}", None),            # equal to no option
    ("I would pick B", None),        # no final answer
    ("", None),
]


@pytest.mark.parametrize("response, letter", PICKS)
def test_pick(response, letter):
  assert MC.pick(response) == letter


def test_verdicts_after_a_shuffle():
  """A response boxing the right letter after the shuffle is right; the letter of the correct option's place in the
  release (A) is wrong when the shuffle moved it, right when it did not."""
  moved = next(i for i in range(20) if choices.MultipleChoice.from_row(ROW, config_seed=0, row_index=i).answer != "A")
  kept = next(i for i in range(20) if choices.MultipleChoice.from_row(ROW, config_seed=0, row_index=i).answer == "A")
  for i, a_is_right in ((moved, False), (kept, True)):
    mc = choices.MultipleChoice.from_row(ROW, config_seed=0, row_index=i)
    right = "ABCD"[mc.options.index("Carbon dioxide")]  # found in the shown options, not taken from mc.answer
    assert mc.pick(rf"\boxed{{{right}}}") == right == mc.answer
    assert (mc.pick(r"\boxed{A}") == mc.answer) is a_is_right
    assert mc.pick(r"\boxed{Carbon dioxide}") == mc.answer  # the text fallback
    assert mc.pick(r"\boxed{Helium}") != mc.answer


def test_an_answer_equal_to_two_options_picks_nothing():
  mc = choices.MultipleChoice(seed=0, options=("0.5", "\\frac12", "x", "y"), columns=rows.GPQA_OPTION_FIELDS,
                              answer="B")
  assert mc.pick(r"\boxed{1/2}") is None and mc.pick(r"\boxed{x}") == "C"


@pytest.mark.parametrize("change, reason, column", [
    ({"Incorrect Answer 2": None}, "missing_field", "Incorrect Answer 2"),
    ({"Correct Answer": "  "}, "empty_field", "Correct Answer"),
    ({"Incorrect Answer 3": ["x"]}, "wrong_type", "Incorrect Answer 3"),
])
def test_a_broken_row_names_the_column(change, reason, column):
  row = {k: v for k, v in dict(ROW, **change).items() if v is not None}
  with pytest.raises(rows.BadRow) as e:
    choices.MultipleChoice.from_row(row, config_seed=0, row_index=0)
  assert e.value.reason == reason and repr(column) in e.value.detail
