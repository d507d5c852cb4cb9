"""Generated tokens/s of `sampling.sample` against peers on the same random Qwen2, prompts and stop tokens, this CPU.

  python bench/sampling.py [--batch 16] [--prompt 64] [--new 128] [--temperature 0] [--tiny]   # fixed length
  python bench/sampling.py --capacity [--rows 64]           # same realised lengths at max_new_tokens 512 and 4,096
  python bench/sampling.py --spread [--budget 1024] [--prompts 4] [--samples 64]   # RL-like length spread
  bash bench/setup_tunix.sh    # once, for the Tunix peer of --spread (its own virtualenv)

Default: prefill + decode of `--new` tokens for `--batch` prompts, eos ignored so ours and transformers `generate`
produce the same tokens; greedy by default. "functions" (default and --spread) is the same sampler running the
decoder as the plain functions the Flax modules replaced (bench/functional_qwen2.py): the modules' cost, 1.0 when free. The model has hidden 256 and 4 layers (`--tiny`: configs/tiny.py's shape).

--capacity: rows stop at eos (8 of the 1,024 ids; the random model's near-uniform softmax makes lengths geometric,
mean about 128) and the key is chosen so every row stops within 512 tokens; the same call at max_new_tokens 512 and
4,096 then writes the same tokens. Ours should take about the same time at both budgets (`decode.Schedule`); the
loop without the schedule (`decode.WHOLE`, the sampler before it) reads every slot of the budget on every step.

--spread: explanation lengths drawn like RL explanations: stop ids are 8·V/budget of the ids, so lengths are
geometric with mean budget/8 and a long tail (the longest of 256 rows is about 0.7·budget). Tokens/s of ours, of
the whole loop (today's sampler before the schedule), of transformers `generate` (PyTorch) and of Tunix's `Sampler`
(bench/tunix_peer.py), each counting the tokens it generated up to and including each row's first stop token.
Times are interleaved best-of-N; the CPU and its measured matmul peak are printed with the figures.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import best_of, matmul_peak_flops, torch_threads  # noqa: E402
from functional_qwen2 import functional  # noqa: E402
from hf_models import make_hf_model  # noqa: E402
from rlt_jax import hf_checkpoint, sampling  # noqa: E402
from rlt_jax.decode import WHOLE, Schedule  # noqa: E402

SHAPE = dict(vocab=1024, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
TUNIX_PYTHON = os.path.join(os.path.dirname(__file__), ".tunix-venv", "bin", "python")


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def prompts(B: int, P: int, vocab: int, seed: int = 0):
  rs = np.random.RandomState(seed)
  lengths = rs.randint(P // 2, P + 1, B)  # left-padded prompts of different lengths
  mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int64)
  return rs.randint(1, vocab, (B, P)) * mask, mask  # ids from 1: Tunix takes id 0 for padding


def header():
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; XLA fp32 matmul peak {matmul_peak_flops() / 1e9:.0f} GFLOP/s; "
        f"jax devices {jax.device_count()}; {time.strftime('%Y-%m-%d')}")


def fixed_length(args, config, params, hf):
  hf.generation_config.eos_token_id = None  # run every row to --new tokens, as ours does with eos_ids=()
  B, P, N = args.batch, args.prompt, args.new
  ids, mask = prompts(B, P, config.vocab_size)
  ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
  greedy = args.temperature == 0
  rng = jax.random.key(0)

  def ours(config=config):
    return jax.block_until_ready(sampling.sample(config, params, ids, mask, rng, max_new_tokens=N,
                                                 temperature=args.temperature))

  def functions():
    return ours(functional(config))

  def peer():
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=None)
    with torch.inference_mode():
      return hf.generate(ids_t, attention_mask=mask_t, max_new_tokens=N, min_new_tokens=N, pad_token_id=0, **kw)

  t0 = time.perf_counter()
  out = ours()  # compile outside the timing
  compile_s = time.perf_counter() - t0
  assert np.array_equal(np.asarray(functions().tokens), np.asarray(out.tokens)), "Flax and functions disagree"
  ref = peer()
  if greedy:
    agree = float((np.asarray(out.tokens) == ref[:, P:].numpy()).mean())
    print(f"greedy agreement with transformers: {agree:.3f} of tokens")
  t = best_of({"ours": ours, "functions": functions, "peer": peer}, args.repeats)
  ours_tps, fn_tps, peer_tps = B * N / t["ours"], B * N / t["functions"], B * N / t["peer"]
  print(f"batch {B}, prompt {P}, {N} new tokens, {'greedy' if greedy else f'T={args.temperature}'}; ours (Flax) "
        f"{t['ours'] * 1e3:.1f} ms (compile {compile_s:.1f} s), functions {t['functions'] * 1e3:.1f} ms, "
        f"transformers generate {t['peer'] * 1e3:.1f} ms")
  print(f"RESULT sampling ours={ours_tps:.0f} functions={fn_tps:.0f} peer={peer_tps:.0f} "
        f"flax_over_functions={ours_tps / fn_tps:.2f} ratio={ours_tps / peer_tps:.2f}")


def capacity(args, config, params):
  B, M, P = args.rows // 16, 16, 64
  ids, mask = prompts(B, P, config.vocab_size)
  eos = tuple(range(2, 10))  # 8 of 1,024 ids: mean length about 128
  kw = dict(temperature=1.0, num_samples=M, eos_ids=eos)
  key = next(jax.random.key(s) for s in range(50) if np.asarray(sampling.sample(
      config, params, ids, mask, jax.random.key(s), max_new_tokens=512, **kw).finished).all())
  runs = {f"{name}@{T}": (lambda T=T, sch=sch: jax.block_until_ready(sampling.sample(
      config, params, ids, mask, key, max_new_tokens=T, schedule=sch, **kw)))
      for name, sch in (("ours", Schedule()), ("whole", WHOLE)) for T in (512, 4096)}
  outs = {k: f() for k, f in runs.items()}  # compiles
  lengths = np.asarray(outs["ours@512"].lengths)
  for k, o in outs.items():
    assert np.array_equal(np.asarray(o.lengths), lengths), f"{k}: realised lengths differ"
  t = best_of(runs, args.repeats)
  print(f"{B} prompts x {M} samples, prompt {P}; realised lengths {lengths.min()}-{lengths.max()} (mean "
        f"{lengths.mean():.0f}) at both budgets")
  for name in ("ours", "whole"):
    print(f"  {name:<6} max_new_tokens 512: {t[name + '@512'] * 1e3:8.1f} ms   4096: {t[name + '@4096'] * 1e3:8.1f} ms"
          f"   ratio {t[name + '@4096'] / t[name + '@512']:.2f}")
  print(f"RESULT capacity ours_4096_over_512={t['ours@4096'] / t['ours@512']:.2f} "
        f"whole_4096_over_512={t['whole@4096'] / t['whole@512']:.2f}")


def spread(args, config, params, hf, model_dir):
  B, M, P, T = args.prompts, args.samples, 64, args.budget
  V = config.vocab_size
  eos = tuple(range(2, 2 + max(1, 8 * V // T)))  # stop probability 8/T a step: mean length T/8
  ids, mask = prompts(B, P, V)
  key = jax.random.key(0)
  ours_out = {}

  def ours(schedule, name, config=config):
    def run():
      ours_out[name] = jax.block_until_ready(sampling.sample(config, params, ids, mask, key, max_new_tokens=T,
                                                             temperature=1.0, num_samples=M, eos_ids=eos,
                                                             schedule=schedule))
    return run

  ids_t, mask_t = torch.as_tensor(np.repeat(ids, M, 0)), torch.as_tensor(np.repeat(mask, M, 0))
  hf_tokens = {}

  def peer():
    with torch.inference_mode():
      out = hf.generate(ids_t, attention_mask=mask_t, max_new_tokens=T, do_sample=True, temperature=1.0, top_k=None,
                        top_p=1.0, eos_token_id=list(eos), pad_token_id=0)[:, P:].numpy()
    stop = np.isin(out, eos)
    hf_tokens["n"] = int(np.where(stop.any(1), stop.argmax(1) + 1, out.shape[1]).sum())

  runs = {"ours": ours(Schedule(), "ours"), "functions": ours(Schedule(), "functions", functional(config)),
          "whole": ours(WHOLE, "whole"), "transformers": peer}
  for f in runs.values():
    f()  # compile / warm up
  t = best_of(runs, args.repeats)
  tokens = {k: float(np.asarray(ours_out[k].lengths).sum()) for k in ("ours", "functions", "whole")}
  assert np.array_equal(np.asarray(ours_out["functions"].tokens), np.asarray(ours_out["ours"].tokens))
  tokens["transformers"] = hf_tokens["n"]
  tps = {k: tokens[k] / t[k] for k in runs}
  lengths = np.asarray(ours_out["ours"].lengths)
  print(f"{B} prompts x {M} samples, prompt {P}, budget {T}, {len(eos)} stop ids of {V}: lengths mean "
        f"{lengths.mean():.0f} (budget/{T / lengths.mean():.1f}), median {np.median(lengths):.0f}, max {lengths.max()}")
  o = ours_out["ours"]
  print(f"  ours computed {float(o.row_steps):.0f} row-steps (the whole loop "
        f"{float(ours_out['whole'].row_steps):.0f}) and read {float(o.slots_read):.3g} cache slots "
        f"({float(ours_out['whole'].slots_read):.3g})")
  if os.path.exists(TUNIX_PYTHON):
    with tempfile.TemporaryDirectory() as d:
      np.savez(os.path.join(d, "prompts.npz"), ids=np.repeat(ids, M, 0), mask=np.repeat(mask, M, 0))
      cmd = [TUNIX_PYTHON, os.path.join(os.path.dirname(__file__), "tunix_peer.py"), "--model", model_dir,
             "--prompts", os.path.join(d, "prompts.npz"), "--max-new", str(T), "--temperature", "1.0",
             "--repeats", str(args.repeats)] + [a for e in eos for a in ("--eos", str(e))]
      res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    tps["tunix"], t["tunix"], tokens["tunix"] = res["tokens_per_s"], res["seconds"], res["tokens"]
  else:
    print("  tunix: skipped (bash bench/setup_tunix.sh builds its virtualenv)")
  for k in tps:
    print(f"  {k:<13} {t[k]:7.2f} s  {tokens[k]:8.0f} tokens  {tps[k]:8.0f} tokens/s   ours / it "
          f"{tps['ours'] / tps[k]:.2f}x")
  print("RESULT spread " + " ".join(f"{k}={v:.0f}" for k, v in tps.items()) +
        f" ours_over_whole={tps['ours'] / tps['whole']:.2f} flax_over_functions={tps['ours'] / tps['functions']:.2f}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--tiny", action="store_true", help="the model shape of configs/tiny.py (hidden 64, 2 layers)")
  ap.add_argument("--capacity", action="store_true")
  ap.add_argument("--rows", type=int, default=64, help="--capacity: rows (16 samples a prompt)")
  ap.add_argument("--spread", action="store_true")
  ap.add_argument("--budget", type=int, default=1024, help="--spread: max_new_tokens")
  ap.add_argument("--prompts", type=int, default=4, help="--spread: prompts a call")
  ap.add_argument("--samples", type=int, default=64, help="--spread: samples a prompt")
  args = ap.parse_args()
  torch.set_num_threads(torch_threads())
  shape = dict(SHAPE, hidden=64, layers=2, heads=4, inter=128) if args.tiny else SHAPE
  header()
  print(f"model {shape} (random, std 0.02), fp32, torch threads {torch.get_num_threads()}")
  with tempfile.TemporaryDirectory() as d:
    hf = make_hf_model(d, std=0.02, **shape)
    config, params = hf_checkpoint.load_hf(d)
    if args.capacity:
      capacity(args, config, params)
    elif args.spread:
      spread(args, config, params, hf, d)
    else:
      fixed_length(args, config, params, hf)


if __name__ == "__main__":
  main()
