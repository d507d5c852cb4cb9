"""bench/replicate.py: the miniature task (hand-worked problems, splits disjoint by construction, one token a digit
in the tokenizer it builds), the report's arithmetic (hand-worked seed means), the distilled rows' split, the
--model/--data inputs, and `--quick` end to end in a subprocess: every arm graded on every held-out problem, a
rerun resumes from the stage markers without redoing a stage."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import replicate  # noqa: E402
import replicate_stages  # noqa: E402
import replicate_task as task  # noqa: E402

from rlt_jax import formats, hf_checkpoint, rows  # noqa: E402


def test_problem_hand_worked():
  d = (6, 6, 0, 4)  # 6, 12, 12, 16: running last digits 6 2 2 6
  assert task.question(d) == "Sum mod 10: 6 6 0 4"
  assert task.answer(d) == 6 and task.solution(d) == "Answer: \\boxed{6}"
  assert task.explanation(d, "steps") == "Running 6 2 2 6."
  assert task.explanation(d, "answer") == "It ends in 6."
  assert [task.style_of(task.explanation(d, s)) for s in task.STYLES] == list(task.STYLES)
  assert task.style_of("6 2 2 6") == "other"
  assert task.digits_of(task.question(d)) == d
  assert task.digits_of("Sum mod 10: 6 12") is None and task.digits_of("What is 6 + 6?") is None
  assert task.steps_correct(d, "Running 6 2 2 6.") and not task.steps_correct(d, "Running 6 2 2 7.")
  with pytest.raises(ValueError, match="unknown style"):
    task.explanation(d, "poem")


def test_splits_disjoint_and_answers_right():
  train = task.problems(400, held_out=False, num_digits=3, seed=0)
  held = task.problems(100, held_out=True, num_digits=3, seed=1)
  assert len(set(train)) == 400 and len(set(held)) == 100
  assert not {task.question(p) for p in train} & {task.question(p) for p in held}
  for p in train[:50] + held[:50]:
    assert int(task.task_row(p)["answer"]) == sum(p) % 10
    running = [int(x) for x in task.explanation(p, "steps")[len("Running "):-1].split()]
    assert running == [sum(p[:i + 1]) % 10 for i in range(len(p))]
  # The split is a property of the question, so other sizes and seeds never move a problem across it.
  assert all(task.is_held_out(p) for p in task.problems(30, held_out=True, num_digits=3, seed=7))
  with pytest.raises(ValueError, match="only"):
    task.problems(11, held_out=False, num_digits=1, seed=0)


def test_seed_mean_hand_worked():
  m, se = replicate.seed_mean([0.5, 0.7, 0.9])
  assert m == pytest.approx(0.7) and se == pytest.approx(0.2 / np.sqrt(3))  # std (ddof=1) = 0.2
  assert replicate.seed_mean([0.25]) == (0.25, None)
  assert replicate.seed_mean([None, None]) == (None, None)


def test_split_distilled(tmp_path):
  def row(i, text, reward):
    return dict(index=i, question=f"q{i}", solution="s", system="Solve.", reasoning_trace=text, reward=reward,
                r_ss=reward / 2, r_kl=0.5, matched=i % 2 == 0)
  lines = [row(2, "It ends in 1.", -1.0), row(0, "Running 1 2.", -0.5), row(1, "Running 3 4.", -0.25),
           row(3, "Running 5.", -2.0), row(4, "xyz", -4.0)]
  path = tmp_path / "distill.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  got = replicate.split_distilled(str(path), 3, str(tmp_path / "rows.jsonl"))
  student = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert [r["question"] for r in student] == ["q0", "q1", "q2"]  # training items only, in item order
  assert student[0] == dict(question="q0", solution="s", system="Solve.", reasoning_trace="Running 1 2.")
  assert got["heldout_reward"] == pytest.approx(-3.0) and got["heldout_r_ss"] == pytest.approx(-1.5)
  assert got["heldout_matched"] == pytest.approx(0.5)
  assert got["style_fractions"] == pytest.approx({"answer": 1 / 3, "steps": 2 / 3})


def test_solutions_only_row_is_an_empty_thought():
  r = rows.read_row(task.no_thought_row((1, 2)))
  assert r["reasoning"] == ""
  assert rows.read_row(dict(question="q", solution="s", reasoning_trace="  "))["reasoning"] is None


def test_real_inputs_split(tmp_path):
  data = os.path.join(ROOT, "rlt_jax", "assets", "gsm8k_sample.jsonl")
  args = replicate.parse_args(["--model", ROOT, "--data", data, "--workdir", str(tmp_path)])
  b = replicate.budget_of(args)
  assert b.max_len == 1024 and b.rl_lr == 1e-6 and b.seeds == (0, 1, 2)
  inputs = replicate.real_inputs(args, b, str(tmp_path))
  read = lambda k: [json.loads(x) for x in open(inputs["files"][k])]  # noqa: E731
  train, held, warm = read("train"), read("heldout"), read("warmup")
  n = sum(1 for line in open(data) if line.strip())
  assert len(train) == n - len(range(0, n, 5)) == inputs["train_problems"]
  assert not {r["question"] for r in train} & {r["question"] for r in held}
  assert all(r["answer"] for r in held) and warm[0]["reasoning_trace"] == train[0]["solution"]
  assert [r["question"] for r in read("distill_items")] == [r["question"] for r in train + held]
  with pytest.raises(SystemExit):
    replicate.parse_args(["--model", ROOT])  # --model without --data


def test_a_workdir_keeps_its_budget(tmp_path):
  args = replicate.parse_args(["--quick", "--workdir", str(tmp_path)])
  b = replicate.budget_of(args)
  replicate.check_workdir_budget(str(tmp_path), b, args)
  replicate.check_workdir_budget(str(tmp_path), replicate.dataclasses.replace(b, seeds=(0, 1, 2)), args)  # more seeds
  with pytest.raises(SystemExit, match=r"another budget \(rl_steps: 2 → 3; student_steps: 4 → 5\)"):
    replicate.check_workdir_budget(str(tmp_path), replicate.dataclasses.replace(b, rl_steps=3, student_steps=5), args)
  with pytest.raises(SystemExit, match="--seeds='0,x': expected comma-separated integers"):
    replicate.budget_of(replicate.parse_args(["--seeds", "0,x"]))


def test_quick_run_end_to_end(tmp_path):
  wd = tmp_path / "rep"
  cmd = [sys.executable, os.path.join(ROOT, "bench", "replicate.py"), "--quick", "--workdir", str(wd)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads((wd / "results.json").read_text())
  b = replicate_stages.QUICK
  for seed in map(str, b.seeds):
    for arm in replicate.ARMS:
      for key, samples in (("eval", 1), ("eval_t07", replicate_stages.DECODINGS["t07"]["samples"])):
        ev = summary["results"][seed][arm][key]
        assert ev["n"] == b.heldout_problems and 0 <= ev["pass_at_1"] <= 1
        graded = [json.loads(x) for x in (wd / f"seed_{seed}" / key / arm / "heldout.jsonl").read_text().split("\n")
                  if x]
        assert len(graded) == b.heldout_problems and {len(g["responses"]) for g in graded} == {samples}
        assert ev["pass_at_1"] == pytest.approx(np.mean([g["pass_rate"] for g in graded]))
        styles = [replicate_task_style(r) for g in graded for r in g["responses"]]
        assert sum(ev["thought_styles"].values()) == pytest.approx(1.0)
        assert ev["thought_styles"].get("steps", 0.0) == pytest.approx(styles.count("steps") / len(styles))
    for arm in ("pre_rl", *replicate_stages.REWARDS):
      assert summary["results"][seed][arm]["teacher"]["train_rows"] == b.train_problems
    for arm in replicate_stages.REWARDS:
      rl = [json.loads(x) for x in (wd / f"seed_{seed}" / "rl" / arm / "metrics.jsonl").read_text().split("\n") if x]
      assert len(rl) == b.rl_steps
  # each RL arm ran with its own reward (the run config saved beside its last checkpoint)
  for arm, weights in replicate_stages.REWARDS.items():
    saved = json.loads((wd / "seed_0" / "rl" / arm / "checkpoints" / str(b.rl_steps) / "config" /
                        "run_config.json").read_text())
    reward = {"answer_log_prob_coeff": [1.0, 0.01], "kl_penalty_coeff": [3.0, 0.03],  # the paper's, then the arm's
              **{k: list(v) for k, v in weights.items()}}
    assert {k: saved["reward"][k] for k in reward} == reward
  table = (wd / "results.md").read_text()
  for text in replicate.ARM_TEXT.values():
    assert text in table
  assert "| **total** |" in table and table in first.stdout
  # a second run finds every stage done and reports the same table
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode == 0 and "=== replicate:" not in again.stdout
  assert (wd / "results.md").read_text() == table


def replicate_task_style(response: str) -> str:
  return task.style_of(response.split("</think>")[0].replace("<think>", ""))


def test_tokenizer_reads_a_digit_as_one_token(tmp_path):
  train = task.problems(64, held_out=False, num_digits=4, seed=0)
  from rlt_jax import tiny
  tok = tiny.build_tokenizer(tmp_path / "tok", task.tokenizer_texts(train), 512)
  fmt = formats.RLTFormat(tok, **task.FORMAT)
  d = (3, 1, 4, 1)
  ids = tok(task.question(d), add_special_tokens=False)["input_ids"]
  assert [tok.decode([i]) for i in ids[-4:]] == [" 3", " 1", " 4", " 1"]
  assert len(fmt.teacher_prompt(task.question(d), task.solution(d))) <= replicate_stages.FULL.max_prompt_len
  assert hf_checkpoint.load_tokenizer(tmp_path / "tok") is not None
