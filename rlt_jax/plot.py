"""PNG plots of a run's `metrics.jsonl` (what `rlt_jax.train` writes, one JSON object a step).

  python -m rlt_jax.plot --workdir runs/tiny        # -> runs/tiny/plots/*.png

One file a topic: the reward and its components (with the held-out `eval/*` means where the run has them, a point
every eval_every steps), the match rate, the KL to the reference, completion lengths, throughput and the time split
of a step, and the optimizer (loss, grad norm, lr). A metric missing from the file is
left out (a figure with none of its metrics is not written); null values (non-finite numbers) are gaps. A line that
is not a JSON object with a "step" is skipped and counted, with its line number in the message.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through pyplot, so importing this module
does not change the backend of a notebook that also draws inline.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


class MetricsFileError(ValueError):
  """metrics.jsonl is missing or holds no usable line."""


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
  """(rows in file order, one message per skipped line). Raises MetricsFileError naming the file."""
  if not os.path.isfile(path):
    raise MetricsFileError(f"{path}: no such file (a run writes metrics.jsonl into its workdir after each step)")
  rows, skipped = [], []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line.rstrip())
      except json.JSONDecodeError as e:
        skipped.append(f"{path}:{number}: broken JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)) or isinstance(row["step"], bool):
        skipped.append(f"{path}:{number}: not an object with a numeric \"step\"")
        continue
      rows.append(row)
  if not rows:
    why = f"all {len(skipped)} line(s) are unusable, e.g. {skipped[0]}" if skipped else "the file is empty"
    raise MetricsFileError(f"{path}: no metrics to plot ({why})")
  return rows, skipped


def series(rows: list[dict], key: str) -> np.ndarray | None:
  """float64 values of `key` per row (NaN where a row lacks it or holds null / a non-number); None if no row has it."""
  if not any(key in r for r in rows):
    return None
  ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  return np.array([float(r[key]) if ok(r.get(key)) else np.nan for r in rows], np.float64)


# ------------------------------------------------------------------------------------------------------ panels
def _lines(ax, steps, rows, keys, dashed=()) -> None:
  for key in keys:
    y = series(rows, key)
    if y is not None:
      ax.plot(steps, y, "--" if key in dashed else "-", label=key)


def _reward_band(ax, steps, rows, keys) -> None:
  # The band is the std over all completions of the step (files from before it had its own name: reward_std).
  mean = series(rows, "reward_mean")
  std_key = "reward_std_batch" if series(rows, "reward_std_batch") is not None else "reward_std"
  std = series(rows, std_key)
  if mean is None:  # only a std: nothing meaningful to draw a band around
    _lines(ax, steps, rows, [std_key])
    return
  ax.plot(steps, mean, "-", label="reward_mean")
  if std is not None:
    ax.fill_between(steps, mean - std, mean + std, alpha=0.25, label=f"± {std_key}")
  if std_key != "reward_std" and series(rows, "reward_std") is not None:  # the official within-group std
    ax.plot(steps, series(rows, "reward_std"), ":", label="reward_std")


def _points(ax, steps, rows, keys) -> None:
  # Held-out metrics have a value every eval_every steps only: lines through those points, markers on them.
  for key in keys:
    y = series(rows, key)
    if y is not None:
      ok = np.isfinite(y)
      ax.plot(steps[ok], y[ok], "o-", label=key)


def _stacked(ax, steps, rows, keys) -> None:
  present = [k for k in keys if series(rows, k) is not None]
  ax.stackplot(steps, *[np.nan_to_num(series(rows, k)) for k in present], labels=present, alpha=0.8)


class Panel(NamedTuple):
  title: str
  keys: tuple[str, ...]          # drawn when at least one is in the file
  draw: Callable | None = None   # (ax, steps, rows, keys); None = one line per key
  ylabel: str = ""
  dashed: tuple[str, ...] = ()


# file name -> (figure title, panels)
FIGURES: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "reward": ("RLT reward and its components", (
        Panel("reward (mean ± std over completions)", ("reward_mean", "reward_std_batch", "reward_std"), _reward_band),
        Panel("r_SS and r_KL (reward = r_SS − r_KL − 1 without the end tag)", ("r_ss", "r_kl", "r_kl_no_entropy"),
              dashed=("r_kl_no_entropy",)),
        Panel("student log-prob of the solution", ("solution_logp_mean", "solution_logp_min")),
        Panel("teacher − student log-prob on the explanation", ("kl_mean", "kl_max")),
        Panel("held-out reward (eval/*: prompts never trained on)", ("eval/reward_mean",), _points),
        Panel("held-out r_SS and r_KL", ("eval/r_ss_mean", "eval/r_kl_mean"), _points),
    )),
    "match_rate": ("Explanations that close their end tag", (
        Panel("match rate", ("match_rate",)),
        Panel("held-out match rate", ("eval/match_rate",), _points))),
    "kl_to_ref": ("KL of the teacher to its reference", (
        Panel("k3 KL to the reference (per-sequence mean; token mean dashed)", ("kl_to_ref", "kl_to_ref_token"),
              dashed=("kl_to_ref_token",)),)),
    "lengths": ("Completion lengths", (
        Panel("completion length", ("completion_len_mean", "completion_len_max"), ylabel="tokens"),
        Panel("cut at max_new_tokens without the end tag", ("truncated_fraction",), ylabel="fraction"),
    )),
    "throughput": ("Throughput and time split of a step", (
        Panel("sampled tokens per second", ("tokens_per_s",), ylabel="tokens/s"),
        Panel("time split, stacked (a run's first step includes compiling)",
              ("time_sample", "time_splice", "time_program"), _stacked, ylabel="seconds"),
    )),
    "optimizer": ("Optimizer", (
        Panel("GRPO loss", ("loss",)),
        Panel("gradient norm (before clipping)", ("grad_norm",)),
        Panel("learning rate", ("lr",)),
    )),
}


def make_figures(rows: list[dict]) -> dict[str, Figure]:
  """name -> Figure for every figure with at least one of its metrics in `rows` (x axis: "step"). Each panel's
  lines carry their metric key as label; panels with none of their keys are left out."""
  steps = series(rows, "step")
  out = {}
  for name, (title, panels) in FIGURES.items():
    present = [p for p in panels if any(series(rows, k) is not None for k in p.keys)]
    if not present:
      continue
    ncols = min(len(present), 2)
    nrows = -(-len(present) // ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, present):
      if panel.draw is None:
        _lines(ax, steps, rows, panel.keys, panel.dashed)
      else:
        panel.draw(ax, steps, rows, panel.keys)
      ax.set_title(panel.title, fontsize=10)
      ax.set_xlabel("step")
      ax.set_ylabel(panel.ylabel)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    for ax in axes[len(present):]:
      ax.set_axis_off()
    fig.suptitle(title)
    out[name] = fig
  return out


def plot_run(workdir: str, out_dir: str | None = None) -> list[str]:
  """Writes `<workdir>/plots/<name>.png` (or into `out_dir`) from `<workdir>/metrics.jsonl`; returns the paths.

  Skipped lines are reported on stderr. Raises MetricsFileError when the file is missing or has no usable line."""
  rows, skipped = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if skipped:
    print(f"rlt_jax.plot: skipped {len(skipped)} line(s):\n  " + "\n  ".join(skipped[:10]), file=sys.stderr)
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, fig in make_figures(rows).items():
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


if __name__ == "__main__":
  from absl import app, flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
  _OUT = flags.DEFINE_string("out", None, "Where the PNGs go (default: <workdir>/plots).")
  flags.mark_flag_as_required("workdir")

  def _main(argv):
    try:
      for p in plot_run(_WORKDIR.value, _OUT.value):
        print(p)
    except MetricsFileError as e:
      sys.exit(f"error: {e}")

  app.run(_main)
