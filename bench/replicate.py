"""The paper's comparison in miniature: does a teacher trained with the RLT reward give a better distilled student?

  python bench/replicate.py [--quick] [--workdir runs/replicate] [--seeds 0,1,2]
  python bench/replicate.py --model /ckpt/Qwen2.5-0.5B-Instruct --data gsm8k/train.jsonl --heldout gsm8k/test.jsonl

One run, fixed seeds, the same budget for every arm. Shared by all seeds (the "pretrained" checkpoints of the
paper's setting): the teacher's SFT warm-up and the reward student's. Then, per seed:

  RL (rlt_jax.train) of the warmed-up teacher: the paper's reward, and two ablations (λ = 0: no r_KL; no min/max terms)
  distill (rlt_jax.distill, one candidate) with each RL teacher and with the warmed-up teacher before RL
  student SFT (rlt_jax.sft) from one starting model on each teacher's explanations, and on the solutions alone
  evaluate (rlt_jax.evaluate) every student on held-out problems nobody trained on, greedy and at T = 0.7

It prints one table (pass@1 ± s.e. per arm, every seed, the teachers' held-out RLT reward before and after RL, the
style of the explanations each teacher writes, the wall time of every stage) and writes it to <workdir>/results.md
and results.json. Each stage leaves a `.done.json` marker: a killed run, started again, goes on from the first stage
that did not finish (the stages themselves resume from their checkpoints).

Without --model, the task is bench/replicate_task.py's (the last digit of a sum; tiny models built here). There
the distilled students start from the warmed-up reward student, which has seen both explanation styles, rather than
from the random base: a student from scratch needs about 2,000 SFT steps to learn the running sums, and fifteen of
those do not fit in 45 minutes on two cores, so each arm's data decides how the student explains, not whether it can
add.

With --model (a Hugging Face directory, e.g. Qwen2.5-0.5B-Instruct) and --data (rows rlt_jax reads: GSM8K, MATH,
Stratos or custom), every model starts from that checkpoint, the teacher warm-up explains with the row's reasoning
trace, else its solution (the official code's fallback), and --heldout (default: every fifth row of --data, set
aside) is graded; sizes come from the --rl-steps / --student-steps / ... flags. That mode needs a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import replicate_task as task  # noqa: E402
from replicate_stages import (DECODINGS, FULL, QUICK, REWARDS, Budget, Stages,  # noqa: E402
                              distill_config, eval_config, rl_config, sft_config)

ARMS = ("rl", "rl_no_kl", "rl_no_minmax", "pre_rl", "solutions_only")
ARM_TEXT = {"rl": "RLT teacher (paper's reward)", "rl_no_kl": "ablation: RLT teacher, λ = 0 (no r_KL)",
            "rl_no_minmax": "ablation: RLT teacher, no min/max terms", "pre_rl": "teacher before RL (warm-up only)",
            "solutions_only": "solutions only (no thought)"}


# ---------------------------------------------------------------------------------------------------------- inputs
def build_task(b: Budget, root: str) -> dict:
  """The synthetic task's files and models under root/task: rows, warm-up rows, tokenizer, the random base model."""
  import jax

  from rlt_jax import formats, hf_checkpoint, tiny
  from rlt_jax.models import init_params, num_params
  d = os.path.join(root, "task")
  os.makedirs(d, exist_ok=True)
  train = task.problems(b.train_problems, held_out=False, num_digits=b.num_digits, seed=0)
  heldout = task.problems(b.heldout_problems, held_out=True, num_digits=b.num_digits, seed=1)
  rng = np.random.RandomState(2)
  styles = [task.STYLES[i] for i in rng.randint(0, len(task.STYLES), len(train))]
  files = {k: os.path.join(d, f"{k}.jsonl") for k in ("train", "heldout", "warmup", "solutions_only", "distill_items")}
  task.write_jsonl(files["train"], [task.task_row(p) for p in train])
  task.write_jsonl(files["heldout"], [task.task_row(p) for p in heldout])
  task.write_jsonl(files["warmup"], [task.warmup_row(p, s) for p, s in zip(train, styles)])
  task.write_jsonl(files["solutions_only"], [task.no_thought_row(p) for p in train])
  # One distillation pass explains the training problems (the student's rows) and the held-out ones (the teacher's
  # held-out reward): rows with index >= train_problems are the held-out ones.
  task.write_jsonl(files["distill_items"], [task.task_row(p) for p in train + heldout])
  tok = tiny.build_tokenizer(os.path.join(d, "tokenizer"), task.tokenizer_texts(train), b.vocab_size)
  fmt = formats.RLTFormat(tok, **task.FORMAT)
  config = tiny.tiny_config(len(tok), eos_token_id=fmt.eos_id, **task.MODEL_SHAPE)
  base = os.path.join(d, "base")
  params = init_params(config, jax.random.key(1000))
  hf_checkpoint.save_hf(config, params, base, tokenizer=tok)
  # student_start None: the distilled students start from the warmed-up reward student (see the module doc).
  return dict(files=files, warmup_base=base, student_start=None, format=task.FORMAT,
              styles={s: styles.count(s) for s in task.STYLES}, num_params=num_params(params))


