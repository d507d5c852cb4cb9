"""The RLT teacher reward (METHOD_SPEC §2.2): batched, jitted, fp32, never holding [B, T, V] logits.

  R = Σ_i a_i·red_i(ℓ_s over solution) − Σ_j k_j·red_j(d over explanation) + not_matched_penalty·[no end tag]

with ℓ = log softmax(logits / temperature) at the observed token, d = ℓ_t − ℓ_s (or its k3 form) on the explanation
tokens, and the paper's defaults a = (1, 0.01) with (mean, min), k = (3, 0.03) with (mean, max).

Three layers, each usable on its own:
  * `logprobs.token_logprobs` (`rlt_jax.models.logprobs`): per-token log-probs of a sequence under a model, computed
    over sequence chunks so that at most [B, chunk, V] fp32 logits exist at once.
  * `rlt_reward`: the reward from per-token log-probs and masks (pure, jittable, no NaN/inf can reach the output).
  * `rlt_rewards`: teacher/student params + padded ids + span masks -> rewards, in one jitted call.
Shape letters: docs/architecture.md's glossary (T the teacher sequence, S the student's, N the explanation span
left-aligned).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import sharding
from rlt_jax.models import logprobs
from rlt_jax.models.config import ModelConfig

REDUCTIONS = ("mean", "sum", "min", "max")
KL_ESTIMATORS = ("log_ratio", "k3")
# Per-token terms are clipped to ±_CLIP (the official code clips log-probs at −1e5 and KL at +1e5). The bound never
# binds on real log-probs; it keeps every reduction finite, so only a NaN input can make a reduction undefined.
_CLIP = 1e5
_BIG = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward weights (frozen and hashable: a static jit argument). Defaults are the paper's / official run config.

  answer_log_prob_coeff/reductions: r_SS = Σ coeff·reduction(ℓ_s over solution tokens).
  kl_penalty_coeff/reductions: r_KL = Σ coeff·reduction(d over explanation tokens); the reward subtracts it.
  not_matched_penalty: added when the explanation end tag is missing; also sets the fill of undefined reductions
    (empty span or NaN): `not_matched_penalty` for the solution terms, `-not_matched_penalty` for the KL terms.
  kl_estimator: "log_ratio" (d = ℓ_t − ℓ_s of the sampled token) or "k3" (d − 1 + e^(−d)).
  include_teacher_entropy: False returns the "no entropy" variant, d = −ℓ_s (student NLL only).
  """
  answer_log_prob_coeff: tuple[float, ...] = (1.0, 0.01)
  answer_log_prob_reductions: tuple[str, ...] = ("mean", "min")
  kl_penalty_coeff: tuple[float, ...] = (3.0, 0.03)
  kl_penalty_reductions: tuple[str, ...] = ("mean", "max")
  not_matched_penalty: float = -1.0
  kl_estimator: str = "log_ratio"
  include_teacher_entropy: bool = True
  student_temperature: float = 0.7
  teacher_temperature: float = 0.7

  def __post_init__(self):
    for field in ("answer_log_prob_coeff", "answer_log_prob_reductions", "kl_penalty_coeff", "kl_penalty_reductions"):
      value = getattr(self, field)
      if isinstance(value, (str, float, int)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"RewardConfig.{field}={value!r}: expected a tuple")
      object.__setattr__(self, field, tuple(value))  # lists (e.g. from YAML) become hashable tuples
    for coeff, red in (("answer_log_prob_coeff", "answer_log_prob_reductions"),
                       ("kl_penalty_coeff", "kl_penalty_reductions")):
      if len(getattr(self, coeff)) != len(getattr(self, red)):
        raise ValueError(f"RewardConfig: {coeff} has {len(getattr(self, coeff))} entries but {red} has "
                         f"{len(getattr(self, red))}; they pair up one to one")
      bad = [r for r in getattr(self, red) if r not in REDUCTIONS]
      if bad:
        raise ValueError(f"RewardConfig.{red}: unknown reduction(s) {bad}; expected some of {REDUCTIONS}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"RewardConfig.kl_estimator={self.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
    for field in ("student_temperature", "teacher_temperature"):
      if not float(getattr(self, field)) > 0:
        raise ValueError(f"RewardConfig.{field}={getattr(self, field)!r}: must be > 0")

  def replace(self, **kw) -> "RewardConfig":
    return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------------------- reward
def left_align(values_BT, mask_BT, width: int):
  """The entries of each row where `mask` is true, in order, moved to the front: (values [B, N], valid [B, N]).

  A stable argsort of ~mask puts the selected positions first without a Python loop over rows; entries past a row's
  count are 0 and invalid. Rows with more than `width` selected entries are cut to `width`.
  """
  mask_BT = jnp.asarray(mask_BT).astype(bool)
  order_BN = jnp.argsort(~mask_BT, axis=-1, stable=True)[:, :width]
  valid_BN = jnp.arange(width)[None, :] < jnp.sum(mask_BT, axis=-1, keepdims=True)
  vals_BN = jnp.take_along_axis(values_BT, order_BN, axis=-1)
  return jnp.where(valid_BN, vals_BN, 0).astype(values_BT.dtype), valid_BN


def _reduce(x_BN, mask_BN, op: str, fill: float):
  """A masked reduction per row. Undefined results (mean/min/max of an empty span, or a NaN) take `fill`.

  Masked entries never enter an arithmetic op (`where` first), so neither values nor gradients see NaN/inf from
  padding, and the empty-span sentinel (±float32 max) is replaced before it can reach the reward.
  """
  n_B = jnp.sum(mask_BN, axis=-1)
  if op == "mean":
    val = jnp.sum(jnp.where(mask_BN, x_BN, 0.0), axis=-1) / jnp.maximum(n_B, 1)
  elif op == "sum":
    val = jnp.sum(jnp.where(mask_BN, x_BN, 0.0), axis=-1)
  elif op == "min":
    val = jnp.min(jnp.where(mask_BN, x_BN, _BIG), axis=-1)
  else:
    val = jnp.max(jnp.where(mask_BN, x_BN, -_BIG), axis=-1)
  defined = (n_B > 0) | (op == "sum")  # an empty sum is 0, as in the official code
  return jnp.where(defined & ~jnp.isnan(val), val, fill)


def _score(x_BN, mask_BN, coeffs, ops, fill: float, prefix: str, metrics: dict):
  total = jnp.zeros(x_BN.shape[:1], jnp.float32)
  for coeff, op in zip(coeffs, ops):
    part = _reduce(x_BN, mask_BN, op, fill)
    metrics[f"{prefix}_{op}"] = part
    total = total + coeff * part
  return total


def rlt_reward(student_solution_logp, solution_mask, teacher_explanation_logp, student_explanation_logp,
               explanation_mask, matched, config: RewardConfig = RewardConfig()):
  """The RLT reward [B] and its components, from per-token log-probs (METHOD_SPEC §2.2).

  student_solution_logp [B, S] with solution_mask [B, S]: ℓ_s of the student at its solution-content tokens.
  teacher/student_explanation_logp [B, N] with explanation_mask [B, N]: ℓ_t and ℓ_s of the same explanation
    tokens, aligned element by element (see `left_align`).
  matched [B]: the completion has its explanation end tag; False adds `not_matched_penalty`.
  Log-probs are already temperature-scaled. Pure and jittable (`config` static); the inputs are stop-gradient'd.

  Undefined reductions (empty span, NaN) take a fill: `not_matched_penalty` (−1) for the solution terms and
  −not_matched_penalty (+1) for every KL term, including the no-entropy variant. (The official code fills the
  no-entropy variant with −1, which would turn an empty explanation into a +3.03 bonus when that variant is the
  reward; we use +1 there too, so an empty explanation is always penalised.)

  Returns (reward [B], metrics): dict of [B] float32 arrays: solution_logp_<red>, kl_<red>, no_entropy_kl_<red>,
  r_ss, r_kl, r_kl_no_entropy, match_reward, reward_with_entropy, reward_no_entropy, solution_tokens,
  explanation_tokens.
  """
  sg = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))  # noqa: E731
  lp_BS, lt_BN, ls_BN = sg(student_solution_logp), sg(teacher_explanation_logp), sg(student_explanation_logp)
  sol_BS = jnp.asarray(solution_mask).astype(bool)
  expl_BN = jnp.asarray(explanation_mask).astype(bool)
  matched_B = jnp.asarray(matched).astype(bool)
  B = lp_BS.shape[0]
  if lp_BS.ndim != 2 or sol_BS.shape != lp_BS.shape:
    raise ValueError(f"rlt_reward: student_solution_logp {lp_BS.shape} and solution_mask {sol_BS.shape} must be "
                     "the same [B, S] shape")
  if lt_BN.ndim != 2 or not (lt_BN.shape == ls_BN.shape == expl_BN.shape) or lt_BN.shape[0] != B:
    raise ValueError(f"rlt_reward: teacher_explanation_logp {lt_BN.shape}, student_explanation_logp "
                     f"{ls_BN.shape} and explanation_mask {expl_BN.shape} must be the same [B={B}, N] shape")
  if matched_B.shape != (B,):
    raise ValueError(f"rlt_reward: matched has shape {matched_B.shape}, expected ({B},)")

  clip = lambda x: jnp.clip(x, -_CLIP, _CLIP)  # noqa: E731
  lp_BS, lt_BN, ls_BN = clip(lp_BS), clip(lt_BN), clip(ls_BN)
  d_BN = lt_BN - ls_BN
  if config.kl_estimator == "k3":
    d_BN = d_BN - 1.0 + jnp.exp(-d_BN)
  d_BN = clip(d_BN)  # k3 overflows to inf for d < -88; clipped back to a finite value
  metrics: dict = {}
  pen = float(config.not_matched_penalty)
  r_ss = _score(lp_BS, sol_BS, config.answer_log_prob_coeff, config.answer_log_prob_reductions, pen,
                "solution_logp", metrics)
  r_kl = _score(d_BN, expl_BN, config.kl_penalty_coeff, config.kl_penalty_reductions, -pen, "kl", metrics)
  r_kl_ne = _score(-ls_BN, expl_BN, config.kl_penalty_coeff, config.kl_penalty_reductions, -pen,
                   "no_entropy_kl", metrics)
  match = jnp.where(matched_B, 0.0, pen).astype(jnp.float32)
  with_entropy, no_entropy = r_ss - r_kl + match, r_ss - r_kl_ne + match
  reward = with_entropy if config.include_teacher_entropy else no_entropy
  metrics.update(r_ss=r_ss, r_kl=r_kl, r_kl_no_entropy=r_kl_ne, match_reward=match, reward_with_entropy=with_entropy,
                 reward_no_entropy=no_entropy, solution_tokens=jnp.sum(sol_BS, -1).astype(jnp.float32),
                 explanation_tokens=jnp.sum(expl_BN, -1).astype(jnp.float32))
  return reward, metrics


