"""rlt_jax.evaluate end to end on the tiny local models, against independent oracles.

- greedy responses equal a step-by-step argmax of a teacher-forced `decoder.forward` from prompt ids built by the
  tokenizer's own chat template (not by RLTFormat), including where the response stops (eos);
- results.json / results.md / <benchmark>.jsonl agree with a re-grading of the written responses and a NumPy
  recomputation of pass@1 and its standard error; golds and questions agree with the data file read here;
- a student built by hand to answer every question "\\boxed{7}" gets the hand-worked verdicts, pass@1 = 4/7 and
  standard error sqrt(2)/7 on a mixed GSM8K / MATH / custom file, with bad rows skipped, counted and located;
- n = 2 samples at T = 1 give two graded responses per problem; bad configs fail early naming the field;
- GPQA (hand-made rows with the release's columns) loads alike from .csv, .jsonl and .parquet, shuffled by a recorded
  seed; the tiny student's records agree with the file and a re-grading; a scripted sampler that reads the options
  from each prompt gets hand-worked verdicts (the right letter, the release's letter A moved by the shuffle, the
  option's value in another form, a wrong option's text, no final answer) and pass@1 = 1/2 ± sqrt(0.05).
"""
import json
import math
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from conftest import REPO
from rlt_jax import data, evaluate, formats, grading, hf_checkpoint
from rlt_jax.models import decoder

_forward = jax.jit(decoder.forward, static_argnums=0)


