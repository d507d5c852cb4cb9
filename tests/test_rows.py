"""Dataset row readers: every reader's canonical row, and bad rows raising BadRow with their reason."""
import pytest

from rlt_jax import rows


STRATOS_ROW = {
    "system": "Stratos student prompt.",
    "conversations": [
        {"from": "user", "value": "Return your final response within \\boxed{}. What is 2+3?"},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nOkay, 2+3.\n\nIt is 5.\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\nThe sum is \\boxed{5}.\n\n<|end_of_solution|>"}]}


def test_readers():
  r = rows.read_row(STRATOS_ROW)
  assert r == dict(question="Return your final response within \\boxed{}. What is 2+3?",
                   solution="\n\nThe sum is \\boxed{5}.\n\n", reasoning="Okay, 2+3.\n\nIt is 5.\n\n",
                   system="Stratos student prompt.", answer=None)
  assert rows.read_row({"prompt": "P?", "solution": "S", "reasoning_trace": "R"}) == dict(
      question="P?", solution="S", reasoning="R", system=None, answer=None)
  assert rows.read_row({"question": "Q?", "solution": "S"})["reasoning"] is None
  assert rows.read_row({"question": "Q?", "answer": "a\n#### 1,234"}) == dict(
      question="Q?", solution="a\n#### 1,234", reasoning=None, system=None, answer="1234")
  assert rows.read_row({"problem": "P", "solution": "S", "answer": "\\frac12"}, "math")["answer"] == "\\frac12"
  aime = {"id": 60, "problem": "P", "solution": "S", "answer": 204, "question": "P"}
  assert rows.read_row(aime) == dict(question="P", solution="S", reasoning=None, system=None, answer="204")
  assert rows.read_row({"question": b"Q?", "solution": b"S"})["question"] == "Q?"  # TFDS gives bytes


GPQA_ROW = {"Record ID": "r1", "Question": " Which gas do plants take in?\n", "Correct Answer": "Carbon dioxide ",
            "Incorrect Answer 1": "Oxygen", "Incorrect Answer 2": "Nitrogen", "Incorrect Answer 3": "Helium",
            "Explanation": "Photosynthesis fixes CO2.", "Subdomain": "Biology"}


def test_gpqa_reader_gives_a_free_response_row():
  """A GPQA row as training data: the question alone (the release lists the correct option first, so the options
  in a fixed order would teach its position), the correct option's text as solution and answer, the expert
  explanation as the reasoning trace."""
  assert rows.detect_reader(GPQA_ROW) == "gpqa"
  assert rows.read_row(GPQA_ROW) == dict(question="Which gas do plants take in?", solution="Carbon dioxide",
                                         reasoning="Photosynthesis fixes CO2.", system=None, answer="Carbon dioxide")
  no_explanation = {k: v for k, v in GPQA_ROW.items() if k != "Explanation"}
  assert rows.read_row(no_explanation)["reasoning"] is None
  assert rows.gpqa_options(GPQA_ROW) == ("Carbon dioxide", "Oxygen", "Nitrogen", "Helium")
  assert rows.gpqa_options(dict(GPQA_ROW, **{"Correct Answer": 4, "Incorrect Answer 1": 2.5}))[:2] == ("4", "2.5")


@pytest.mark.parametrize("change, reason, field", [
    ({"Question": None}, "missing_field", "Question"),
    ({"Incorrect Answer 3": None}, "missing_field", "Incorrect Answer 3"),
    ({"Correct Answer": ""}, "empty_field", "Correct Answer"),
    ({"Incorrect Answer 1": True}, "wrong_type", "Incorrect Answer 1"),
    ({"Question": b"\xff"}, "undecodable", "Question"),
])
def test_bad_gpqa_rows_name_the_field(change, reason, field):
  row = {k: v for k, v in dict(GPQA_ROW, **change).items() if v is not None}
  with pytest.raises(rows.BadRow) as e:
    rows.read_row(row)
  assert e.value.reason == reason and repr(field) in e.value.detail


@pytest.mark.parametrize("row,reader,reason", [
    ({"solution": "S"}, "custom", "missing_field"),
    ({"question": "  ", "solution": "S"}, "custom", "empty_field"),
    ({"question": 5, "solution": "S"}, "custom", "wrong_type"),
    ({"question": b"\xff\xfe", "solution": "S"}, "custom", "undecodable"),
    ({"question": "Q"}, "gsm8k", "missing_field"),
    ({"conversations": "text"}, "stratos", "wrong_type"),
    ({"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "no tags"}]}, "stratos",
     "missing_field"),
    ([1, 2], "auto", "wrong_type"),
])
def test_bad_rows_raise_with_reason(row, reader, reason):
  with pytest.raises(rows.BadRow) as e:
    rows.read_row(row, reader)
  assert e.value.reason == reason


def test_stratos_system_as_message():
  row = {"conversations": [{"role": "system", "content": "Sys."}, *[
      {"role": m["from"], "content": m["value"]} for m in STRATOS_ROW["conversations"]]]}
  r = rows.read_row(row)
  assert r["system"] == "Sys." and r["solution"] == "\n\nThe sum is \\boxed{5}.\n\n"
