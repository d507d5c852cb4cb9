"""The sampler's two compiled programs: `prefill` of the prompts, then `decode`, one program whose cost follows the
tokens written, not the budget.

`prefill` runs the B prompts once (not B·G times) and keeps their keys/values: the prompt cache [L, B, P, K, E].

`decode` writes each row's generated keys/values into a generation cache of S = max(T−1, 1) slots and stops once
every row has finished. The G samples of prompt b attend to prompt b's cache (queries grouped as [B, G]) plus their
own slots, in one exact softmax. Two schedules keep a step's work to what is live (`Schedule`):
- windows: a step at generation slot t reads only the first w slots of the cache, w the smallest of the static
  window sizes (`window`, doubling, up to S) that holds t; the loop runs one `lax.while_loop` per window size, in
  order, each ending when t leaves it. A step reads at most 2·t slots (+ the first window), never all S.
- row buckets: rows that finished keep no slot for long. Once every group (prompt) has at most half as many live rows
  as it has slots, the live rows move to the front of their group (stable, so their caches move with them) and the
  loop goes on over half as many rows (a few static sizes, `buckets`, each a loop of its own in the one program),
  down to `min_rows`; with one sample per prompt the prompts themselves are halved. Packing beats refilling the freed
  slots with waiting prompts here because an RL step's prompts are all known up front and each sampler call is one
  group of them: refilling would need a prefill inside the decode loop and gives nothing once the queue is empty,
  which is exactly when the long tail runs.
Under a mesh the packing is local to each device (rows never cross devices: each device holds whole groups, or a
slice of one), so it moves no data between devices. The sampled token of a row depends on (key, step, row) only, so
the schedule changes no result: it is the same computation on fewer rows and fewer slots.

Cost of one decode step (bytes read; the attention reads what the windows and buckets leave):
  weights + rows_j · (L · 2 · K · E · itemsize) · (w + P / G_j) ,   w < max(2·t, first window),
with t the furthest position of a live row and rows_j (G_j a prompt) the current bucket, halved each time every
prompt's live rows fit in half its slots.
KV cache (compute dtype): 2 · L · K · E · itemsize · (B·P + R·S_alloc), S_alloc = S rounded up to the first window.

Shapes (docs/architecture.md's glossary): B prompts, G samples per prompt, R = B·G rows, P prompt length,
T `max_new_tokens`, S generation slots, W a window, L layers, K kv heads, Q query heads per kv head, E head dim,
V vocab; Z devices the rows are split over, r = R/Z rows a device, n rows a device in the current bucket.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlt_jax import sharding
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

_MASKED = -1e30  # finite, so masking never makes NaN; every decode query sees at least itself


class Schedule(NamedTuple):
  """How `decode` keeps its work to the live rows and written slots (static; hashable)."""
  window: int = 256   # first attention window over the generation cache (doubles up to S); 0 = always all S slots
  buckets: int = 4    # row bucket sizes at most (R, R/2, R/4, ...); 1 = all rows until the last one finishes
  min_rows: int = 32  # no bucket of fewer rows (below it a step costs about the same: the weights dominate)


WHOLE = Schedule(window=0, buckets=1)  # the sampler before schedules: every step reads every slot of every row


class SampleOutput(NamedTuple):
  """What `decode` returns. Rows b·G … b·G+G−1 are the G samples of prompt b."""
  tokens: jax.Array     # [R, T] int32; after a row's eos (and after an early stop) every slot is `pad_id`
  logprobs: jax.Array   # [R, T] fp32, log-prob of each token; 0 on padding
  lengths: jax.Array    # [R] int32, generated tokens including the eos
  finished: jax.Array   # [R] bool, True where the row emitted one of `eos_ids`
  row_steps: jax.Array = None    # [] fp32, rows the decode steps computed, summed over steps (live or not)
  slots_read: jax.Array = None   # [] fp32, generation-cache slots the decode steps' attention read, summed


class PromptCache(NamedTuple):
  k: jax.Array        # [L, B, P, K, E] compute dtype
  v: jax.Array        # [L, B, P, K, E]
  mask: jax.Array     # [B, P] bool, True on real prompt tokens
  lengths: jax.Array  # [B] int32 real prompt tokens = RoPE position of the first generated token


def windows(S: int, first: int) -> tuple[int, ...]:
  """The static window sizes over S generation slots: first, 2·first, ... and the allocation (a multiple of first)."""
  if first <= 0 or first >= S:
    return (S,)
  out = [first]
  while out[-1] < S:
    out.append(out[-1] * 2)
  return tuple(min(w, -(-S // first) * first) for w in out)


class Layout(NamedTuple):
  """How the R rows sit on the Z devices of the batch axis, and the buckets they shrink through (static)."""
  Z: int                 # devices the rows are split over
  Zp: int                # devices the prompts are split over (Z when each holds whole groups, else 1)
  stages: tuple          # ((groups a device, slots a group), ...) of each bucket, largest first


def layout(B: int, G: int, Z: int, schedule: Schedule) -> Layout:
  R = B * G
  if B % Z == 0:  # each device holds B/Z whole groups
    stages, Zp = [(B // Z, G)], Z
  elif Z % B == 0:  # each device holds a slice of one group
    stages, Zp = [(1, R // Z)], 1
  else:  # groups straddle devices: no packing (it would move rows between devices)
    return Layout(Z, 1, ((1, R // Z),))
  while len(stages) < schedule.buckets:
    g, m = stages[-1]
    nxt = (g, -(-m // 2)) if m > 1 else (-(-g // 2), 1) if g > 1 else None
    if nxt is None or Z * nxt[0] * nxt[1] < schedule.min_rows:
      break
    stages.append(nxt)
  return Layout(Z, Zp, tuple(stages))


def kv_cache_bytes(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, num_samples: int = 1,
                   window: int = Schedule().window) -> int:
  """Bytes of the prompt cache plus the generation cache that `decode` allocates."""
  per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(config.jnp_dtype).itemsize
  slots = windows(max(max_new_tokens - 1, 1), window)[-1]
  return per_slot * (batch * prompt_len + batch * num_samples * slots)


# ------------------------------------------------------------------------------------------------------ model pieces
def _last_logits(config: ModelConfig, params, x_B1D):
  return decoder.head(config, params, x_B1D)[:, 0]


_CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", None)
# The caches as the decode loop keeps them: rows (or prompts) as [devices, per device], heads before positions.
_ROW_CACHE_AXES = ("layers", "batch", None, "act_kv_heads", "length", None)


@functools.partial(jax.jit, static_argnums=0)
def prefill(config: ModelConfig, params, prompt_ids, prompt_mask) -> tuple[PromptCache, jax.Array]:
  """Runs left-padded prompts [B, P] once: their cache and the fp32 logits [B, V] of the first new token."""
  ids_BP = jnp.asarray(prompt_ids, jnp.int32)
  mask_BP = jnp.asarray(prompt_mask).astype(bool)
  cos, sin = decoder.rope(config, decoder.positions_from_mask(mask_BP))
  # Long prompts (RLT prompts hold the whole solution) take the blocked attention, no [B, H, P, P] scores. Its
  # padding rows' keys/values differ from the dense path's, but decode never attends to them.
  mask = decoder.self_attention_mask(config, mask_BP)
  attend = lambda q, k, v: decoder.self_attention(config, q, k, v, mask)  # noqa: E731

  def body(x, lp):
    x, k, v = decoder.layer(config, lp, x, cos, sin, attend)
    return x, (k, v)

  x, (k, v) = jax.lax.scan(body, decoder.embed_tokens(config, params, ids_BP), params["layers"])
  cache = PromptCache(sharding.constrain(k, _CACHE_AXES), sharding.constrain(v, _CACHE_AXES), mask_BP,
                      mask_BP.sum(-1).astype(jnp.int32))
  # Left padding puts every prompt's last real token in the last column.
  return cache, _last_logits(config, params, x[:, -1:])


def _cached_attention(q_R1KQE, k_R1KE, v_R1KE, *, pk_BKPE, pv_BKPE, pmask_BP, gk_RKWE, gv_RKWE, gvisible_W):
  """One new query per row against [its prompt's cache, its own generated slots, itself], one exact softmax.

  The caches are heads-before-positions ([.., K, W, E]) so every einsum here is a plain batched matmul: with the
  [.., W, K, E] layout XLA CPU transposed the whole cache of every layer on every step."""
  B, P = pmask_BP.shape
  R, _, K, Q, E = q_R1KQE.shape
  G = R // B
  f32 = jnp.float32
  scale = E ** -0.5
  q_RKQE = q_R1KQE[:, 0]
  # The G samples of prompt b share prompt b's keys: group the rows as [B, G] instead of copying the cache G times.
  q_BKJE = q_RKQE.reshape(B, G, K, Q, E).transpose(0, 2, 1, 3, 4).reshape(B, K, G * Q, E)
  s_p = jnp.einsum("bkje,bkpe->bkjp", q_BKJE, pk_BKPE, preferred_element_type=f32)
  s_p = jnp.where(pmask_BP[:, None, None, :], s_p * scale, _MASKED)
  s_g = jnp.einsum("rkqe,rkwe->rkqw", q_RKQE, gk_RKWE, preferred_element_type=f32)
  s_g = jnp.where(gvisible_W, s_g * scale, _MASKED)
  s_s = jnp.einsum("rkqe,rke->rkq", q_RKQE, k_R1KE[:, 0], preferred_element_type=f32) * scale
  # One softmax over the three parts without concatenating them: a shared max and a shared normaliser.
  m_p = s_p.max(-1).reshape(B, K, G, Q).transpose(0, 2, 1, 3).reshape(R, K, Q)
  m = jnp.maximum(jnp.maximum(m_p, s_g.max(-1)), s_s)
  m_BKJ = m.reshape(B, G, K, Q).transpose(0, 2, 1, 3).reshape(B, K, G * Q)
  e_p = jnp.exp(s_p - m_BKJ[..., None])
  e_g = jnp.exp(s_g - m[..., None])
  e_s = jnp.exp(s_s - m)
  z_p = e_p.sum(-1).reshape(B, K, G, Q).transpose(0, 2, 1, 3).reshape(R, K, Q)
  inv = 1.0 / (z_p + e_g.sum(-1) + e_s)
  dt = v_R1KE.dtype
  o_p = jnp.einsum("bkjp,bkpe->bkje", e_p.astype(dt), pv_BKPE, preferred_element_type=f32)
  o_p = o_p.reshape(B, K, G, Q, E).transpose(0, 2, 1, 3, 4).reshape(R, K, Q, E)
  o_g = jnp.einsum("rkqw,rkwe->rkqe", e_g.astype(dt), gv_RKWE, preferred_element_type=f32)
  out = (o_p + o_g + e_s[..., None] * v_R1KE[:, 0, :, None, :].astype(f32)) * inv[..., None]
  return out.astype(dt).reshape(R, 1, K * Q, E)


def _decode_step(config: ModelConfig, params, caches, pmask_BP, tok_R, pos_R, slot, *, n: int, groups: int,
                 window: int):
  """Feeds one token per row at RoPE position `pos_R` and writes its k/v at generation slot `slot`; the next logits
  [R, V] and the caches. caches = (pk, pv, gk, gv): prompt caches [L, Zp, B/Zp, K, P, E] of which the first `groups`
  prompts a device are read, generation caches [L, Z, r, K, S, E] of which the first n rows a device and the first
  `window` slots are read. Each layer's slices are cut inside the layer loop (one copy of what is read, if any)."""
  pk, pv, gk, gv = caches
  L, Z, _, K, _, E = gk.shape
  P = pk.shape[4]
  x = decoder.embed_tokens(config, params, tok_R[:, None])
  cos, sin = decoder.rope(config, pos_R[:, None])
  gvisible_W = jnp.arange(window) < slot  # slots 0 … slot−1 hold earlier generated tokens

  def cut(c, l, rows, length):
    part = jax.lax.dynamic_slice(c, (l, 0, 0, 0, 0, 0), (1, c.shape[1], rows, K, length, E))
    return part.reshape(c.shape[1] * rows, K, length, E)

  def body(x, layer):
    lp, l = layer
    attend = functools.partial(_cached_attention, pk_BKPE=cut(pk, l, groups, P), pv_BKPE=cut(pv, l, groups, P),
                               pmask_BP=pmask_BP, gk_RKWE=cut(gk, l, n, window), gv_RKWE=cut(gv, l, n, window),
                               gvisible_W=gvisible_W)
    x, k, v = decoder.layer(config, lp, x, cos, sin, attend)
    return x, (k, v)

  # The caches are read-only inside the layer loop and written once after it, for all layers: carried through the
  # layer loop instead, XLA copied both whole caches in and out of it on every step.
  x, (k_new, v_new) = jax.lax.scan(body, x, (params["layers"], jnp.arange(L)))
  put = lambda c, new: jax.lax.dynamic_update_slice(  # noqa: E731  in place: the cache is a while_loop carry
      c, new.reshape(L, Z, n, K, 1, E).astype(c.dtype), (0, 0, 0, 0, slot, 0))
  gk, gv = put(gk, k_new), put(gv, v_new)
  return _last_logits(config, params, x), (pk, pv, gk, gv)


# ------------------------------------------------------------------------------------------------------- token choice
def choose(logits_RV, keys_R, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool):
  """The next token of each row (drawn with that row's key) and its log-prob under the *unfiltered*
  softmax(logits / T) (T = 1 when greedy)."""
  draw = jax.vmap(jax.random.categorical)
  if greedy:
    tok = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits_RV, axis=-1)
  else:
    scaled = logits_RV / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if top_k is None and not use_top_p:
      tok = draw(keys_R, scaled).astype(jnp.int32)
    else:
      # Sample in the sorted top-k space (k = V for top-p alone); top-p then keeps the shortest prefix whose mass
      # reaches p, renormalised within the top k, as transformers' TopK-then-TopP warpers do.
      vals, idx = jax.lax.top_k(scaled, top_k or scaled.shape[-1])
      if use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(mass_before < top_p, vals, -jnp.inf)  # the first token always stays
      j = draw(keys_R, vals)
      tok = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


