"""The rollout layout (sharding.rollout_mesh / ROLLOUT_RULES, precision.compute_copy with shardings) against XLA's
own compiled program: on 8 fake CPU devices under the training meshes of the 7B targets (8×H100: fsdp = 8; 4×8
H100 scaled to one 8-device host: data = 2 × fsdp = 4), the decode loop's body holds no all-gather of a weight, while
the same loop on the training layout does (the premise that makes the check able to fail)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hlo_text
from rlt_jax import precision, sampling, sharding
from rlt_jax.decode import Schedule
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

# 7B's proportions in small dims: 8 query heads over 4 kv heads (7B: 28 over 4), so 4-way tensor parallelism fits.
CONFIG = ModelConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=4,
                     head_dim=8, rope_theta=1e6, tie_word_embeddings=False)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def decode_loop_collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(kind, result shape) of every collective inside the token loops of compiled decode HLO: the while loops whose
  body runs the layer loop, with everything they call."""
  comps = hlo_text.computations(hlo)
  token_loops = [b for b in hlo_text.while_bodies(comps) if any(re.search(r"\bwhile\(", ln) for ln in comps[b])]
  assert token_loops, "premise: the decode loops (each with a layer loop inside) were found"
  inside = hlo_text.reachable(comps, token_loops)
  found = []
  for c in inside:
    for line in comps[c]:
      m = re.match(r"(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
      if m:
        found.append((m.group(2), tuple(int(d) for d in m.group(1).split(",") if d)))
  return found


def weight_shapes(config: ModelConfig) -> set[tuple[int, ...]]:
  """Every weight's shape, stacked and per layer, whole and as a tensor-parallel slice could gather it."""
  out = set()
  for leaf in jax.tree.leaves(decoder.param_shapes(config)):
    out.add(tuple(leaf.shape))
    out.add(tuple(leaf.shape[1:]))
  return out


def compile_decode(params, mesh, rules, B=2, M=8, P=6, T=24):
  ids = np.ones((B, P), np.int32)
  with sharding.use_mesh(mesh, rules):
    cache, logits = sampling.prefill(CONFIG, params, ids, np.ones((B, P), np.int32))
    return sampling.decode.lower(
        CONFIG, params, cache, logits, jax.random.key(0), 0.7, 1.0, (3,), 0, max_new_tokens=T, num_samples=M, greedy=False, top_k=None, use_top_p=False,
        schedule=Schedule(window=8, buckets=2, min_rows=8)).compile().as_text()


@pytest.mark.parametrize("train_mesh", [(1, 8, 1), (2, 4, 1)], ids=["8xh100", "4x8xh100"])
def test_decode_loop_gathers_no_weights_on_the_rollout_layout(train_mesh):
  mesh = sharding.make_mesh(train_mesh)
  names = decoder.param_logical_axes(CONFIG)
  params = jax.device_put(decoder.init_params(CONFIG, jax.random.key(0)),
                          sharding.tree_shardings(names, decoder.param_shapes(CONFIG), mesh, sharding.DEFAULT_RULES))
  weights = weight_shapes(CONFIG)

  # Premise: on the training layout every token all-gathers the fsdp-split weights.
  on_training = decode_loop_collectives(compile_decode(params, mesh, sharding.DEFAULT_RULES))
  gathered = [s for kind, s in on_training if kind == "all-gather" and s in weights]
  assert gathered, f"premise: the training layout's decode loop gathers weights; found {on_training}"

  tensor = sharding.rollout_tensor(mesh, CONFIG.num_heads, CONFIG.num_kv_heads)
  assert tensor == 4  # the most that divide 4 kv heads and the 8 devices of the one host
  rmesh = sharding.rollout_mesh(mesh, tensor)
  assert dict(rmesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert list(rmesh.devices.flat) == list(mesh.devices.flat)  # one device order: one jitted cast moves the params
  shardings = sharding.tree_shardings(names, params, rmesh, sharding.ROLLOUT_RULES)
  rollout = precision.compute_copy(params, "bfloat16", shardings)
  assert all(p.sharding == s for p, s in zip(jax.tree.leaves(rollout), jax.tree.leaves(shardings)))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(rollout))
  found = decode_loop_collectives(compile_decode(jax.tree.map(lambda p: p.astype(jnp.float32), rollout), rmesh,
                                                 sharding.ROLLOUT_RULES))
  bad = [(kind, s) for kind, s in found if kind == "all-gather" and s in weights]
  assert not bad, f"weights all-gathered inside the decode loop: {bad}"
  assert all(kind in ("all-reduce", "all-gather") for kind, _ in found), found
  # What remains is the tensor-parallel sums of activations: each layer's attention and MLP outputs, [rows, hidden].
  assert any(kind == "all-reduce" and s[-1] == CONFIG.hidden_size for kind, s in found), found


def test_rollout_copy_is_the_params_when_nothing_changes():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  names = decoder.param_logical_axes(CONFIG)
  params = jax.device_put(decoder.init_params(CONFIG, jax.random.key(0)),
                          sharding.tree_shardings(names, decoder.param_shapes(CONFIG), mesh, sharding.DEFAULT_RULES))
  rmesh = sharding.rollout_mesh(mesh, 1)
  shardings = sharding.tree_shardings(names, params, rmesh, sharding.ROLLOUT_RULES)
  assert precision.compute_copy(params, "float32", shardings) is params
  copy = precision.compute_copy(params, "bfloat16", shardings)
  np.testing.assert_array_equal(np.asarray(copy["embed"]["embedding"]),
                                np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16)))


def test_rollout_tensor_choice():
  mesh = sharding.make_mesh((1, 8, 1))
  assert sharding.rollout_tensor(mesh, 28, 4) == 4   # Qwen2.5-7B on an 8-GPU host
  assert sharding.rollout_tensor(mesh, 14, 2) == 2   # Qwen2.5-0.5B
  assert sharding.rollout_tensor(mesh, 12, 2, requested=8) == 8
  with pytest.raises(ValueError, match="does not divide"):
    sharding.rollout_tensor(mesh, 12, 2, requested=3)
