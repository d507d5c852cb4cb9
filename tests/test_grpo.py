"""GRPO pieces against torch (std) and NumPy references written from the formulas (the optimizer: test_optim.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rlt_jax import grpo, optim


def test_group_advantages_match_torch_unbiased_std():
  r = np.random.RandomState(0).randn(12).astype(np.float32)
  t = torch.tensor(r).view(3, 4)
  expected = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)).view(-1).numpy()
  np.testing.assert_allclose(grpo.group_advantages(r, 4), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(r, 4, scale="none"), (t - t.mean(1, keepdim=True)).view(-1),
                             atol=1e-6)
  # A group of equal rewards has no signal: zero advantages, not NaN.
  np.testing.assert_array_equal(grpo.group_advantages(np.ones(4), 2), np.zeros(4))
  with pytest.raises(ValueError, match="6 rewards do not split into groups of 4"):
    grpo.group_advantages(np.zeros(6), 4)


def numpy_loss(logp, old, ref, adv, mask, beta, eps, how):
  """Written from the formula: −[min(ρA, clip(ρ)A) − β(e^(ref−logp) − (ref−logp) − 1)], then aggregated."""
  rho = np.exp(logp - old)
  a = adv[:, None]
  obj = np.minimum(rho * a, np.clip(rho, 1 - eps, 1 + eps) * a)
  d = ref - logp
  tok = -(obj - beta * (np.exp(d) - d - 1))
  if how == "sequence_mean":
    return np.mean([(tok[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(len(tok))])
  if how == "token_mean":
    return (tok * mask).sum() / mask.sum()
  return (tok * mask).sum() / (mask.shape[0] * mask.shape[1])


def batch(seed=0, B=6, T=7):
  rng = np.random.RandomState(seed)
  logp = -rng.rand(B, T).astype(np.float32) * 3
  old = logp + 0.3 * rng.randn(B, T).astype(np.float32)  # ratios away from 1, some clipped
  ref = logp + 0.5 * rng.randn(B, T).astype(np.float32)
  adv = rng.randn(B).astype(np.float32)
  lengths = rng.randint(1, T + 1, B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return logp, old, ref, adv, mask


@pytest.mark.parametrize("how", grpo.LOSS_AGGREGATIONS)
def test_policy_loss_matches_numpy(how):
  logp, old, ref, adv, mask = batch()
  cfg = grpo.GRPOConfig(beta=0.04, clip_eps=0.2, loss_aggregation=how)
  loss, metrics = grpo.policy_loss(logp, old, ref, adv, mask, cfg)
  np.testing.assert_allclose(loss, numpy_loss(logp, old, ref, adv, mask, 0.04, 0.2, how), rtol=1e-5)
  rho = np.exp(logp - old)
  np.testing.assert_allclose(metrics["clip_fraction"], ((np.abs(rho - 1) > 0.2) * mask).sum() / mask.sum(), rtol=1e-5)
  assert 0 < float(metrics["clip_fraction"]) < 1
  # The reference KL both ways: per sequence then averaged (the official code's `kl`), and over all tokens.
  d = ref - logp
  k3 = np.exp(d) - d - 1
  per_seq = [(k3[i] * mask[i]).sum() / mask[i].sum() for i in range(len(k3))]
  np.testing.assert_allclose(metrics["kl_to_ref"], np.mean(per_seq), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_to_ref_token"], (k3 * mask).sum() / mask.sum(), rtol=1e-5)
  assert abs(float(metrics["kl_to_ref"]) - float(metrics["kl_to_ref_token"])) > 1e-3  # lengths differ: not equal


def test_one_iteration_gradient_is_reinforce_with_k3():
  """With old = sg(logp) the ratio is 1 and d loss / d logp = (−A + β(1 − e^(ref−logp))) / (len · B)."""
  logp, _, ref, adv, mask = batch(1)
  cfg = grpo.GRPOConfig(beta=0.04)
  g = jax.grad(lambda lp: grpo.policy_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, cfg)[0])(logp)
  expected = (-adv[:, None] + 0.04 * (1 - np.exp(ref - logp))) * mask / mask.sum(1, keepdims=True) / len(adv)
  np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="ref_logp is required"):
    grpo.policy_loss(logp, logp, None, adv, mask, cfg)
  zero_beta = grpo.GRPOConfig(beta=0.0)
  loss, m = grpo.policy_loss(logp, logp, None, adv, mask, zero_beta)
  assert float(m["kl_to_ref"]) == 0.0 and np.isfinite(float(loss))


@pytest.mark.parametrize("how", grpo.LOSS_AGGREGATIONS)
def test_accumulated_micro_batches_equal_the_full_batch(how):
  logp, old, ref, adv, mask = batch(2, B=8)
  cfg = grpo.GRPOConfig(loss_aggregation=how, beta=0.04)
  w = jnp.ones(())

  def make_loss(denominators):
    def loss_fn(w, b):
      return grpo.policy_loss(w * b["logp"], b["old"], b["ref"], b["adv"], b["mask"], cfg, denominators=denominators)
    return loss_fn

  b = {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask}
  full, full_metrics = optim.accumulate_gradients(make_loss(None), w, b, 1)
  parts, part_metrics = optim.accumulate_gradients(make_loss((8, mask.sum())), w, b, 4)
  np.testing.assert_allclose(parts, full, rtol=1e-5)
  # Every metric of the parts adds up to the whole batch's (the loss, both KLs, the token means).
  assert set(part_metrics) == {"loss", "kl_to_ref", "kl_to_ref_token", "clip_fraction", "ratio_mean"}
  for k in part_metrics:
    np.testing.assert_allclose(part_metrics[k], full_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  with pytest.raises(ValueError, match="batch of 8 does not split into 3"):
    optim.accumulate_gradients(make_loss(None), w, b, 3)


def test_mix_reference():
  ref = {"w": jnp.full((2,), 1.0, jnp.bfloat16)}
  pol = {"w": jnp.full((2,), 3.0, jnp.float32)}
  mixed = grpo.mix_reference(ref, pol, 0.9)
  assert mixed["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(mixed["w"], np.float32), 2.8, rtol=1e-2)


@pytest.mark.parametrize("field,value,msg", [("loss_aggregation", "mean", "loss_aggregation='mean'"),
                                             ("micro_batches", 0, "micro_batches=0"),
                                             ("lr_schedule", "linear", "lr_schedule='linear'")])
def test_bad_config_names_the_field(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    grpo.GRPOConfig(**{field: value})
