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
