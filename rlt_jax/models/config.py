"""ModelConfig: the architecture of a Qwen2-family (or Llama-style) causal LM, read from a HF `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# Config readers of registered families (`family.register`), asked newest first: hf dict, source -> config or None.
_READERS: dict[str, Any] = {}


def register_reader(name: str, reader) -> None:
  """Makes `reader` the newest config reader, under `name` (None: removes the reader of `name`)."""
  _READERS.pop(name, None)
  if reader is not None:
    _READERS[name] = reader


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Frozen and hashable, so it can be a static argument of `jax.jit`."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = True            # Qwen2: True; Llama: `attention_bias`
  o_bias: bool = False             # Llama with attention_bias=True also biases o_proj
  max_position_embeddings: int = 32768
  model_type: str = "qwen2"       # the Hugging Face model_type written to config.json
  family: str = "qwen2"           # the registered decoder family that runs it (`models.family`)
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  param_dtype: str = "float32"     # storage dtype of params
  dtype: str = "float32"           # compute dtype of activations and matmuls
  remat: str = "none"              # activation checkpointing per layer: none | full | dots
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation: None (XLA) | "cudnn"
  # Tile size of the memory-bounded attention that `forward_hidden` uses for sequences longer than one block (with
  # attention_impl None): [B, H, block, block] score tiles instead of [B, H, T, T]. None: 64 on CPU (cache-sized
  # tiles), 512 on accelerators (fewer loop steps). A runtime knob, not stored in HF files.
  attention_block: int | None = None

  def __post_init__(self):
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected one of {sorted(_DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
    block = self.attention_block
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
      raise ValueError(f"ModelConfig.attention_block={block!r}: expected None (automatic) or an int >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for rotary embeddings")

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    """Reads a Hugging Face `config.json` (the file, or the directory holding it)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no Hugging Face config.json at {file!r}")
    with open(file) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, source=file, **overrides)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "<dict>", **overrides) -> "ModelConfig":
    for reader in reversed(list(_READERS.values())):
      config = reader(hf, source)
      if config is not None:
        return config.replace(**overrides) if overrides else config
    model_type = hf.get("model_type", "qwen2")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"{source}: model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ValueError(f"{source}: missing field(s) {missing}")
    # transformers >= 5 nests rope settings in `rope_parameters`; released Qwen2.5 files keep a top-level `rope_theta`.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
      raise NotImplementedError(f"{source}: rope scaling type {rope_type!r} is not implemented (only plain RoPE)")
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if hf.get("mlp_bias"):
      raise NotImplementedError(f"{source}: mlp_bias=true is not implemented")
    if hf.get("use_sliding_window"):
      raise NotImplementedError(f"{source}: use_sliding_window=true is not implemented")
    heads = hf["num_attention_heads"]
    if model_type == "qwen2":
      qkv_bias, o_bias = True, False  # Qwen2 always biases q/k/v and never o_proj
    else:
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` contents that transformers reads back into the same architecture."""
    hf = {
        "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "torch_dtype": self.param_dtype,
        "dtype": self.param_dtype,
    }
    if self.model_type == "qwen2":
      if not self.qkv_bias or self.o_bias:
        raise ValueError("a qwen2 checkpoint always has q/k/v bias and no o_proj bias; use model_type='llama'")
      hf["use_sliding_window"] = False
    else:
      if self.qkv_bias != self.o_bias:
        raise ValueError("a llama checkpoint biases q/k/v/o together (attention_bias); qkv_bias must equal o_bias")
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = False
    return hf
