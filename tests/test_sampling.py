"""rlt_jax.sampling against independent oracles.

- greedy tokens: transformers `generate(do_sample=False)` on the same random tiny Qwen2 (left-padded prompts);
- returned log-probs: a teacher-forced `decoder.forward` of the finished sequences (what the RL loss recomputes);
- temperature: a chi-square test of 4,096 draws against softmax(logits / T) from the transformers logits;
- top-k / top-p: every emitted token lies in the set computed in NumPy from teacher-forced logits;
- sharding: greedy output on 8 fake devices ((8,1,1) and (2,2,2) meshes) equals the single-device output.
- schedule: shedding finished rows and unwritten cache slots (decode.Schedule) gives the whole loop's tokens and
  log-probs exactly, on 1 and 8 devices, while computing fewer rows and reading fewer slots (its own counters), and
  the slots a call reads do not grow with max_new_tokens.
- decode speed: XLA's compiled decode loop transposes no KV cache on any step.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

import hlo_text
from hf_models import hf_logits, make_hf_model
from rlt_jax import hf_checkpoint, sampling, sharding
from rlt_jax.decode import WHOLE, Schedule
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

V = 128
_forward = jax.jit(decoder.forward, static_argnums=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.set_num_threads(1)
  path = tmp_path_factory.mktemp("tiny_qwen2")
  model = make_hf_model(path, vocab=V, hidden=64, layers=2, heads=4, kv_heads=2, seed=1)
  config, params = hf_checkpoint.load_hf(path)
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
    _, sharded_params = hf_checkpoint.load_hf(path, mesh=mesh)
    with sharding.use_mesh(mesh):
      out = sampling.sample(config, sharded_params, ids, mask, jax.random.key(0), **kw)
    assert len(out.tokens.sharding.device_set) == 8, f"mesh {shape}: output is not spread over the mesh"
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=f"mesh {shape}")
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_kv_cache_size_and_dtype(qwen_dir):
  config = ModelConfig.from_hf(qwen_dir, dtype="bfloat16", param_dtype="bfloat16")
  # Qwen2.5-0.5B: 24 layers × 2 kv heads × 64 dims × (k, v) × 2 bytes = 12 KiB per token slot. The 1,000 generation
  # slots are allocated as whole 256-slot windows (1,024); without windows, exactly 1,000.
  assert sampling.kv_cache_bytes(config, 16, 1000, 1001, 64) == 12288 * (16 * 1000 + 16 * 64 * 1024)
  assert sampling.kv_cache_bytes(config, 16, 1000, 1001, 64, window=0) == 12288 * (16 * 1000 + 16 * 64 * 1000)
  tiny = config.replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
  params = jax.eval_shape(lambda: decoder.init_params(tiny, jax.random.key(0)))
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
  comps = hlo_text.computations(hlo)
  loop = hlo_text.reachable(comps, hlo_text.while_bodies(comps))
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
  # What keeps the decode step fast on CPU (bench/sampling.py): no per-step transpose or copy of a layer's prompt or
  # generation cache, nor of the whole caches (the oracle is XLA's own compiled program). Shapes are chosen so no
  # other array matches them.
  _, config, params, _ = tiny
  B, P, T = 3, 5, 7
  K, E = config.num_kv_heads, config.head_dim
  ids, mask = left_padded([5, 2, 4], P, seed=7)
  cache, logits = sampling.prefill(config, params, ids, mask)
  compiled = sampling.decode.lower(
      config, params, cache, logits, jax.random.key(0), 1.0, 1.0, (3,), 0, max_new_tokens=T, num_samples=1, greedy=True, top_k=None, use_top_p=False).compile()
  hlo = compiled.as_text()
  assert "while" in hlo, "premise: decode is one while loop"
  L = config.num_layers
  # A layer's slices of both caches, in either layout, and the whole stacked caches as the loop keeps them ([L,
  # devices, rows a device, K, slots, E]): XLA once copied those in and out of the layer loop on every step.
  shapes = {(B, K, T - 1, E), (B, T - 1, K, E), (B, K, P, E), (B, P, K, E), (L, 1, B, K, T - 1, E),
            (L, 1, B, K, P, E)}
  bad, seen = _loop_ops_of_shape(hlo, shapes)
  assert seen > 0, "premise: the loop body was found and handles the caches"
  assert bad == [], "\n".join(bad)


# Small enough that 16 rows of 64 tokens go through every stage: on 2x1x4 (rows over 2 devices, 2 prompts each) the
# slots of each prompt are halved down to 1, then the prompts themselves.
SHED = Schedule(window=4, buckets=4, min_rows=2)


@pytest.mark.parametrize("mesh_shape", [None, (8, 1, 1), (2, 1, 4)], ids=["1-device", "8x1x1", "2x1x4"])
def test_schedule_sheds_work_and_changes_no_result(tiny, mesh_shape):
  _, config, params, path = tiny
  P, M, T = 10, 4, 64
  ids, mask = left_padded([10, 3, 7, 5], P, seed=0)
  kw = dict(max_new_tokens=T, temperature=1.0, num_samples=M, eos_ids=(3, 9, 17, 33))
  whole = sampling.sample(config, params, ids, mask, jax.random.key(0), schedule=WHOLE, **kw)
  lengths = np.asarray(whole.lengths)
  assert lengths.min() < 8 and lengths.max() == T and (lengths < 32).sum() >= 8, f"premise: spread {lengths}"
  if mesh_shape is None:
    out = sampling.sample(config, params, ids, mask, jax.random.key(0), schedule=SHED, **kw)
  else:
    mesh = sharding.make_mesh(mesh_shape)
    _, sharded = hf_checkpoint.load_hf(path, mesh=mesh)
    with sharding.use_mesh(mesh):
      out = sampling.sample(config, sharded, ids, mask, jax.random.key(0), schedule=SHED, **kw)
  for field in ("tokens", "lengths", "finished"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(whole, field)), err_msg=field)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(whole.logprobs), atol=1e-5)
  # The log-probs are still those of a teacher-forced forward of the finished sequences.
  expected, _ = teacher_forced_logprobs(config, params, ids, mask, out, M, 1.0)
  np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=2e-4)
  # The whole loop computes all 16 rows for 63 steps and reads all 63 slots; shedding computes fewer rows (but every
  # live one) and reads a window that follows the furthest row.
  R = len(lengths)
  assert float(whole.row_steps) == R * (T - 1) and float(whole.slots_read) == R * (T - 1) * (T - 1)
  assert (lengths - 1).sum() <= float(out.row_steps) < 0.75 * float(whole.row_steps)
  assert float(out.slots_read) < 0.4 * float(whole.slots_read)


def test_decode_reads_follow_the_tokens_written_not_the_budget(tiny):
  _, config, params, _ = tiny
  ids, mask = left_padded([10, 3, 7, 5], 10, seed=2)
  kw = dict(temperature=1.0, num_samples=4, eos_ids=tuple(range(3, 19)))  # 16 of 128 ids: rows stop early
  out = {T: sampling.sample(config, params, ids, mask, jax.random.key(1), max_new_tokens=T,
                            schedule=Schedule(window=8), **kw) for T in (64, 512)}
  assert np.asarray(out[64].finished).all(), "premise: every row stops within 64 tokens"
  np.testing.assert_array_equal(np.asarray(out[512].tokens)[:, :64], np.asarray(out[64].tokens))
  assert float(out[512].slots_read) == float(out[64].slots_read)  # the same windows, whatever the budget
  assert float(out[512].row_steps) == float(out[64].row_steps)
  whole = sampling.sample(config, params, ids, mask, jax.random.key(1), max_new_tokens=512, schedule=WHOLE, **kw)
  assert float(whole.slots_read) > 8 * float(out[512].slots_read)  # the whole loop reads all 511 slots a step
