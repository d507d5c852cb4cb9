"""The loop both trainers run (`train.run` for RL, `sft.run` for SFT): dispatch step k, report step k−1,
checkpoint, stop.

A `Trainer` queues a step's device work in `dispatch(k)` and reads it back in `report(k, out)`. The loop reports
step k−1 only after step k is queued, so the host never leaves the devices idle between steps and a step's metrics
come back a step late, in one transfer. The loop runs under `jax.transfer_guard("disallow")`: every host↔device
transfer on the step path is an explicit `device_put` / `device_get` (checkpoint writes are allowed their own).
Before a checkpoint every pending step is reported, so `metrics.jsonl` never ends before the checkpoint a resume
starts from. A checkpoint write that fails stops the run with the Checkpointer's one-line error.

`Profile` (`config.profile_steps="START,END"`) records a `jax.profiler` trace of steps START..END on process 0: it
starts before step START is queued and stops once step END has been read back, so the trace holds those steps'
device work whole (TensorBoard's profile tab or XProf read `<workdir>/profile`).

`preemption.Watch` (`config.checkpoint_every_minutes`, SIGTERM / SIGUSR1) adds checkpoints: after a step is queued
every process agrees whether one is due; on a signal the step in flight finishes, its checkpoint is written and the
run raises `preemption.Stopped` (the command line exits with `preemption.STOPPED_STATUS`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

import jax

from rlt_jax import preemption


class Trainer(Protocol):
  state: Any  # the train state pytree the checkpoints hold

  def dispatch(self, step: int) -> Any:
    """Queues step `step` (0-based) and returns what `report` needs; must not wait for the devices."""

  def report(self, step: int, out: Any, seconds: float) -> tuple[dict, list | None]:
    """(metrics of step `step`, its data rows or None), reading `out` back."""

  def check(self, step: int, metrics: dict) -> None:
    """Raises to stop the run, once step `step`'s metrics are written (so the log shows why it stopped)."""

  def data_state(self) -> dict:
    """The data-iterator state that goes with `state` in a checkpoint (before any batch read ahead)."""


@dataclasses.dataclass
class Profile:
  """A `jax.profiler` trace of steps window[0]..window[1] (counted from 1) into `directory`, on process 0."""
  window: tuple[int, int] | None = None
  directory: str = ""
  tracing: bool = False

  def before(self, step: int, start: int) -> None:
    """Called before 0-based `step` is queued; a run resumed inside the window traces from its first step."""
    if self.window is None or jax.process_index() != 0 or self.tracing:
      return
    first, last = self.window
    if step + 1 == max(first, start + 1) and step + 1 <= last:
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def ends_at(self, step: int) -> bool:
    return self.window is not None and step + 1 == self.window[1]

  def stop(self) -> None:
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()
      logging.getLogger("rlt_jax").info("profile of steps %d-%d written under %s", *self.window, self.directory)


def progress(total: int, initial: int, desc: str = "rlt", unit: str = "step"):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=jax.process_index() != 0,
              dynamic_ncols=True)


def run(trainer: Trainer, *, start: int, total: int, checkpoint_every: int, ckpt, writer, bar, on_step=None,
        postfix=None, profile: Profile | None = None, watch: preemption.Watch | None = None) -> dict:
  """Steps `start` … `total`−1; returns the last step's metrics. `ckpt.save(step, state, data_state)` every
  `checkpoint_every` steps, at the end, and when `watch` says (its checkpoint_every_minutes passed, or a signal: then
  preemption.Stopped is raised once the checkpoint is written); `writer.write(step, metrics, rows=...)`,
  `on_step(step, metrics)` and the progress bar (with `postfix(metrics)`) per step, in order; `profile` traces its
  window of steps."""
  profile = profile or Profile()
  watch = watch or preemption.Watch()
  last: dict = {}
  pending = None
  clock = [time.perf_counter()]

  def finish(step, out):
    nonlocal last
    now = time.perf_counter()
    last, rows = trainer.report(step, out, now - clock[0])
    clock[0] = now
    writer.write(step + 1, last, **({} if rows is None else {"rows": rows}))
    bar.update(1)
    if postfix is not None:
      bar.set_postfix(**postfix(last))
    if on_step is not None:
      on_step(step + 1, last)
    trainer.check(step, last)

  try:
    with watch, jax.transfer_guard("disallow"):
      for step in range(start, total):
        profile.before(step, start)
        out = trainer.dispatch(step)
        if pending is not None:
          finish(*pending)
        pending = (step, out)
        verdict = watch.poll(step)  # the same on every process; host only, the queued step runs on
        save = ((step + 1) % checkpoint_every == 0 or step + 1 == total or verdict.checkpoint_due
                or verdict.signal_name is not None)
        if save or profile.ends_at(step):
          finish(*pending)  # read back now: the checkpoint, or the end of the trace, holds this step whole
          pending = None
          if profile.ends_at(step):
            profile.stop()
          if save:
            writer.flush()  # a bucket workdir's files hold every line up to the checkpoint
            with jax.transfer_guard("allow"):  # orbax reads the state back itself
              ckpt.save(step + 1, trainer.state, trainer.data_state())
            watch.checkpointed()
        if verdict.signal_name is not None and step + 1 < total:
          ckpt.wait()  # written (a failed write raises its CheckpointError instead)
          watch.barrier("stopped")  # no process exits while another still writes
          raise preemption.Stopped(step + 1, verdict.signal_name, ckpt.directory)
  except BaseException as e:  # an exception (or Ctrl-C) still finishes the checkpoint in flight, and stays the error
    profile.stop()
    _close(ckpt, bar, writer, failing=not isinstance(e, preemption.Stopped))
    raise
  profile.stop()  # a window past the last step ends with the run
  _close(ckpt, bar, writer, failing=False)
  return last


def _close(ckpt, bar, writer, *, failing: bool) -> None:
  """Waits for the checkpoint in flight, then closes the bar and the writer. A failed write (`ckpt.wait` raises
  checkpointing.CheckpointError) is the run's error, or, when the run is already failing, one logged line."""
  try:
    ckpt.wait()
  except Exception as e:  # noqa: BLE001
    if not failing:
      raise
    logging.getLogger("rlt_jax").error("%s", e)
  finally:
    bar.close()
    writer.close()
