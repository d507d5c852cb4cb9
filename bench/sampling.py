"""Generated tokens/s of `sampling.sample` vs transformers `model.generate` (PyTorch): same tiny Qwen2, this CPU.

Both run prefill + decode of `--new` tokens for `--batch` prompts of `--prompt` tokens, eos ignored so both produce
the same number of tokens; greedy by default (`--temperature T` samples). Times are interleaved best-of-N.

  python bench/sampling.py [--batch 16] [--prompt 64] [--new 128] [--temperature 0] [--tiny]

The default model has hidden 256 and 4 layers; `--tiny` uses the shape of the default RL run's models
(configs/tiny.py: hidden 64, 2 layers), where a decode step's matmuls are so small that per-token overheads decide.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import best_of, torch_threads  # noqa: E402
from hf_models import make_hf_model  # noqa: E402
from rlt_jax import checkpoint, sampling  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--tiny", action="store_true", help="the model shape of configs/tiny.py (hidden 64, 2 layers)")
  args = ap.parse_args()
  torch.set_num_threads(torch_threads())
  shape = dict(vocab=1024, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
  if args.tiny:
    shape = dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, inter=128)
  with tempfile.TemporaryDirectory() as d:
    hf = make_hf_model(d, std=0.02, **shape)
    config, params = checkpoint.load_hf(d)
  hf.generation_config.eos_token_id = None  # run every row to --new tokens, as ours does with eos_ids=()
  rs = np.random.RandomState(0)
  B, P, N = args.batch, args.prompt, args.new
  lengths = rs.randint(P // 2, P + 1, B)  # left-padded prompts of different lengths
  mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int64)
  ids = rs.randint(1, shape["vocab"], (B, P)) * mask
  ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
  greedy = args.temperature == 0
  rng = jax.random.key(0)

  def ours():
    out = sampling.sample(config, params, ids, mask, rng, max_new_tokens=N, temperature=args.temperature)
    return jax.block_until_ready(out)

  def peer():
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=None)
    with torch.inference_mode():
      return hf.generate(ids_t, attention_mask=mask_t, max_new_tokens=N, min_new_tokens=N, pad_token_id=0, **kw)

  t0 = time.perf_counter()
  out = ours()  # compile outside the timing
  compile_s = time.perf_counter() - t0
  ref = peer()
  assert out.tokens.shape == (B, N) and ref.shape == (B, P + N)
  if greedy:
    agree = float((np.asarray(out.tokens) == ref[:, P:].numpy()).mean())
    print(f"greedy agreement with transformers: {agree:.3f} of tokens")
  cache, logits = sampling.prefill(config, params, ids, mask)
  prefill_s = best_of({"prefill": lambda: jax.block_until_ready(sampling.prefill(config, params, ids, mask))},
                      args.repeats)["prefill"]
  t = best_of({"ours": ours, "peer": peer}, args.repeats)
  tokens = B * N
  ours_tps, peer_tps = tokens / t["ours"], tokens / t["peer"]
  print(f"model {shape}, fp32, batch {B}, prompt {P} (left-padded, {lengths.min()}-{lengths.max()} real), {N} new "
        f"tokens, {'greedy' if greedy else f'T={args.temperature}'}, torch threads {torch.get_num_threads()}, "
        f"jax devices {jax.device_count()}")
  print(f"ours: {t['ours'] * 1e3:.1f} ms ({prefill_s * 1e3:.1f} ms prefill; first call with compile {compile_s:.1f} s)"
        f"; transformers generate: {t['peer'] * 1e3:.1f} ms")
  print(f"ours decode-only: {B * (N - 1) / (t['ours'] - prefill_s):,.0f} tok/s; "
        f"KV cache {sampling.kv_cache_bytes(config, B, P, N) / 2**20:.2f} MiB")
  print(f"RESULT sampling ours={ours_tps:.0f} peer={peer_tps:.0f} ratio={ours_tps / peer_tps:.2f}")


if __name__ == "__main__":
  main()