# -------------------------------------------------------------------------------------------- models -> reward
class RewardBatch(NamedTuple):
  """The reward's inputs, one row per completion (B rows). T: teacher sequence, S: student sequence.

  teacher_ids [B, T]: teacher prompt + completion; teacher_mask its real tokens; teacher_expl the explanation tokens.
  student_ids [B, S]: the student example; student_mask its real tokens; student_expl the same explanation tokens
    (same ids, same order); solution_mask the solution-content tokens. matched [B]: the end tag was found.
  """
  teacher_ids: Any
  teacher_mask: Any
  teacher_expl: Any
  student_ids: Any
  student_mask: Any
  student_expl: Any
  solution_mask: Any
  matched: Any


def reward_rows(teacher_config: ModelConfig, teacher_params, student_config: ModelConfig, student_params,
                batch: RewardBatch, reward_config: RewardConfig, *, chunk_size: int, micro_batch: int = 0,
                teacher_last: int | None = None):
  """(reward [B], metrics, teacher log-probs [B, T]) of a batch: pure and traceable (`rlt_rewards` jits it; the RL
  step program calls it inside its own jit). With `micro_batch`, rows are scored in parts of that many inside a
  `lax.map`, so one part's activations are live at a time. With `teacher_last` = N (the RL step: the explanation
  lies in the completion, the last N columns of [prompt | completion]), only those N teacher positions go through
  the vocabulary projection, and the teacher log-probs returned are [B, N]."""
  one = functools.partial(_rewards_of_rows, teacher_config, teacher_params, student_config, student_params,
                          reward_config=reward_config, chunk_size=chunk_size, teacher_last=teacher_last)
  B = batch.teacher_ids.shape[0]
  if not micro_batch or micro_batch >= B:
    return one(batch)
  # Row r goes to part r % n, so each part takes the same slice of every device's rows (no data moves between
  # devices when micro_batch is a multiple of the batch shards).
  n = B // micro_batch
  split = lambda x: jnp.swapaxes(x.reshape(micro_batch, n, *x.shape[1:]), 0, 1)  # noqa: E731
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, *x.shape[2:])  # noqa: E731
  return jax.tree.map(merge, jax.lax.map(one, jax.tree.map(split, batch)))