# -------------------------------------------------------------------------------------------------------- the loop
class _State(NamedTuple):
  step: jax.Array      # index of the token chosen in this iteration
  row: jax.Array       # [Z, n] the row (index within its device, r = empty slot) each slot generates for
  last: jax.Array      # [Z, n] token chosen in the previous iteration
  pos0: jax.Array      # [Z, n] RoPE position of the row's first generated token
  live: jax.Array      # [Z, n] the slot holds a row that has not finished
  caches: tuple        # prompt caches [L, Zp, B/Zp, K, P, E], generation caches [L, Z, r, K, S, E]
  pmask: jax.Array     # [Zp, B/Zp, P]
  tokens: jax.Array    # [Z, r, T] outputs, by row
  logprobs: jax.Array  # [Z, r, T]
  lengths: jax.Array   # [Z, r]
  finished: jax.Array  # [Z, r]
  work: jax.Array      # [2] fp32: rows computed and generation-cache slots read, summed over steps


def _pack(s: _State, keep: int, group_slots: int, *, prompts: bool, chunk: int) -> _State:
  """Moves each group's live slots to its front and keeps `keep` slots a group (groups of `group_slots` slots; with
  `prompts`, slots are whole prompts and the prompt caches move too). Per device, in place: only the cache slots
  written so far are copied, `chunk` slots at a time."""
  Z, n = s.live.shape
  live = s.live.reshape(Z, n // group_slots, group_slots)
  order = jnp.argsort(~live, axis=-1, stable=True)[..., :keep]
  src = (order + jnp.arange(live.shape[1])[:, None] * group_slots).reshape(Z, -1)
  take = lambda x: jnp.take_along_axis(x, src, axis=1)  # noqa: E731
  new_live = take(s.live)
  pk, pv, gk, gv = s.caches
  L, S = gk.shape[0], gk.shape[4]

  def move(c, l, start, length):  # c[l, :, :n][src] -> c[l, :, :len(src)] over `length` slots from `start`
    part = jax.lax.dynamic_slice(c, (l, 0, 0, 0, start, 0), (1, Z, c.shape[2], c.shape[3], length, c.shape[5]))
    moved = jnp.take_along_axis(part, src[None, :, :, None, None, None], axis=2)
    return jax.lax.dynamic_update_slice(c, moved, (l, 0, 0, 0, start, 0))

  written = (jnp.minimum(s.step, S) + chunk - 1) // chunk  # chunks holding slots 0 … step−1

  def layer(l, caches):
    pk, pv, gk, gv = caches
    if prompts:
      pk, pv = move(pk, l, 0, pk.shape[4]), move(pv, l, 0, pv.shape[4])
    gk, gv = jax.lax.fori_loop(0, written, lambda c, kv: (move(kv[0], l, c * chunk, chunk),
                                                          move(kv[1], l, c * chunk, chunk)), (gk, gv))
    return pk, pv, gk, gv

  caches = jax.lax.fori_loop(0, L, layer, (pk, pv, gk, gv))
  pmask = jnp.take_along_axis(s.pmask, src[:, :, None], axis=1) if prompts else s.pmask
  return s._replace(row=jnp.where(new_live, take(s.row), s.tokens.shape[1]),
                    last=take(s.last), pos0=take(s.pos0), live=new_live, caches=caches, pmask=pmask)


@functools.partial(jax.jit, static_argnames=("config", "temperature", "top_p", "eos_ids", "pad_id", "max_new_tokens",
                                             "num_samples", "greedy", "top_k", "use_top_p", "schedule"))
def decode(config: ModelConfig, params, cache: PromptCache, logits_BV, rng, temperature, top_p, eos_ids, pad_id, *,
           max_new_tokens: int, num_samples: int, greedy: bool, top_k: int | None, use_top_p: bool,
           schedule: Schedule = Schedule()) -> SampleOutput:
  """The decode loop after `prefill`: a `lax.while_loop` per (bucket, window), stopping once every row has finished.
  `temperature` and `top_p` (floats), `eos_ids` (a tuple) and `pad_id` are static: constants of the program, so a
  call uploads nothing but its arrays."""
  B, P = cache.mask.shape
  G, T = num_samples, max_new_tokens
  R = B * G
  Z = sharding.shard_count("batch", R)
  lay = layout(B, G, Z, schedule)
  r = R // Z
  wins = windows(max(T - 1, 1), schedule.window)
  S = wins[-1]
  eos = jnp.asarray(eos_ids, jnp.int32)
  pad = jnp.asarray(pad_id, jnp.int32)
  choice = functools.partial(choose, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)
  by_device = lambda x: sharding.constrain(  # noqa: E731
      x.reshape(Z, -1, *x.shape[1:]), ("batch",) + (None,) * x.ndim)
  row_key = lambda step, row: jax.vmap(  # noqa: E731  a row's draw depends on (rng, step, row) only
      lambda i: jax.random.fold_in(jax.random.fold_in(rng, step), i))(row)
  global_row = lambda row: row + jnp.arange(Z)[:, None] * r  # noqa: E731

  # Step 0: the first token of every row from the prefill logits.
  row0 = by_device(jnp.arange(R, dtype=jnp.int32)) % r
  tok0, lp0 = choice(jnp.repeat(logits_BV, G, axis=0), row_key(0, jnp.arange(R)))
  gshape = (config.num_layers, Z, r, config.num_kv_heads, S, config.head_dim)
  zeros = lambda: sharding.constrain(jnp.zeros(gshape, config.jnp_dtype), _ROW_CACHE_AXES)  # noqa: E731
  prompt_view = lambda c: sharding.constrain(  # noqa: E731  [L, B, P, K, E] -> [L, Zp, B/Zp, K, P, E]
      c.swapaxes(2, 3).reshape(c.shape[0], lay.Zp, B // lay.Zp, *c.shape[3:4], c.shape[2], c.shape[4]),
      _ROW_CACHE_AXES if lay.Zp > 1 else ("layers", None, None, "act_kv_heads", None, None))
  tokens = by_device(jnp.full((R, T), pad, jnp.int32).at[:, 0].set(tok0))
  s = _State(step=jnp.int32(1), row=row0, last=by_device(tok0), pos0=by_device(jnp.repeat(cache.lengths, G)),
             live=by_device(~jnp.isin(tok0, eos)), caches=(prompt_view(cache.k), prompt_view(cache.v), zeros(),
                                                          zeros()),
             pmask=cache.mask.reshape(lay.Zp, B // lay.Zp, P), tokens=tokens,
             logprobs=by_device(jnp.zeros((R, T), jnp.float32).at[:, 0].set(lp0)),
             lengths=by_device(jnp.ones((R,), jnp.int32)), finished=by_device(jnp.isin(tok0, eos)),
             work=jnp.zeros((2,), jnp.float32))
  # Per device, by row: the slots' rows are indices into this device's r rows (r: nothing to write).
  write = jax.vmap(lambda buf, idx, i, val: buf.at[idx, i].set(val, mode="drop"), in_axes=(0, 0, None, 0))
  add_one = jax.vmap(lambda buf, idx: buf.at[idx].add(1, mode="drop"))
  mark = jax.vmap(lambda buf, idx: buf.at[idx].set(True, mode="drop"))

  for j, (groups, slots) in enumerate(lay.stages):
    n = groups * slots
    pgroups = groups if lay.Zp == lay.Z else B
    nxt = lay.stages[j + 1] if j + 1 < len(lay.stages) else None

    def packable(s, nxt=nxt, groups=groups, slots=slots):
      if nxt is None:
        return jnp.bool_(False)
      per_group = s.live.reshape(Z, groups, slots).sum(-1) if slots > 1 else s.live.sum(-1)
      return per_group.max() <= (nxt[1] if slots > 1 else nxt[0])

    for w in wins:
      def cond(s, w=w, packable=packable):
        return (s.step < T) & (s.step - 1 <= w) & jnp.any(s.live) & ~packable(s)

      def body(s, w=w, n=n, pgroups=pgroups):
        i = s.step
        logits, caches = _decode_step(config, params, s.caches, s.pmask[:, :pgroups].reshape(-1, P),
                                      s.last.reshape(-1), (s.pos0 + i - 1).reshape(-1), i - 1, n=n, groups=pgroups,
                                      window=w)
        tok, lp = choice(logits, row_key(i, global_row(s.row).reshape(-1)))
        tok, lp = tok.reshape(Z, n), lp.reshape(Z, n)
        at = jnp.where(s.live, s.row, r)  # finished rows and empty slots write nothing
        is_eos = jnp.isin(tok, eos)
        return s._replace(step=i + 1, last=tok, live=s.live & ~is_eos, caches=caches,
                          tokens=write(s.tokens, at, i, tok), logprobs=write(s.logprobs, at, i, lp),
                          lengths=add_one(s.lengths, at), finished=mark(s.finished, jnp.where(is_eos, at, r)),
                          work=s.work + jnp.array([Z * n, Z * n * w], jnp.float32))

      s = jax.lax.while_loop(cond, body, s)
    if nxt is not None:  # pack: slots within each group (prompt), or whole prompts once a group is one slot
      by_prompt = slots == 1
      s = _pack(s, nxt[0] if by_prompt else nxt[1], groups if by_prompt else slots, prompts=by_prompt,
                chunk=wins[0])
  flat = lambda x: x.reshape(R, *x.shape[2:])  # noqa: E731
  return SampleOutput(flat(s.tokens), flat(s.logprobs), flat(s.lengths), flat(s.finished), s.work[0], s.work[1])
