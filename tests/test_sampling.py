"""rlt_jax.sampling against independent oracles.

- greedy tokens: transformers `generate(do_sample=False)` on the same random tiny Qwen2 (left-padded prompts);
- returned log-probs: a teacher-forced `qwen2.forward` of the finished sequences (what the RL loss recomputes);
- temperature: a chi-square test of 4,096 draws against softmax(logits / T) from the transformers logits;
- top-k / top-p: every emitted token lies in the set computed in NumPy from teacher-forced logits;
- sharding: greedy output on 8 fake devices ((8,1,1) and (2,2,2) meshes) equals the single-device output.
- decode speed: XLA's compiled decode loop transposes no KV cache on any step.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from hf_models import hf_logits, make_hf_model
from rlt_jax import checkpoint, sampling, sharding
from rlt_jax.models import qwen2
from rlt_jax.models.config import ModelConfig

V = 128
_forward = jax.jit(qwen2.forward, static_argnums=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.set_num_threads(1)
  path = tmp_path_factory.mktemp("tiny_qwen2")
  model = make_hf_model(path, vocab=V, hidden=64, layers=2, heads=4, kv_heads=2, seed=1)
  config, params = checkpoint.load_hf(path)
  return model, config, params, path


def left_padded(lengths, P, seed):
  rs = np.random.RandomState(seed)
  ids = np.zeros((len(lengths), P), np.int64)
  mask = np.zeros((len(lengths), P), np.int64)
  for b, n in enumerate(lengths):
    ids[b, P - n:] = rs.randint(1, V, n)
    mask[b, P - n:] = 1
  return ids, mask


def teacher_forced_logprobs(config, params, ids, mask, out, num_samples, temperature):
  """log softmax(logits / T) of each generated token from one forward over prompt + generated tokens (NumPy after)."""
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  N = tokens.shape[1]
  seq = np.concatenate([np.repeat(ids, num_samples, 0), tokens], 1)
  seq_mask = np.concatenate([np.repeat(mask, num_samples, 0), np.arange(N)[None] < lengths[:, None]], 1)
  logits = np.asarray(_forward(config, params, seq, seq_mask), np.float64)
  P = ids.shape[1]
  step_logits = logits[:, P - 1:P - 1 + N] / temperature  # position P−1+j predicts generated token j
  logp = step_logits - np.logaddexp.reduce(step_logits, axis=-1, keepdims=True)
  lp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  return np.where(np.arange(N)[None] < lengths[:, None], lp, 0.0), step_logits


def test_greedy_matches_transformers_generate(tiny):
  model, config, params, _ = tiny
  P, N, M = 12, 12, 2
  ids, mask = left_padded([5, 9, 12], P, seed=0)
  kw = dict(attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=N, pad_token_id=0)
  free = model.generate(torch.tensor(ids), eos_token_id=None, **kw)[:, P:].numpy()
  eos = (int(free[0, 4]), int(V - 1))  # row 0 ends by step 4; the others may run on
  hf = model.generate(torch.tensor(ids), eos_token_id=list(eos), **kw)[:, P:].numpy()
  hf = np.pad(hf, ((0, 0), (0, N - hf.shape[1])))  # generate stops once all rows end; the rest is padding
  hits = np.isin(hf, eos)
  hf_finished = hits.any(1)
  hf_len = np.where(hf_finished, hits.argmax(1) + 1, N)
  assert hf_finished.any() and not hf_finished.all(), "premise: some rows end early, some run to max_new_tokens"

  out = sampling.sample(config, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                        eos_ids=eos, num_samples=M, pad_id=0)
  assert out.tokens.shape == (3 * M, N) and out.logprobs.shape == (3 * M, N)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(hf, M, 0))
  np.testing.assert_array_equal(np.asarray(out.lengths), np.repeat(hf_len, M))
  np.testing.assert_array_equal(np.asarray(out.finished), np.repeat(hf_finished, M))
  # Greedy log-probs are of softmax(logits) at T = 1; padding gets 0.
  want, _ = teacher_forced_logprobs(config, params, ids, mask, out, M, 1.0)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def test_long_prompts_prefill_with_blocked_attention(tiny):
  """Prompts longer than one attention block are prefilled with tiled attention: the same tokens as transformers."""
  model, config, params, _ = tiny
  P, N = 12, 8
  ids, mask = left_padded([5, 9, 12], P, seed=3)
  hf = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=N,
                      min_new_tokens=N, pad_token_id=0, eos_token_id=None)[:, P:].numpy()
  blocked = config.replace(attention_block=4)  # P = 12 > 4: prefill takes the blocked path
  out = sampling.sample(blocked, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), hf)
  want, _ = teacher_forced_logprobs(config, params, ids, mask, out, 1, 1.0)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def test_sampled_logprobs_match_teacher_forced_forward(tiny):
  _, config, params, _ = tiny
  P, N, M, T = 10, 12, 3, 0.7
  ids, mask = left_padded([10, 4], P, seed=1)
  kw = dict(max_new_tokens=N, temperature=T, num_samples=M, pad_id=5)
  # The draws before a row's eos do not depend on eos_ids, so a first run picks an eos that ends row 0 at step 3
  # (same shapes, so no second compilation).
  first = sampling.sample(config, params, ids, mask, jax.random.key(1), eos_ids=(V - 1,), **kw)
  eos = (int(first.tokens[0, 3]),)
  out = sampling.sample(config, params, ids, mask, jax.random.key(1), eos_ids=eos, **kw)
  tokens, lengths, finished = (np.asarray(x) for x in (out.tokens, out.lengths, out.finished))
  assert finished.any() and not finished.all(), "premise: a mix of finished and unfinished rows"
  assert len({tuple(r) for r in tokens}) > 1, "samples of a prompt should differ"
  for r in range(tokens.shape[0]):  # eos semantics: the row ends at its first eos, padding after it
    gen = tokens[r, :lengths[r]]
    assert not np.isin(gen[:-1], eos).any()
    assert np.isin(gen[-1], eos) == finished[r]
    assert (tokens[r, lengths[r]:] == 5).all()
  want, _ = teacher_forced_logprobs(config, params, ids, mask, out, M, T)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def _chi_square_p(counts, probs):
  """p-value of observed counts against probabilities, lumping categories with expected count < 5."""
  expected = probs * counts.sum()
  big = expected >= 5
  obs, exp = counts[big], expected[big]
  if not big.all():
    obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
  return scipy.stats.chisquare(obs, exp).pvalue


def test_temperature_frequencies_match_softmax(tiny):
  model, config, params, _ = tiny
  P, M, T = 8, 4096, 1.5
  ids, mask = left_padded([8], P, seed=2)
  out = sampling.sample(config, params, ids, mask, jax.random.key(2), max_new_tokens=1, temperature=T,
                        num_samples=M)
  counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=V)
  z = hf_logits(model, ids, mask)[0, -1].astype(np.float64)  # the transformers model as the oracle
  softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
  assert _chi_square_p(counts, softmax(z / T)) > 1e-3
  # Power: the same draws reject the wrong temperatures.
  assert _chi_square_p(counts, softmax(z)) < 1e-3
  assert _chi_square_p(counts, softmax(z / 3.0)) < 1e-3


@pytest.mark.parametrize("top_k,top_p", [(4, None), (None, 0.3)])
def test_top_k_top_p_never_emit_excluded_tokens(tiny, top_k, top_p):
  _, config, params, _ = tiny
  P, N, M, T = 8, 8, 16, 2.0
  ids, mask = left_padded([8, 5], P, seed=3)
  out = sampling.sample(config, params, ids, mask, jax.random.key(3), max_new_tokens=N, temperature=T,
                        top_k=top_k, top_p=top_p, num_samples=M)
  tokens = np.asarray(out.tokens)
  want_lp, z = teacher_forced_logprobs(config, params, ids, mask, out, M, T)
  # The returned log-prob is of the unfiltered softmax(logits / T).
  np.testing.assert_allclose(np.asarray(out.logprobs), want_lp, atol=1e-4)
  order = np.argsort(-z, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1)  # rank of every token, 0 = most likely
  tok_rank = np.take_along_axis(rank, tokens[..., None], -1)[..., 0]
  probs = np.exp(z - np.logaddexp.reduce(z, axis=-1, keepdims=True))
  if top_k is not None:
    allowed = rank < top_k
    assert (tok_rank < top_k).all(), f"a token outside the top {top_k} was emitted"
  else:
    sorted_p = np.take_along_axis(probs, order, -1)
    before = np.cumsum(sorted_p, -1) - sorted_p
    allowed = np.take_along_axis(before < top_p, rank, -1)
    tok_before = np.take_along_axis(before, tok_rank[..., None], -1)[..., 0]
    assert (tok_before < top_p + 1e-5).all(), f"a token outside the top-p={top_p} nucleus was emitted"
  # Power: without the filter about this many excluded tokens would have been drawn.
  assert (probs * ~allowed).sum() > 20
  assert len(np.unique(tokens)) > 2


def test_sharded_greedy_equals_single_device(tiny):
  _, config, params, path = tiny
  P, N, M = 12, 8, 2
  ids, mask = left_padded([12, 3, 7, 10], P, seed=4)
  kw = dict(max_new_tokens=N, temperature=0.0, num_samples=M, eos_ids=(9,))
  ref = sampling.sample(config, params, ids, mask, jax.random.key(0), **kw)
  for shape in [(8, 1, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(shape)
    _, sharded_params = checkpoint.load_hf(path, mesh=mesh)
    with sharding.use_mesh(mesh):
      out = sampling.sample(config, sharded_params, ids, mask, jax.random.key(0), **kw)
    assert len(out.tokens.sharding.device_set) == 8, f"mesh {shape}: output is not spread over the mesh"
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=f"mesh {shape}")
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_kv_cache_size_and_dtype(qwen_dir):
  config = ModelConfig.from_hf(qwen_dir, dtype="bfloat16", param_dtype="bfloat16")
  # Qwen2.5-0.5B: 24 layers × 2 kv heads × 64 dims × (k, v) × 2 bytes = 12 KiB per token slot.
  assert sampling.kv_cache_bytes(config, 16, 1000, 1001, 64) == 12288 * (16 * 1000 + 16 * 64 * 1000)
  tiny = config.replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
  params = jax.eval_shape(lambda: qwen2.init_params(tiny, jax.random.key(0)))
  ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
  cache, logits = jax.eval_shape(lambda p, i: sampling.prefill(tiny, p, i, jnp.ones(i.shape, bool)), params, ids)
  assert cache.k.shape == (2, 2, 5, 2, 8) and cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("change,message", [
    (dict(mask=[[1, 1, 0], [1, 1, 1]]), "row 0 is not left-padded"),
    (dict(mask=[[1, 1, 1], [0, 0, 0]]), "row 1 has no real token"),
    (dict(ids=[[1, 2, 3], [4, 5, 999]]), "row 1 holds token ids outside"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_ids=(V,)), "eos_ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_input_gives_clear_error(tiny, change, message):
  _, config, params, _ = tiny
  args = dict(ids=[[1, 2, 3], [4, 5, 6]], mask=[[1, 1, 1], [1, 1, 1]], temperature=1.0, max_new_tokens=2)
  args.update(change)
  ids, mask = np.asarray(args.pop("ids")), np.asarray(args.pop("mask"))
  with pytest.raises(ValueError, match=message):
    sampling.sample(config, params, ids, mask, jax.random.key(0), **args)


def _loop_ops_of_shape(hlo: str, shapes) -> tuple[list[str], int]:
  """Copies and transposes (alone or inside a fusion) inside the while loops of compiled HLO text whose result has
  one of `shapes`, and how many loop instructions have one of `shapes` at all."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None and line.strip() and line != "}":
      comps[name].append(line.strip())
  calls = {c: set(re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", "\n".join(ls)))
           for c, ls in comps.items()}
  todo = [b for ls in comps.values() for line in ls for b in re.findall(r"\bbody=%([\w.\-]+)", line)]
  loop = set()
  while todo:
    c = todo.pop()
    if c not in loop:
      loop.add(c)
      todo.extend(calls.get(c, ()))
  bad, seen = [], 0
  for c in loop:
    for line in comps[c]:
      m = re.match(r"(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)", line)
      if not m or tuple(int(d) for d in m.group(1).split(",") if d) not in shapes:
        continue
      seen += 1
      op = m.group(2)
      if op in ("copy", "transpose"):
        bad.append(line)
      elif op == "fusion":
        callee = re.search(r"calls=%([\w.\-]+)", line).group(1)
        if any(re.search(r" (copy|transpose)\(", ls) for ls in comps[callee]):
          bad.append(line)
  return bad, seen


def test_decode_loop_moves_no_cache(tiny):
  # What keeps the decode step fast on CPU (bench/sampling.py): no per-step transpose of a layer's prompt or
  # generation cache (the oracle is XLA's own compiled program). Shapes are chosen so no other array matches them.
  _, config, params, _ = tiny
  B, P, T = 3, 5, 7
  K, E = config.num_kv_heads, config.head_dim
  ids, mask = left_padded([5, 2, 4], P, seed=7)
  cache, logits = sampling.prefill(config, params, ids, mask)
  compiled = sampling.decode.lower(
      config, params, cache, logits, jax.random.key(0), jnp.float32(1), jnp.float32(1), jnp.asarray([3], jnp.int32),
      jnp.int32(0), max_new_tokens=T, num_samples=1, greedy=True, top_k=None, use_top_p=False).compile()
  hlo = compiled.as_text()
  assert "while" in hlo, "premise: decode is one while loop"
  shapes = {(B, K, T - 1, E), (B, T - 1, K, E), (B, K, P, E), (B, P, K, E)}
  bad, seen = _loop_ops_of_shape(hlo, shapes)
  assert seen > 0, "premise: the loop body was found and handles the caches"
  assert bad == [], "\n".join(bad)