def _rewards_of_rows(teacher_config, teacher_params, student_config, student_params, batch: RewardBatch, *,
                     reward_config, chunk_size, teacher_last=None):
  b = RewardBatch(*(sharding.constrain(x, ("batch",) + ("length",) * (x.ndim - 1)) for x in batch))
  lt_BT = logprobs.token_logprobs(teacher_config, teacher_params, b.teacher_ids, b.teacher_mask,
                                  temperature=reward_config.teacher_temperature, chunk_size=chunk_size,
                                  last=teacher_last)
  if teacher_last is not None:  # T is now the last N columns: the explanation mask keeps the same columns
    b = b._replace(teacher_expl=b.teacher_expl[:, -teacher_last:])
  ls_BS = logprobs.token_logprobs(student_config, student_params, b.student_ids, b.student_mask,
                                  temperature=reward_config.student_temperature, chunk_size=chunk_size)
  N = min(lt_BT.shape[1], b.student_ids.shape[1])
  lt_BN, t_valid = left_align(lt_BT, b.teacher_expl, N)
  ls_BN, s_valid = left_align(ls_BS, b.student_expl, N)
  reward, metrics = rlt_reward(ls_BS, b.solution_mask, lt_BN, ls_BN, t_valid & s_valid, b.matched, reward_config)
  metrics["explanation_length_mismatch"] = jnp.sum(b.teacher_expl, -1) != jnp.sum(b.student_expl, -1)
  return reward, metrics, lt_BT


