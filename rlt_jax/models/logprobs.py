"""Per-token log-probs of sequences under a model, never holding [B, T, V] logits.

  * `token_logprobs`: per-token log-probs of a sequence under a model, computed over sequence chunks so that at most
    [B, chunk, V] fp32 logits exist at once (also under autodiff: each chunk is rematerialised in the backward pass).
  * `hidden_logprobs`: the same from final hidden states (the vocabulary projection in chunks).
The reward (`rewards`), the GRPO update (`train`) and SFT (`sft`) all read log-probs from here.
Shape letters: docs/architecture.md's glossary (C tokens of a chunk, X chunks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig


def hidden_logprobs(config: ModelConfig, params, hidden_BTD, input_ids, *, temperature: float = 1.0,
                    chunk_size: int = 512):
  """[B, T] log-probs of `input_ids` from final hidden states; see `token_logprobs`.

  The output projection, the temperature and the logsumexp run on chunks of `chunk_size` positions inside a
  `lax.map`, so the largest live array is the [B, C, V] fp32 logits of one chunk. Each chunk body is under
  `jax.checkpoint`: the backward pass recomputes a chunk's logits instead of saving all of them.
  """
  if not float(temperature) > 0:
    raise ValueError(f"token_logprobs: temperature={temperature!r} must be > 0")
  if int(chunk_size) < 1:
    raise ValueError(f"token_logprobs: chunk_size={chunk_size!r} must be >= 1")
  ids_BT = jnp.asarray(input_ids, jnp.int32)
  B, T, D = hidden_BTD.shape
  if ids_BT.shape != (B, T):
    raise ValueError(f"token_logprobs: input_ids has shape {ids_BT.shape}, hidden states {hidden_BTD.shape}")
  C = min(int(chunk_size), T)
  X = -(-T // C)
  pad = X * C - T
  # Position t predicts token t+1; the last position predicts nothing (a dummy target 0, dropped below).
  targets_BT = jnp.concatenate([ids_BT[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)
  h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
  tgt = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_XBCD = h.reshape(B, X, C, D).swapaxes(0, 1)
  tgt_XBC = tgt.reshape(B, X, C).swapaxes(0, 1)
  w_DV = decoder.output_kernel(config, params).astype(config.jnp_dtype)

  @jax.checkpoint
  def chunk(args):
    h_BCD, tgt_BC = args
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32) / temperature
    logits_BCV = sharding.constrain(logits_BCV, ("batch", "length", "act_vocab"))
    # A gather of the picked logit (with V sharded, the partitioner masks it per shard and all-reduces); a masked
    # sum over V would cost one more [B, C, V] temporary on CPU.
    picked_BC = jnp.take_along_axis(logits_BCV, tgt_BC[..., None], axis=-1)[..., 0]
    return picked_BC - jax.nn.logsumexp(logits_BCV, axis=-1)

  lp_XBC = jax.lax.map(chunk, (h_XBCD, tgt_XBC))
  lp_BT = lp_XBC.swapaxes(0, 1).reshape(B, X * C)[:, :T]
  out = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp_BT[:, :-1]], axis=1)
  return sharding.constrain(out, ("batch", "length"))


def token_logprobs(config: ModelConfig, params, input_ids, attention_mask=None, *, temperature: float = 1.0,
                   chunk_size: int = 512, positions=None, segment_ids=None, last: int | None = None):
  """Per-token log-probs [B, T] (fp32) of `input_ids` under the model; with `last`, only those of the last `last`
  tokens, [B, last] (the vocabulary projection then runs on the positions that predict them, not on all T).

  Entry t is log softmax(logits[t−1] / temperature)[input_ids[t]] for t >= 1, and 0 at t = 0. Entries at padding (and
  at the first real token of a left-padded row) are finite but meaningless: mask them. Differentiable w.r.t. params
  (GRPO uses the same function). The vocabulary side holds one chunk at a time: about 2·B·chunk_size·V·4 bytes per
  device (the chunk's logits and one temporary), so lower `chunk_size` as the per-device batch grows.
  Jit it with `config`, `temperature` and `chunk_size` static.
  """
  h_BTD = decoder.forward_hidden(config, params, input_ids, attention_mask, positions=positions,
                               segment_ids=segment_ids)
  if last is None:
    return hidden_logprobs(config, params, h_BTD, input_ids, temperature=temperature, chunk_size=chunk_size)
  T = h_BTD.shape[1]
  if not 1 <= int(last) < T:
    raise ValueError(f"token_logprobs: last={last!r} must be in [1, {T - 1}] for a sequence of {T} tokens")
  # Position t−1 predicts token t: the last `last` tokens need the `last` positions before them (one more column in,
  # whose own entry, the placeholder 0, is dropped).
  keep = int(last) + 1
  lp = hidden_logprobs(config, params, h_BTD[:, -keep:], jnp.asarray(input_ids)[:, -keep:], temperature=temperature,
                       chunk_size=chunk_size)
  return lp[:, 1:]
