"""Stopping a run cleanly and bounding what a hard kill loses: the training loop's `Watch`.

A preemption (SIGTERM: Slurm's preemption or `scancel`, a cloud VM's shutdown, Kubernetes) or a warning before a time
limit (SIGUSR1: `launch/gpu_slurm.sbatch` asks Slurm for it 10 minutes before the job's end) makes every process of
the run finish the step in flight, write a checkpoint, and exit with status `STOPPED_STATUS` (75, EX_TEMPFAIL: "try
again"); running the same command again resumes from that checkpoint. `checkpoint_every_minutes` adds a checkpoint
whenever that long has passed since the last one, so a kill that gives no warning (SIGKILL, a lost node) loses at most
that much work besides the step in flight.

With several processes the decision must be the same everywhere, or one process would wait forever in the step
another has left: after each step is queued, every process posts what it has seen (a signal, the clock) to the JAX
coordination service and reads everyone else's, and all act on the union. This goes through the coordinator's
key-value store, on the host: it never waits for the devices, so the step queued behind it keeps running.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import threading
import time

import jax

STOPPED_STATUS = 75  # the exit status of a run that stopped on a signal after writing its checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_AGREE_TIMEOUT_MS = 30 * 60 * 1000  # a process this far behind the others is stuck (a step is minutes at 7B)

_log = logging.getLogger("rlt_jax")
_WATCHES = itertools.count()  # every process makes its Watches in the same order: their keys agree


class Stopped(Exception):
  """The run stopped on a signal after writing the checkpoint of `step` (steps done); the command line exits with
  STOPPED_STATUS. Running the same command again resumes there."""

  def __init__(self, step: int, signal_name: str, directory: str):
    self.step, self.signal_name = step, signal_name
    super().__init__(f"stopped on {signal_name} after step {step}; its checkpoint is in {directory}: run the same "
                     "command again to resume")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What every process agreed on after a step was queued."""
  signal_name: str | None  # a signal some process received: checkpoint after this step, then stop
  checkpoint_due: bool     # checkpoint_every_minutes has passed on some process since the last checkpoint


class Watch:
  """The loop's view of signals and the checkpoint clock. `with Watch(minutes):` installs the handlers of SIGTERM and
  SIGUSR1 (main thread only; elsewhere a handler cannot be installed and signals keep their default action) and puts
  the previous ones back on exit; `poll(step)` is the agreed Verdict; `checkpointed()` restarts the clock.

  `clock` (seconds, monotonic) can be replaced in tests."""

  def __init__(self, minutes: float = 0.0, *, clock=time.monotonic):
    self.minutes, self.clock = float(minutes), clock
    self.received: str | None = None
    self._since = clock()
    self._previous: dict = {}
    self._posted: str | None = None  # this process's key of the last poll
    self._prefix = f"rlt_jax/watch/{next(_WATCHES)}"

  def __enter__(self) -> "Watch":
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    else:
      _log.debug("not the main thread: SIGTERM/SIGUSR1 keep their handlers (no checkpoint-and-stop on a signal)")
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is None:
      self.received = name
      _log.warning("%s received: finishing the current step, then writing a checkpoint and stopping", name)
    else:
      _log.warning("%s received; already stopping after the current step (on %s)", name, self.received)

  def barrier(self, name: str) -> None:
    """Waits until every process reaches this Watch's barrier `name` (host only; nothing with one process)."""
    if jax.process_count() > 1:
      from jax._src import distributed as jax_distributed
      jax_distributed.global_state.client.wait_at_barrier(f"{self._prefix}/{name}", _AGREE_TIMEOUT_MS)

  def checkpointed(self) -> None:
    self._since = self.clock()

  def poll(self, step: int) -> Verdict:
    """What every process agrees on once step `step` (0-based) is queued: each process's signal and clock, united."""
    due = self.minutes > 0 and self.clock() - self._since >= 60.0 * self.minutes
    if jax.process_count() == 1:
      return Verdict(self.received, due)
    key = f"{self._prefix}/{step}"
    seen = agree(key, f"{self.received or ''},{int(due)}", forget=self._posted)
    self._posted = key
    signals = [s.split(",")[0] for s in seen if s.split(",")[0]]
    return Verdict(signals[0] if signals else None, any(s.endswith(",1") for s in seen))


def agree(key: str, value: str, *, forget: str | None = None) -> list[str]:
  """Every process's `value` for `key`, in process order, through the coordination service's key-value store (host
  only; one process: [value]). `forget`: this process's key of the previous call, deleted once every value of this
  one is read (every process posted this key after reading all of that one), so the store stays small."""
  if jax.process_count() == 1:
    return [value]
  from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize connected
  client = jax_distributed.global_state.client
  me, n = jax.process_index(), jax.process_count()
  client.key_value_set(f"{key}/{me}", value)
  values = [value if p == me else client.blocking_key_value_get(f"{key}/{p}", _AGREE_TIMEOUT_MS) for p in range(n)]
  if forget is not None:
    client.key_value_delete(f"{forget}/{me}")
  return values


