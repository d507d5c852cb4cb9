"""Full RLT teacher RL steps per second: rlt_jax's `train.run` vs trl's GRPOTrainer (PyTorch) on the same work.

Both sides run the tiny configs/tiny.py teacher and student (built once by `tiny.ensure_assets` into --assets and
loaded by both: rlt_jax via checkpoint.load_hf, TRL via AutoModelForCausalLM/AutoTokenizer), the same RLT teacher
prompts of the bundled GSM8K sample (`RLTFormat.teacher_prompt_text`, as plain text), the same B completions a step
in groups of G, max_new_tokens N, T=0.7, lr, beta, reference mix-up, one update per batch, fp32, no remat. A step is
sample -> RLT reward (student + current-teacher forwards) -> reference forward -> policy forward/backward -> AdamW.
TRL's reward is the RLT reward written for it in PyTorch, one sequence at a time as the official code runs it
(bench/trl_peer.py).

The peer needs its own virtualenv (not inside the repo; no JAX there):

  python3 -m venv /work/trl-venv && \
    /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0

and is found at --peer-python, else $RLT_PEER_PYTHON, else /work/trl-venv/bin/python (../trl-venv from the repo).

Timing: each side first runs --warmup untimed steps (compilation on our side, lazy init on TRL's), then the sides
take turns, one window of --window steps each, --windows times (they never run at the same time; this shared CPU has
slow spells, so each side's best window counts). A step is timed from the end of the previous one, data loading,
logging and metric writing included. Mean completion lengths (tokens, eos included) are printed beside the rates:
a side that stops earlier does less work.

Peer threads: --threads (default 2, one per core). When other processes hold the cores, PyTorch's OpenMP workers
wait on each other and a 2-thread peer runs many times slower than a 1-thread one (measured here: 2.3 vs 14.2
samples/s under the same load), which inflates the ratio; compare with --threads 1 on a busy machine.

  python bench/train_step.py [--window 2] [--windows 4] [--batch 32] [--group 8] [--max-new-tokens 48]
Last line: RESULT train_step ours=<samples/s> peer=<samples/s> ratio=<r>
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_PEER = os.path.join(os.path.dirname(REPO), "trl-venv", "bin", "python")
VENV_HELP = ("python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 "
             "transformers==5.24.0")


def peer_python(flag: str | None) -> str:
  """The peer interpreter, checked to import torch and trl; exits with the setup command when it cannot."""
  path = flag or os.environ.get("RLT_PEER_PYTHON") or DEFAULT_PEER
  probe = "import torch, trl, transformers, datasets; print(torch.__version__, trl.__version__, transformers.__version__)"
  try:
    out = subprocess.run([path, "-c", probe], capture_output=True, text=True, timeout=300)
    ok = out.returncode == 0
  except OSError as e:
    out, ok = e, False
  if not ok:
    detail = out.stderr.strip().splitlines()[-1] if hasattr(out, "stderr") and out.stderr.strip() else str(out)
    sys.exit(f"bench/train_step.py: the TRL peer interpreter {path!r} is not usable ({detail}).\n"
             f"Make the peer virtualenv with:\n  {VENV_HELP}\n"
             "or point --peer-python / $RLT_PEER_PYTHON at a python that has torch, trl and transformers.")
  return path


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def build(args):
  """(our config, peer spec) for the same models, prompts and settings."""
  from rlt_jax import checkpoint, data, formats, tiny
  cfg = tiny_config()
  rows = [formats.read_row(json.loads(line)) for line in open(data.SAMPLE_PATH) if line.strip()]
  overrides = {k: v for k, v in cfg.format.to_dict().items() if v}
  paths = tiny.ensure_assets(args.assets, rows, format_overrides=overrides, **cfg.tiny.to_dict())
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = paths["teacher"], paths["student"], paths["tokenizer"]
  cfg.batch_size, cfg.group_size, cfg.max_new_tokens = args.batch, args.group, args.max_new_tokens
  cfg.steps = args.warmup + args.window * args.windows
  cfg.checkpoint_every, cfg.tensorboard, cfg.export_dir = 10 ** 6, False, ""
  cfg.seed = args.seed
  tok = checkpoint.load_tokenizer(paths["tokenizer"])
  fmt = formats.RLTFormat(tok, **{k: v for k, v in overrides.items() if k != "style"})
  # The prompts our data pipeline keeps (it drops rows over max_prompt_len), as plain text for TRL.
  peer_rows = [dict(prompt=fmt.teacher_prompt_text(r["question"], r["solution"]), question=r["question"],
                    solution=r["solution"]) for r in rows
               if len(fmt.teacher_prompt(r["question"], r["solution"])) <= cfg.max_prompt_len]
  fields = ("solution_tags", "explanation_tags", "thought_tags", "student_solution_tags", "student_system",
            "delimiter", "padding", "think_prefix")
  spec = dict(teacher=paths["teacher"], student=paths["student"], tokenizer=paths["tokenizer"], rows=peer_rows,
              format={k: getattr(fmt, k) for k in fields}, batch_size=args.batch, group_size=args.group,
              max_new_tokens=args.max_new_tokens, temperature=float(cfg.temperature), grpo=cfg.grpo.to_dict(),
              threads=args.threads, seed=args.seed, warmup=args.warmup, window=args.window, windows=args.windows)
  return cfg, spec, len(rows)


class Peer:
  """The TRL process: reads its "@@peer" records, sends one stdin line per timed window."""

  def __init__(self, python: str, spec_path: str, log_path: str):
    self.log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(json.load(open(spec_path))["threads"]), PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen([python, os.path.join(REPO, "bench", "trl_peer.py"), "--spec", spec_path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

  def record(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        self.log.flush()
        tail = open(self.log.name).read()[-3000:]
        raise RuntimeError(f"the TRL peer exited (code {self.proc.wait()}); its log ends:\n{tail}")
      if line.startswith("@@peer "):
        return json.loads(line[len("@@peer "):])

  def window(self, steps: int) -> list[dict]:
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()
    out = [self.record() for _ in range(steps)]
    assert all("step" in r for r in out), out
    return out

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
    self.log.close()


def summarize(windows: list[list[dict]], batch: int) -> dict:
  """Best window by samples/s; means over it."""
  rates = [batch * len(w) / sum(r["seconds"] for r in w) for w in windows]
  best = max(range(len(windows)), key=rates.__getitem__)
  w = windows[best]
  mean = lambda k: sum(r[k] for r in w) / len(w)  # noqa: E731
  return dict(samples_per_s=rates[best], steps_per_s=rates[best] / batch, all=rates, len_mean=mean("len_mean"),
              step_s=mean("seconds"), reward_s=mean("reward_seconds"), sample_s=mean("sample_seconds"),
              reward_mean=sum(r["reward_mean"] for w in windows for r in w) / sum(len(w) for w in windows))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32, help="completions a step (prompts × group)")
  ap.add_argument("--group", type=int, default=8, help="GRPO group size G")
  ap.add_argument("--max-new-tokens", type=int, default=48)
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps on each side before the windows")
  ap.add_argument("--window", type=int, default=2, help="steps in one timed window")
  ap.add_argument("--windows", type=int, default=4, help="windows on each side (interleaved; the best counts)")
  ap.add_argument("--threads", type=int, default=2, help="torch threads of the peer")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--assets", default=os.path.join(tempfile.gettempdir(), "rlt_bench_assets"),
                  help="cache dir of the tiny tokenizer/teacher/student (built once, ~4 minutes on 2 cores)")
  ap.add_argument("--peer-python", default=None, help="python of the TRL virtualenv (else $RLT_PEER_PYTHON)")
  args = ap.parse_args()
  if args.warmup < 1 or args.window < 1 or args.windows < 1 or args.batch % args.group:
    sys.exit("bench/train_step.py: --warmup/--window/--windows must be >= 1 and --batch a multiple of --group")
  python = peer_python(args.peer_python)

  import jax
  from rlt_jax import train
  t0 = time.perf_counter()
  cfg, spec, n_rows = build(args)
  print(f"assets {args.assets} ready in {time.perf_counter() - t0:.1f}s; {len(spec['rows'])} of {n_rows} sample "
        f"prompts fit max_prompt_len={cfg.max_prompt_len}", flush=True)
  tmp = tempfile.mkdtemp(prefix="rlt_train_step_bench_")
  spec_path = os.path.join(tmp, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  peer = Peer(python, spec_path, os.path.join(tmp, "peer.log"))
  ours_windows, peer_windows, current = [], [], []
  clock = {"resume": None}

  def on_step(step, m):
    now = time.perf_counter()
    if step > args.warmup:
      current.append(dict(seconds=now - clock["resume"], len_mean=m["completion_len_mean"],
                          reward_seconds=m["time_reward"], sample_seconds=m["time_sample"],
                          reward_mean=m["reward_mean"]))
    if step == args.warmup:  # the peer finishes its own warm-up while we wait (untimed)
      ready = peer.record()
      print(f"ours: {args.warmup} warm-up step(s) done in {now - t0:.1f}s since start; peer ready at its step "
            f"{ready['ready']}", flush=True)
    elif (step - args.warmup) % args.window == 0:
      ours_windows.append(list(current))
      current.clear()
      peer_windows.append(peer.window(args.window))
      i = len(peer_windows)
      fmt_w = lambda w: f"{args.batch * len(w) / sum(r['seconds'] for r in w):7.1f} samples/s"  # noqa: E731
      print(f"window {i}: ours {fmt_w(ours_windows[-1])}  peer {fmt_w(peer_windows[-1])}", flush=True)
      if i < args.windows:
        peer.record()  # "ready": it waits for the next window
    clock["resume"] = time.perf_counter()

  try:
    train.run(cfg, os.path.join(tmp, "ours"), on_step=on_step)
    done = peer.record()
  finally:
    peer.close()
    shutil.rmtree(tmp, ignore_errors=True)
  ours, theirs = summarize(ours_windows, args.batch), summarize(peer_windows, args.batch)
  print(f"B={args.batch} G={args.group} N={args.max_new_tokens} T={cfg.temperature} lr={cfg.grpo.learning_rate} "
        f"beta={cfg.grpo.beta} model=tiny(V={json.load(open(os.path.join(args.assets, 'assets.json')))['vocab_size']}, "
        f"D={cfg.tiny.hidden}, L={cfg.tiny.layers}) jax={jax.__version__} on {jax.devices()[0].platform}; "
        f"peer torch={done['torch']} trl={done['trl']} transformers={done['transformers']} threads={done['threads']}")
  for name, s in (("ours", ours), ("peer", theirs)):
    print(f"{name}: best window {s['samples_per_s']:.1f} samples/s = {s['steps_per_s']:.3f} steps/s "
          f"({s['step_s']:.3f}s a step: sample {s['sample_s']:.3f}s, reward {s['reward_s']:.3f}s, update and rest "
          f"{s['step_s'] - s['sample_s'] - s['reward_s']:.3f}s); windows "
          f"{', '.join(f'{r:.1f}' for r in s['all'])}; mean completion length {s['len_mean']:.1f} tokens, "
          f"mean reward {s['reward_mean']:+.2f}")
  ratio = ours["samples_per_s"] / theirs["samples_per_s"]
  print(f"RESULT train_step ours={ours['samples_per_s']:.1f} peer={theirs['samples_per_s']:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
  main()
