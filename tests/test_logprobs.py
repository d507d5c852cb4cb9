"""rlt_jax.models.logprobs against independent oracles: a naive full-logits log-softmax (NumPy float64 on the model's
logits) and the gradient of a naive full-logits JAX version; a jaxpr walk shows no [B, T, V]-sized logits exist,
forward or backward."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import np_token_logprobs
from rlt_jax.models import decoder, logprobs
from rlt_jax.models.config import ModelConfig

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)
logprobs_jit = jax.jit(logprobs.token_logprobs, static_argnames=("config", "temperature", "chunk_size"))


@pytest.fixture(scope="module")
def tiny():
  params = decoder.init_params(TINY, jax.random.PRNGKey(0), std=0.3)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, TINY.vocab_size, (3, 37)).astype(np.int32)
  mask = np.ones((3, 37), np.int32)
  mask[1, 30:] = 0  # right padding
  mask[2, :5] = 0   # left padding
  return params, ids, mask


def test_token_logprobs_matches_full_logits(tiny):
  params, ids, mask = tiny
  # chunk 8 does not divide T = 37: the last chunk is padded
  got = np.asarray(logprobs_jit(TINY, params, ids, mask, temperature=0.7, chunk_size=8))
  ref = np_token_logprobs(decoder.forward(TINY, params, ids, mask), ids, 0.7)
  assert got.shape == (3, 37) and got.dtype == np.float32
  assert np.all(got[:, 0] == 0)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert ref[:, 1:].std() > 0.5  # the distributions are far from uniform, so the check has teeth


def test_the_last_tokens_alone_match_the_oracle_and_project_only_their_positions(tiny):
  params, ids, mask = tiny
  ref = np_token_logprobs(decoder.forward(TINY, params, ids, mask), ids, 0.7)
  fn = lambda p, n: logprobs.token_logprobs(TINY, p, ids, mask, temperature=0.7, chunk_size=8, last=n)  # noqa: E731
  for n in (1, 12, 36):
    got = np.asarray(jax.jit(fn, static_argnums=1)(params, n))
    assert got.shape == (3, n)
    np.testing.assert_allclose(got, ref[:, -n:], atol=1e-5, rtol=0)
  # The vocabulary projection sees only the 13 positions that predict the last 12 tokens: 2 chunks of 8, not 5.
  jaxpr = jax.make_jaxpr(lambda p: fn(p, 12))(params).jaxpr
  assert _max_vocab_array(jaxpr, TINY.vocab_size) == 3 * 8 * TINY.vocab_size
  full = jax.make_jaxpr(lambda p: fn(p, None))(params).jaxpr
  scans = lambda j: sorted(e.params["length"] for e in _all_eqns(j) if e.primitive.name == "scan")  # noqa: E731
  assert scans(full) == [2, 5] and scans(jaxpr) == [2, 2]  # the layer scan, then the chunk map: 5 chunks -> 2
  with pytest.raises(ValueError, match=r"last=37 must be in \[1, 36\]"):
    fn(params, 37)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _all_eqns(inner)


def _naive_logprobs(config, params, ids, mask, temperature):
  logits = decoder.forward(config, params, ids, mask) / temperature
  picked = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
  return jnp.concatenate([jnp.zeros((ids.shape[0], 1)), picked], 1)


def _max_vocab_array(jaxpr, V):
  """Largest element count of any value with a trailing vocab axis, anywhere in a (nested) jaxpr."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = getattr(v.aval, "shape", ())
      if shape and shape[-1] == V:
        best = max(best, int(np.prod(shape)))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          best = max(best, _max_vocab_array(inner, V))
  return best


def test_token_logprobs_gradient_and_no_full_logits(tiny):
  params, ids, mask = tiny
  weights = jnp.asarray(np.random.RandomState(1).randn(*ids.shape), jnp.float32) * mask

  def loss(fn):
    return lambda p: jnp.sum(weights * fn(p))

  ours = loss(lambda p: logprobs.token_logprobs(TINY, p, ids, mask, temperature=0.7, chunk_size=8))
  naive = loss(lambda p: _naive_logprobs(TINY, p, jnp.asarray(ids), mask, 0.7))
  g_ours, g_naive = jax.jit(jax.grad(ours))(params), jax.jit(jax.grad(naive))(params)
  for path, a in jax.tree_util.tree_leaves_with_path(g_ours):
    b = g_naive
    for k in path:
      b = b[k.key]
    scale = float(jnp.abs(b).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5, err_msg=str(path))

  # No [B, T, V] logits in the forward or the backward (the chunk body is rematerialised); the naive one has them.
  # (The largest allowed ones are the [D, V] kernel and its gradient, and one [B, 8, V] chunk.)
  B, T, V = ids.shape + (TINY.vocab_size,)
  for fn in (ours, jax.grad(ours)):
    assert _max_vocab_array(jax.make_jaxpr(fn)(params).jaxpr, V) <= max(B * 8, TINY.hidden_size) * V
  assert _max_vocab_array(jax.make_jaxpr(jax.grad(naive))(params).jaxpr, V) >= B * T * V


def test_bad_arguments_give_clear_errors(tiny):
  params, ids, mask = tiny
  with pytest.raises(ValueError, match="temperature"):
    logprobs.token_logprobs(TINY, params, ids, mask, temperature=0.0)
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs.token_logprobs(TINY, params, ids, mask, chunk_size=0)
