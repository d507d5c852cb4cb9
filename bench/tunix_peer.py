"""A sampling-benchmark peer: Google's Tunix `Sampler` generating from a local HF Qwen2 checkpoint.

Runs in its own virtualenv (Tunix pins older transformers/safetensors than rlt_jax), built by bench/setup_tunix.sh:

  bash bench/setup_tunix.sh
  bench/.tunix-venv/bin/python bench/tunix_peer.py --model DIR --prompts FILE.npz --max-new N --temperature T \
      [--top-p P] --eos ID [--eos ID ...] --repeats K

DIR: a `Qwen2ForCausalLM.save_pretrained` directory (config.json + *.safetensors; no tokenizer needed). FILE.npz:
`ids` [B, P] left-padded prompt ids and `mask` [B, P] (1 on real tokens). The checkpoint is loaded with Tunix's own
safetensors loader into tunix.models.qwen2, and the prompts go through `Sampler.__call__` as strings of ids
("12 7 99") with a minimal id tokenizer, so Tunix sees exactly these ids, left-padded with pad id 0 to width P.

The first call (compile + one run) is timed as compile_s; then the best of --repeats calls. Generated tokens = per
row, tokens up to and including the first eos (N if none), summed. Stdout carries exactly one line of JSON:
  {"tokens", "seconds", "tokens_per_s", "compile_s", "batch", "cache_size", "tunix"}
everything else goes to stderr.
"""
import argparse
import importlib.metadata
import json
import os
import sys
import time

import numpy as np

PAD = 0


class IdTokenizer:
  """The duck-typed tokenizer Tunix's TokenizerAdapter accepts (encode/decode/bos_id/eos_id/pad_id) over
  space-separated ids."""

  def __init__(self, eos_id):
    self._eos = eos_id

  def encode(self, text, **kwargs):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None  # Sampler.tokenize prepends bos_id() whenever it is truthy: the prompts carry their own

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return PAD


def tunix_config(model_dir, dtype):
  """tunix.models.qwen2.ModelConfig matching the checkpoint's config.json (refusing what Tunix's Qwen2 lacks)."""
  from tunix.models.qwen2 import model as qwen2
  with open(os.path.join(model_dir, "config.json")) as f:
    c = json.load(f)
  # transformers 5 keeps rope_theta under rope_parameters; older configs have it at top level.
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default" or c.get("use_sliding_window") or c.get("hidden_act") != "silu":
    raise SystemExit(f"tunix_peer: Tunix's Qwen2 has plain RoPE, full attention and SiLU only; got {c}")
  heads = c["num_attention_heads"]
  return qwen2.ModelConfig(
      num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
      hidden_dim=c["intermediate_size"], num_heads=heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
      num_kv_heads=c["num_key_value_heads"], rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
      norm_eps=c["rms_norm_eps"], use_tied_embedding=c.get("tie_word_embeddings", False), dtype=dtype,
      param_dtype=dtype)


def load_model(model_dir, dtype_name="float32"):
  """(Tunix Qwen2 nnx module with the checkpoint's weights, its ModelConfig)."""
  import jax.numpy as jnp
  from tunix.models.qwen2 import params
  dtype = jnp.dtype(dtype_name)
  cfg = tunix_config(model_dir, dtype)
  return params.create_model_from_safe_tensors(model_dir, cfg, dtype=dtype), cfg


def read_prompts(path):
  """(prompt strings for the id tokenizer, the [B, P] padded ids Tunix should build from them)."""
  data = np.load(path)
  ids, mask = np.asarray(data["ids"], np.int64), np.asarray(data["mask"]).astype(bool)
  if ids.shape != mask.shape or ids.ndim != 2:
    raise SystemExit(f"tunix_peer: ids {ids.shape} and mask {mask.shape} must both be [B, P]")
  if (np.diff(mask.astype(np.int8), axis=1) < 0).any() or not mask[:, -1].all():
    raise SystemExit("tunix_peer: prompts must be left-padded, each with at least one real token")
  if (ids[mask] == PAD).any():
    # Tunix derives its prompt mask as `token != pad_id`, so a real token 0 would silently become padding.
    raise SystemExit(f"tunix_peer: a real prompt token equals the pad id {PAD}; Tunix would mask it out")
  prompts = [" ".join(map(str, row[m])) for row, m in zip(ids, mask)]
  return prompts, np.where(mask, ids, PAD)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True)
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--max-new", type=int, required=True)
  ap.add_argument("--temperature", type=float, required=True)
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--eos", type=int, action="append", required=True)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="float32", help="compute and parameter dtype (float32, bfloat16)")
  args = ap.parse_args()
  if args.repeats < 1 or args.max_new < 1:
    ap.error("--repeats and --max-new must be at least 1")

  # Only the result line may reach stdout: point fd 1 at stderr while Tunix/JAX run, restore it for the result.
  stdout = os.dup(1)
  os.dup2(2, 1)
  try:
    result = run(args)
  finally:
    sys.stdout.flush()
    os.dup2(stdout, 1)
  print(json.dumps(result), flush=True)


def run(args):
  from tunix.generate import sampler as sampler_lib

  prompts, padded = read_prompts(args.prompts)
  batch, width = padded.shape
  n = args.max_new
  model, cfg = load_model(args.model, args.dtype)
  # Tunix requires prompt width + max_generation_steps <= cache_size; the smallest legal cache is also the
  # cheapest, since every decode step attends over the whole cache.
  cache_size = width + n
  # One Sampler per eos set: its jitted decode loop bakes in the eos ids of the first call.
  sampler = sampler_lib.Sampler(
      model, IdTokenizer(args.eos[0]),
      sampler_lib.CacheConfig(cache_size=cache_size, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                              head_dim=cfg.head_dim))
  # Tunix samples only in top_p mode; with top_p=None it decodes greedily whatever the temperature. top_p=1.0 is
  # its full-vocabulary categorical path (no sort).
  top_p = None if args.temperature == 0 else (1.0 if args.top_p is None else args.top_p)

  def generate():
    t0 = time.perf_counter()
    # max_prompt_length=width keeps Tunix's padded layout the same as ours (it otherwise rounds up to a power of 2).
    out = sampler(prompts, max_generation_steps=n, max_prompt_length=width, temperature=args.temperature,
                  top_p=top_p, eos_tokens=args.eos, seed=args.seed)
    seconds = time.perf_counter() - t0
    # out.tokens[i] stops just before row i's first eos (or holds all n tokens): count the eos itself too.
    return sum(min(len(t) + 1, n) for t in out.tokens), seconds, out

  _, compile_s, out = generate()
  if not np.array_equal(out.padded_prompt_tokens, padded):
    raise SystemExit("tunix_peer: Tunix built different prompt ids than the given ones")
  best_tokens, best_s = None, float("inf")
  for _ in range(args.repeats):
    tokens, seconds, _ = generate()
    print(f"tunix_peer: {tokens} tokens in {seconds:.3f} s", file=sys.stderr)
    if seconds < best_s:
      best_tokens, best_s = tokens, seconds
  return {"tokens": best_tokens, "seconds": best_s, "tokens_per_s": best_tokens / best_s, "compile_s": compile_s,
          "batch": batch, "cache_size": cache_size, "tunix": importlib.metadata.version("google-tunix")}


if __name__ == "__main__":
  main()