_reward_rows_jit = jax.jit(reward_rows, static_argnames=("teacher_config", "student_config", "reward_config",
                                                          "chunk_size", "micro_batch", "teacher_last"))


def rlt_rewards(teacher_config: ModelConfig, teacher_params, student_config: ModelConfig, student_params,
                batch: RewardBatch, reward_config: RewardConfig = RewardConfig(), *, chunk_size: int = 512,
                micro_batch: int = 0, teacher_last: int | None = None):
  """Rewards of a batch of teacher completions (`RewardBatch`) in one jitted call (configs and chunk_size static).

  The teacher runs at `teacher_temperature` (the current policy), the student at `student_temperature`.
  Returns (reward [B], metrics (see `rlt_reward`, plus explanation_length_mismatch), teacher log-probs [B, T]:
  the per-token ℓ_t of the whole teacher sequence).
  Host (NumPy) masks are checked for span/count errors before the call; device arrays only for shapes.
  micro_batch: score the rows in parts of this many (0 = all at once) inside the same call, so only one part's
  activations are live: a step's 1,024 rows of 32k tokens do not fit a device at once. B must divide into parts,
  and each part should split over the batch shards (data × fsdp).
  teacher_last: N when every explanation lies in the last N teacher columns (a prompt followed by its completion):
  only those positions go through the teacher's vocabulary projection, and the teacher log-probs are [B, N].
  """
  if not isinstance(teacher_config, ModelConfig) or not isinstance(student_config, ModelConfig):
    raise TypeError("rlt_rewards: teacher_config and student_config must be ModelConfig")
  if not isinstance(reward_config, RewardConfig):
    raise TypeError(f"rlt_rewards: reward_config must be a RewardConfig, got {type(reward_config).__name__}")
  if not isinstance(batch, RewardBatch):
    raise TypeError(f"rlt_rewards: batch must be a RewardBatch, got {type(batch).__name__}")
  shapes = {k: tuple(np.shape(v)) for k, v in batch._asdict().items()}
  for group in (("teacher_ids", "teacher_mask", "teacher_expl"),
                ("student_ids", "student_mask", "student_expl", "solution_mask")):
    for k in group:
      if len(shapes[k]) != 2 or shapes[k] != shapes[group[0]]:
        raise ValueError(f"rlt_rewards: {k} has shape {shapes[k]}, expected {shapes[group[0]]} like {group[0]} "
                         "([B, T])")
  B = shapes["teacher_ids"][0]
  if shapes["student_ids"][0] != B or shapes["matched"] != (B,):
    raise ValueError(f"rlt_rewards: batch sizes differ: teacher_ids {shapes['teacher_ids']}, student_ids "
                     f"{shapes['student_ids']}, matched {shapes['matched']}")
  if micro_batch and micro_batch < B and B % micro_batch:
    raise ValueError(f"rlt_rewards: micro_batch={micro_batch} does not divide the batch of {B} rows")
  T = shapes["teacher_ids"][1]
  teacher_last = None if teacher_last is None else int(teacher_last)
  if teacher_last is not None and not 1 <= teacher_last < T:
    raise ValueError(f"rlt_rewards: teacher_last={teacher_last!r} must be in [1, {T - 1}] for teacher sequences of "
                     f"{T} tokens")
  if all(isinstance(v, np.ndarray) for v in batch[:7]):
    _check_host_inputs(teacher_config, student_config, batch)
    outside = np.argwhere(batch.teacher_expl[:, :T - teacher_last].astype(bool)) if teacher_last else ()
    if len(outside):
      r, t = outside[0]
      raise ValueError(f"rlt_rewards: teacher_expl[{r}, {t}] is set, but teacher_last={teacher_last} scores only "
                       f"columns {T - teacher_last} … {T - 1}")
  return _reward_rows_jit(teacher_config, teacher_params, student_config, student_params, batch, reward_config,
                          chunk_size=int(chunk_size), micro_batch=int(micro_batch),
                          teacher_last=teacher_last)