def eval_tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("eval_tiny", REPO / "configs" / "eval_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_for(model_dir, tokenizer_dir, **overrides):
  cfg = eval_tiny_config()
  cfg.tiny_models, cfg.model_path, cfg.tokenizer_path = False, str(model_dir), str(tokenizer_dir)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def argmax_continuation(config, params, prompt_ids, max_new_tokens, stop_ids):
  """Greedy decoding by full forwards: one fixed [1, P + T] buffer (right padding is invisible to causal attention),
  the next token = argmax of the logits at the last real position."""
  P = len(prompt_ids)
  seq = np.zeros((1, P + max_new_tokens), np.int32)
  seq[0, :P] = prompt_ids
  out = []
  for t in range(max_new_tokens):
    mask = np.arange(P + max_new_tokens)[None] < P + t
    nxt = int(np.argmax(np.asarray(_forward(config, params, seq, mask))[0, P + t - 1]))
    if nxt in stop_ids:
      return out, True
    out.append(nxt)
    seq[0, P + t] = nxt
  return out, False


def check_consistent(workdir, results, name):
  """The three outputs agree with each other, with grading, and with NumPy's pass@1 and standard error."""
  rows = read_jsonl(os.path.join(workdir, f"{name}.jsonl"))
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk == json.loads(json.dumps(results))
  r = results["benchmarks"][name]
  rates = []
  for i, row in enumerate(rows):
    assert row["index"] == i and len(row["responses"]) == r["n_samples"]
    assert row["correct"] == [grading.is_correct(x, row["gold"]) for x in row["responses"]]
    assert row["extracted"] == [grading.extract_answer(x) for x in row["responses"]]
    assert row["pass_rate"] == pytest.approx(np.mean(row["correct"]))
    rates.append(np.mean(row["correct"]))
  assert r["n_problems"] == len(rows)
  assert r["pass@1"] == pytest.approx(np.mean(rates))
  assert r["stderr"] == pytest.approx(np.std(rates, ddof=1) / np.sqrt(len(rates)))
  table = open(os.path.join(workdir, "results.md")).read()
  assert f"| {name} | {100 * r['pass@1']:.2f} | {100 * r['stderr']:.2f} | {len(rows)} | {r['n_samples']} |" in table
  return rows


def test_greedy_sample_eval_matches_forward_argmax_and_regrading(assets, tmp_path):
  # limit 8 in batches of 3: the last batch (2 problems) is padded with a copy, which must not leak into outputs.
  cfg = config_for(assets["student"], assets["tokenizer"], limit=8, batch_size=3, max_new_tokens=24)
  results = evaluate.run(cfg, str(tmp_path))
  rows = check_consistent(tmp_path, results, "gsm8k")
  assert len(rows) == 8 and results["benchmarks"]["gsm8k"]["skipped"] == dict(no_answer=0, too_long=0, bad_row=0)
  with open(data.SAMPLE_PATH) as f:
    sample = [json.loads(next(f)) for _ in range(8)]
  assert [r["question"] for r in rows] == [s["question"] for s in sample]
  assert [r["gold"] for r in rows] == [s["answer"].split("####")[-1].strip().replace(",", "") for s in sample]
  assert [r["where"] for r in rows] == [f"{data.SAMPLE_PATH}:{i + 1}" for i in range(8)]

  tok = hf_checkpoint.load_tokenizer(assets["tokenizer"])
  config, params = hf_checkpoint.load_hf(assets["student"])
  stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
  for i in (0, 7):  # first batch and the padded last batch
    messages = [{"role": "system", "content": cfg.format.student_system},
                {"role": "user", "content": rows[i]["question"]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ids, finished = argmax_continuation(config, params, prompt, cfg.max_new_tokens, stop)
    assert rows[i]["responses"] == [tok.decode(ids, skip_special_tokens=False)]
    assert rows[i]["finished"] == [finished] and rows[i]["response_tokens"] == [len(ids) + finished]


@pytest.fixture(scope="module")
def boxed7(assets, tmp_path_factory):
  """A model that replies "\\boxed{7}" to any student prompt, built by hand from the tiny student: with every layer's
  output projections zeroed, the logits depend on the current token only, and an untied output head maps each token
  of the chain  <last prompt token> → \\boxed{7} → <|im_end|>  to the next one."""
  tok = hf_checkpoint.load_tokenizer(assets["tokenizer"])
  fmt = formats.RLTFormat(tok, student_system=eval_tiny_config().format.student_system)
  config, params = hf_checkpoint.load_hf(assets["student"])
  params = jax.tree.map(np.array, params)
  last_prompt_id = int(tok(fmt.student_prompt_text("q"), add_special_tokens=False)["input_ids"][-1])
  chain = [last_prompt_id, *tok("\\boxed{7}", add_special_tokens=False)["input_ids"], fmt.eos_id]
  assert len(set(chain[:-1])) == len(chain) - 1 < config.hidden_size, chain  # a chain, not a loop
  params["layers"]["attn"]["o_proj"]["kernel"][:] = 0
  params["layers"]["mlp"]["down_proj"]["kernel"][:] = 0
  params["final_norm"]["scale"][:] = 1
  head_DV = np.zeros((config.hidden_size, config.vocab_size), np.float32)
  for i, (src, dst) in enumerate(zip(chain[:-1], chain[1:])):
    params["embed"]["embedding"][src] = np.eye(config.hidden_size)[i]  # RMS-normed to sqrt(D)·e_i
    head_DV[i, dst] = 5.0
  params["lm_head"] = {"kernel": head_DV}
  path = tmp_path_factory.mktemp("boxed7")
  hf_checkpoint.save_hf(config.replace(tie_word_embeddings=False), params, path, tokenizer=tok)
  return path, assets["tokenizer"]


def mixed_benchmark(path):
  """GSM8K, MATH and custom rows (questions the model was not tuned on), then three rows to skip."""
  with open(data.SAMPLE_PATH) as f:
    q = [json.loads(line)["question"] for line in f][200:]
  rows = [
      {"question": q[0], "answer": "7"},                                    # custom {question, answer}: right
      {"problem": q[1], "solution": "…", "answer": "\\frac{14}{2}"},      # MATH: right (math equivalence)
      {"question": q[2], "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},         # GSM8K: right
      {"question": q[3], "answer": "8"},                                    # wrong
      {"problem": q[4], "solution": "…", "answer": "0.7"},                # wrong
      {"question": q[5], "solution": "…", "answer": "7.0"},               # custom with solution: right
      {"question": q[6], "answer": "-7"},                                   # wrong
  ]
  lines = [json.dumps(r) for r in rows]
  lines.append(json.dumps({"question": q[7], "answer": "It is 3 + 4.\nSo 7."}))  # line 8: no gold answer
  lines.append("{broken json")                                                   # line 9: unreadable
  lines.append(json.dumps({"question": "x " * 2000, "answer": "7"}))            # line 10: prompt too long
  path.write_text("\n".join(lines) + "\n")
  return [True, True, True, False, False, True, False]


def test_boxed7_student_gets_hand_worked_grades_and_skips_bad_rows(boxed7, tmp_path, caplog):
  bench = tmp_path / "mixed.jsonl"
  expected = mixed_benchmark(bench)
  cfg = config_for(*boxed7, benchmarks=(f"mixed={bench}",), limit=0, batch_size=4, max_new_tokens=12)
  with caplog.at_level("WARNING", logger="rlt_jax"):
    results = evaluate.run(cfg, str(tmp_path / "out"))
  rows = check_consistent(tmp_path / "out", results, "mixed")
  assert [r["responses"] for r in rows] == [["\\boxed{7}"]] * 7
  assert [r["correct"] for r in rows] == [[v] for v in expected]
  r = results["benchmarks"]["mixed"]
  assert r["pass@1"] == pytest.approx(4 / 7) and r["stderr"] == pytest.approx(math.sqrt(2) / 7)
  assert r["skipped"] == dict(no_answer=1, too_long=1, bad_row=1)
  for line, reason in ((8, "no_answer"), (9, "bad_row"), (10, "too_long")):
    assert any(f"{bench}:{line}" in m and reason in m for m in caplog.messages), (line, caplog.messages)


def test_two_samples_at_temperature_one(assets, tmp_path):
  cfg = config_for(assets["student"], assets["tokenizer"], limit=3, num_samples=2, temperature=1.0,
                   max_new_tokens=12, batch_size=2)
  results = evaluate.run(cfg, str(tmp_path))
  rows = check_consistent(tmp_path, results, "gsm8k")
  assert len(rows) == 3 and all(len(r["responses"]) == len(r["correct"]) == 2 for r in rows)
  assert results["benchmarks"]["gsm8k"]["n_samples"] == 2
  assert any(r["responses"][0] != r["responses"][1] for r in rows)  # two draws, not one draw copied


@pytest.mark.parametrize("change, field", [
    (dict(model_path=""), "config.model_path"),
    (dict(model_path="/no/such/model"), "config.model_path"),
    (dict(tokenizer_path="/no/such/tokenizer"), "config.tokenizer_path"),
    (dict(benchmarks=("gsm8k=/no/such/file.jsonl",)), "config.benchmarks[0]"),
    (dict(benchmarks=("gsm8k",)), "config.benchmarks[0]"),
    (dict(benchmarks=("a=sample", "a=sample")), "config.benchmarks[1]"),
    (dict(benchmarks=("bad/name=sample",)), "config.benchmarks[0]"),
    (dict(benchmarks=()), "config.benchmarks"),
    (dict(num_samples=0), "config.num_samples"),
    (dict(num_samples=2, temperature=0.0), "config.num_samples"),
    (dict(temperature=-1.0), "config.temperature"),
    (dict(top_p=0.0), "config.top_p"),
    (dict(max_new_tokens=0), "config.max_new_tokens"),
    (dict(limit=-1), "config.limit"),
    (dict(dtype="int8"), "config.dtype"),
])
def test_bad_config_names_the_field(assets, change, field):
  cfg = config_for(assets["student"], assets["tokenizer"])
  for k, v in change.items():
    cfg[k] = v
  with pytest.raises(evaluate.ConfigError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]")):
    evaluate.validate(cfg)


def test_configs_validate_and_cli_reports_errors(tmp_path):
  assert evaluate.validate(eval_tiny_config()) == [("gsm8k", str(data.SAMPLE_PATH))]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for config, extra, field in (("eval_tiny.py", ["--config.num_samples=0"], "config.num_samples"),
                               ("eval_qwen2.5_7b.py", [], "config.model_path")):
    proc = subprocess.run([sys.executable, "-m", "rlt_jax.evaluate", f"--config=configs/{config}",
                           f"--workdir={tmp_path}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and f"error: {field}" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------- GPQA
# Hand-made rows with the GPQA release's columns (and two of its other columns); row 1's question spans lines.
GPQA_ROWS = [
    {"Record ID": "g0", "Question": "Which gas do plants take in for photosynthesis?",
     "Correct Answer": "Carbon dioxide", "Incorrect Answer 1": "Oxygen", "Incorrect Answer 2": "Nitrogen",
     "Incorrect Answer 3": "Helium", "Explanation": "Plants fix CO2."},
    {"Record ID": "g1", "Question": "A ball is dropped.\nWhich quantity stays constant while it falls?",
     "Correct Answer": "Its acceleration", "Incorrect Answer 1": "Its speed", "Incorrect Answer 2": "Its height",
     "Incorrect Answer 3": "Its kinetic energy", "Explanation": "Gravity is uniform."},
    {"Record ID": "g2", "Question": "What is the probability that a fair coin shows heads?", "Correct Answer": "0.5",
     "Incorrect Answer 1": "0.25", "Incorrect Answer 2": "1", "Incorrect Answer 3": "2", "Explanation": ""},
    {"Record ID": "g3", "Question": "Which particle carries a negative charge?", "Correct Answer": "The electron",
     "Incorrect Answer 1": "The proton", "Incorrect Answer 2": "The neutron", "Incorrect Answer 3": "The photon",
     "Explanation": "By convention."},
    {"Record ID": "g4", "Question": "Which organelle makes most of a cell's ATP?", "Correct Answer": "Mitochondrion",
     "Incorrect Answer 1": "Ribosome", "Incorrect Answer 2": "Nucleus", "Incorrect Answer 3": "Golgi apparatus",
     "Explanation": "Oxidative phosphorylation."},
    {"Record ID": "g5", "Question": "What is the chemical symbol of sodium?", "Correct Answer": "Na",
     "Incorrect Answer 1": "S", "Incorrect Answer 2": "So", "Incorrect Answer 3": "N", "Explanation": "Latin natrium."},
]


def write_gpqa(path, records=GPQA_ROWS):
  """The rows as .csv (stdlib writer), .jsonl or .parquet, by the path's suffix."""
  import csv
  if path.suffix == ".csv":
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(records[0]))
      w.writeheader()
      w.writerows(records)
  elif path.suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), path)
  return path


def shown_options(prompt_text):
  """{letter: option text} as listed in a prompt's "X) text" lines (read from the text, not from rlt_jax.choices)."""
  return dict(re.findall(r"^([A-D])\) (.*)$", prompt_text, flags=re.MULTILINE))


def test_gpqa_rows_load_alike_from_csv_jsonl_and_parquet(fmt, tmp_path):
  from rlt_jax import choices
  loaded = {}
  for suffix in (".csv", ".jsonl", ".parquet"):
    path = write_gpqa(tmp_path / f"gpqa_diamond{suffix}")
    problems, skipped, _ = evaluate.load_problems(str(path), fmt, limit=0, max_prompt_len=512, seed=0)
    assert skipped == dict(no_answer=0, too_long=0, bad_row=0) and len(problems) == len(GPQA_ROWS)
    loaded[suffix] = problems
  assert [p["where"].rsplit(":", 1)[1] for p in loaded[".csv"]] == ["2", "3", "5", "6", "7", "8"]  # row 1 spans 2
  for suffix, problems in loaded.items():
    for i, (p, row) in enumerate(zip(problems, GPQA_ROWS)):
      assert p["question"] == row["Question"] and p["choice"] == loaded[".csv"][i]["choice"], suffix
      assert p["choice"].seed == choices.problem_seed(0, i)
      prompt = fmt.tokenizer.decode(p["prompt_ids"].tolist())
      shown = shown_options(prompt)
      assert row["Question"] in prompt and sorted(shown.values()) == sorted(rows_options(row))
      assert shown[p["gold"]] == row["Correct Answer"]  # the gold letter is where the correct option is shown
  # Another config seed: other seeds, other orders for some problems; the same seed again: the same problems.
  again, _, _ = evaluate.load_problems(str(tmp_path / "gpqa_diamond.csv"), fmt, limit=0, max_prompt_len=512, seed=0)
  other, _, _ = evaluate.load_problems(str(tmp_path / "gpqa_diamond.csv"), fmt, limit=0, max_prompt_len=512, seed=5)
  assert [p["choice"] for p in again] == [p["choice"] for p in loaded[".csv"]]
  assert [p["choice"].seed for p in other] == [choices.problem_seed(5, i) for i in range(len(GPQA_ROWS))]
  assert [p["choice"].options for p in other] != [p["choice"].options for p in again]


def rows_options(row):
  return [row[c] for c in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")]


def test_gpqa_bad_rows_are_skipped_and_located(fmt, tmp_path):
  broken = [GPQA_ROWS[0], dict(GPQA_ROWS[1], **{"Incorrect Answer 2": ""}), GPQA_ROWS[2]]
  path = write_gpqa(tmp_path / "g.csv", broken)
  problems, skipped, where = evaluate.load_problems(str(path), fmt, limit=0, max_prompt_len=512)
  assert len(problems) == 2 and skipped["bad_row"] == 1
  assert where["bad_row"] == [f"{path}:3 (empty_field: field 'Incorrect Answer 2' is empty)"]


def check_gpqa_records(workdir, results, name, path):
  """Each <name>.jsonl line against the data file and an independent re-grading: the options shown are the row's,
  the gold letter is where the correct one is, the seed is the one derived from config.seed and the row, the picks
  and verdicts follow the responses; pass@1 and its standard error follow the verdicts."""
  from rlt_jax import choices, rows
  recs = read_jsonl(os.path.join(workdir, f"{name}.jsonl"))
  rates = []
  for i, (rec, row) in enumerate(zip(recs, GPQA_ROWS)):
    assert rec["index"] == i and rec["question"] == row["Question"] and rec["where"].startswith(str(path))
    assert rec["row_index"] == i and rec["choice_seed"] == choices.problem_seed(results["seed"], i)
    assert sorted(rec["choices"]) == ["A", "B", "C", "D"]
    assert all(row[rec["choice_columns"][k]] == text for k, text in rec["choices"].items())
    assert rec["gold"] == rec["answer_letter"] and rec["choices"][rec["gold"]] == row["Correct Answer"]
    mc = choices.MultipleChoice(seed=rec["choice_seed"], options=tuple(rec["choices"].values()),
                                columns=rows.GPQA_OPTION_FIELDS, answer=rec["gold"])
    assert rec["picked"] == [mc.pick(r) for r in rec["responses"]]
    assert rec["correct"] == [p == rec["gold"] for p in rec["picked"]]
    rates.append(np.mean(rec["correct"]))
  r = results["benchmarks"][name]
  assert r["n_problems"] == len(recs) and r["pass@1"] == pytest.approx(np.mean(rates))
  assert r["stderr"] == pytest.approx(np.std(rates, ddof=1) / np.sqrt(len(rates)))
  table = open(os.path.join(workdir, "results.md")).read()
  assert f"| {name} | {100 * r['pass@1']:.2f} | {100 * r['stderr']:.2f} | {len(recs)} | {r['n_samples']} |" in table
  assert json.load(open(os.path.join(workdir, "results.json"))) == json.loads(json.dumps(results))
  return recs


def test_gpqa_end_to_end_on_the_tiny_student(assets, tmp_path):
  path = write_gpqa(tmp_path / "gpqa_diamond.parquet")
  cfg = config_for(assets["student"], assets["tokenizer"], benchmarks=(f"gpqa_diamond={path}",), limit=3,
                   batch_size=4, max_new_tokens=8, max_prompt_len=512)
  results = evaluate.run(cfg, str(tmp_path / "out"))
  recs = check_gpqa_records(tmp_path / "out", results, "gpqa_diamond", path)
  assert len(recs) == 3 and all(len(r["responses"]) == 1 for r in recs)


def test_gpqa_scripted_responses_get_hand_worked_verdicts(assets, tmp_path, monkeypatch):
  """The sampler replaced by a script that reads each prompt as the model sees it and answers in a set way: the
  right letter, the letter A (the correct option's place in the release, which the shuffle moved), the correct
  option's value in another form, a wrong option's text, "(letter)" after "the answer is", no final answer."""
  tok = hf_checkpoint.load_tokenizer(assets["tokenizer"])
  path = write_gpqa(tmp_path / "gpqa_diamond.csv")
  by_question = {row["Question"]: (i, row) for i, row in enumerate(GPQA_ROWS)}
  script = {
      0: lambda right, row, shown: f"It must be \\boxed{{{right}}}",
      1: lambda right, row, shown: "\\boxed{A}",
      2: lambda right, row, shown: "The answer is \\frac{1}{2}.",  # option text 0.5, by math equivalence
      3: lambda right, row, shown: "\\boxed{The proton}",
      4: lambda right, row, shown: f"the answer is ({right}).",
      5: lambda right, row, shown: "I am not sure.",
  }
  seen = {}

  def scripted_sample(config, params, ids, mask, rng, *, max_new_tokens, eos_ids, num_samples, **_):
    replies = []
    for b in range(ids.shape[0]):
      prompt = tok.decode(np.asarray(ids)[b][np.asarray(mask)[b] > 0].tolist())
      i, row = next(v for q, v in by_question.items() if q in prompt)
      shown = shown_options(prompt)
      right = next(k for k, text in shown.items() if text == row["Correct Answer"])
      seen[i] = right
      replies += [tok(script[i](right, row, shown), add_special_tokens=False)["input_ids"] + [eos_ids[0]]] * num_samples
    tokens = np.zeros((len(replies), max(max_new_tokens, max(map(len, replies)))), np.int32)
    for r, reply in enumerate(replies):
      tokens[r, :len(reply)] = reply
    # What evaluate reads of the sampler's result: tokens, lengths (eos included) and finished.
    return types.SimpleNamespace(tokens=tokens, lengths=np.array([len(x) for x in replies], np.int32),
                                 finished=np.ones(len(replies), bool))

  monkeypatch.setattr(evaluate.sampling, "sample", scripted_sample)
  cfg = config_for(assets["student"], assets["tokenizer"], benchmarks=(f"gpqa_diamond={path}",), limit=0,
                   batch_size=4, max_new_tokens=8, max_prompt_len=512)
  cfg.seed = 5  # the config's seed reaches the shuffle (check_gpqa_records compares each problem's choice_seed)
  results = evaluate.run(cfg, str(tmp_path / "out"))
  recs = check_gpqa_records(tmp_path / "out", results, "gpqa_diamond", path)
  assert seen[1] != "A"  # the shuffle moved row 1's correct option away from A, so "\boxed{A}" must be wrong
  wrong_letter_3 = next(k for k, text in recs[3]["choices"].items() if text == "The proton")
  assert [r["picked"] for r in recs] == [[seen[0]], ["A"], [seen[2]], [wrong_letter_3], [seen[4]], [None]]
  assert [r["correct"] for r in recs] == [[True], [False], [True], [False], [True], [False]]
  r = results["benchmarks"]["gpqa_diamond"]
  assert r["pass@1"] == pytest.approx(0.5) and r["stderr"] == pytest.approx(math.sqrt(0.05))  # sqrt(0.3 / 6)


@pytest.mark.parametrize("cause", ["other_columns", "missing_fields", "too_long"])
def test_a_benchmark_with_nothing_to_grade_stops_the_run(assets, tmp_path, cause):
  """Other column names, rows missing their fields, every prompt over max_prompt_len: evaluate stops before the
  model loads (it used to exit 0 with an empty result), naming the benchmark, its file, the skips per reason and the
  first offending row; a good benchmark beside it does not hide it."""
  from test_data_survey import unusable_data
  path, first = unusable_data(tmp_path, cause)
  reason, limit = ("too_long", 80) if cause == "too_long" else ("missing_field", 384)
  good = tmp_path / "good.jsonl"
  good.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")  # its prompt fits in 80 tokens
  cfg = config_for(assets["student"], assets["tokenizer"], benchmarks=(f"good={good}", f"bad={path}"), limit=0,
                   max_prompt_len=limit)
  with pytest.raises(evaluate.ConfigError, match=re.escape(
      f"config.benchmarks[1]: benchmark bad has nothing to grade: no usable row in {path}: all 6 rows skipped "
      f"({reason} 6); first skipped: {first} ({reason}")):
    evaluate.run(cfg, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "results.json").exists()


def test_problems_read_in_batches_equal_one_by_one_and_stop_at_the_limit(fmt, tmp_path, caplog):
  bench = tmp_path / "mixed.jsonl"
  mixed_benchmark(bench)
  outs = [evaluate.read_problems(str(bench), fmt, limit=0, max_prompt_len=512, batch_rows=b) for b in (1, 4, 256)]
  for problems, skipped, where, summary in outs:
    assert [p["where"] for p in problems] == [f"{bench}:{i}" for i in range(1, 8)]
    assert [p["prompt_ids"].tolist() for p in problems] == [p["prompt_ids"].tolist() for p in outs[0][0]]
    assert skipped == dict(no_answer=1, too_long=1, bad_row=1) and where == outs[0][2]
    assert (summary.rows, summary.used, summary.skipped) == (10, 7, dict(no_answer=1, broken_json=1, too_long=1))
  # The first 7 problems fill the limit: the rows after them are neither read nor counted.
  problems, skipped, _, summary = evaluate.read_problems(str(bench), fmt, limit=7, max_prompt_len=512, batch_rows=4)
  assert len(problems) == 7 and skipped == dict(no_answer=0, too_long=0, bad_row=0) and summary.rows == 7
