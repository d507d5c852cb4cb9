"""Orbax checkpoints of a training run (RL and SFT): the train state, each process's data-iterator state and the
run config (`<step>/config/run_config.json`), asynchronous, the last K kept; a data position written by one process
count is re-dealt to another on restore.

Faults end in one line each. A resume compares the saved run config with the new one (`run_config.check_resume`); a
step that cannot be read (a truncated or missing file) is warned about and the one before it resumed, the unreadable
ones moved aside (never deleted); a write that fails (full disk, read-only directory) stops the run with a
`CheckpointError` naming the directory, the earlier steps intact. Orbax's own error records (tracebacks from its
threads) go to the `rlt_jax.orbax` logger at DEBUG."""
from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import math
import os
import re
import sys
import warnings

import jax

from rlt_jax import distributed, run_config, storage

_log = logging.getLogger("rlt_jax")
_orbax_log = logging.getLogger("rlt_jax.orbax")

CONFIG_FILE = "run_config.json"  # <directory>/<step>/config/run_config.json: the run config that wrote the step
UNREADABLE_SUFFIX = "_unreadable"  # <directory>_unreadable/<step>: steps a resume could not read, set aside


class CheckpointError(run_config.ConfigError):
  """A checkpoint that cannot be written (full disk, read-only directory), or no checkpoint that can be read: one
  line naming the directory (the command line prints `error: <message>`); orbax's details are logged at DEBUG."""


def failure_reason(e: BaseException, limit: int = 240) -> str:
  """The innermost error of `e`'s chain in one line (tensorstore's spec dump cut off): why a read or write failed."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      break
    e = inner
  text = re.split(r"\s*\[tensorstore_spec|\.? See full TensorStore details", str(e))[0].strip()
  text = (text.splitlines() or [""])[0].strip() or type(e).__name__
  return text if len(text) <= limit else text[:limit - 1] + "…"


class _OrbaxErrors(logging.Filter):
  """Orbax logs a failed write at ERROR through absl, a traceback from each of its threads (hundreds of lines for
  one full disk). Every such failure also reaches the Checkpointer as an exception, reported in one line: the records
  go to the `rlt_jax.orbax` logger at DEBUG instead, the first one kept (`pop`) for a failure that raises nothing."""

  def __init__(self):
    super().__init__()
    self.first = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if self.first is None:
      self.first = record.getMessage()
    _orbax_log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
    return False

  def pop(self):
    first, self.first = self.first, None
    return first


_ORBAX_ERRORS = _OrbaxErrors()


def _from_checkpoint_io(text: str, exc: BaseException | None) -> bool:
  """Whether a leftover error (its text, its exception) comes from orbax / tensorstore."""
  files, tb = [], exc.__traceback__ if exc is not None else None
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return any(k in t for t in [text, *files] for k in ("orbax", "tensorstore", "TensorStore", "OCDBT"))


class _LeftoverReads(logging.Filter):
  """asyncio's "Task/Future exception was never retrieved", with a traceback, for each of tensorstore's other reads
  of a step one read of which failed (the failure itself is reported): to DEBUG, whenever they are collected."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if "exception was never retrieved" not in text or not _from_checkpoint_io(
        text, record.exc_info[1] if record.exc_info else None):
      return True
    _orbax_log.debug("asyncio: %s", text.splitlines()[0])
    return False


_LEFTOVER_READS = _LeftoverReads()


def _quiet_unraisable(hook):
  """`sys.unraisablehook` without "Exception ignored in: <coroutine ...>" for those reads, nor "Event loop is
  closed" for tensorstore's callbacks that reach orbax's finished event loop after them (to DEBUG)."""
  def quiet(unraisable):
    e = unraisable.exc_value
    if _from_checkpoint_io(repr(unraisable.object), e) or (isinstance(e, RuntimeError) and
                                                           str(e) == "Event loop is closed"):
      _orbax_log.debug("ignored: %r in %r", unraisable.exc_value, unraisable.object)
    else:
      hook(unraisable)
  quiet.rlt_jax_checkpointing = True
  return quiet


@contextlib.contextmanager
def _quiet_failed_read():
  """A failed read leaves tensorstore's other reads of the step behind as never-awaited coroutines, each printed
  when collected: collected here, once the failure has been caught (its traceback holds them), without the warning.
  (Those collected later go through `_LeftoverReads` and `_quiet_unraisable`.)"""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    yield
    gc.collect()