def _check_host_inputs(teacher_config, student_config, b: RewardBatch) -> None:
  """Span errors that would silently give a wrong reward inside jit, reported with the offending row."""
  a = b._asdict()
  for side, cfg in (("teacher", teacher_config), ("student", student_config)):
    ids = a[f"{side}_ids"]
    bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))
    if bad.size:
      r, t = bad[0]
      raise ValueError(f"rlt_rewards: {side}_ids[{r}, {t}]={ids[r, t]} is outside the vocabulary "
                       f"(vocab_size={cfg.vocab_size})")
    att = a[f"{side}_mask"].astype(bool)
    # A span token needs a real token before it: position 0 and the first token of a left-padded row have no log-prob.
    scored = att & np.pad(att[:, :-1], ((0, 0), (1, 0)))
    for name in [f"{side}_expl"] + (["solution_mask"] if side == "student" else []):
      bad = np.argwhere(a[name].astype(bool) & ~scored)
      if bad.size:
        r, t = bad[0]
        raise ValueError(f"rlt_rewards: {name}[{r}, {t}] is set, but position {t} is padding or has no real token "
                         "before it, so it has no log-prob")
  nt = a["teacher_expl"].astype(bool).sum(-1)
  ns = a["student_expl"].astype(bool).sum(-1)
  if (nt != ns).any():
    r = int(np.argmax(nt != ns))
    raise ValueError(f"rlt_rewards: row {r}: teacher_expl marks {nt[r]} tokens but "
                     f"student_expl marks {ns[r]}; they must mark the same explanation tokens")
  width = max(int(nt.max(initial=0)), 1)
  t_ids = np.take_along_axis(a["teacher_ids"], np.argsort(~a["teacher_expl"].astype(bool), -1,
                                                          kind="stable")[:, :width], -1)
  s_ids = np.take_along_axis(a["student_ids"], np.argsort(~a["student_expl"].astype(bool), -1,
                                                          kind="stable")[:, :width], -1)
  bad = np.argwhere((t_ids != s_ids) & (np.arange(width)[None, :] < nt[:, None]))
  if bad.size:
    r, k = bad[0]
    raise ValueError(f"rlt_rewards: row {r}: explanation token {k} is id {t_ids[r, k]} in teacher_ids but "
                     f"{s_ids[r, k]} in student_ids; the two masks must select the same ids in the same order")
