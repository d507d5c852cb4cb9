"""Tokens/s of the jitted `forward` (the Flax modules) vs the functions it replaced (bench/functional_qwen2.py, the
same params and math) and transformers' PyTorch forward: same random Qwen2, batch, length, this CPU.

  python bench/forward.py [--batch 8] [--length 256] [--remat dots]

The Flax/functions ratio is the cost of the module machinery (it should be 1: both trace to the same program, which
the script checks by comparing their optimized HLO modulo names); the transformers ratio is the speed-up.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import best_of, matmul_peak_flops, torch_threads  # noqa: E402
from hf_models import make_hf_model  # noqa: E402
from functional_qwen2 import functional  # noqa: E402
from rlt_jax import hf_checkpoint, models  # noqa: E402
from sampling import cpu_name  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  args = ap.parse_args()
  torch.set_num_threads(torch_threads())
  shape = dict(vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768)
  with tempfile.TemporaryDirectory() as d:
    hf = make_hf_model(d, std=0.02, **shape)
    config, params = hf_checkpoint.load_hf(d)
  config = config.replace(remat=args.remat)
  ids = np.random.RandomState(0).randint(0, shape["vocab"], (args.batch, args.length))
  mask = np.ones_like(ids)
  fwd = jax.jit(models.forward, static_argnums=0)
  ids_j, mask_j = jax.device_put(ids), jax.device_put(mask)
  base = functional(config)
  fwd(config, params, ids_j, mask_j).block_until_ready()  # compile outside the timing
  fwd(base, params, ids_j, mask_j).block_until_ready()
  same = _program(fwd, config, params, ids_j, mask_j) == _program(fwd, base, params, ids_j, mask_j)
  ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)

  def peer():
    with torch.inference_mode():
      hf(input_ids=ids_t, attention_mask=mask_t).logits

  peer()
  t = best_of({"ours": lambda: fwd(config, params, ids_j, mask_j).block_until_ready(),
               "functions": lambda: fwd(base, params, ids_j, mask_j).block_until_ready(), "peer": peer}, args.repeats)
  tokens = args.batch * args.length
  n_params = models.num_params(params)
  flops = 2 * n_params * tokens + 4 * shape["layers"] * args.batch * args.length ** 2 * shape["hidden"]
  peak = matmul_peak_flops()
  ours, fn_tps, peer_tps = tokens / t["ours"], tokens / t["functions"], tokens / t["peer"]
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
  print(f"model {shape}, batch {args.batch}, length {args.length}, fp32, remat {args.remat}, torch threads "
        f"{torch.get_num_threads()}")
  print(f"ours (Flax) {ours:,.0f} tok/s ({flops / t['ours'] / 1e9:.1f} GFLOP/s = {flops / t['ours'] / peak:.0%} of the "
        f"measured {peak / 1e9:.1f} GFLOP/s matmul peak); functions {fn_tps:,.0f} tok/s; transformers "
        f"{peer_tps:,.0f} tok/s; optimized HLO identical to the functions': {same}")
  print(f"RESULT forward ours={ours:.0f} functions={fn_tps:.0f} peer={peer_tps:.0f} "
        f"flax_over_functions={ours / fn_tps:.2f} ratio={ours / peer_tps:.2f}")


def _program(fwd, config, *args) -> str:
  """The optimized HLO's instructions without names, metadata and stack frames (which carry the Python call sites)."""
  import re
  lines = [line for line in fwd.lower(config, *args).compile().as_text().splitlines()
           if line.startswith(("%", "ENTRY", "ROOT", "  ")) and "file_name_id" not in line]
  text = re.sub(r", metadata=\{[^}]*\}|, stack_frame_id=\d+", "", "\n".join(lines))
  return re.sub(r"[\w.-]+\.\d+", "x", re.sub(r"%[\w.-]+", "%x", text))


if __name__ == "__main__":
  main()
