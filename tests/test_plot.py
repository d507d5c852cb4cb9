"""rlt_jax.plot on a hand-written metrics.jsonl: the PNGs are real images, the drawn lines are the file's numbers
(read back from the matplotlib figures), missing metrics are left out, broken lines are counted with their line
number, and a missing or empty file is an error naming it (also through the CLI)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.image import imread

from conftest import REPO
from rlt_jax import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_rows():
  """Five steps with the keys train.run writes, except the length and kl_to_ref ones; step 3 has a null
  reward_std_batch (a non-finite value in the run) and no r_kl_no_entropy."""
  rows = []
  for i in range(5):
    row = dict(step=i + 1, reward_mean=-1.0 + 0.25 * i, reward_std_batch=0.5 - 0.05 * i, reward_std=0.3 + 0.01 * i,
               r_ss=-0.6 + 0.1 * i,
               r_kl=0.3 - 0.02 * i, r_kl_no_entropy=2.0 - 0.1 * i, solution_logp_mean=-0.7 + 0.1 * i,
               solution_logp_min=-3.0 + 0.2 * i, kl_mean=0.1 * i, kl_max=1.0 + i, match_rate=0.125 * i,
               tokens_per_s=100.0 + 7 * i, time_sample=1.0 + 0.1 * i, time_splice=0.5, time_program=0.25 * (i + 1),
               loss=0.01 * (i - 2), grad_norm=0.5 + i, lr=3e-4, skipped=False, rows=["a.jsonl:1", "a.jsonl:2"])
    rows.append(row)
  rows[2]["reward_std_batch"] = None
  del rows[2]["r_kl_no_entropy"]
  return rows


def write_metrics(path, rows, broken_after=None):
  with open(path, "w") as f:
    for i, r in enumerate(rows):
      f.write(json.dumps(r) + "\n")
      if i == broken_after:
        f.write('{"step": 99, "reward_mean": \n')  # a torn line, as a killed writer could leave
  return path


def expected(rows, key):
  return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def lines_by_label(fig):
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for ax in fig.axes
          for line in ax.get_lines()}


def band_edges(fig):
  """The y values of the reward band's polygon vertices (the band's lower and upper edges), sorted and unique."""
  (band,) = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
  return sorted(set(np.round(np.concatenate([p.vertices[:, 1] for p in band.get_paths()]), 9)))


def edges(rows, std_key):
  return sorted(set(np.round([r["reward_mean"] + s * r[std_key] for r in rows if r.get(std_key) is not None
                              for s in (-1, 1)], 9)))


def test_figures_hold_the_file_values(tmp_path):
  rows = hand_rows()
  read, skipped = plot.read_metrics(write_metrics(tmp_path / "metrics.jsonl", rows, broken_after=1))
  assert len(read) == 5 and skipped == [f"{tmp_path / 'metrics.jsonl'}:3: broken JSON "
                                        "(Expecting value at column 28)"]
  figs = plot.make_figures(read)
  # kl_to_ref and the completion-length keys are not in the file: those figures are left out.
  assert set(figs) == {"reward", "match_rate", "throughput", "optimizer"}
  steps = [1.0, 2.0, 3.0, 4.0, 5.0]
  drawn = {name: lines_by_label(fig) for name, fig in figs.items()}
  for name, keys in {"reward": ["reward_mean", "reward_std", "r_ss", "r_kl", "r_kl_no_entropy", "solution_logp_mean",
                                "solution_logp_min", "kl_mean", "kl_max"],
                     "match_rate": ["match_rate"], "throughput": ["tokens_per_s"],
                     "optimizer": ["loss", "grad_norm", "lr"]}.items():
    assert sorted(drawn[name]) == sorted(keys), name
    for key in keys:
      x, y = drawn[name][key]
      assert x == steps
      np.testing.assert_array_equal(y, expected(rows, key), err_msg=key)  # NaN where the row lacks the key
  assert math.isnan(drawn["reward"]["r_kl_no_entropy"][1][2])

  # The reward band is mean ± the std over the batch; step 3 (null std) leaves a gap, not a zero-width band.
  assert band_edges(figs["reward"]) == pytest.approx(edges(rows, "reward_std_batch"), abs=1e-9)
  # A file written before reward_std_batch had its name: the band is its reward_std.
  old = [{k: v for k, v in r.items() if k != "reward_std_batch"} for r in rows]
  assert band_edges(plot.make_figures(old)["reward"]) == pytest.approx(edges(old, "reward_std"), abs=1e-9)

  # The stacked time split: the top of the last layer is the step's total time.
  (time_ax,) = [ax for ax in figs["throughput"].axes if ax.get_title().startswith("time split")]
  layers = [c for c in time_ax.collections if isinstance(c, PolyCollection)]
  assert [c.get_label() for c in layers] == ["time_sample", "time_splice", "time_program"]
  top = layers[-1].get_paths()[0].vertices
  totals = {r["step"]: r["time_sample"] + r["time_splice"] + r["time_program"] for r in rows}
  for x, y in top:
    if y > totals[round(x)] - 1e-9:  # the upper edge of the polygon
      assert y == pytest.approx(totals[round(x)])
  assert max(top[:, 1]) == pytest.approx(max(totals.values()))


def test_held_out_means_are_points_at_their_steps():
  """A run with eval_every=2: a step-0 line with the eval/* means only, and the means again on steps 2 and 4. The
  held-out panels draw exactly those points (the steps between have none); the training lines start at step 1."""
  rows = [{"step": 0, "eval/reward_mean": -2.0, "eval/r_ss_mean": -1.5, "eval/r_kl_mean": 0.5,
           "eval/match_rate": 0.1}] + hand_rows()
  for r, v in zip(rows[2::2], (-1.5, -1.0)):
    r.update({"eval/reward_mean": v, "eval/r_ss_mean": v + 0.5, "eval/r_kl_mean": 0.4, "eval/match_rate": 0.3})
  figs = plot.make_figures(rows)
  reward, match = lines_by_label(figs["reward"]), lines_by_label(figs["match_rate"])
  assert reward["eval/reward_mean"] == ([0.0, 2.0, 4.0], [-2.0, -1.5, -1.0])
  assert reward["eval/r_ss_mean"] == ([0.0, 2.0, 4.0], [-1.5, -1.0, -0.5])
  assert match["eval/match_rate"] == ([0.0, 2.0, 4.0], [0.1, 0.3, 0.3])
  x, y = reward["reward_mean"]
  assert x == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and math.isnan(y[0]) and y[1:] == [r["reward_mean"] for r in rows[1:]]


def check_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == PNG_MAGIC, path
  image = imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
  assert image[..., :3].std() > 0.01, f"{path} is blank"


def test_plot_run_writes_pngs_and_counts_broken_lines(tmp_path, capsys):
  write_metrics(tmp_path / "metrics.jsonl", hand_rows(), broken_after=3)
  paths = plot.plot_run(str(tmp_path))
  assert sorted(paths) == sorted(str(tmp_path / "plots" / f"{n}.png")
                                 for n in ("reward", "match_rate", "throughput", "optimizer"))
  for p in paths:
    check_png(p)
  err = capsys.readouterr().err
  assert "skipped 1 line(s)" in err and f"{tmp_path / 'metrics.jsonl'}:5: broken JSON" in err


def test_missing_empty_and_unusable_files_are_errors_naming_the_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with pytest.raises(plot.MetricsFileError, match=f"{path}: no such file"):
    plot.plot_run(str(tmp_path))
  path.write_text("\n")
  with pytest.raises(plot.MetricsFileError, match=f"{path}: no metrics to plot \\(the file is empty\\)"):
    plot.plot_run(str(tmp_path))
  path.write_text('{"reward_mean": 1.0}\n[1, 2]\n')
  with pytest.raises(plot.MetricsFileError, match=f"all 2 line\\(s\\) are unusable, e.g. {path}:1: not an object "
                                                  'with a numeric "step"'):
    plot.plot_run(str(tmp_path))
  assert not (tmp_path / "plots").exists()


def test_cli(tmp_path):
  write_metrics(tmp_path / "metrics.jsonl", hand_rows())
  out = subprocess.run([sys.executable, "-m", "rlt_jax.plot", "--workdir", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  printed = out.stdout.split()
  assert len(printed) == 4 and all(p.startswith(str(tmp_path / "plots")) for p in printed)
  for p in printed:
    check_png(p)
  empty = tmp_path / "empty"
  empty.mkdir()
  out = subprocess.run([sys.executable, "-m", "rlt_jax.plot", "--workdir", str(empty)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and f"error: {empty / 'metrics.jsonl'}: no such file" in out.stderr
