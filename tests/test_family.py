"""The model interface (`models.family`): a second family registered through it trains, samples and exports.

The family is Llama 3: Llama's blocks with its "llama3" RoPE scaling, i.e. a `qwen2.Decoder` subclass with its own
`rope`, a `ModelConfig` subclass with the scaling fields, and a config reader that claims `rope_type: llama3` files.
The oracle is transformers' `LlamaForCausalLM` with the same rope parameters; plain RoPE gives other logits, so the
family's rope is what is being checked, in the forward (Flax's scan) and in the sampler (one layer at a time).
"""
import dataclasses
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_models import hf_logits, np_token_logprobs
from rlt_jax import hf_checkpoint, sampling, train
from rlt_jax.models import decoder, family, qwen2
from rlt_jax.models.config import ModelConfig
from test_train import metrics_rows, small_config

ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


@dataclasses.dataclass(frozen=True)
class Llama3Config(ModelConfig):
  rope_factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  model_type: str = "llama"
  family: str = "llama3_test"
  qkv_bias: bool = False

  def to_hf_dict(self):
    hf = super().to_hf_dict()
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": self.rope_factor,
                             "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
                             "original_max_position_embeddings": self.original_max_position}
    return hf


def read_config(hf, source):
  rope = hf.get("rope_parameters") or {}
  if hf.get("model_type") != "llama" or rope.get("rope_type") != "llama3":
    return None
  base = ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_type": "default"},
                                   "rope_theta": rope["rope_theta"]}, source=source)
  return Llama3Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)
                         if f.name not in ("model_type", "family")},
                      rope_factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                      high_freq_factor=rope["high_freq_factor"],
                      original_max_position=rope["original_max_position_embeddings"])


class Llama3Decoder(qwen2.Decoder):
  def rope(self, positions_BT):
    """Llama 3's scaled frequencies: long wavelengths divided by the factor, short ones kept, a smooth ramp between."""
    c = self.config
    inv = 1.0 / (c.rope_theta ** (jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim))
    wavelen = 2 * math.pi / inv
    low, high = c.original_max_position / c.low_freq_factor, c.original_max_position / c.high_freq_factor
    smooth = (c.original_max_position / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
    inv = jnp.where(wavelen > low, inv / c.rope_factor,
                    jnp.where(wavelen < high, inv, (1 - smooth) * inv / c.rope_factor + smooth * inv))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@pytest.fixture
def llama3():
  """The family registered for one test, then removed (the registry and the config readers as they were)."""
  fam = family.register(family.Family("llama3_test", Llama3Decoder, qwen2.Block, qwen2.hf_tensors, read_config))
  yield fam
  family.unregister("llama3_test")


def make_llama3(path, vocab=128, bias=False):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=256, attention_bias=bias, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **ROPE})
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  return model


def test_a_registered_family_matches_transformers_in_forward_sampling_and_export(llama3, tmp_path):
  hf = make_llama3(tmp_path / "hf")
  config, params = hf_checkpoint.load_hf(tmp_path / "hf")
  assert type(config) is Llama3Config and config.family == "llama3_test"
  assert config.original_max_position == 32 and config.rope_factor == 8.0
  rs = np.random.RandomState(0)
  B, T = 3, 48  # longer than the original 32 positions, and than one attention block (blocked attention)
  ids = rs.randint(0, 128, (B, T))
  mask = np.ones((B, T), np.int64)
  mask[1, :7] = 0  # left padding
  want = hf_logits(hf, ids, mask)
  got = np.asarray(jax.jit(decoder.forward, static_argnums=0)(config, params, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
  plain = np.asarray(decoder.forward(config.replace(family="qwen2"), params, ids, mask))
  assert np.abs(plain[real] - want[real]).max() > 1e-2  # plain RoPE is another model: the family's rope matters

  # The sampler runs the family one layer at a time: greedy tokens and their log-probs are transformers' own.
  P, N = 24, 24
  out = sampling.sample(config, params, ids[:, :P], mask[:, :P], jax.random.key(0), max_new_tokens=N,
                        temperature=0.0)
  full = np.concatenate([ids[:, :P], np.asarray(out.tokens)], 1)
  full_mask = np.concatenate([mask[:, :P], np.ones((B, N), np.int64)], 1)
  hf_full = hf_logits(hf, full, full_mask)
  assert (np.asarray(out.tokens) == hf_full[:, P - 1:-1].argmax(-1)).all()
  np.testing.assert_allclose(np.asarray(out.logprobs), np_token_logprobs(hf_full, full, 1.0)[:, P:], atol=1e-4)

  # Export: the config and tensors transformers loads back as the same Llama 3.
  hf_checkpoint.save_hf(config, params, tmp_path / "export")
  with open(tmp_path / "export" / "config.json") as f:
    assert json.load(f)["rope_parameters"]["rope_type"] == "llama3"
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
  np.testing.assert_allclose(hf_logits(back, ids, mask)[real], want[real], atol=1e-5)
  assert hf_checkpoint.load_hf(tmp_path / "export")[0] == config


def test_a_registered_family_trains_one_rl_step(llama3, assets, tmp_path):
  """The tiny run with a Llama 3 teacher (the tiny teacher's weights under the family's rope; the student stays
  Qwen2). With overlap the update's old log-probs are the sampler's: a ratio of 1 says the sampler's layer-by-layer
  path and the training forward are the same model."""
  tiny, params = hf_checkpoint.load_hf(assets["teacher"])
  fields = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(ModelConfig)
            if f.name not in ("model_type", "family")}
  config = Llama3Config(**{**fields, "qkv_bias": True, "o_bias": True}, original_max_position=16)
  params["layers"]["attn"]["o_proj"]["bias"] = jnp.zeros((tiny.num_layers, tiny.hidden_size), jnp.float32)
  teacher = tmp_path / "teacher"
  hf_checkpoint.save_hf(config, params, teacher)
  for name in os.listdir(assets["teacher"]):  # the tokenizer and the recorded chat format
    if name not in ("config.json", hf_checkpoint.SAFE_NAME):
      shutil.copy(os.path.join(assets["teacher"], name), teacher / name)
  cfg = small_config(assets, steps=1, teacher_path=str(teacher), overlap=True, export_dir="export")
  train.run(cfg, str(tmp_path / "run"))
  (row,) = metrics_rows(tmp_path / "run")
  assert np.isfinite(row["reward_mean"]) and row["grad_norm"] > 0
  assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and row["clip_fraction"] == 0.0
  exported, trained = hf_checkpoint.load_hf(tmp_path / "run" / "export")
  assert type(exported) is Llama3Config and exported.original_max_position == 16
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), trained, params)
  assert max(jax.tree.leaves(moved)) > 0  # the step updated the family's params


class _Unnamed(qwen2.Decoder):
  """A decoder whose extra param has no logical axis names."""

  def setup(self):
    super().setup()
    self.gain = self.param("gain", nn.initializers.ones, (1,))

  def output_kernel(self):
    return super().output_kernel() * self.gain


def test_a_param_without_logical_axes_is_an_error_naming_it():
  family.register(family.Family("unnamed_test", _Unnamed, qwen2.Block, qwen2.hf_tensors))
  try:
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, family="unnamed_test")
    with pytest.raises(ValueError, match=r"'unnamed_test'.*param gain \(1,\) has logical axes \(\).*"
                                         r"with_logical_partitioning"):
      decoder.param_logical_axes(config)
  finally:
    family.unregister("unnamed_test")
  with pytest.raises(ValueError, match="family='nowhere' is not registered"):
    decoder.param_shapes(config.replace(family="nowhere"))
