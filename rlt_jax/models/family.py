"""The model interface: what a decoder family provides, and the registry that picks one by `ModelConfig.family`.

A family is two Flax linen modules and a name map (see `Family`). Everything else (the sampler, the reward, GRPO,
SFT, the planner, checkpoints, HF import/export) reaches a model only through `models/decoder.py`, which calls the
family's modules with `module.apply({"params": params}, ...)` on plain params pytrees; so a family registered here
trains, samples and exports like the built-in Qwen2 / Llama one (`models/qwen2.py`).

The contract (shape letters: docs/architecture.md's glossary):

`decoder(config)`, the whole model. Its params are a nested dict with the per-layer params under "layers", stacked
on a leading axis of `config.num_layers` (a `nn.scan` over `block` with `variable_axes={"params": 0}` gives this),
every param created with logical axis names (`nn.with_logical_partitioning`, the leading axis named "layers"), and
these methods:
  __call__(ids_BT, mask_BT=None, positions_BT=None, segment_ids_BT=None) -> hidden_BTD
      final-normed hidden states in the compute dtype; `mask` 1 on real tokens (left or right padding), positions
      from the mask unless given, `segment_ids` (packed rows) restrict attention to one segment. `config.remat`
      (none | full | dots) applies per layer.
  embed_tokens(ids_BT) -> x_BTD          the first layer's input
  rope(positions_BT) -> (cos_BTE, sin_BTE)   the position tables `block.layer` takes
  head(x_BTD) -> logits_BTV              final norm and output projection, fp32 (the sampler's next-token logits)
  output_kernel() -> w_DV                the output projection of final-normed hidden states (log-probs project
                                         chunk by chunk with it, never holding [B, T, V])
`block(config)`, one layer, whose params are one slice of "layers":
  layer(x_BTD, cos_BTE, sin_BTE, attend) -> (x_BTD, k_BTKE, v_BTKE)
      the layer with its attention as `attend(q_BTKQE, k_BTKE, v_BTKE) -> out_BTHE`, returning the rotated keys and
      values it made. The sampler runs prefill and every decode step through it, with an `attend` that reads its
      KV cache; the family never sees the cache.
`hf_tensors(config)`: one `HFTensor` per param: its path in the params tree, its Hugging Face safetensors name and
the reshapes both ways (`hf_checkpoint.load_hf` / `save_hf` use nothing else).
`read_config(hf_dict, source)` (optional): the family's `ModelConfig` (a subclass may add fields) from a
`config.json`, or None when the file is not of this family; with `ModelConfig.to_hf_dict` it makes exports
round-trip. Families registered later are asked first; the built-in reader comes last.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from rlt_jax.models import config as config_lib
from rlt_jax.models.config import ModelConfig


class HFTensor(NamedTuple):
  """How one param maps to Hugging Face tensors (one per layer when `per_layer`, "{}" in `hf_name` the layer)."""
  path: tuple[str, ...]
  hf_name: str
  per_layer: bool
  to_ours: Callable[[np.ndarray], np.ndarray]   # view -> view, no copy
  to_hf: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
  """A decoder family (the contract is this module's docstring)."""
  name: str
  decoder: Callable[[ModelConfig], Any]     # a linen Module class: decoder(config)
  block: Callable[[ModelConfig], Any]       # a linen Module class: block(config), one layer
  hf_tensors: Callable[[ModelConfig], list[HFTensor]]
  read_config: Callable[[dict, str], ModelConfig | None] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Makes `family` the one `ModelConfig(family=family.name)` runs with (and its `read_config` the first asked)."""
  FAMILIES[family.name] = family
  if family.read_config is not None:
    config_lib.register_reader(family.name, family.read_config)
  return family


def unregister(name: str) -> None:
  """Removes the family `name` and its config reader (tests; a process that changes its mind)."""
  FAMILIES.pop(name, None)
  config_lib.register_reader(name, None)


def family_of(config: ModelConfig) -> Family:
  try:
    return FAMILIES[config.family]
  except KeyError:
    raise ValueError(f"ModelConfig.family={config.family!r} is not registered (registered: {sorted(FAMILIES)}); "
                     "see rlt_jax/models/family.py") from None