def read_canonical(path: str) -> list[dict]:
  """Every usable row of a data file as rlt_jax reads it ({question, solution, reasoning, system, answer});
  unusable rows are counted and reported, never silently dropped."""
  from rlt_jax import rows, sources
  src, out, bad = sources.open_source(path), [], 0
  for i in range(len(src)):
    try:
      out.append(rows.read_row(sources.decode_payload(src[i].payload)))
    except rows.BadRow:
      bad += 1
  print(f"replicate: {path}: {len(out)} rows read, {bad} unusable rows skipped")
  if not out:
    raise SystemExit(f"replicate: {path}: no usable row")
  return out


def real_inputs(args, b: Budget, root: str) -> dict:
  """--model/--data mode: the data's rows split into training and held-out problems (every fifth row held out
  unless --heldout names a file), written as the rows each stage reads."""
  d = os.path.join(root, "task")
  os.makedirs(d, exist_ok=True)
  rows = read_canonical(args.data)
  if args.heldout:
    train, heldout = rows, read_canonical(args.heldout)
  else:
    train, heldout = [r for i, r in enumerate(rows) if i % 5], [r for i, r in enumerate(rows) if not i % 5]
  train, heldout = train[:b.train_problems], [r for r in heldout if r["answer"]][:b.heldout_problems]
  if not heldout:
    raise SystemExit("replicate: no held-out row has a final answer to grade")
  plain = lambda r, **kw: dict(question=r["question"], solution=r["solution"], **kw)  # noqa: E731
  files = {k: os.path.join(d, f"{k}.jsonl") for k in ("train", "heldout", "warmup", "solutions_only", "distill_items")}
  task.write_jsonl(files["train"], [plain(r) for r in train])
  task.write_jsonl(files["heldout"], [plain(r, answer=r["answer"]) for r in heldout])
  # The official code's warm-up explains with the row's reasoning trace, else with the solution itself.
  task.write_jsonl(files["warmup"], [plain(r, reasoning_trace=r["reasoning"] or r["solution"]) for r in train])
  task.write_jsonl(files["solutions_only"], [plain(r, reasoning_trace="") for r in train])
  task.write_jsonl(files["distill_items"], [plain(r) for r in train + heldout])
  return dict(files=files, warmup_base=args.model, student_start=args.model, format={},
              styles={}, train_problems=len(train))


# -------------------------------------------------------------------------------------------------------- pipeline
def _export(workdir: str) -> str:
  return os.path.join(workdir, "export")


def split_distilled(path: str, n_train: int, out_rows: str) -> dict:
  """distill.jsonl → the student's rows (training items) and the teacher's held-out reward (held-out items)."""
  with open(path) as f:
    rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["index"])
  train = [r for r in rows if r["index"] < n_train]
  held = [r for r in rows if r["index"] >= n_train]
  task.write_jsonl(out_rows, [dict(question=r["question"], solution=r["solution"], system=r["system"],
                                   reasoning_trace=r["reasoning_trace"]) for r in train])
  styles = [task.style_of(r["reasoning_trace"]) for r in train]
  mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
  # Of the explanations in steps, the share whose every running digit is right (synthetic task only).
  worked = [task.steps_correct(task.digits_of(r["question"]), r["reasoning_trace"]) for r, s in zip(train, styles)
            if s == "steps" and task.digits_of(r["question"])]
  return dict(heldout_reward=mean([r["reward"] for r in held]), heldout_r_ss=mean([r["r_ss"] for r in held]),
              heldout_r_kl=mean([r["r_kl"] for r in held]), heldout_matched=mean([r["matched"] for r in held]),
              train_rows=len(train), style_fractions={s: styles.count(s) / len(styles) for s in sorted(set(styles))},
              steps_correct=mean(worked))


