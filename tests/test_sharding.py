"""Mesh construction, logical-axis rules, and sharded forward == single-device forward on 8 fake CPU devices."""
import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_models import make_hf_model
from rlt_jax import hf_checkpoint, models, sharding


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_make_mesh_sizes_and_errors():
  assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="do not fit 8 devices"):
    sharding.make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="use 4 devices, but there are 8"):
    sharding.make_mesh((2, 2, 1))
  with pytest.raises(ValueError, match="unknown axis"):
    sharding.make_mesh({"model": 8})
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.normalize_rules([("embed", "model")])


def test_logical_to_spec_uses_each_mesh_axis_once():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.normalize_rules({"batch": ["data", "fsdp"], "embed": "fsdp", "vocab": "tensor", "length": None})
  assert sharding.logical_to_spec(("batch", "length", "vocab"), rules, mesh=mesh) == P(("data", "fsdp"), None, "tensor")
  # "embed" wants fsdp, already taken by "batch": that dimension stays replicated.
  assert sharding.logical_to_spec(("batch", "embed"), rules, mesh=mesh) == P(("data", "fsdp"), None)
  with pytest.raises(KeyError, match="no sharding rule for logical axis 'heads'"):
    sharding.logical_to_spec(("heads",), rules)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  make_hf_model(path, vocab=128, hidden=64, heads=4, kv_heads=2)
  config, params = hf_checkpoint.load_hf(path)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 128, (8, 12))
  mask = np.ones((8, 12), np.int32)
  mask[::2, :5] = 0   # left padding
  mask[1::4, 9:] = 0  # right padding
  logits = np.asarray(jax.jit(models.forward, static_argnums=0)(config, params, ids, mask))
  return path, config, ids, mask, logits


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_single_device(tiny, shape):
  path, config, ids, mask, expected = tiny
  mesh = sharding.make_mesh(shape)
  _, params = hf_checkpoint.load_hf(path, mesh=mesh)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == sharding.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), mesh=mesh)
  assert len(q.addressable_shards) == 8
  with sharding.use_mesh(mesh):
    batch = sharding.batch_sharding(mesh, 2)
    out = jax.jit(models.forward, static_argnums=0)(config, params, jax.device_put(ids, batch),
                                                    jax.device_put(mask, batch))
  expected_spec = sharding.logical_to_spec(("batch", "length", "act_vocab"), mesh=mesh)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, expected_spec), 3)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_indivisible_kv_heads_replicate_or_error(tiny, caplog):
  path, config, ids, mask, expected = tiny
  mesh = sharding.make_mesh((1, 2, 4))  # 2 kv heads on tensor=4
  with pytest.raises(ValueError, match=r"param layers/attn/k_proj/bias: dimension 1 \(kv_heads=2\) is not divisible "
                                       r"by mesh axes \('tensor',\) \(size 4\); sizes that divide it: \[1, 2\]"):
    hf_checkpoint.load_hf(path, mesh=mesh, on_indivisible="error")
  with caplog.at_level(logging.WARNING):
    _, params = hf_checkpoint.load_hf(path, mesh=mesh)
  assert "replicating this dimension" in caplog.text
  assert params["layers"]["attn"]["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", None, None)
  assert params["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  with sharding.use_mesh(mesh):
    out = jax.jit(models.forward, static_argnums=0)(config, params, ids, mask)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_rules_from_config_change_the_layout(tiny):
  path, config, ids, mask, expected = tiny
  mesh = sharding.make_mesh((1, 8, 1))
  rules = dict(sharding.DEFAULT_RULES, embed=None, mlp="fsdp")  # shard MLP width instead of the hidden size
  _, params = hf_checkpoint.load_hf(path, mesh=mesh, rules=sharding.normalize_rules(rules))
  assert params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, None, "fsdp")
  assert params["embed"]["embedding"].sharding.spec == P(None, None)
  with sharding.use_mesh(mesh, rules):
    out = jax.jit(models.forward, static_argnums=0)(config, params, ids, mask)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
