"""Peak memory of `logprobs.token_logprobs` vs the naive full-logits computation at long context.

A narrow Qwen2 (hidden 64, 1 head, vocab 151,936, untied head: the vocabulary side of Qwen2.5) on one sequence of
T = 16,384 tokens at temperature 0.7:
  ours:  `token_logprobs` (chunked fp32 head + logsumexp, chunk bodies rematerialised in the backward pass).
  peer:  forward -> full [T, V] fp32 logits / T -> log_softmax -> gather (what the official code does, in fp32).
Both are measured by XLA's buffer assignment, `jit(f).lower(...).compile().memory_analysis()`: temp + argument +
output bytes, reported as MiB above the params (the argument bytes of the params). Compile-only, so the peer's
~19 GiB never has to exist on this shared machine. Ours is also run in a subprocess whose RSS is sampled every
2 ms during the call (peak minus the RSS just before it); `--run-peer` does the same for the peer (needs ~20 GiB).

Two depths are reported: 0 decoder layers (only the vocabulary side, which is what the chunking bounds) and
`--layers` (default 1; both columns run the same decoder, whose blocked attention holds O(block·T), not O(T^2)).
The RESULT line is the `--layers` model, forward only.

  python bench/reward_memory.py [--seq 16384] [--vocab 151936] [--layers 1] [--chunk 512] [--no-rss] [--run-peer]
Last line: RESULT reward_memory ours=<MiB> peer=<MiB> ratio=<r>
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MIB = 2**20


def setup(args, layers):
  import jax
  import jax.numpy as jnp
  from rlt_jax.models import decoder, logprobs
  from rlt_jax.models.config import ModelConfig

  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=args.hidden)

  def ours(params, ids, mask):
    return logprobs.token_logprobs(cfg, params, ids, mask, temperature=0.7, chunk_size=args.chunk)

  def peer(params, ids, mask):
    logits = decoder.forward(cfg, params, ids, mask) / 0.7
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros((ids.shape[0], 1)), picked], axis=1)

  def grad(f):
    return jax.grad(lambda p, i, m: jnp.sum(f(p, i, m)))

  def body(params, ids, mask):  # the decoder alone: what any log-prob computation pays before the vocabulary side
    return decoder.forward_hidden(cfg, params, ids, mask)

  return cfg, {"ours": ours, "peer": peer, "ours_grad": grad(ours), "peer_grad": grad(peer), "body": body}


def compiled_mib(args, layers):
  """{variant: (MiB above params, total MiB)} from XLA's memory analysis, and the params' MiB."""
  import jax
  import jax.numpy as jnp
  from rlt_jax.models import decoder
  cfg, fns = setup(args, layers)
  params = decoder.param_shapes(cfg)
  param_mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / MIB
  ids = jax.ShapeDtypeStruct((1, args.seq), jnp.int32)
  out = {}
  for name, fn in fns.items():
    ma = jax.jit(fn).lower(params, ids, ids).compile().memory_analysis()
    total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes) / MIB
    out[name] = (total - param_mib, total, (ma.temp_size_in_bytes + ma.output_size_in_bytes) / MIB)
  return out, param_mib


def rss_child(args):
  """Runs one variant once; prints the peak RSS growth during the call (MiB) as JSON."""
  import jax
  import numpy as np
  from rlt_jax.models import decoder
  cfg, fns = setup(args, args.layers)
  params = decoder.init_params(cfg, jax.random.PRNGKey(0))
  ids = np.random.RandomState(0).randint(0, args.vocab, (1, args.seq)).astype(np.int32)
  mask = np.ones_like(ids)
  f = jax.jit(fns[args.rss_child]).lower(params, ids, mask).compile()
  page = os.sysconf("SC_PAGE_SIZE")

  def rss():
    with open("/proc/self/statm") as fh:
      return int(fh.read().split()[1]) * page

  peak, done = [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss())
      time.sleep(0.002)

  base = rss()
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(params, ids, mask))
  dt = time.perf_counter() - t0
  done.set()
  thread.join()
  assert np.isfinite(np.asarray(out)).all()
  print(json.dumps({"peak_growth_mib": (max(peak[0], rss()) - base) / MIB, "seconds": dt}))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq", type=int, default=16384)
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--chunk", type=int, default=512)
  ap.add_argument("--no-rss", action="store_true", help="skip running ours in a subprocess")
  ap.add_argument("--run-peer", action="store_true", help="also run the peer (needs about 20 GiB of RAM)")
  ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.rss_child:
    return rss_child(args)

  print(f"T={args.seq} V={args.vocab} D={args.hidden} chunk={args.chunk}; MiB above params "
        "(XLA memory_analysis: temp + arguments + outputs - params)")
  result = None
  for layers in sorted({0, args.layers}):
    mib, param_mib = compiled_mib(args, layers)
    what = "vocabulary side only" if layers == 0 else "same blocked-attention decoder in both"
    print(f"layers={layers} ({what}), params {param_mib:.1f} MiB:")
    for kind in ("", "_grad"):
      o, p = mib["ours" + kind], mib["peer" + kind]
      print(f"  {'forward' if not kind else 'gradient':8s} ours={o[0]:9.1f} peer={p[0]:9.1f} ratio={p[0] / o[0]:6.1f}"
            f"   (totals {o[1]:.1f} / {p[1]:.1f} MiB)")
    print(f"  model body alone (decoder.forward_hidden, forward): {mib['body'][2]:.1f} MiB of temps + outputs")
    if layers == args.layers:
      result = (mib["ours"][0], mib["peer"][0])
  variants = ([] if args.no_rss else ["ours"]) + (["peer"] if args.run_peer else [])
  for name in variants:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", name] + [
        f"--{k}={getattr(args, k)}" for k in ("seq", "vocab", "hidden", "layers", "chunk")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
      print(f"{name}: RSS run failed (rc {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
      continue
    res = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"measured RSS growth during one {name} call (layers={args.layers}): {res['peak_growth_mib']:.1f} MiB "
          f"in {res['seconds']:.1f}s")
  ours, peer = result
  print(f"RESULT reward_memory ours={ours:.1f} peer={peer:.1f} ratio={peer / ours:.2f}")


if __name__ == "__main__":
  main()