def run_seed(b: Budget, inputs: dict, stages: Stages, root: str, seed: int, teachers: dict) -> dict:
  from rlt_jax import distill, evaluate, sft, train
  fmt, files, out = inputs["format"], inputs["files"], {}
  reward_student = teachers["reward_student"]
  n_train = inputs.get("train_problems", b.train_problems)
  wd = lambda *p: os.path.join(root, f"seed_{seed}", *p)  # noqa: E731
  teacher_of = {"pre_rl": teachers["teacher"]}
  for arm in REWARDS:
    cfg = rl_config(b, fmt, teacher=teachers["teacher"], student=reward_student, data=files["train"], arm=arm,
                    seed=seed)

    def reinforce(cfg=cfg, arm=arm):
      train.run(cfg, wd("rl", arm))
      return rl_curve(wd("rl", arm, "metrics.jsonl"))
    out.setdefault(arm, {})["rl"] = stages.run(f"s{seed}_rl_{arm}", reinforce)
    teacher_of[arm] = _export(wd("rl", arm))
  for arm, teacher in teacher_of.items():
    cfg = distill_config(b, fmt, teacher=teacher, student=reward_student, data=files["distill_items"], seed=seed)
    rows_path = wd("distill", arm, "student_rows.jsonl")

    def explain(cfg=cfg, arm=arm, rows_path=rows_path):
      distill.run(cfg, wd("distill", arm))
      return split_distilled(wd("distill", arm, "distill.jsonl"), n_train, rows_path)
    out.setdefault(arm, {})["teacher"] = stages.run(f"s{seed}_distill_{arm}", explain)
  for arm in ARMS:
    data = files["solutions_only"] if arm == "solutions_only" else wd("distill", arm, "student_rows.jsonl")
    cfg = sft_config(b, fmt, kind="student", model=inputs.get("student_start") or reward_student, data=data,
                     steps=b.student_steps, lr=b.student_lr, seed=seed)
    stages.run(f"s{seed}_student_{arm}", lambda cfg=cfg, arm=arm: _floats(sft.run(cfg, wd("student", arm))))
    for decoding in DECODINGS:
      ecfg = eval_config(b, fmt, model=_export(wd("student", arm)), heldout=files["heldout"], seed=seed,
                         decoding=decoding)
      where = wd("eval", arm) if decoding == "greedy" else wd(f"eval_{decoding}", arm)

      def grade(ecfg=ecfg, where=where):
        r = evaluate.run(ecfg, where)["benchmarks"]["heldout"]
        return dict(pass_at_1=r["pass@1"], stderr=r["stderr"], n=r["n_problems"],
                    thought_styles=_thought_styles(os.path.join(where, "heldout.jsonl")))
      key = "eval" if decoding == "greedy" else f"eval_{decoding}"
      out.setdefault(arm, {})[key] = stages.run(f"s{seed}_{key}_{arm}", grade)
  return out


def rl_curve(path: str, n: int = 5) -> dict:
  """The training reward (and its parts) averaged over the first and the last `n` RL steps."""
  with open(path) as f:
    steps = [json.loads(line) for line in f if line.strip()]
  steps = list({m["step"]: m for m in steps}.values())  # a resumed run may repeat steps: keep the last record
  avg = lambda part, k: float(np.mean([m[k] for m in part]))  # noqa: E731
  return {f"{where}_{k}": avg(part, k) for where, part in (("first", steps[:n]), ("last", steps[-n:]))
          for k in ("reward_mean", "r_ss", "r_kl", "match_rate")}


def _floats(metrics) -> dict:
  return {k: float(v) for k, v in (metrics or {}).items() if np.ndim(v) == 0}


