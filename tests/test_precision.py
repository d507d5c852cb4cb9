"""Mixed precision at the 7B recipe's settings: one lr-1e-6 update moves the fp32 masters (and would not move bf16
storage), the compute copy keeps the params' layout, the export keeps the masters' dtype unless asked, and a
learning rate that bf16 storage rounds away stops the run at start naming both fields."""
import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, set_fields, tiny_module_config
from rlt_jax import checkpointing, grpo, hf_checkpoint, optim, precision, rewards, rl_step, run_config, sft, sharding, tiny, train
from rlt_jax.models import decoder

RECIPE = run_config.config_file(str(REPO / "configs" / "rlt_qwen2.5_7b.py"))
SFT_RECIPE = run_config.config_file(str(REPO / "configs" / "teacher_sft_qwen2.5_7b.py"))


def _model(param_dtype, dtype):
  # Every embedding row is used by the batch below, so every entry of every matrix gets a gradient.
  return tiny.tiny_config(128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tie=False).replace(
      param_dtype=param_dtype, dtype=dtype)


def _moved(before, after) -> dict:
  """Share of changed entries of every weight matrix (kernels and the embedding), by path."""
  out = {}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
    if path[-1].key in ("kernel", "embedding"):
      out["/".join(k.key for k in path)] = float(np.mean(np.asarray(a) != np.asarray(b)))
  return out


def _rl_update(param_dtype, dtype, lr):
  config = _model(param_dtype, dtype)
  params = decoder.init_params(config, jax.random.key(0), std=0.02)  # N(0, 0.02) weights
  g = grpo.GRPOConfig(**dict(RECIPE.grpo.to_dict(), learning_rate=lr, micro_batches=1))
  sc = rl_step.StepConfig(config, config, g, rewards.RewardConfig(), dtype, 4, 32, 64, 0)
  optimizer = optim.make_optimizer(g.optim)
  state = {"params": params, "opt_state": optimizer.init(params),
           "ref_params": precision.compute_copy(params, dtype), "step": jnp.zeros((), jnp.int32),
           "bad_steps": jnp.zeros((), jnp.int32)}
  B, T = 8, 64
  rng = np.random.default_rng(0)
  batch = rl_step.UpdateBatch(jnp.asarray(rng.integers(0, 128, (B, T)), jnp.int32), jnp.ones((B, T), bool),
                              jnp.asarray(rng.standard_normal(B), jnp.float32), jnp.zeros((B, 32), jnp.float32))
  # Behaviour log-probs = 0 make the ratio exp(logp) < 1 and unclipped on most tokens: a real, dense gradient.
  new_state, m = jax.jit(lambda s, b: rl_step.update(sc, optimizer, s, b))(
      jax.tree.map(jnp.copy, state), batch)
  assert not bool(m["skipped"])
  return params, new_state["params"]


def test_recipe_update_at_lr_1e6_moves_every_weight_matrix():
  assert (RECIPE.param_dtype, RECIPE.dtype, RECIPE.grpo.learning_rate) == ("float32", "bfloat16", 1e-6)
  before, after = _rl_update(RECIPE.param_dtype, RECIPE.dtype, 1e-6)
  moved = _moved(before, after)
  assert len(moved) == 9 and all(v >= 0.9 for v in moved.values()), moved
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(after))
  # The same update on bf16 storage (still available) rounds nearly every step away: why the masters are fp32.
  before, after = _rl_update("bfloat16", "bfloat16", 1e-6)
  moved16 = _moved(before, after)
  assert all(v < 0.1 for v in moved16.values()), moved16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(after))
  # ... as the run-start check predicts from the rounding alone (±1 point: a weight's sign of step is random).
  assert np.mean(list(moved16.values())) == pytest.approx(precision.moved_fraction(1e-6, "bfloat16"), abs=0.01)


