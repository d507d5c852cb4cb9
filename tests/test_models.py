"""The Qwen2-family decoder against transformers' PyTorch models (the oracle)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from hf_models import hf_logits, make_hf_model
from rlt_jax import hf_checkpoint, models, sharding
from rlt_jax.models import decoder

jit_forward = jax.jit(models.forward, static_argnums=0)

CASES = {
    # name: (make_hf_model kwargs)
    "qwen2-untied-gqa2": dict(arch="qwen2", heads=4, kv_heads=2, tie=False, rope_theta=10000.0),
    "qwen2-tied-gqa4-theta1e6": dict(arch="qwen2", heads=4, kv_heads=1, tie=True, rope_theta=1e6),
    "qwen2-mha": dict(arch="qwen2", heads=4, kv_heads=4, tie=False, rope_theta=1e6, hidden=32),
    "llama-nobias-gqa2": dict(arch="llama", heads=4, kv_heads=2, bias=False, tie=True),
    "llama-bias-gqa4": dict(arch="llama", heads=8, kv_heads=2, bias=True, tie=False, rope_theta=5e5),
}


def padded_batch(vocab, seed=0):
  """Four rows: full, left-padded, right-padded, and both (a short row in the middle of padding)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (4, 11))
  mask = np.ones((4, 11), np.int32)
  mask[1, :4] = 0
  mask[2, 7:] = 0
  mask[3, :2] = 0
  mask[3, 9:] = 0
  return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  hf = make_hf_model(tmp_path, **CASES[case])
  config, params = hf_checkpoint.load_hf(tmp_path)
  assert config.qkv_bias == (CASES[case]["arch"] == "qwen2" or CASES[case].get("bias", False))
  assert config.tie_word_embeddings == CASES[case]["tie"]
  assert ("lm_head" in params) == (not CASES[case]["tie"])
  ids, mask = padded_batch(config.vocab_size)
  ours = np.asarray(jit_forward(config, params, ids, mask))
  ref = hf_logits(hf, ids, mask)
  real = mask.astype(bool)
  assert ours.shape == ref.shape
  np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)


@pytest.mark.parametrize("case", ["qwen2-untied-gqa2", "llama-nobias-gqa2"])
def test_save_hf_round_trip_through_transformers(tmp_path, case):
  hf = make_hf_model(tmp_path / "src", **CASES[case])
  config, params = hf_checkpoint.load_hf(tmp_path / "src")
  hf_checkpoint.save_hf(config, params, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  ids, mask = padded_batch(config.vocab_size, seed=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(hf_logits(back, ids, mask)[real], hf_logits(hf, ids, mask)[real], atol=1e-6)
  ours = np.asarray(jit_forward(config, params, ids, mask))
  np.testing.assert_array_less(np.abs(ours - hf_logits(back, ids, mask))[real].max(), 1e-4)


def test_sharded_index_round_trip(tmp_path):
  hf = make_hf_model(tmp_path / "src", layers=3)
  config, params = hf_checkpoint.load_hf(tmp_path / "src")
  hf_checkpoint.save_hf(config, params, tmp_path / "out", max_shard_bytes=40_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  _, params2 = hf_checkpoint.load_hf(tmp_path / "out")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  ids, mask = padded_batch(config.vocab_size)
  real = mask.astype(bool)
  np.testing.assert_allclose(hf_logits(back, ids, mask)[real], hf_logits(hf, ids, mask)[real], atol=1e-6)


def test_bf16_checkpoint_and_compute(tmp_path):
  hf = make_hf_model(tmp_path / "src")
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  config, params = hf_checkpoint.load_hf(tmp_path / "bf16")
  assert params["embed"]["embedding"].dtype == jnp.float32  # upcast on load by default
  config16, params16 = hf_checkpoint.load_hf(tmp_path / "bf16", dtype="bfloat16")
  assert params16["embed"]["embedding"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params16["embed"]["embedding"], np.float32),
                                np.asarray(params["embed"]["embedding"]))
  ids, mask = padded_batch(config.vocab_size)
  real = mask.astype(bool)
  # bf16 weights, fp32 math (a fresh load: `.to(bf16)` would also round the rotary inv_freq buffer)
  ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32), ids, mask)
  np.testing.assert_array_less(np.abs(np.asarray(jit_forward(config, params, ids, mask)) - ref)[real].max(), 1e-4)
  # bf16 compute: the same function, looser (bf16 has ~3 significant digits); logits still come out fp32.
  out16 = jit_forward(config16.replace(dtype="bfloat16"), params16, ids, mask)
  assert out16.dtype == jnp.float32
  assert np.abs(np.asarray(out16) - ref)[real].max() < 0.1


def test_save_hf_writes_bf16(tmp_path):
  make_hf_model(tmp_path / "src")
  config, params = hf_checkpoint.load_hf(tmp_path / "src", dtype="bfloat16")
  hf_checkpoint.save_hf(config, params, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
  assert back.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().float().numpy(),
                                np.asarray(params["embed"]["embedding"], np.float32))