def _thought_styles(path: str) -> dict:
  """Fractions of the student's held-out responses whose thought follows each explanation style."""
  with open(path) as f:
    responses = [r for line in f if line.strip() for r in json.loads(line)["responses"]]
  thoughts = [r.split("</think>")[0].replace("<think>", "") for r in responses]
  styles = [task.style_of(t) for t in thoughts]
  return {s: styles.count(s) / len(styles) for s in sorted(set(styles))}


def warm_up(b: Budget, inputs: dict, stages: Stages, root: str) -> dict:
  """The teacher's and the reward student's SFT warm-ups (one each, shared by the seeds)."""
  from rlt_jax import sft
  fmt, files, out = inputs["format"], inputs["files"], {}
  for kind, name in (("teacher", "teacher"), ("student", "reward_student")):
    cfg = sft_config(b, fmt, kind=kind, model=inputs["warmup_base"], data=files["warmup"], steps=b.warmup_steps,
                     lr=b.warmup_lr, seed=0)
    workdir = os.path.join(root, "warmup", name)
    stages.run(f"warmup_{name}", lambda cfg=cfg, workdir=workdir: _floats(sft.run(cfg, workdir)))
    out[name] = _export(workdir)
  return out


# ----------------------------------------------------------------------------------------------------------- report
def seed_mean(values) -> tuple[float | None, float | None]:
  """Mean over seeds and its standard error (evaluate.pass_at_1's: std ddof=1 over sqrt(n); None with one seed);
  seeds without a value are left out."""
  from rlt_jax import evaluate
  return evaluate.pass_at_1([x for x in values if x is not None])


