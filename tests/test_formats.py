"""RLT formats against the real Qwen2.5 tokenizer: its chat template, its decode, and hand-worked boundary cases."""
import json

import numpy as np
import pytest

from rlt_jax import formats
from rlt_jax.formats import RLTFormat

END = "<|end_of_explanation|>"


@pytest.fixture(scope="module")
def gsm8k(shared_data):
  rows = [json.loads(l) for l in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines() if l.strip()]
  assert len(rows) == 7473
  return rows


def _template(tok, system, user, assistant, open_turn=False):
  msgs = [{"role": "system", "content": system}, {"role": "user", "content": user},
          {"role": "assistant", "content": assistant}]
  return tok.apply_chat_template(msgs, tokenize=False, continue_final_message=open_turn)


@pytest.mark.parametrize("style", ["stratos", "r1"])
def test_chat_text_matches_tokenizer_template(tok, style, gsm8k):
  f = RLTFormat(tok, style=style)
  for row in gsm8k[:5]:
    q, sol = row["question"], row["answer"]
    prompt = f.teacher_prompt_text(q, sol)
    asst = prompt.split("<|im_start|>assistant\n", 1)[1]
    assert prompt == _template(tok, f.teacher_system, q, asst, open_turn=True)
    # the ids are the tokenizer's own tokenization of the template text (system block tokenized apart is exact)
    want = tok.apply_chat_template([{"role": "system", "content": f.teacher_system}, {"role": "user", "content": q},
                                    {"role": "assistant", "content": asst}], continue_final_message=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    np.testing.assert_array_equal(f.teacher_prompt(q, sol), want)
    assert f.teacher_prompt(q, sol).dtype == np.int32
    student = f.student_text(q, "Some thought.", sol)
    s_asst = student.split("<|im_start|>assistant\n", 1)[1][: -len("<|im_end|>\n")]
    assert student == _template(tok, f.student_system, q, s_asst)
    teacher = f.teacher_text(q, sol, "Some thought.")
    assert teacher == _template(tok, f.teacher_system, q, teacher.split("assistant\n", 1)[1][: -len("<|im_end|>\n")])
  if style == "stratos":
    assert prompt.endswith(f"<|begin_of_solution|>{sol}<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n")
    assert s_asst == ("<|begin_of_thought|>\n\nSome thought.<|end_of_thought|>\n\n"
                      f"<|begin_of_solution|>{sol}<|end_of_solution|>")
    assert f.teacher_prompt(q, sol)[-1] == 1339  # ">\n\n": the padding merged into the tag's last token
  else:
    assert s_asst.startswith("<think>\nSome thought.</think>\n\n") and "<solution>" in prompt


def test_every_gsm8k_row_invariants(tok, fmt, gsm8k):
  """Invariants a-c over all 7,473 rows; completion = gold explanation + end tag + <|im_end|> tokenized together."""
  qs = [r["question"] for r in gsm8k]
  sols = [r["answer"] for r in gsm8k]
  expl = [r["answer"].split("####")[0].strip() for r in gsm8k]
  prompts = fmt.teacher_prompts(qs, sols)
  comps = [np.asarray(c, np.int32)
           for c in tok([e + END + "<|im_end|>" for e in expl], add_special_tokens=False)["input_ids"]]
  exs = fmt.student_examples(qs, sols, comps, prompt_lens=[len(p) for p in prompts])
  decoded = tok.batch_decode([e.input_ids for e in exs])
  sol_dec = tok.batch_decode([e.input_ids[e.solution_mask] for e in exs])
  merged = 0
  for i, e in enumerate(exs):
    assert e.matched and e.explanation_text == expl[i], i
    # (a) explanation ids in the student == the teacher's ids under its mask, in order
    teacher = np.concatenate([prompts[i], comps[i]])
    assert e.teacher_explanation_mask.shape == teacher.shape
    np.testing.assert_array_equal(e.input_ids[e.explanation_mask], teacher[e.teacher_explanation_mask])
    assert e.explanation_len == e.explanation_mask.sum() > 0
    # (b) decode(input_ids) is exactly the student chat for that explanation
    assert decoded[i] == fmt.student_text(qs[i], expl[i], sols[i]), i
    # the explanation lost only a last id merged with the tag's "<" (".<")
    nxt = tok.decode(comps[i][e.explanation_len])
    if nxt != "<":
      merged += 1
      assert len(nxt) > 1 and nxt.endswith("<") and expl[i].endswith(nxt[:-1]), i
    rest = expl[i][len(tok.decode(comps[i][:e.explanation_len])):]
    assert tok.decode(comps[i][e.explanation_len:]) == rest + END + "<|im_end|>"
    # (c) the solution ids decode to the solution content up to characters merged into a neighbouring tag id
    d, s = sol_dec[i], sols[i]
    k = s.find(d)
    assert d and k >= 0, i
    ids = e.input_ids
    where = np.flatnonzero(e.solution_mask)
    assert np.all(np.diff(where) == 1)
    if k > 0:
      assert tok.decode(ids[where[0] - 1]).endswith(s[:k]) and ">" in tok.decode(ids[where[0] - 1])
    tail = s[k + len(d):]
    if tail:
      assert tok.decode(ids[where[-1] + 1]).startswith(tail + "<")
  assert merged > 1000 and len(exs) - merged > 1000  # both boundary kinds were exercised


def _ids(tok, text):
  return np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)