def test_remat_gives_same_logits_and_grads(tmp_path):
  make_hf_model(tmp_path)
  config, params = hf_checkpoint.load_hf(tmp_path)
  ids, mask = padded_batch(config.vocab_size)

  def loss(cfg, p):
    return jnp.mean(jax.nn.log_softmax(models.forward(cfg, p, ids, mask))[..., 0])

  grads = {}
  for policy in ("none", "full", "dots"):
    grads[policy] = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(config.replace(remat=policy), params)
  for policy in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads["none"], grads[policy])


def test_init_params_under_eval_shape_matches_layout():
  config = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=8)
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  assert shapes["layers"]["attn"]["k_proj"]["kernel"].shape == (3, 32, 2, 8)
  assert jax.tree.structure(shapes) == jax.tree.structure(models.param_shapes(config))
  params = models.init_params(config, jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, shapes)
  assert float(jnp.std(params["layers"]["mlp"]["up_proj"]["kernel"])) == pytest.approx(0.02, rel=0.1)


def test_real_qwen25_05b_parameter_count(qwen_dir):
  """494,032,768 is the published size of Qwen2.5-0.5B(-Instruct); torch on the meta device is a second oracle."""
  config = models.ModelConfig.from_hf(qwen_dir)
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (24, 14, 2, 64)
  assert config.rope_theta == 1e6 and config.tie_word_embeddings and config.qkv_bias
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  assert models.num_params(shapes) == 494_032_768
  with torch.device("meta"):
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(qwen_dir))
  assert models.num_params(shapes) == sum(p.numel() for p in hf.parameters())


def test_config_reads_nested_rope_theta_and_rejects_bad_files(tmp_path):
  nested = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default",
                                                                                    "rope_theta": 12345.0}}
  (tmp_path / "config.json").write_text(json.dumps(nested))
  assert models.ModelConfig.from_hf(tmp_path).rope_theta == 12345.0
  (tmp_path / "config.json").write_text(json.dumps({**nested, "rope_theta": 777.0}))
  assert models.ModelConfig.from_hf(tmp_path / "config.json").rope_theta == 777.0
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in nested.items() if k != "hidden_size"}))
  with pytest.raises(ValueError, match=r"config.json: missing field\(s\) \['hidden_size'\]"):
    models.ModelConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**nested, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    models.ModelConfig.from_hf(tmp_path)
  with pytest.raises(FileNotFoundError, match="no Hugging Face config.json"):
    models.ModelConfig.from_hf(tmp_path / "nowhere")


def test_load_hf_names_missing_and_misshapen_tensors(tmp_path):
  make_hf_model(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
  with pytest.raises(KeyError, match="model.layers.2.input_layernorm.weight' is missing"):
    hf_checkpoint.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 50}))
  with pytest.raises(ValueError, match="gate_proj.weight' has shape"):
    hf_checkpoint.load_hf(tmp_path)


# ----------------------------------------------------------------------------------- memory-bounded attention
LONG_T, BLOCK = 40, 8  # 5 blocks of 8, padded to 6 (3 pairs): exercises the pairing and the dummy tail


def long_batch(vocab, seed=2):
  """Five rows of 40: full, left-padded, right-padded, both, and all padding (every query sees no key)."""
  ids = np.random.RandomState(seed).randint(0, vocab, (5, LONG_T))
  mask = np.ones((5, LONG_T), np.int32)
  mask[1, :13] = 0
  mask[2, 29:] = 0
  mask[3, :3] = 0
  mask[3, 33:] = 0
  mask[4] = 0
  return ids, mask


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("long")
  hf = make_hf_model(path)
  config, params = hf_checkpoint.load_hf(path)
  assert BLOCK < LONG_T <= decoder.attention_block_size(config)  # by default these 40 tokens take the dense path
  return hf, config, params


def test_blocked_attention_matches_dense_path_and_transformers(long_model):
  hf, config, params = long_model
  ids, mask = long_batch(config.vocab_size)
  blocked = np.asarray(jit_forward(config.replace(attention_block=BLOCK), params, ids, mask))
  dense = np.asarray(jit_forward(config, params, ids, mask))
  real = mask.astype(bool)
  assert np.isfinite(blocked).all()  # padding rows (row 4 has no visible key anywhere) stay finite
  np.testing.assert_allclose(blocked[real], dense[real], atol=1e-5, rtol=0)
  np.testing.assert_allclose(blocked[real], hf_logits(hf, ids, mask)[real], atol=1e-5, rtol=0)


