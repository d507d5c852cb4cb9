"""Orbax checkpoints of a training run (RL and SFT): the train state plus each process's data-iterator state,
asynchronous, the last K kept; a data position written by one process count is re-dealt to another on restore."""
from __future__ import annotations

import collections
import logging
import math
import os

import jax

from rlt_jax import distributed, run_config

_log = logging.getLogger("rlt_jax")


class Checkpointer:
  """Orbax checkpoints of the train state plus the data-iterator state (JSON), async, keeping the last K."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                             create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state) -> None:
    """Every process calls it. Each process's data iterator stands at its own place in its own shard, and orbax
    writes JSON from process 0 only: with several processes the states of all of them are gathered and saved."""
    ocp = self._ocp
    if jax.process_count() > 1:
      data_state = {"process_states": distributed.allgather_objects(data_state)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))

  def restore_latest(self, state, *, resume: bool):
    """(state, data-iterator state) of the latest checkpoint, or (state, None) when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return state, None
    if not resume:
      raise run_config.ConfigError(f"config.resume=False, but {self.directory} holds checkpoints (latest step "
                                   f"{step}); use a new workdir or resume=True")
    ocp = self._ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    _log.info("resumed from %s at step %d", self.directory, step)
    saved = out["data"]
    states = saved["process_states"] if isinstance(saved, dict) and "process_states" in saved else [saved]
    if len(states) != jax.process_count():
      _log.info("data position written by %d processes, re-dealt to %d", len(states), jax.process_count())
      states = redeal_data_states(states, jax.process_count())
    return out["state"], states[jax.process_index()]

  def wait(self) -> None:
    self.manager.wait_until_finished()


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
