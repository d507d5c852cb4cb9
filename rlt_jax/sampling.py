"""Autoregressive sampling with a KV cache, inside jit: the public `sample` (checks its inputs, then runs
`decode.prefill` and `decode.decode`).

The sampler reads whatever params pytree it is given, on the context mesh (`sharding.use_mesh`). RL gives it the
rollout copy of the teacher (`rollout`): the compute-dtype params laid out for generation once a step, replicated
over the rows' devices and split over tensor, so that the decode loop gathers no weights.

Shape letters: docs/architecture.md's glossary (B prompts, G samples per prompt (`num_samples`), R = B·G rows,
P prompt length, T `max_new_tokens`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from rlt_jax.decode import WHOLE, PromptCache, SampleOutput, Schedule, decode, kv_cache_bytes, prefill
from rlt_jax.models.config import ModelConfig

__all__ = ["WHOLE", "PromptCache", "SampleOutput", "Schedule", "decode", "kv_cache_bytes", "prefill", "sample"]


# ------------------------------------------------------------------------------------------------------------ public
def sample(config: ModelConfig, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int, temperature: float,
           top_k: int | None = None, top_p: float | None = None, eos_ids: Sequence[int] = (), num_samples: int = 1,
           pad_id: int = 0, schedule: Schedule = Schedule()) -> SampleOutput:
  """Samples `num_samples` continuations of each left-padded prompt.

  prompt_ids, prompt_mask: [B, P]; the mask is 1 on real tokens, which must be right-aligned (left padding), and
    prompts may differ in length. The first generated token's RoPE position is the prompt's real length.
  temperature: 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / temperature).
  top_k / top_p: restrict what is *drawn* (top-k first, then nucleus top-p within it). The returned `logprobs` are
    always of the chosen token under the full, unfiltered softmax(logits / temperature) in fp32 (softmax(logits) at
    T = 1 when greedy): the quantity the RL loss and rewards compare against a teacher-forced forward.
  eos_ids: a row finishes at the first of these; later slots hold `pad_id` with log-prob 0.
  schedule: how the decode loop sheds finished rows and unwritten cache slots (`decode.Schedule`); it changes the
    cost, never the tokens (`decode.WHOLE` is the loop without either).
  Under `sharding.use_mesh`, rows are sharded over the "batch" rule and heads over tensor, with params as
  `hf_checkpoint.load_hf(..., mesh=...)` or the RL step's rollout copy (`rl_step.make_step`) place them.
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
  return decode(config, params, cache, logits, rng, temperature if not greedy else 1.0,
                1.0 if top_p is None else float(top_p), eos_ids, int(pad_id),
                max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=greedy,
                top_k=None if greedy or top_k is None else int(top_k), use_top_p=use_top_p,
                schedule=_check_schedule(schedule))


def _check_schedule(schedule) -> Schedule:
  if not isinstance(schedule, Schedule) or schedule.window < 0 or schedule.buckets < 1 or schedule.min_rows < 1:
    raise ValueError(f"sampling.sample: schedule={schedule!r} must be a decode.Schedule with window >= 0 (0 = the "
                     "whole cache every step), buckets >= 1 and min_rows >= 1")
  return schedule


def _check_int(name: str, value) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"sampling.sample: {name}={value!r} must be an int >= 1")
  return int(value)


def _check_prompts(prompt_ids, prompt_mask, vocab_size: int) -> None:
  """Shape/padding checks with row numbers, done on the host when the inputs are host arrays."""
  if any(isinstance(a, jax.Array) for a in (prompt_ids, prompt_mask)):
    return  # device arrays (RL's uploaded prompts): reading them back would be a transfer; the caller owns them
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