class Checkpointer:
  """Orbax checkpoints of the train state plus the data-iterator state and the run config (JSON), async, keeping
  the last K. `config` (the run's ConfigDict) is saved with every step and compared on resume."""

  def __init__(self, directory: str, keep: int, *, config=None):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = storage.abspath(directory)  # a URL (gs://...) as it is: orbax writes it directly
    self.config = config
    self._pending = None  # the step whose write may still be in flight
    self._failed = None   # the CheckpointError of a failed write (raised once)
    for name, quiet in (("absl", _ORBAX_ERRORS), ("asyncio", _LEFTOVER_READS)):
      if quiet not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(quiet)
    if not getattr(sys.unraisablehook, "rlt_jax_checkpointing", False):
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(filename=CONFIG_FILE))
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, item_handlers=handlers,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True))
    except Exception as e:  # noqa: BLE001 -- e.g. a read-only or unreachable directory
      _log.debug("opening %s failed", self.directory, exc_info=e)
      raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: {failure_reason(e)}") from e

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state) -> None:
    """Every process calls it. Each process's data iterator stands at its own place in its own shard, and orbax
    writes JSON from process 0 only: with several processes the states of all of them are gathered and saved. The
    write runs in the background; its failure (or the previous one's) raises CheckpointError."""
    ocp = self._ocp
    self._finish_write()
    if jax.process_count() > 1:
      data_state = {"process_states": distributed.allgather_objects(data_state)}
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    if self.config is not None:
      items["config"] = ocp.args.JsonSave(run_config.config_json(self.config))
    self._pending = step
    try:
      written = self.manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- a full disk or read-only directory, as orbax and tensorstore say it
      raise self._write_failed(step, e) from e
    if not written:
      self._pending = None
      _log.warning("checkpoint of step %d not written: %s already holds step %s", step, self.directory,
                   self.manager.latest_step())

  def wait(self) -> None:
    """Waits for the write in flight: CheckpointError if it failed (once; after a failure, waits quietly)."""
    if self._failed is not None:
      with contextlib.suppress(Exception):
        self.manager.wait_until_finished()
      return
    self._finish_write()

  def _finish_write(self) -> None:
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_failed(step, e) from e
    logged = _ORBAX_ERRORS.pop()
    if logged:  # orbax logged an error but raised nothing: say so (the records are at DEBUG)
      _log.warning("orbax reported an error while writing step %d in %s: %s", step, self.directory,
                   logged.splitlines()[0][:240])

  def _write_failed(self, step: int, e: BaseException) -> CheckpointError:
    _log.debug("writing checkpoint step %d in %s failed", step, self.directory, exc_info=e)
    _ORBAX_ERRORS.pop()
    try:  # the step directories on disk (orbax's own list already dropped the steps it meant to delete)
      kept = sorted(int(n) for n in storage.listdir(self.directory) if n.isdigit() and int(n) != step)
    except OSError:
      kept = []
    fix = "free space or make the directory writable, then run the same command again"
    after = (f"the checkpoints before it (step{'s' * (len(kept) > 1)} {', '.join(map(str, kept))}) are intact: {fix} "
             f"to resume from step {kept[-1]}" if kept else f"there is no earlier checkpoint: {fix}")
    self._failed = CheckpointError(f"cannot write the checkpoint of step {step} in {self.directory}: "
                                   f"{failure_reason(e)}; the run stopped, and {after}")
    return self._failed

  def restore_latest(self, state, *, resume: bool, steps: int | None = None):
    """(state, data-iterator state) of the newest checkpoint that can be read, or (state, None) when there is none.

    For each step, newest first: `steps` (the run's last step) below it is a ConfigError; its saved run config is
    compared with `self.config` (`run_config.check_resume`: a ConfigError listing the changed fields); then it is
    read. A step that cannot be read is warned about (the step and the reason) and the one before it tried; once one
    is read, the unreadable newer ones are moved to `<directory>_unreadable/` (never deleted), so this run's
    checkpoints can take their step numbers. None readable: a CheckpointError naming the directory, nothing moved."""
    candidates = sorted(self.manager.all_steps(), reverse=True)
    if not candidates:
      return state, None
    if not resume:
      raise run_config.ConfigError(f"config.resume=False, but {self.directory} holds checkpoints (latest step "
                                   f"{candidates[0]}); use a new workdir or resume=True")
    ocp = self._ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    unreadable, reasons = [], []
    for i, step in enumerate(candidates):
      why, saved = None, None
      try:
        saved = self._saved_config(step)
      except Exception as e:  # noqa: BLE001 -- a missing or broken file: the step is damaged
        why = failure_reason(e)
      why = _agree(why)
      if why is None:
        if steps is not None and step > steps:
          raise run_config.ConfigError(
              f"{self._steps_field(steps)}: fewer than the {step} steps the checkpoint in {self.directory} has "
              f"done; set config.steps={step} or more to resume it (config.steps={step} only exports), or use a "
              "new workdir")
        if self.config is not None:
          run_config.check_resume(saved, self.config, where=f"the checkpoint at step {step} in {self.directory}")
        with _quiet_failed_read():
          try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     data=ocp.args.JsonRestore()))
          except Exception as e:  # noqa: BLE001 -- tensorstore / orbax errors of a truncated or missing file
            _log.debug("reading checkpoint step %d in %s failed", step, self.directory, exc_info=e)
            why = failure_reason(e)
        why = _agree(why)
      if why is None:
        break
      unreadable.append(step)
      reasons.append(f"step {step}: {why}")
      _log.warning("checkpoint step %d in %s cannot be read (%s); %s", step, self.directory, why,
                   f"trying step {candidates[i + 1]}" if i + 1 < len(candidates) else "no older step to try")
    else:
      which = "" if len(unreadable) == 1 else f"steps {', '.join(map(str, unreadable))}; "
      raise CheckpointError(f"no checkpoint in {self.directory} can be read ({which}{reasons[0]}); nothing was moved "
                            f"or deleted: move {self.directory} away (or use another workdir) to start the run afresh")
    if unreadable:
      dest = self._set_aside(unreadable)
      _log.warning("resuming from step %d of %s; the unreadable step(s) %s moved to %s (nothing deleted)", step,
                   self.directory, ", ".join(map(str, unreadable)), dest)
    else:
      _log.info("resumed from %s at step %d", self.directory, step)
    _ORBAX_ERRORS.pop()  # whatever orbax logged about the unreadable steps: not a write's error
    position = out["data"]
    states = position["process_states"] if isinstance(position, dict) and "process_states" in position else [position]
    if len(states) != jax.process_count():
      _log.info("data position written by %d processes, re-dealt to %d", len(states), jax.process_count())
      states = redeal_data_states(states, jax.process_count())
    return out["state"], states[jax.process_index()]

  def _saved_config(self, step: int) -> dict | None:
    """The run config saved with `step`; None for a step written before run configs were saved with checkpoints."""
    item = storage.join(self.directory, str(step), "config")
    if not storage.isdir(item):
      return None
    with storage.open_file(storage.join(item, CONFIG_FILE)) as f:
      return json.load(f)

  def _steps_field(self, steps: int) -> str:
    cfg = self.config
    if cfg is None or cfg.get("steps") == steps or "epochs" not in cfg:
      return f"config.steps={steps}"
    return f"config.steps={cfg.get('steps')} ({steps} steps from config.epochs={cfg.get('epochs')})"

  def _set_aside(self, steps: list[int]) -> str:
    """Moves the step directories `steps` to <directory>_unreadable/ (process 0; a name taken gets a suffix)."""
    dest = self.directory + UNREADABLE_SUFFIX
    if jax.process_index() == 0:
      for step in steps:
        target, n = storage.join(dest, str(step)), 1
        while storage.exists(target):
          target, n = storage.join(dest, f"{step}.{n}"), n + 1
        try:
          storage.makedirs(dest)
          storage.move(storage.join(self.directory, str(step)), target)
        except OSError as e:
          raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read, nor moved to {dest} "
                                f"({failure_reason(e)}): move it away yourself, then run again") from e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("rlt_jax.checkpointing.set_aside")
    self.manager.reload()
    return dest


