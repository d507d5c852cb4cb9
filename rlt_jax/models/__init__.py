"""Decoder LMs as Flax linen modules applied to plain params pytrees: the family interface (`family`), the
built-in Qwen2 / Llama family (`qwen2`), and the functions every stage calls (`decoder`)."""
from rlt_jax.models.config import ModelConfig
from rlt_jax.models.decoder import (
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
