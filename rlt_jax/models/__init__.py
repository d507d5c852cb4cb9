"""Qwen2-family causal LMs as pure functions over plain params pytrees."""
from rlt_jax.models.config import ModelConfig
from rlt_jax.models.qwen2 import (
    embed_tokens,
    forward,
    forward_hidden,
    init_params,
    lm_head,
    num_params,
    output_kernel,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
)

__all__ = [
    "ModelConfig", "embed_tokens", "forward", "forward_hidden", "init_params", "lm_head", "num_params",
    "output_kernel", "param_logical_axes", "param_shapes", "positions_from_mask",
]
