"""Autoregressive sampling with a KV cache, inside jit, from the training params on their own mesh.

RL spends most of its wall time generating. The official code ships weights to separate vLLM servers every step; here
the sampler reads the same params pytree (sharded or not) that the trainer updates, so there is no weight copy.

Two jitted programs:
  `prefill`  runs the B prompts once (not B·M times) and keeps their keys/values: the prompt cache [L, B, P, K, E].
  `decode`   one `lax.while_loop` over new tokens. Each of the M samples of prompt b attends to prompt b's cache (the
             queries are grouped as [B, M]) plus its own generation cache [L, B·M, K, T−1, E], and the loop stops as
             soon as every row has finished. The softmax parts are combined exactly (one softmax over all the
             scores), so sharing the prompt cache changes nothing numerically.

KV cache size (kept in the compute dtype `config.dtype`, so bf16 compute gives a bf16 cache):
  bytes = 2 · L · K · E · itemsize · (B·P + B·M·max(T−1, 1))
(2 for keys and values; `kv_cache_bytes` computes it). Sharing the prompt cache saves B·(M−1)·P token slots against a
per-row cache of B·M·(P+T). Qwen2.5-0.5B (L=24, K=2, E=64) in bf16 takes 12 KiB per token slot.

Costs to know: every decode step reads the whole preallocated generation cache (unwritten slots are masked), so a
step costs O(P + T), not O(P + t). Prefill of prompts longer than one attention block uses `qwen2.blocked_attention`
(O(block·P) memory, no [B, H, P, P] scores), shorter ones one dense softmax, or the fused kernel that
`config.attention_impl` names (e.g. "cudnn" on GPU).

Shapes: B prompts, M samples per prompt (`num_samples`), R = B·M rows, P prompt length, T `max_new_tokens`, L layers,
K kv heads, G query heads per kv head, E head dim, D hidden, V vocab.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import sharding
from rlt_jax.models import qwen2
from rlt_jax.models.config import ModelConfig

_MASKED = -1e30  # finite, so masking never makes NaN; every decode query sees at least itself


class SampleOutput(NamedTuple):
  """What `sample` returns. Rows b·M … b·M+M−1 are the M samples of prompt b."""
  tokens: jax.Array     # [R, T] int32; after a row's eos (and after an early stop) every slot is `pad_id`
  logprobs: jax.Array   # [R, T] fp32, log-prob of each token (see `sample`); 0 on padding
  lengths: jax.Array    # [R] int32, generated tokens including the eos
  finished: jax.Array   # [R] bool, True where the row emitted one of `eos_ids`


class PromptCache(NamedTuple):
  k: jax.Array        # [L, B, P, K, E] compute dtype
  v: jax.Array        # [L, B, P, K, E]
  mask: jax.Array     # [B, P] bool, True on real prompt tokens
  lengths: jax.Array  # [B] int32 real prompt tokens = RoPE position of the first generated token


def kv_cache_bytes(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, num_samples: int = 1) -> int:
  """Bytes of the prompt cache plus the generation cache that `sample` allocates (see the module docstring)."""
  per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(config.jnp_dtype).itemsize
  return per_slot * (batch * prompt_len + batch * num_samples * max(max_new_tokens - 1, 1))


# ------------------------------------------------------------------------------------------------------ model pieces
def _last_logits(config: ModelConfig, params, x_B1D):
  h = qwen2.rms_norm(x_B1D, params["final_norm"]["scale"], config.rms_norm_eps)
  return qwen2.lm_head(config, params, h)[:, 0]


_CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", None)
_STEP_CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)  # the caches as the decode loop reads them


@functools.partial(jax.jit, static_argnums=0)
def prefill(config: ModelConfig, params, prompt_ids, prompt_mask) -> tuple[PromptCache, jax.Array]:
  """Runs left-padded prompts [B, P] once: their cache and the fp32 logits [B, V] of the first new token."""
  ids_BP = jnp.asarray(prompt_ids, jnp.int32)
  mask_BP = jnp.asarray(prompt_mask).astype(bool)
  cos, sin = qwen2.rope_cos_sin(qwen2.positions_from_mask(mask_BP), config.head_dim, config.rope_theta)
  # Long prompts (RLT prompts hold the whole solution) take the blocked attention, no [B, H, P, P] scores. Its
  # padding rows' keys/values differ from the dense path's, but decode never attends to them.
  mask = qwen2.self_attention_mask(config, mask_BP)
  attend = lambda q, k, v: qwen2.self_attention(config, q, k, v, mask)  # noqa: E731

  def body(x, lp):
    x, k, v = qwen2.decoder_block(config, lp, x, cos, sin, attend)
    return x, (k, v)

  x, (k, v) = jax.lax.scan(body, qwen2.embed_tokens(config, params, ids_BP), params["layers"])
  cache = PromptCache(sharding.constrain(k, _CACHE_AXES), sharding.constrain(v, _CACHE_AXES), mask_BP,
                      mask_BP.sum(-1).astype(jnp.int32))
  # Left padding puts every prompt's last real token in the last column.
  return cache, _last_logits(config, params, x[:, -1:])


def _cached_attention(q_R1KGE, k_R1KE, v_R1KE, *, pk_BKPE, pv_BKPE, pmask_BP, gk_RKSE, gv_RKSE, gvisible_S):
  """One new query per row against [its prompt's cache, its own generated slots, itself], one exact softmax.

  The caches are heads-before-positions ([.., K, S, E]) so every einsum here is a plain batched matmul: with the
  [.., S, K, E] layout XLA CPU transposed the whole cache of every layer on every step."""
  B, P = pmask_BP.shape
  R, _, K, G, E = q_R1KGE.shape
  M = R // B
  f32 = jnp.float32
  scale = E ** -0.5
  q_RKGE = q_R1KGE[:, 0]
  # The M samples of prompt b share prompt b's keys: group the rows as [B, M] instead of copying the cache M times.
  q_BKNE = q_RKGE.reshape(B, M, K, G, E).transpose(0, 2, 1, 3, 4).reshape(B, K, M * G, E)
  s_p = jnp.einsum("bkne,bkpe->bknp", q_BKNE, pk_BKPE, preferred_element_type=f32)
  s_p = jnp.where(pmask_BP[:, None, None, :], s_p * scale, _MASKED)
  s_g = jnp.einsum("rkge,rkse->rkgs", q_RKGE, gk_RKSE, preferred_element_type=f32)
  s_g = jnp.where(gvisible_S, s_g * scale, _MASKED)
  s_s = jnp.einsum("rkge,rke->rkg", q_RKGE, k_R1KE[:, 0], preferred_element_type=f32) * scale
  # One softmax over the three parts without concatenating them: a shared max and a shared normaliser.
  m_p = s_p.max(-1).reshape(B, K, M, G).transpose(0, 2, 1, 3).reshape(R, K, G)
  m = jnp.maximum(jnp.maximum(m_p, s_g.max(-1)), s_s)
  m_BKN = m.reshape(B, M, K, G).transpose(0, 2, 1, 3).reshape(B, K, M * G)
  e_p = jnp.exp(s_p - m_BKN[..., None])
  e_g = jnp.exp(s_g - m[..., None])
  e_s = jnp.exp(s_s - m)
  z_p = e_p.sum(-1).reshape(B, K, M, G).transpose(0, 2, 1, 3).reshape(R, K, G)
  inv = 1.0 / (z_p + e_g.sum(-1) + e_s)
  dt = v_R1KE.dtype
  o_p = jnp.einsum("bknp,bkpe->bkne", e_p.astype(dt), pv_BKPE, preferred_element_type=f32)
  o_p = o_p.reshape(B, K, M, G, E).transpose(0, 2, 1, 3, 4).reshape(R, K, G, E)
  o_g = jnp.einsum("rkgs,rkse->rkge", e_g.astype(dt), gv_RKSE, preferred_element_type=f32)
  out = (o_p + o_g + e_s[..., None] * v_R1KE[:, 0, :, None, :].astype(f32)) * inv[..., None]
  return out.astype(dt).reshape(R, 1, K * G, E)


def _decode_step(config: ModelConfig, params, pk, pv, pmask_BP, gk, gv, tok_R, pos_R, slot):
  """Feeds one token per row at RoPE position `pos_R`; writes its k/v at generation slot `slot`; next logits [R, V].
  pk/pv: prompt cache [L, B, K, P, E]; gk/gv: generation cache [L, R, K, S, E].

  On CPU XLA copies each layer's cache slice out of the stacked caches before its matmuls. Unrolling the layers over
  per-layer cache arrays avoids those copies but measured no faster on a quiet 2-core machine (bench/sampling.py,
  B=16 and 64) and doubles the decode compile time at 24 layers, so the layers stay one `scan`."""
  x = qwen2.embed_tokens(config, params, tok_R[:, None])
  cos, sin = qwen2.rope_cos_sin(pos_R[:, None], config.head_dim, config.rope_theta)
  gvisible_S = jnp.arange(gk.shape[3]) < slot  # slots 0 … slot−1 hold earlier generated tokens

  def body(x, layer):
    lp, lpk, lpv, lgk, lgv = layer
    attend = functools.partial(_cached_attention, pk_BKPE=lpk, pv_BKPE=lpv, pmask_BP=pmask_BP, gk_RKSE=lgk,
                               gv_RKSE=lgv, gvisible_S=gvisible_S)
    x, k, v = qwen2.decoder_block(config, lp, x, cos, sin, attend)
    return x, (k, v)

  x, (k_new, v_new) = jax.lax.scan(body, x, (params["layers"], pk, pv, gk, gv))
  # One in-place write for all layers (the cache is a while_loop carry, so XLA updates it without a copy).
  gk = jax.lax.dynamic_update_slice_in_dim(gk, k_new.swapaxes(2, 3).astype(gk.dtype), slot, axis=3)
  gv = jax.lax.dynamic_update_slice_in_dim(gv, v_new.swapaxes(2, 3).astype(gv.dtype), slot, axis=3)
  return _last_logits(config, params, x), gk, gv


# ------------------------------------------------------------------------------------------------------- token choice
def _choose(logits_RV, key, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool):
  """The next token of each row and its log-prob under the *unfiltered* softmax(logits / T) (T = 1 when greedy)."""
  if greedy:
    tok = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits_RV, axis=-1)
  else:
    scaled = logits_RV / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if top_k is None and not use_top_p:
      tok = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    else:
      # Sample in the sorted top-k space (k = V for top-p alone); top-p then keeps the shortest prefix whose mass
      # reaches p, renormalised within the top k, as transformers' TopK-then-TopP warpers do.
      vals, idx = jax.lax.top_k(scaled, top_k or scaled.shape[-1])
      if use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(mass_before < top_p, vals, -jnp.inf)  # the first token always stays
      j = jax.random.categorical(key, vals, axis=-1)
      tok = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


class _State(NamedTuple):
  step: jax.Array      # index of the token chosen in this iteration
  last: jax.Array      # [R] token chosen in the previous iteration
  tokens: jax.Array    # [R, T]
  logprobs: jax.Array  # [R, T]
  lengths: jax.Array   # [R]
  finished: jax.Array  # [R]
  gk: jax.Array        # [L, R, K, S, E] generation cache, S = max(T−1, 1)
  gv: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "num_samples", "greedy", "top_k", "use_top_p"))
def decode(config: ModelConfig, params, cache: PromptCache, logits_BV, rng, temperature, top_p, eos_ids, pad_id, *,
           max_new_tokens: int, num_samples: int, greedy: bool, top_k: int | None, use_top_p: bool) -> SampleOutput:
  """The decode loop after `prefill`: one `lax.while_loop`, stopping once every row has finished."""
  B = logits_BV.shape[0]
  R, T = B * num_samples, max_new_tokens
  eos = jnp.asarray(eos_ids, jnp.int32)
  pad = jnp.asarray(pad_id, jnp.int32)
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)
  rows = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
  pos0_R = jnp.repeat(cache.lengths, num_samples)

  tok0, lp0 = choose(rows(jnp.repeat(logits_BV, num_samples, axis=0)), jax.random.fold_in(rng, 0))
  S = max(T - 1, 1)
  gshape = (config.num_layers, R, config.num_kv_heads, S, config.head_dim)
  zeros = lambda: sharding.constrain(jnp.zeros(gshape, config.jnp_dtype), _STEP_CACHE_AXES)  # noqa: E731
  # Heads before positions once here, not per layer per step inside the loop (see `_cached_attention`).
  pk, pv = (sharding.constrain(c.swapaxes(2, 3), _STEP_CACHE_AXES) for c in (cache.k, cache.v))
  state = _State(step=jnp.int32(1), last=tok0,
                 tokens=rows(jnp.full((R, T), pad, jnp.int32).at[:, 0].set(tok0)),
                 logprobs=rows(jnp.zeros((R, T), jnp.float32).at[:, 0].set(lp0)),
                 lengths=jnp.ones((R,), jnp.int32), finished=jnp.isin(tok0, eos), gk=zeros(), gv=zeros())

  def cond(s: _State):
    return (s.step < T) & ~jnp.all(s.finished)

  def body(s: _State):
    i = s.step
    logits, gk, gv = _decode_step(config, params, pk, pv, cache.mask, s.gk, s.gv, s.last, pos0_R + i - 1, i - 1)
    tok, lp = choose(logits, jax.random.fold_in(rng, i))
    done = s.finished
    out_tok = jnp.where(done, pad, tok)
    out_lp = jnp.where(done, 0.0, lp)
    return _State(step=i + 1, last=tok,
                  tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, out_tok[:, None], i, axis=1),
                  logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, out_lp[:, None], i, axis=1),
                  lengths=s.lengths + (~done).astype(jnp.int32),
                  finished=done | jnp.isin(tok, eos), gk=gk, gv=gv)

  s = jax.lax.while_loop(cond, body, state)
  return SampleOutput(s.tokens, s.logprobs, s.lengths, s.finished)


# ------------------------------------------------------------------------------------------------------------ public
def sample(config: ModelConfig, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int, temperature: float,
           top_k: int | None = None, top_p: float | None = None, eos_ids: Sequence[int] = (), num_samples: int = 1,
           pad_id: int = 0) -> SampleOutput:
  """Samples `num_samples` continuations of each left-padded prompt.

  prompt_ids, prompt_mask: [B, P]; the mask is 1 on real tokens, which must be right-aligned (left padding), and
    prompts may differ in length. The first generated token's RoPE position is the prompt's real length.
  temperature: 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / temperature).
  top_k / top_p: restrict what is *drawn* (top-k first, then nucleus top-p within it). The returned `logprobs` are
    always of the chosen token under the full, unfiltered softmax(logits / temperature) in fp32 (softmax(logits) at
    T = 1 when greedy): the quantity the RL loss and rewards compare against a teacher-forced forward.
  eos_ids: a row finishes at the first of these; later slots hold `pad_id` with log-prob 0.
  Under `sharding.use_mesh`, rows are sharded over the "batch" rule (data, fsdp) and heads over tensor, with params
  as `checkpoint.load_hf(..., mesh=...)` / `shard_params` place them.
  """
  max_new_tokens, num_samples = _check_int("max_new_tokens", max_new_tokens), _check_int("num_samples", num_samples)
  temperature = float(temperature)
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"sampling.sample: temperature={temperature} must be a finite number >= 0 (0 = greedy)")
  V = config.vocab_size
  if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= V):
    raise ValueError(f"sampling.sample: top_k={top_k!r} must be None or an int in [1, vocab_size={V}]")
  if top_p is not None and not (0.0 < float(top_p) <= 1.0):
    raise ValueError(f"sampling.sample: top_p={top_p!r} must be None or in (0, 1]")
  eos_ids = tuple(int(e) for e in ((eos_ids,) if isinstance(eos_ids, (int, np.integer)) else eos_ids))
  bad = [e for e in eos_ids if not 0 <= e < V]
  if bad:
    raise ValueError(f"sampling.sample: eos_ids {bad} are outside the vocabulary [0, {V})")
  if not 0 <= int(pad_id) < V:
    raise ValueError(f"sampling.sample: pad_id={pad_id} is outside the vocabulary [0, {V})")
  _check_prompts(prompt_ids, prompt_mask, V)

  greedy = temperature == 0.0
  use_top_p = not greedy and top_p is not None and float(top_p) < 1.0
  cache, logits = prefill(config, params, prompt_ids, prompt_mask)
  return decode(config, params, cache, logits, rng, jnp.float32(temperature if not greedy else 1.0),
                jnp.float32(1.0 if top_p is None else top_p), jnp.asarray(eos_ids, jnp.int32), jnp.int32(pad_id),
                max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=greedy,
                top_k=None if greedy or top_k is None else int(top_k), use_top_p=use_top_p)


def _check_int(name: str, value) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"sampling.sample: {name}={value!r} must be an int >= 1")
  return int(value)


def _check_prompts(prompt_ids, prompt_mask, vocab_size: int) -> None:
  """Shape/padding checks with row numbers, done on the host when the inputs are concrete."""
  arrays = (prompt_ids, prompt_mask)
  if any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable)
         for a in arrays):
    return  # traced or multi-process global arrays: nothing to read here; the caller owns the layout
  ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
  if ids.ndim != 2 or ids.shape != mask.shape or 0 in ids.shape:
    raise ValueError(f"sampling.sample: prompt_ids {ids.shape} and prompt_mask {mask.shape} must be the same "
                     "non-empty [batch, prompt_len] shape")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"sampling.sample: prompt_ids must be integer token ids, got dtype {ids.dtype}")
  real = mask.astype(bool)
  empty = np.flatnonzero(~real.any(-1))
  if empty.size:
    raise ValueError(f"sampling.sample: prompt row {int(empty[0])} has no real token (prompt_mask all 0)")
  not_left = np.flatnonzero((real[:, :-1] & ~real[:, 1:]).any(-1))
  if not_left.size:
    raise ValueError(f"sampling.sample: prompt row {int(not_left[0])} is not left-padded (a 0 follows a 1 in "
                     "prompt_mask); pad prompts on the left")
  bad_rows = np.flatnonzero((((ids < 0) | (ids >= vocab_size)) & real).any(-1))
  if bad_rows.size:
    raise ValueError(f"sampling.sample: prompt row {int(bad_rows[0])} holds token ids outside the vocabulary "
                     f"[0, {vocab_size})")
