"""The held-out prompts of an RL run: which rows they are, their batches, and the `eval/*` means of a pass over them.

`config.eval.path` names a dataset of its own; "" sets aside `config.eval.num_prompts` rows of the training data at
start (a seeded pick, `select`): `data.make_dataset(exclude=...)` leaves them out of the training stream, so they
are never trained on. Every process picks the same rows (the same seeded order, read through the pipeline's own
`data.RowEncoder`) and holds all of them, as the step's gathered batch is held.

`batches` lays them out in batches of exactly the training step's shape (its prompt count, padded to
`max_prompt_len`), so a pass reuses the step's sampler programs; the last batch is filled with repeats of its first
prompt, whose completions `summary` leaves out of the means. `train.HeldOutEval` runs the pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rlt_jax import data, data_survey, formats, run_config

KEYS = ("eval/reward_mean", "eval/r_ss_mean", "eval/r_kl_mean", "eval/match_rate", "eval/completion_len_mean")


@dataclasses.dataclass(frozen=True)
class HeldOut:
  rows: list            # encoded rows (`data.RowEncoder` "prompt" examples: prompt_ids, question, ..., where)
  exclude: tuple = ()   # their indices in the training data when they were set aside from it (else ())


def select(cfg, fmt: formats.RLTFormat, *, train_used: int) -> HeldOut | None:
  """The run's held-out prompts (None when `eval.num_prompts` is 0): the first `num_prompts` usable rows of
  `eval.path`, or of the training data in a seeded order (then set aside). `train_used`: the usable rows of the
  training data (`data_survey`), of which at least one must be left to train on."""
  n = int(cfg.eval.num_prompts)
  if not n:
    return None
  need = run_config.Checker(cfg).need
  path = cfg.eval.path
  spec = path or cfg.data.path or str(data.SAMPLE_PATH)
  src = data.concat_sources([spec], cfg.data.tfds_data_dir or None)
  # A seeded order, not file order: a file sorted by source or difficulty would give an unrepresentative head.
  order = np.random.RandomState(int(cfg.seed)).permutation(len(src))
  picked = []
  for r in data_survey.encode_rows(src, fmt, kind="prompt", max_len=cfg.max_prompt_len, indices=order,
                                   reader="auto" if path else cfg.data.reader, length_field="max_prompt_len",
                                   batch_rows=min(max(n, 16), 256)):
    if r["bad"] is None:
      picked.append(r)
      if len(picked) == n:
        break
  need(len(picked) == n, "eval.num_prompts", f"{spec} has only {len(picked)} usable prompts (max_prompt_len="
       f"{cfg.max_prompt_len})")
  if path:
    return HeldOut([r["example"] for r in picked])
  need(train_used > n, "eval.num_prompts", f"sets aside {n} of the {train_used} usable rows of {spec}, leaving none "
       "to train on: lower it or give the held-out prompts their own file (config.eval.path)")
  return HeldOut([r["example"] for r in picked], tuple(sorted(r["index"] for r in picked)))


def batches(held: HeldOut, prompts: int, max_prompt_len: int, pad_id: int) -> list[tuple[dict, int]]:
  """(batch, real prompts in it) in batches of `prompts` prompts left-padded to `max_prompt_len`: the training
  step's shape. The last batch is filled with repeats of its first prompt."""
  out = []
  for i in range(0, len(held.rows), prompts):
    part = held.rows[i:i + prompts]
    out.append((data.collate_prompts(part + [part[0]] * (prompts - len(part)), (max_prompt_len,), pad_id), len(part)))
  return out


def summary(parts: list[dict], group_size: int) -> dict:
  """The `eval/*` means over the real prompts' completions of a pass. `parts`, one a batch, in host arrays: prompts
  (the real ones, first), reward, r_ss, r_kl [rows] (rows b·G … b·G+G−1 are prompt b's), matched, lengths."""
  cat = lambda k: np.concatenate([np.asarray(p[k])[:p["prompts"] * group_size] for p in parts])  # noqa: E731
  return {"eval/reward_mean": float(cat("reward").mean()), "eval/r_ss_mean": float(cat("r_ss").mean()),
          "eval/r_kl_mean": float(cat("r_kl").mean()), "eval/match_rate": float(cat("matched").mean()),
          "eval/completion_len_mean": float(cat("lengths").mean())}