def test_sft_recipe_update_at_lr_1e6_moves_every_weight_matrix():
  assert (SFT_RECIPE.param_dtype, SFT_RECIPE.dtype) == ("float32", "bfloat16")
  config = _model(SFT_RECIPE.param_dtype, SFT_RECIPE.dtype)
  params = decoder.init_params(config, jax.random.key(1), std=0.02)
  opt = optim.OptimConfig(learning_rate=1e-6, b1=SFT_RECIPE.b1, b2=SFT_RECIPE.b2, weight_decay=SFT_RECIPE.weight_decay)
  optimizer, schedule = optim.make_optimizer(opt), optim.learning_rate_schedule(opt)
  B, L = 4, 128
  ids = np.random.default_rng(1).integers(0, 128, (B, L))
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "loss_mask": jnp.ones((B, L), bool),
           "segment_ids": jnp.ones((B, L), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
  new, _ = jax.jit(lambda s, b: sft._sft_step(sft.SFTStepConfig(config, 64, 1), optimizer, schedule, s, b))(
      jax.tree.map(jnp.copy, state), batch)
  moved = _moved(params, new["params"])
  assert all(v >= 0.9 for v in moved.values()), moved


def test_compute_copy_is_cast_once_and_keeps_each_shard():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  config = _model("float32", "bfloat16")
  params = hf_checkpoint.shard_params(decoder.init_params(config, jax.random.key(0)), mesh, config)
  copy = precision.compute_copy(params, "bfloat16")
  for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
    assert c.dtype == jnp.bfloat16 and c.sharding.is_equivalent_to(p.sharding, p.ndim)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(p).astype(ml_dtypes.bfloat16))
  assert precision.compute_copy(params, "float32") is params  # an all-fp32 run makes no copy


def _safetensors_dtypes(path) -> set:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return {v["dtype"] for v in header.values()}


def test_export_keeps_the_master_dtype_unless_asked(tmp_path):
  config = _model("float32", "bfloat16")
  params = decoder.init_params(config, jax.random.key(0))
  hf_checkpoint.save_hf(config, params, tmp_path / "masters")
  assert _safetensors_dtypes(tmp_path / "masters" / "model.safetensors") == {"F32"}
  assert json.load(open(tmp_path / "masters" / "config.json"))["torch_dtype"] == "float32"
  hf_checkpoint.save_hf(config, params, tmp_path / "bf16", dtype="bfloat16")
  assert _safetensors_dtypes(tmp_path / "bf16" / "model.safetensors") == {"BF16"}
  assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
  _, back = hf_checkpoint.load_hf(tmp_path / "bf16", dtype="float32")
  np.testing.assert_array_equal(np.asarray(back["lm_head"]["kernel"]),
                                np.asarray(params["lm_head"]["kernel"]).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_rl_run_exports_fp32_masters_and_honours_export_dtype(assets, tmp_path):
  cfg = tiny_module_config()
  set_fields(cfg, dict(teacher_path=assets["teacher"], student_path=assets["student"],
                       tokenizer_path=assets["tokenizer"], batch_size=8, group_size=4, max_new_tokens=16, steps=1,
                       tensorboard=False, dtype="bfloat16", export_dtype="bfloat16"))
  train.run(cfg, str(tmp_path / "run"))
  assert _safetensors_dtypes(tmp_path / "run" / "export" / "model.safetensors") == {"BF16"}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"), 1)
  assert ckpt.latest_step() == 1


@pytest.mark.parametrize("module", ["train", "sft"])
def test_a_learning_rate_rounded_away_by_the_storage_dtype_stops_the_run(assets, tmp_path, module):
  if module == "train":
    cfg = set_fields(tiny_module_config(), {"teacher_path": assets["teacher"], "student_path": assets["student"],
                                            "param_dtype": "bfloat16", "dtype": "bfloat16",
                                            "grpo.learning_rate": 1e-6})
    run, lr_field = train.run, "config.grpo.learning_rate=1e-06"
  else:
    cfg = set_fields(sft.default_config(), dict(model_path=assets["teacher"], param_dtype="bfloat16",
                                                dtype="bfloat16", learning_rate=1e-5))
    run, lr_field = sft.run, "config.learning_rate=1e-05"
  with pytest.raises(run_config.ConfigError) as e:
    run(cfg, str(tmp_path))
  assert "config.param_dtype='bfloat16'" in str(e.value) and lr_field in str(e.value), e.value
  assert "float32" in str(e.value)
  assert not (tmp_path / "metrics.jsonl").exists()
  # The bf16-storage path stays open at a learning rate it can take.
  assert precision.check_learning_rate(3e-4, "bfloat16", "learning_rate", "param_dtype") is None
  assert precision.moved_fraction(1e-6, "float32") == 1.0
