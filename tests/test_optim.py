"""The optimizer: clipping then AdamW, the schedules, the state sharded like the params, and the RL run's optimizer
config taken from GRPOConfig's fields. (Gradient accumulation under the GRPO loss: test_grpo.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import grpo, optim


def test_optimizer_and_schedule():
  cfg = optim.OptimConfig(learning_rate=0.1, max_grad_norm=1.0)
  opt = optim.make_optimizer(cfg)
  p = {"w": jnp.zeros(3)}
  updates, _ = opt.update({"w": jnp.array([30.0, 40.0, 0.0])}, opt.init(p), p)
  # Adam's first step moves each coordinate by lr·sign(g) (clipping rescales, the sign stays).
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1, 0.0], atol=1e-4)
  sched = optim.learning_rate_schedule(optim.OptimConfig(learning_rate=1.0, lr_schedule="cosine", warmup_steps=2,
                                                         total_steps=10))
  assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(1.0) and float(sched(10)) == pytest.approx(0.0)


def test_grpo_config_gives_the_optimizer_config():
  assert grpo.GRPOConfig().optim == optim.OptimConfig()  # the same defaults
  g = grpo.GRPOConfig(learning_rate=3e-4, lr_schedule="cosine", warmup_steps=5, total_steps=50, weight_decay=0.1,
                      b1=0.8, b2=0.95, adam_eps=1e-6, max_grad_norm=0.5, micro_batches=4)
  o = g.optim
  assert {f.name: getattr(o, f.name) for f in dataclasses.fields(o)} == dict(
      learning_rate=3e-4, lr_schedule="cosine", warmup_steps=5, total_steps=50, weight_decay=0.1, b1=0.8, b2=0.95,
      adam_eps=1e-6, max_grad_norm=0.5)
  with pytest.raises(ValueError, match="lr_schedule='linear'"):
    optim.OptimConfig(lr_schedule="linear")


def test_optimizer_state_is_sharded_like_the_params():
  from rlt_jax import hf_checkpoint, sharding
  from rlt_jax.models import init_params
  from rlt_jax.models.config import ModelConfig
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  params = hf_checkpoint.shard_params(init_params(config, jax.random.key(0)), mesh, config)
  opt = optim.make_optimizer(optim.OptimConfig(weight_decay=0.1))
  state = optim.init_state(opt, params)
  adam = state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  for moments in (adam.mu, adam.nu):
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
      assert m.sharding.is_equivalent_to(p.sharding, p.ndim) and m.shape == p.shape
      np.testing.assert_array_equal(np.asarray(m), 0)
  assert adam.count.sharding.is_fully_replicated
  # Per device, the moments take what the params take (not a whole model each), and the update agrees with plain init.
  local = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  assert local(adam.mu) == local(params) < sum(x.nbytes for x in jax.tree.leaves(params))
  grads = jax.tree.map(jnp.ones_like, params)
  a, _ = opt.update(grads, state, params)
  b, _ = opt.update(grads, opt.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