def test_cut_completion_anywhere(tok, fmt, gsm8k):
  """(d) every cut of a completion is a valid example; matched only once the whole end tag was sampled."""
  rng = np.random.default_rng(0)
  rows = [gsm8k[i] for i in rng.choice(len(gsm8k), 3, replace=False)]
  for row in rows:
    q, sol = row["question"], row["answer"]
    expl = sol.split("####")[0].strip()
    prompt = fmt.teacher_prompt(q, sol)
    full = fmt.completion_ids(expl)
    tag_done = len(full) - 1  # index of <|im_end|>: the tag is complete in full[:tag_done]
    cuts = list(range(len(full) + 1))
    exs = fmt.student_examples([q] * len(cuts), [sol] * len(cuts), [full[:k] for k in cuts],
                               prompt_lens=[len(prompt)] * len(cuts))
    for k, e in zip(cuts, exs):
      comp = full[:k]
      assert e.matched == (k >= tag_done), k
      text = tok.decode(comp[: tag_done]) if k < tag_done else expl
      assert e.explanation_text == text
      assert tok.decode(e.input_ids) == fmt.student_text(q, e.explanation_text, sol)
      np.testing.assert_array_equal(e.input_ids[e.explanation_mask],
                                    np.concatenate([prompt, comp])[e.teacher_explanation_mask])
      assert tok.decode(e.input_ids[e.solution_mask]) == sol  # GSM8K answers start with a letter, end with a digit


def test_empty_and_whitespace_explanations(tok, fmt):
  q, sol = "What is 1+1?", "1+1 = 2"
  cases = {"tag only": _ids(tok, END + "<|im_end|>"), "nothing": np.zeros(0, np.int32),
           "eos only": _ids(tok, "<|im_end|>"), "pad after eos": _ids(tok, "<|im_end|><|endoftext|><|endoftext|>")}
  for name, comp in cases.items():
    e = fmt.student_example(q, sol, comp)
    assert e.explanation_len == 0 and not e.explanation_mask.any() and not e.teacher_explanation_mask.any(), name
    assert e.matched == (name == "tag only"), name
    assert e.explanation_text == ""
    assert tok.decode(e.input_ids) == fmt.student_text(q, "", sol)
    assert tok.decode(e.input_ids[e.solution_mask]) == sol
  # whitespace only: the sampled "\n\n" id is a real explanation id (documented choice)
  e = fmt.student_example(q, sol, _ids(tok, "\n\n" + END + "<|im_end|>"))
  assert e.matched and e.explanation_len == 1 and e.explanation_text == "\n\n"
  assert tok.decode(e.input_ids) == fmt.student_text(q, "\n\n", sol)


