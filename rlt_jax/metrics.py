"""Run outputs: one JSON object a line (`metrics.jsonl`, `completions.jsonl`, whose rows `completion_rows` picks),
TensorBoard scalars, and, when `config.wandb.project` is set, Weights & Biases (the same scalars and the completions
as a table; wandb is imported only then).

Only process 0 writes. On resume, lines of steps after the restored checkpoint are dropped first, so a killed and
resumed run leaves the same files as an uninterrupted one. A workdir URL (gs://...) has no appends: the files are
written on this machine (`storage.Mirror`, TensorBoard events under `storage.scratch_dir`) and uploaded whole at
`flush` (the loop flushes before every checkpoint, so a resume finds every line up to it) and `close`. W&B cannot drop what it has
logged: a resumed run goes on in the same W&B run (its id is kept in `<workdir>/wandb_run_id`), and W&B keeps the
first values of the steps that are run again.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid

import jax
import numpy as np

from rlt_jax import run_config, storage

WANDB_ID_FILE = "wandb_run_id"  # <workdir>/wandb_run_id: the W&B run a resumed run continues


def _plain(v):
  """JSON-able Python values from NumPy/JAX scalars and arrays; non-finite floats become null."""
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return _plain(v.item() if v.ndim == 0 else v.tolist())
  if isinstance(v, (np.floating, float)):
    return float(v) if math.isfinite(float(v)) else None
  if isinstance(v, (np.integer, np.bool_)):
    return v.item()
  return v


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the lines whose "step" is at most `last_step` (and drops a torn last line)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("step", 0) <= last_step:
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


class RunWriter:
  """metrics.jsonl + completions.jsonl + TensorBoard events under `workdir`, and W&B when `config.wandb.project` is
  set (process 0 only). `config` is the run's ConfigDict (its `tensorboard` and `wandb` fields; W&B records it)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, config=None):
    self.active = jax.process_index() == 0
    self._tb, self._wandb, self._mirrors, self._tb_dirs = None, None, [], None
    self.metrics_path = storage.join(workdir, "metrics.jsonl")  # the local files written (a URL's local copies)
    self.completions_path = storage.join(workdir, "completions.jsonl")
    if not self.active:
      return
    storage.makedirs(workdir)
    local = storage.scratch_dir(workdir) if storage.is_url(workdir) else None
    self._mirrors = [storage.Mirror(p, local) for p in (self.metrics_path, self.completions_path)]
    self.metrics_path, self.completions_path = (m.local for m in self._mirrors)
    for p in (self.metrics_path, self.completions_path):
      # A fresh start (resume_step 0) keeps nothing: not even a step-0 line (the held-out baseline), written anew.
      truncate_jsonl(p, resume_step if resume_step > 0 else -1)
    if config is not None and config.get("tensorboard", False):
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      tb = os.path.join(local or workdir, "tensorboard")
      self._tb = EventFileWriter(tb)
      self._tb_dirs = (tb, storage.join(workdir, "tensorboard")) if local else None
    if config is not None and config.get("wandb") and config.wandb.project:
      self._wandb = _start_wandb(workdir, local, config)
    self.flush()

  def write(self, step: int, scalars: dict, **extra) -> None:
    if not self.active:
      return
    row = {"step": int(step), **_plain(scalars), **_plain(extra)}
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in _plain(scalars).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in _plain(scalars).items() if isinstance(v, (int, float))}, step=int(step))

  def write_completions(self, rows: list[dict]) -> None:
    if not self.active or not rows:
      return
    rows = [_plain(r) for r in rows]
    with open(self.completions_path, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    if self._wandb is not None:
      import wandb
      columns = list(rows[0])
      self._wandb.log({"completions": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                      step=int(rows[0]["step"]))

  def flush(self) -> None:
    """A workdir URL: uploads the files that changed (each a whole object); nothing for a local workdir."""
    if self._tb is not None:
      self._tb.flush()
    self._upload()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
    self._upload()

  def _upload(self) -> None:
    for m in self._mirrors:
      m.sync()
    if self._tb_dirs:
      storage.upload_dir(*self._tb_dirs)


def _start_wandb(workdir: str, local: str | None, config):
  """wandb.init for the run in `workdir`: the id kept in <workdir>/wandb_run_id (made on the first start), so a
  resumed run continues the same W&B run; W&B's local files go under <workdir>/wandb (a workdir URL: under its
  local scratch directory `local`)."""
  import wandb
  w = config.wandb
  id_path = storage.join(workdir, WANDB_ID_FILE)
  if storage.exists(id_path):
    with storage.open_file(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
    storage.write_text(id_path, run_id + "\n")
  name = w.name or storage.abspath(workdir).rstrip("/").rsplit("/", 1)[-1]
  return wandb.init(project=w.project, entity=w.entity or None, name=name, group=w.group or None,
                    tags=list(w.tags) or None, mode=w.mode or None, id=run_id, resume="allow", dir=local or workdir,
                    config=run_config.config_json(config))


def completion_rows(step: int, batch: dict, examples: list, lengths, per_row: dict, group_size: int,
                    fraction: float) -> list[dict]:
  """A seeded `fraction` of the step's completions (row i is prompt i // group_size of `batch`), with their
  rewards (`per_row`: reward, r_ss, r_kl [B] as NumPy), for completions.jsonl."""
  pick = np.flatnonzero(np.random.RandomState(step).rand(len(lengths)) < fraction)
  G = group_size
  return [{"step": step, "row": batch["where"][i // G], "question": batch["question"][i // G],
           "explanation": examples[i].explanation_text, "matched": examples[i].matched, "length": int(lengths[i]),
           "reward": float(per_row["reward"][i]), "r_ss": float(per_row["r_ss"][i]), "r_kl": float(per_row["r_kl"][i])}
          for i in pick]