def report(b: Budget, results: dict, seconds: dict, header: str, *, styles: bool = True) -> str:
  """The markdown table; `styles` False (real data) leaves the synthetic task's style columns blank."""
  pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
  num = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
  seeds = sorted(results, key=int)
  lines = [header]
  for decoding, d in DECODINGS.items():
    key = "eval" if decoding == "greedy" else f"eval_{decoding}"
    how = "greedy" if not d["temperature"] else f"T = {d['temperature']}, {d['samples']} samples a problem"
    lines += ["", f"Held-out pass@1, {how}:", "",
              "| student distilled from | pass@1 (%) mean ± s.e. over seeds | " +
              " | ".join(f"seed {s} (± s.e. over problems)" for s in seeds) + " | thoughts in steps (%) |",
              "|---|---:|" + "---:|" * len(seeds) + "---:|"]
    for arm in ARMS:
      evs = [results[s][arm][key] for s in seeds]
      m, se = seed_mean([e["pass_at_1"] for e in evs])
      per = " | ".join(f"{pct(e['pass_at_1'])} ± {pct(e['stderr'])}" for e in evs)
      steps = seed_mean([e["thought_styles"].get("steps", 0.0) for e in evs])[0] if styles else None
      lines.append(f"| {ARM_TEXT[arm]} | **{pct(m)} ± {pct(se)}** | {per} | {pct(steps)} |")
  lines += ["", "| teacher | held-out RLT reward | r_SS | r_KL | end tag (%) | explains in steps (%) | " +
            "its steps all right (%) | RL training reward, first → last 5 steps |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for arm in ("pre_rl", "rl", "rl_no_kl", "rl_no_minmax"):
    ts = [results[s][arm]["teacher"] for s in seeds]
    cell = lambda k: num(seed_mean([t[k] for t in ts])[0])  # noqa: E731
    rl = [results[s][arm].get("rl") for s in seeds]
    curve = "–" if rl[0] is None else " → ".join(num(seed_mean([r[f"{w}_reward_mean"] for r in rl])[0])
                                                  for w in ("first", "last"))
    steps = seed_mean([t["style_fractions"].get("steps", 0.0) for t in ts])[0] if styles else None
    lines.append(f"| {ARM_TEXT[arm]} | {cell('heldout_reward')} | {cell('heldout_r_ss')} | {cell('heldout_r_kl')} | "
                 f"{pct(seed_mean([t['heldout_matched'] for t in ts])[0])} | {pct(steps)} | "
                 f"{pct(seed_mean([t.get('steps_correct') for t in ts])[0])} | "
                 f"{curve} |")
  total = sum(seconds.values())
  kinds = {}
  for name, t in seconds.items():
    kind = name.split("_", 2)[1] if name.startswith("s") and name[1].isdigit() else name
    kinds[kind] = kinds.get(kind, 0.0) + t
  lines += ["", "| stage | wall time (s) |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in kinds.items()]
  lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a small run that checks the plumbing (CI), not the result")
  p.add_argument("--workdir", default="runs/replicate")
  p.add_argument("--seeds", default="", help="comma-separated seeds (default: 0,1,2; --quick: 0)")
  p.add_argument("--model", default="", help="a Hugging Face model directory every model starts from")
  p.add_argument("--data", default="", help="training rows for --model (GSM8K, MATH, Stratos or custom)")
  p.add_argument("--heldout", default="", help="graded problems for --model (default: every fifth --data row)")
  for f in ("train_problems", "heldout_problems", "warmup_steps", "rl_steps", "student_steps", "max_len",
            "max_prompt_len", "max_new_tokens", "eval_new_tokens", "rl_batch", "group_size", "sft_batch"):
    p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
  for f in ("warmup_lr", "rl_lr", "student_lr"):
    p.add_argument("--" + f.replace("_", "-"), type=float, default=None)
  args = p.parse_args(argv)
  if bool(args.model) != bool(args.data):
    p.error("--model and --data go together")
  for path in (args.model, args.data, args.heldout):
    if path and not os.path.exists(path):
      p.error(f"{path}: no such file or directory")
  return args


def budget_of(args) -> Budget:
  b = QUICK if args.quick else FULL
  if args.model:  # real checkpoints: room for real explanations (sizes for a GPU; flags override)
    b = dataclasses.replace(b, max_len=1024, max_prompt_len=512, max_new_tokens=512, eval_new_tokens=512,
                            warmup_steps=100, warmup_lr=1e-5, rl_lr=1e-6, student_lr=1e-5, student_steps=200)
  changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
             if f.name != "seeds" and getattr(args, f.name, None) is not None}
  if args.seeds:
    try:
      changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
      raise SystemExit(f"replicate: --seeds={args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
  return dataclasses.replace(b, **changes)


def check_workdir_budget(root: str, b: Budget, args) -> None:
  """A workdir keeps the budget and inputs its stages ran with (<root>/budget.json); going on with other ones would mix
  results of two experiments in one table, so it stops, naming each field old → new. Seeds may be added."""
  now = dict(dataclasses.asdict(b), model=args.model, data=args.data, heldout=args.heldout)
  now.pop("seeds")
  now = json.loads(json.dumps(now))  # tuples as lists, as read back
  path = os.path.join(root, "budget.json")
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = [f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    if changed:
      raise SystemExit(f"replicate: {root} holds a run with another budget ({'; '.join(changed)}); use a new "
                       "--workdir, or the same flags")
  os.makedirs(root, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(now, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv=None) -> dict:
  args = parse_args(argv)
  b = budget_of(args)
  root = os.path.abspath(args.workdir)
  check_workdir_budget(root, b, args)
  stages = Stages(root)
  if args.model:
    inputs = stages.run("inputs", lambda: real_inputs(args, b, root))
  else:
    inputs = stages.run("inputs", lambda: build_task(b, root))
  teachers = warm_up(b, inputs, stages, root)
  results = {str(seed): run_seed(b, inputs, stages, root, seed, teachers) for seed in b.seeds}
  import jax
  header = (f"Replication in miniature ({'--model ' + args.model if args.model else 'synthetic task'}; "
            f"{'quick' if args.quick else 'full'} budget), {time.strftime('%Y-%m-%d')}, "
            f"{platform.processor() or platform.machine()} × {os.cpu_count()} cores, jax {jax.__version__} on "
            f"{jax.devices()[0].platform}; seeds {', '.join(map(str, b.seeds))}; budget {dataclasses.asdict(b)}")
  table = report(b, results, stages.seconds, header, styles=not args.model)
  print("\n" + table)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table)
  summary = dict(budget=dataclasses.asdict(b), inputs={k: v for k, v in inputs.items() if k != "files"},
                 results=results, seconds=stages.seconds)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()