def test_boundary_merges_hand_worked(tok, fmt):
  """The `.<` merge (id 15757) and a non-canonical spelling of the end tag."""
  q, sol = "Q?", "A."
  comp = _ids(tok, "Add them." + END + "<|im_end|>")
  assert 15757 in comp.tolist()  # ".<"
  e = fmt.student_example(q, sol, comp)
  assert e.matched and e.explanation_text == "Add them."
  assert tok.decode(e.input_ids[e.explanation_mask]) == "Add them"  # the merged ".<" id is not scored
  assert tok.decode(e.input_ids) == fmt.student_text(q, "Add them.", sol)
  # the solution "A." ends with "." which merges with "<|end_of_solution|>": only "A" is under the mask
  assert tok.decode(e.input_ids[e.solution_mask]) == "A"
  # the teacher spells the tag with other ids ("." then "<" alone): every explanation id is kept
  comp2 = np.concatenate([_ids(tok, "Add them."), _ids(tok, END), _ids(tok, "<|im_end|>")])
  e2 = fmt.student_example(q, sol, comp2)
  assert e2.matched and e2.explanation_len == len(_ids(tok, "Add them."))
  assert tok.decode(e2.input_ids) == fmt.student_text(q, "Add them.", sol)
  # a tag that is text inside the explanation of another format is not an end tag; only the real one counts
  comp3 = _ids(tok, "See <|end_of_thought|> here" + END + " trailing<|im_end|>")
  e3 = fmt.student_example(q, sol, comp3)
  assert e3.matched and e3.explanation_text == "See <|end_of_thought|> here"


def test_utf8_split_inside_a_character(tok, fmt):
  """Byte-level ids can split a character; a cut after half of it decodes like the tokenizer (U+FFFD)."""
  b2u = {b: u for u, b in formats._byte_decoder().items()}
  half = [tok.convert_tokens_to_ids(b2u[b]) for b in "é".encode()]
  comp = np.array(half + _ids(tok, END).tolist(), np.int32)
  e = fmt.student_example("Q?", "S", comp)
  assert e.matched and e.explanation_text == "é" and e.explanation_len == 2
  e = fmt.student_example("Q?", "S", np.array(half[:1], np.int32))
  assert not e.matched and e.explanation_text == "\ufffd"
  assert tok.decode(e.input_ids) == fmt.student_text("Q?", "\ufffd", "S")


def test_r1_style_and_system_from_data(tok, gsm8k):
  f = RLTFormat(tok, style="r1", padding="\n")
  for row in gsm8k[:20]:
    q, sol = row["question"], row["answer"]
    expl = sol.split("####")[0].strip()
    e = f.student_example(q, sol, f.completion_ids(expl), system="Custom student prompt.")
    assert e.matched and e.explanation_text == expl
    text = tok.decode(e.input_ids)
    assert text == f.student_text(q, expl, sol, system="Custom student prompt.")
    assert text.startswith("<|im_start|>system\nCustom student prompt.<|im_end|>")
    assert f"<think>\n{expl}</think>" in text
  custom = RLTFormat(tok, teacher_system="T!", explanation_tags=("<e>", "</e>"))
  assert custom.teacher_prompt_text("q", "s").endswith("<|begin_of_solution|>s<|end_of_solution|>\n\n<e>\n\n")
  assert custom.teacher_system == "T!"
  with pytest.raises(ValueError, match="unknown RLTFormat field"):
    RLTFormat(tok, tagz=1)
  with pytest.raises(ValueError, match="unknown style"):
    RLTFormat(tok, style="nope")


def test_sft_examples(tok, fmt):
  q, sol, ex = "What is 3*4?", "3*4 = 12\n#### 12", "Three fours.\n\nThat is 12."
  t = fmt.teacher_sft_example(q, sol, ex)
  assert tok.decode(t.input_ids) == fmt.teacher_text(q, sol, ex)
  assert tok.decode(t.input_ids[t.loss_mask]) == ex + END + "<|im_end|>"
  # the prompt part is exactly what the RL teacher is prompted with
  np.testing.assert_array_equal(t.input_ids[: len(fmt.teacher_prompt(q, sol))], fmt.teacher_prompt(q, sol))
  s = fmt.student_sft_example(q, ex, sol, system="Sys.")
  assert tok.decode(s.input_ids) == fmt.student_text(q, ex, sol, system="Sys.")
  np.testing.assert_array_equal(s.input_ids, _ids(tok, fmt.student_text(q, ex, sol, system="Sys.")))
  want = fmt.student_text(q, ex, sol).split("<|im_start|>assistant\n", 1)[1][: -1]
  assert tok.decode(s.input_ids[s.loss_mask]) == want