def test_blocked_attention_with_segment_ids_matches_each_segment_alone(long_model):
  """Packed rows (positions restart per segment) against transformers run on every segment separately."""
  hf, config, params = long_model
  ids, _ = long_batch(config.vocab_size, seed=3)
  ids = ids[:2]
  bounds = [[(0, 17), (17, 40)], [(0, 9), (9, 30), (30, 34)]]  # row 1 ends in 6 padding tokens
  mask, seg, pos = np.zeros((2, LONG_T), np.int32), np.full((2, LONG_T), 9, np.int32), np.zeros((2, LONG_T), np.int32)
  for r, spans in enumerate(bounds):
    for i, (a, b) in enumerate(spans):
      mask[r, a:b], seg[r, a:b], pos[r, a:b] = 1, i, np.arange(b - a)
  out = {blk: np.asarray(jit_forward(config.replace(attention_block=blk), params, ids, mask, positions=pos,
                                     segment_ids=seg)) for blk in (BLOCK, LONG_T)}
  real = mask.astype(bool)
  np.testing.assert_allclose(out[BLOCK][real], out[LONG_T][real], atol=1e-5, rtol=0)
  for r, spans in enumerate(bounds):
    for a, b in spans:
      alone = hf_logits(hf, ids[r:r + 1, a:b], np.ones((1, b - a), np.int32))[0]
      np.testing.assert_allclose(out[BLOCK][r, a:b], alone, atol=1e-5, rtol=0)


def test_blocked_attention_gradients_equal_dense(long_model):
  _, config, params = long_model
  ids, mask = long_batch(config.vocab_size, seed=4)
  real = jnp.asarray(mask, bool)

  def loss(cfg, p):  # log-likelihood of the next token over real positions only (padding rows differ by design)
    lp = jax.nn.log_softmax(models.forward(cfg, p, ids, mask)[:, :-1])
    picked = jnp.take_along_axis(lp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(real[:, 1:] & real[:, :-1], picked, 0.0))

  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
  g_blocked, g_dense = grad(config.replace(attention_block=BLOCK), params), grad(config, params)
  for leaf in jax.tree.leaves(g_blocked):
    assert np.isfinite(np.asarray(leaf)).all()
  scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(g_dense))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0),
               g_blocked, g_dense)


def _avals(jaxpr):
  """Every value produced anywhere in a jaxpr, sub-jaxprs (scan, map, checkpoint, pjit) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(sub, "eqns"):
          yield from _avals(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _avals(sub.jaxpr)


def test_blocked_forward_and_gradient_hold_no_length_squared_array():
  """With T above every model dimension, any array whose last two dims are both >= T is an O(T²) score/mask."""
  config = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, attention_block=16)
  T = 80
  params = models.param_shapes(config)
  ids = jax.ShapeDtypeStruct((2, T), jnp.int32)

  def quadratic(cfg):
    fwd = lambda p, i: models.forward(cfg, p, i, i > 0, segment_ids=i % 2)  # noqa: E731
    found = []
    for fn in (fwd, jax.grad(lambda p, i: jnp.sum(fwd(p, i)))):
      jaxpr = jax.make_jaxpr(fn)(params, ids).jaxpr
      found += [a.shape for a in _avals(jaxpr) if len(getattr(a, "shape", ())) >= 2 and min(a.shape[-2:]) >= T]
    return found

  assert quadratic(config) == []
  assert quadratic(config.replace(attention_block=T))  # the dense path does build them: the check can fail


def test_attention_block_must_be_positive():
  with pytest.raises(ValueError, match=r"ModelConfig.attention_block=0: expected None \(automatic\) or an int >= 1"):
    models.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4, attention_block=0)
  config = models.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=4)
  assert decoder.attention_block_size(config) == 64  # the tests run on CPU
  assert decoder.attention_block_size(config.replace(attention_block=7)) == 7


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_blocked_forward_without_involuntary_remat(long_model, shape, tmp_path, capfd):
  """Embedding table sharded on vocab (tensor) and embed (fsdp): the lookup must not replicate it (XLA warns on
  stderr when it has to), and the sharded blocked forward equals the single-device one."""
  hf, config, _ = long_model
  hf.save_pretrained(tmp_path)
  config = config.replace(attention_block=BLOCK)
  ids, mask = long_batch(config.vocab_size)
  ids, mask = np.concatenate([ids, ids[:3]]), np.concatenate([mask, mask[:3]])  # 8 rows: divisible by the batch axes
  _, params = hf_checkpoint.load_hf(tmp_path)
  expected = np.asarray(jit_forward(config, params, ids, mask))
  mesh = sharding.make_mesh(shape)
  _, params = hf_checkpoint.load_hf(tmp_path, mesh=mesh)
  assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  capfd.readouterr()
  with sharding.use_mesh(mesh):
    batch = sharding.batch_sharding(mesh, 2)
    out = jax.jit(models.forward, static_argnums=0)(config, params, jax.device_put(ids, batch),
                                                    jax.device_put(mask, batch))
    out = np.asarray(out)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=0)
