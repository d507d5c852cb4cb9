"""Full RLT teacher RL steps per second: rlt_jax's `train.run` vs trl's GRPOTrainer (PyTorch) on the same work, with
each phase's time and FLOP/s against this CPU's matmul peak, measured in the same run.

Sizes (--size):
  tiny   configs/tiny.py's tiny shape (hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 128, the ~1,000-id
         tokenizer as vocab), built by `tiny.ensure_assets` with its 100 warm-up steps; the prompt/student lengths of
         configs/tiny.py.
  small  hidden 512, 8 layers, 8 heads / 2 kv heads of head_dim 64, intermediate 1408 (Qwen2-like ratios), tied
         embeddings, vocab 32,000. A BPE trained on the 300-row sample stops at ~5,300 ids, so the tokenizer is that
         one and the model has 32,000 embedding rows anyway (rows past the tokenizer are never fed; 20 warm-up steps
         teach the model not to sample them). max_prompt_len is the longest sample prompt rounded up to 32 and
         max_student_len the least the run accepts, so every sample row is kept.
Assets are built once per size into --assets (default <tmp>/rlt_bench_assets_<size>) and loaded by both sides:
rlt_jax via hf_checkpoint.load_hf, TRL via AutoModelForCausalLM/AutoTokenizer.

Both sides run the same RLT teacher prompts of the bundled GSM8K sample (`RLTFormat.teacher_prompt_text`, as plain
text), the same B completions a step in groups of G, max_new_tokens N, T=0.7, lr, beta, reference mix-up, one update
per batch, fp32, no remat. A step is sample -> RLT reward (student + current-teacher forwards) -> reference forward
-> policy forward/backward -> AdamW. TRL's reward is the RLT reward written for it in PyTorch, one sequence at a time
as the official code runs it (bench/trl_peer.py).

The peer needs its own virtualenv (not inside the repo; no JAX there):

  python3 -m venv /work/trl-venv && \
    /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0 datasets

and is found at --peer-python, else $RLT_PEER_PYTHON, else /work/trl-venv/bin/python (../trl-venv from the repo).

Full step timing: each side first runs --warmup untimed steps (compilation on our side, lazy init on TRL's), then the
sides take turns, one window of --window steps each, --windows times (they never run at the same time; this shared
CPU has slow spells, so each side's best window counts). A step is timed from the end of the previous one, data
loading, logging and metric writing included. Our loop queues device work a step ahead, so at every window's end we
wait for that work (it is counted in the window that queued it) before the peer's window starts, and the loop runs
two untimed steps more so that the last window is like the others. Mean completion lengths (tokens, eos included)
are printed beside the rates: a side that stops earlier does less work.

Phases. TRL's come from its timed windows: generate, the reward function, and the rest (reference and policy
forwards, backward, AdamW, TRL's bookkeeping). Ours are measured after the windows, with the peer idle, at the
step's exact shapes (one rollout of the run's first batch; best of --phase-repeats, interleaved): sample (the
sampler calls, prefill + decode), splice (host tokenizer work + the upload), and the step program on its own; inside
it, the reward (jitted `rewards.reward_rows`) and the update (jitted `rl_step.update`: reference forward, policy
forward + backward, AdamW) separately. Our loop's own per-phase split is not used: its device work runs
asynchronously, so its "sample" wait also holds the previous step's program.

FLOP counts are analytic, for the shapes computed (padding included, the vocabulary projection where the code does
it): a forward over R rows of L positions, K of them projected onto the vocabulary, is R·(2·W·L + 2·D·V·K +
2·L²·layers·heads·head_dim), W the layers' matmul weights (q, k, v, o, gate, up, down), D·V the projection, the last
term causal attention (QKᵀ and PV, half of 4·L²·heads·head_dim). The teacher's forwards project K = N + 1 positions
(those that predict the completion: `token_logprobs(last=N)`), the student's all S. Reward = teacher forward
[B, P+N] + student forward [B, S]; update = reference forward + 3× policy forward (backward = 2× forward; the
recomputed logit chunks are not counted); step program = reward + update; sample = prefill of the prompts (K = 1)
+ one decode row-step per generated token (2·(W + D·V) + 4·context·layers·heads·head_dim each). Percentages are of
this CPU's fp32 matmul peak measured in the same run (best square matmul of PEAK_SIZES through XLA and through
torch at --threads, both printed; % of the higher one).

Peer threads: --threads (default 2, one per core). When other processes hold the cores, PyTorch's OpenMP workers
wait on each other and a 2-thread peer runs many times slower than a 1-thread one (measured here: 2.3 vs 14.2
samples/s under the same load), which inflates the ratio; compare with --threads 1 on a busy machine.

  python bench/train_step.py [--size tiny|small] [--batch B] [--group G] [--max-new-tokens N] [--window 2]
                             [--windows 4] [--phase-repeats 3]
  defaults: tiny B=32 G=8 N=48 window 2 windows 4 (~5 minutes with its asset build); small B=8 G=4 N=32 window 1
  windows 3 (~10 minutes on 2 cores, the first run ~4 more to build its assets)
Every figure line carries the CPU model (cpu="..."). Last lines:
  RESULT train_step_<phase> size=<size> seconds=<s> gflops=<GFLOP/s> flops_pct=<% of peak> [peer_seconds=<s>] cpu=...
    for phase in sample, splice, reward, update, program (ours at the step's shapes; peer where TRL has the phase)
  RESULT train_step ours=<samples/s> peer=<samples/s> ratio=<r> size=<size> cpu="..."
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]  # rlt_jax, bench/common.py
from common import PEAK_SIZES, best_of, cpu_model, matmul_peak_flops, torch_matmul_peak_flops  # noqa: E402

DEFAULT_PEER = os.path.join(os.path.dirname(REPO), "trl-venv", "bin", "python")
VENV_HELP = ("python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 "
             "transformers==5.24.0 datasets")
# Per-size defaults of the step and the windows: the tiny ones are configs/tiny.py's; the small ones keep a run
# within ~10 minutes on 2 cores.
DEFAULTS = {"tiny": dict(batch=32, group=8, max_new_tokens=48, window=2, windows=4),
            "small": dict(batch=8, group=4, max_new_tokens=32, window=1, windows=3)}
SMALL_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408)  # head_dim = hidden / heads = 64
SMALL_VOCAB = 32000
# Enough for the rows past the tokenizer to become unlikely to be sampled (a random 32,000-way head samples them
# 5 times in 6) and the samples to look like text; a full warm-up would take most of a run's budget at this size.
SMALL_WARMUP_STEPS = 20
PHASES = ("sample", "splice", "program", "reward", "update")


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


def small_assets(directory: str, sample: list[dict], format_overrides: dict) -> dict[str, str]:
  """`tiny.ensure_assets` for the small shape (built once): that one sizes the model's vocabulary by its tokenizer,
  and no tokenizer trained on the sample reaches SMALL_VOCAB ids, so here the tokenizer keeps what the sample gives
  and the model gets SMALL_VOCAB embedding rows."""
  import jax
  from rlt_jax import formats, hf_checkpoint, tiny
  from rlt_jax.models import init_params
  paths = {k: os.path.join(directory, k) for k in ("tokenizer", "teacher", "student")}
  done = os.path.join(directory, "assets.json")
  if os.path.exists(done):
    return paths
  tok = tiny.build_tokenizer(paths["tokenizer"], [r["question"] + "\n" + r["solution"] for r in sample], SMALL_VOCAB)
  config = tiny.tiny_config(max(SMALL_VOCAB, len(tok)), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                            **SMALL_SHAPE)
  params = init_params(config, jax.random.key(0))
  fmt = formats.RLTFormat(tok, **format_overrides)
  params, loss = tiny.warmup(config, params, tiny.warmup_rows(fmt, sample), steps=SMALL_WARMUP_STEPS, batch_size=8)
  for name in ("teacher", "student"):
    hf_checkpoint.save_hf(config, params, paths[name], tokenizer=tok)
  with open(done + ".tmp", "w") as f:
    json.dump({"vocab_size": config.vocab_size, "tokenizer_size": len(tok), "warmup_steps": SMALL_WARMUP_STEPS,
               "warmup_loss": loss, **SMALL_SHAPE}, f)
  os.replace(done + ".tmp", done)  # written last: a run killed mid-build rebuilds everything
  return paths


def fit_lengths(cfg, fmt, sample: list[dict]) -> None:
  """Small size: max_prompt_len = the longest sample prompt rounded up to 32 (every row kept, the least padding),
  max_student_len = the least `loading._check_student_len` accepts with it, rounded up to 32."""
  longest = max(len(fmt.teacher_prompt(r["question"], r["solution"])) for r in sample)
  cfg.max_prompt_len = 32 * math.ceil(longest / 32)
  overhead = len(fmt.student_example("q", "s", []).input_ids) - len(fmt.teacher_prompt("q", "s"))
  cfg.max_student_len = 32 * math.ceil((cfg.max_prompt_len + overhead + cfg.max_new_tokens + 8) / 32)


def build(args):
  """(our config, peer spec, sample rows) for the same models, prompts and settings."""
  from rlt_jax import data, formats, hf_checkpoint, rows, tiny
  cfg = tiny_config()
  sample = [rows.read_row(json.loads(line)) for line in open(data.SAMPLE_PATH) if line.strip()]
  overrides = {k: v for k, v in cfg.format.to_dict().items() if v}
  if args.size == "tiny":
    paths = tiny.ensure_assets(args.assets, sample, format_overrides=overrides, **cfg.tiny.to_dict())
  else:
    paths = small_assets(args.assets, sample, overrides)
  cfg.teacher_path, cfg.student_path, cfg.tokenizer_path = paths["teacher"], paths["student"], paths["tokenizer"]
  cfg.batch_size, cfg.group_size, cfg.max_new_tokens = args.batch, args.group, args.max_new_tokens
  # Two more than the timed steps: the loop reports step k after dispatching step k+1 (and queues sampling k+2), so
  # the last window's steps are dispatched, and drained, like every other window's.
  cfg.steps = args.warmup + args.window * args.windows + 2
  cfg.checkpoint_every, cfg.tensorboard, cfg.export_dir = 10 ** 6, False, ""
  cfg.seed = args.seed
  tok = hf_checkpoint.load_tokenizer(paths["tokenizer"])
  fmt = formats.RLTFormat(tok, **{k: v for k, v in overrides.items() if k != "style"})
  if args.size == "small":
    fit_lengths(cfg, fmt, sample)
  # The prompts our data pipeline keeps (it drops rows over max_prompt_len), as plain text for TRL.
  peer_rows = [dict(prompt=fmt.teacher_prompt_text(r["question"], r["solution"]), question=r["question"],
                    solution=r["solution"]) for r in sample
               if len(fmt.teacher_prompt(r["question"], r["solution"])) <= cfg.max_prompt_len]
  fields = ("solution_tags", "explanation_tags", "thought_tags", "student_solution_tags", "student_system",
            "delimiter", "padding", "think_prefix")
  spec = dict(teacher=paths["teacher"], student=paths["student"], tokenizer=paths["tokenizer"], rows=peer_rows,
              format={k: getattr(fmt, k) for k in fields}, batch_size=args.batch, group_size=args.group,
              max_new_tokens=args.max_new_tokens, temperature=float(cfg.temperature), grpo=cfg.grpo.to_dict(),
              threads=args.threads, seed=args.seed, warmup=args.warmup, window=args.window, windows=args.windows)
  return cfg, spec, sample, len(tok)


class Peer:
  """The TRL process: reads its "@@peer" records, sends one stdin line per timed window."""

  def __init__(self, python: str, spec_path: str, log_path: str):
    self.log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(json.load(open(spec_path))["threads"]), PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen([python, os.path.join(BENCH, "trl_peer.py"), "--spec", spec_path],
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
  out = dict(samples_per_s=rates[best], steps_per_s=rates[best] / batch, all=rates, len_mean=mean("len_mean"),
             step_s=mean("seconds"), reward_mean=sum(r["reward_mean"] for w in windows for r in w) /
             sum(len(w) for w in windows))
  if "reward_seconds" in w[0]:
    out.update(reward_s=mean("reward_seconds"), sample_s=mean("sample_seconds"))
  return out


# ------------------------------------------------------------------------------------------------ FLOP counts
def matmul_weights(c) -> int:
  """Weights a token goes through in matmuls: q, k, v, o, gate, up, down of every layer and the vocab projection."""
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * layer + c.hidden_size * c.vocab_size


def forward_flops(c, rows: int, length: int, projected: int | None = None) -> float:
  """One forward over `rows` sequences of `length` positions, `projected` of them (default all) through the
  vocabulary projection: the matmuls plus causal attention (QKᵀ and PV over the lower triangle: half of
  4·L²·heads·head_dim a layer)."""
  vocab = c.hidden_size * c.vocab_size
  projected = length if projected is None else projected
  return rows * (2 * (matmul_weights(c) - vocab) * length + 2 * vocab * projected +
                 2 * length ** 2 * c.num_layers * c.num_heads * c.head_dim)


def decode_flops(c, row_steps: float, context: float) -> float:
  """Decode: `row_steps` one-token forwards, each attending over `context` cached positions."""
  return row_steps * (2 * matmul_weights(c) + 4 * context * c.num_layers * c.num_heads * c.head_dim)


# -------------------------------------------------------------------------------------------- our phases alone
def measure_phases(cfg, workdir: str, repeats: int) -> dict:
  """Our phases at the step's exact shapes, on one rollout of the run's first batch (see the module docstring):
  {"seconds": {phase: best seconds}, "flops": {phase: analytic FLOPs}, "shape": ...}."""
  import jax
  import numpy as np
  from rlt_jax import distributed, grpo, loading, optim, rewards, rl_step, sharding, train
  rs = loading.setup(cfg, workdir)
  optimizer = optim.make_optimizer(rs.grpo_config.optim)
  it = iter(rs.dataset)
  # The trainer's own StepConfig and step program (no writer or checkpointer: only its constructor runs).
  trainer = train.RLTrainer(rs, train.initial_state(rs, optimizer), it, 1, writer=None, ckpt=None)
  sc, live = trainer.sc, {"state": trainer.state}
  batch = distributed.gather_rows(next(it))
  with sharding.use_mesh(rs.mesh, rs.rules):
    rollout_params, keys = trainer.first(live["state"]["params"], live["state"]["step"])
  reward_fn = jax.jit(lambda params, student, rb: rewards.reward_rows(
      sc.teacher, params, sc.student, student, rb, sc.reward, chunk_size=sc.chunk_size,
      micro_batch=sc.reward_micro_batch, teacher_last=sc.completion_len))  # as the step program calls it
  update_fn = jax.jit(functools.partial(rl_step.update, sc, optimizer), donate_argnums=0)

  def sample():
    live["parts"] = train.read_samples(train.sample_step(rs, rollout_params, batch, keys[0]))

  def splice():
    live["rollout"] = train.finish_rollout(rs, batch, live["parts"])
    live["dev"] = train.upload(rs, live["rollout"], off_policy=sc.off_policy)

  def reward():
    with sharding.use_mesh(rs.mesh, rs.rules):
      live["reward"] = jax.block_until_ready(reward_fn(live["state"]["params"], rs.student_params,
                                                       live["dev"].reward))

  def update():
    with sharding.use_mesh(rs.mesh, rs.rules):
      live["state"], _ = jax.block_until_ready(update_fn(live["state"], live["update_batch"]))

  def program():
    with sharding.use_mesh(rs.mesh, rs.rules):
      live["state"], *_ = jax.block_until_ready(trainer.program(live["state"], rs.student_params, live["dev"]))

  sample()
  splice()
  reward()  # compiles; its rewards give the update its advantages
  rb = live["dev"].reward
  advantages = grpo.group_advantages(live["reward"][0], sc.group_size, eps=sc.grpo.advantage_eps,
                                     scale=sc.grpo.advantage_scale)
  live["update_batch"] = rl_step.UpdateBatch(rb.teacher_ids, rb.teacher_mask, advantages,
                                             live["dev"].behaviour_logp_BN)
  update()
  program()
  fns = dict(sample=sample, splice=splice, program=program, reward=reward, update=update)
  seconds = best_of(fns, repeats)

  B, T = rb.teacher_ids.shape
  S, N = rb.student_ids.shape[1], sc.completion_len
  P = T - N
  lengths = live["rollout"]["lengths"]
  row_steps = live["rollout"]["decode_row_steps"]
  # The teacher's forwards (reward, reference, policy) project only the N + 1 positions that predict the completion.
  teacher = forward_flops(sc.teacher, B, T, projected=N + 1)
  reward_flops = teacher + forward_flops(sc.student, B, S)
  update_flops = (teacher if sc.grpo.beta > 0 else 0) + 3 * teacher
  flops = dict(sample=forward_flops(sc.teacher, B // sc.group_size, P, projected=1) +
               decode_flops(sc.teacher, row_steps, P + float(lengths.mean()) / 2),
               splice=0.0, reward=reward_flops, update=update_flops, program=reward_flops + update_flops)
  real = dict(teacher=float(np.mean(live["rollout"]["reward"].teacher_mask)),
              student=float(np.mean(live["rollout"]["reward"].student_mask)))
  return dict(seconds=seconds, flops=flops, shape=dict(B=B, P=P, N=N, T=T, S=S), len_mean=float(lengths.mean()),
              real=real, teacher=sc.teacher, beta=sc.grpo.beta)


def matmul_peaks(threads: int) -> dict:
  """This CPU's fp32 matmul peak, now: the best square matmul of PEAK_SIZES through XLA and through torch."""
  return dict(xla=max(matmul_peak_flops(n) for n in PEAK_SIZES),
              torch=max(torch_matmul_peak_flops(n, threads=threads) for n in PEAK_SIZES))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(DEFAULTS), default="tiny", help="model size (see above)")
  ap.add_argument("--batch", type=int, default=None, help="completions a step (prompts × group); default per size")
  ap.add_argument("--group", type=int, default=None, help="GRPO group size G; default per size")
  ap.add_argument("--max-new-tokens", type=int, default=None, help="N; default per size")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps on each side before the windows")
  ap.add_argument("--window", type=int, default=None, help="steps in one timed window; default per size")
  ap.add_argument("--windows", type=int, default=None,
                  help="windows on each side (interleaved; the best counts); default per size")
  ap.add_argument("--phase-repeats", type=int, default=3, help="repeats of each of our phases (the best counts)")
  ap.add_argument("--threads", type=int, default=2, help="torch threads of the peer (and of the torch peak)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--assets", default=None,
                  help="cache dir of the size's tokenizer/teacher/student (default <tmp>/rlt_bench_assets_<size>; "
                       "built once: ~4 minutes for tiny, ~4 for small on 2 cores)")
  ap.add_argument("--peer-python", default=None, help="python of the TRL virtualenv (else $RLT_PEER_PYTHON)")
  args = ap.parse_args()
  for k, v in DEFAULTS[args.size].items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.assets = args.assets or os.path.join(tempfile.gettempdir(), f"rlt_bench_assets_{args.size}")
  if min(args.warmup, args.window, args.windows, args.phase_repeats) < 1 or args.batch % args.group:
    sys.exit("bench/train_step.py: --warmup/--window/--windows/--phase-repeats must be >= 1 and --batch a multiple "
             "of --group")
  python = peer_python(args.peer_python)
  cpu = cpu_model()
  print(f"CPU: {cpu}", flush=True)

  import jax
  from rlt_jax import train
  t0 = time.perf_counter()
  cfg, spec, sample, tokenizer_size = build(args)
  print(f"assets {args.assets} ready in {time.perf_counter() - t0:.1f}s; {len(spec['rows'])} of {len(sample)} "
        f"sample prompts fit max_prompt_len={cfg.max_prompt_len}", flush=True)
  tmp = tempfile.mkdtemp(prefix="rlt_train_step_bench_")
  spec_path = os.path.join(tmp, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  peer = Peer(python, spec_path, os.path.join(tmp, "peer.log"))
  ours_windows, peer_windows, current = [], [], []
  clock = {"resume": None}

  timed_steps = args.window * args.windows

  def drain():
    """Waits for our queued device work (the loop runs a step ahead: the last step's program and the next
    sampling are in flight), so that the peer's window never shares the CPU with it."""
    jax.block_until_ready(jax.live_arrays())

  def on_step(step, m):
    if step > args.warmup + timed_steps:  # the extra steps that let the last window dispatch like the others
      return
    now = time.perf_counter()
    if step > args.warmup:
      current.append(dict(seconds=now - clock["resume"], len_mean=m["completion_len_mean"],
                          reward_mean=m["reward_mean"]))
    if step == args.warmup:  # the peer finishes its own warm-up while we wait (untimed)
      drain()
      ready = peer.record()
      print(f"ours: {args.warmup} warm-up step(s) done in {now - t0:.1f}s since start; peer ready at its step "
            f"{ready['ready']}", flush=True)
    elif (step - args.warmup) % args.window == 0:
      # A window holds the device work of its own steps: W splices and programs, W samplings (the first one was
      # drained into the previous window, the one after the window's last program drains into this one).
      drain()
      current[-1]["seconds"] += time.perf_counter() - now
      ours_windows.append(list(current))
      current.clear()
      peer_windows.append(peer.window(args.window))
      i = len(peer_windows)
      fmt_w = lambda w: f"{args.batch * len(w) / sum(r['seconds'] for r in w):7.2f} samples/s"  # noqa: E731
      print(f"window {i}: ours {fmt_w(ours_windows[-1])}  peer {fmt_w(peer_windows[-1])}  [{cpu}]", flush=True)
      if i < args.windows:
        peer.record()  # "ready": it waits for the next window
    clock["resume"] = time.perf_counter()

  try:
    train.run(cfg, os.path.join(tmp, "ours"), on_step=on_step)
    done = peer.record()
  finally:
    peer.close()
  try:  # the peer has exited: the CPU is ours alone
    print(f"measuring this CPU's matmul peak and our phases at the step's shapes (best of {args.phase_repeats})",
          flush=True)
    peak = matmul_peaks(args.threads)
    phases = measure_phases(cfg, os.path.join(tmp, "phases"), args.phase_repeats)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  ours, theirs = summarize(ours_windows, args.batch), summarize(peer_windows, args.batch)
  report(args, cfg, cpu, tokenizer_size, ours, theirs, done, peak, phases, jax)


def report(args, cfg, cpu: str, tokenizer_size: int, ours: dict, theirs: dict, done: dict, peak: dict, phases: dict,
           jax) -> None:
  c, shape = phases["teacher"], phases["shape"]
  ref, ref_name = max((peak["xla"], "XLA"), (peak["torch"], "torch"))
  label = f'size={args.size} cpu="{cpu}"'
  print(f"\n== bench/train_step.py --size {args.size}  [CPU: {cpu}]")
  print(f"model: V={c.vocab_size} (tokenizer {tokenizer_size} ids) D={c.hidden_size} L={c.num_layers} "
        f"heads={c.num_heads}/{c.num_kv_heads} kv head_dim={c.head_dim} I={c.intermediate_size} "
        f"tied={c.tie_word_embeddings}; {matmul_weights(c) / 1e6:.1f}M matmul weights a token")
  print(f"step: B={args.batch} G={args.group} N={args.max_new_tokens} P={shape['P']} (teacher T={shape['T']}) "
        f"student S={shape['S']} T={cfg.temperature} lr={cfg.grpo.learning_rate} beta={cfg.grpo.beta} fp32; "
        f"jax={jax.__version__} on {jax.devices()[0].platform}; peer torch={done['torch']} trl={done['trl']} "
        f"transformers={done['transformers']} threads={done['threads']}")
  print(f"fp32 matmul peak of this CPU, measured now (best of {'/'.join(map(str, PEAK_SIZES))} squares): "
        f"XLA {peak['xla'] / 1e9:.1f} GFLOP/s, torch ({args.threads} threads) {peak['torch'] / 1e9:.1f} GFLOP/s; "
        f"% below are of the higher, {ref_name} [CPU: {cpu}]")

  print(f"\nfull step, best window [CPU: {cpu}]")
  print(f"{'side':6} {'samples/s':>10} {'steps/s':>8} {'s/step':>8}  {'mean len':>8} {'mean reward':>11}  windows")
  for name, s in (("ours", ours), ("peer", theirs)):
    print(f"{name:6} {s['samples_per_s']:10.2f} {s['steps_per_s']:8.3f} {s['step_s']:8.3f}  {s['len_mean']:8.1f} "
          f"{s['reward_mean']:+11.2f}  {', '.join(f'{r:.2f}' for r in s['all'])}")

  peer_s = dict(sample=theirs["sample_s"], reward=theirs["reward_s"],
                update=theirs["step_s"] - theirs["sample_s"] - theirs["reward_s"])
  print(f"\nphases [CPU: {cpu}]: ours alone at the step's shapes (best of {args.phase_repeats}; sampled "
        f"{phases['len_mean']:.1f} tokens a row; real tokens: teacher {phases['real']['teacher']:.0%}, student "
        f"{phases['real']['student']:.0%} of the padded shapes); peer: means over its best window (update = "
        "everything but generate and the reward)")
  print(f"{'phase':9} {'ours s':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>7} {'peer s':>8}")
  rates = {}
  for name in PHASES:
    s, f = phases["seconds"][name], phases["flops"][name]
    rates[name] = (f / s, 100 * f / s / ref)
    rate = f"{f / 1e9:8.2f} {f / s / 1e9:8.1f} {rates[name][1]:6.1f}%" if f else f"{'':8} {'':8} {'':7}"
    print(f"{'  ' * (name in ('reward', 'update')) + name:9} {s:8.3f} {rate} "
          f"{f'{peer_s[name]:8.3f}' if name in peer_s else '':>8}")
  print(f"{'step':9} {phases['seconds']['sample'] + phases['seconds']['splice'] + phases['seconds']['program']:8.3f}"
        f" (sum of ours; the loop's best window: {ours['step_s']:.3f}s a step, the peer's {theirs['step_s']:.3f}s)")

  for name in PHASES:
    s, f = phases["seconds"][name], phases["flops"][name]
    extra = f" peer_seconds={peer_s[name]:.4f}" if name in peer_s else ""
    figures = f" gflops={rates[name][0] / 1e9:.2f} flops_pct={rates[name][1]:.1f} peak={ref_name}" if f else ""
    print(f"RESULT train_step_{name} size={args.size} seconds={s:.4f}{figures}{extra} cpu=\"{cpu}\"")
  ratio = ours["samples_per_s"] / theirs["samples_per_s"]
  print(f"RESULT train_step ours={ours['samples_per_s']:.2f} peer={theirs['samples_per_s']:.2f} ratio={ratio:.2f} "
        f"{label}")


if __name__ == "__main__":
  main()