def _agree(why: str | None) -> str | None:
  """Every process's verdict on a step: unreadable (a reason) if any process could not read it."""
  if jax.process_count() == 1:
    return why
  return next((w for w in distributed.allgather_objects(why) if w), None)


def redeal_data_states(states: list[dict], processes: int) -> list[dict]:
  """Data-iterator states of a run with len(states) processes, for the same stream read by `processes` processes.

  data.make_dataset deals stream element g to process g mod count, and a state's parent.next_index counts the
  elements that process has taken (rows.* are statistics only). Everything before the first element some process has
  not taken is consumed; the new processes start right there. When bad rows made the old processes take different
  numbers of elements, the few later elements already taken are read again (logged)."""
  n = len(states)
  try:
    taken = [int(s["parent"]["next_index"]) for s in states]
    stats = [s["rows"] for s in states]
    add = lambda key: sum((collections.Counter(r[key]) for r in stats), collections.Counter())  # noqa: E731
    examples = {}
    for r in stats:
      for reason, wheres in r["examples"].items():
        examples[reason] = (examples.get(reason, []) + list(wheres))[:3]
    merged = dict(epoch=min(r["epoch"] for r in stats), ok=sum(r["ok"] for r in stats), bad=dict(add("bad")),
                  total_ok=sum(r["total_ok"] for r in stats), total_bad=dict(add("total_bad")), examples=examples,
                  reported=min(r["reported"] for r in stats))
  except (KeyError, TypeError, ValueError, AttributeError):
    raise run_config.ConfigError(f"the checkpoint's data position (written by {n} processes) cannot be re-dealt to "
                                 f"{processes} processes: unexpected iterator state (packed SFT data?); resume with "
                                 "the process count that wrote it") from None
  first = min(p + n * m for p, m in enumerate(taken))
  again = sum(max(0, m - math.ceil((first - p) / n)) for p, m in enumerate(taken))
  if again:
    _log.warning("data: %d rows taken by some of the %d old processes are read again by the %d new ones", again, n,
                 processes)
  empty = dict(merged, ok=0, bad={}, total_ok=0, total_bad={}, examples={})
  # New process q takes elements q, q + processes, ...: those below `first` are consumed.
  return [{"parent": dict(states[0]["parent"], next_index=max(0, math.ceil((first - q) / processes))),
           "rows": merged if q == 0 else empty} for q in range(processes)]
