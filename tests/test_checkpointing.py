"""Checkpoints of a run's data position: the iterator states written by one process count, re-dealt to another,
continue the one-process stream (nothing read twice, nothing skipped); uneven positions and bad states. (Orbax
checkpoints moved between process counts by real runs: test_distributed.py.)"""
import logging

import pytest

from rlt_jax import checkpointing, data, run_config


def _iterators(fmt, count: int, prompts: int):
  """One data iterator per process of a `count`-process run reading `prompts` prompts a step in all."""
  return [iter(data.make_dataset([str(data.SAMPLE_PATH)], fmt, batch_size=prompts // count, buckets=(4096,),
                                 seed=5, num_epochs=None, process_index=p, process_count=count))
          for p in range(count)]


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_data_position_re_dealt_to_another_process_count_continues_the_stream(fmt, old, new):
  prompts, steps = 4, 3
  (single,) = _iterators(fmt, 1, prompts * 2 * steps)
  stream = next(single)["where"]  # the oracle: one process reading the whole stream
  its = _iterators(fmt, old, prompts)
  seen = []
  for _ in range(steps):
    for it in its:
      seen += next(it)["where"]
  assert sorted(seen) == sorted(stream[:prompts * steps])
  states = checkpointing.redeal_data_states([it.get_state() for it in its], new)
  moved = _iterators(fmt, new, prompts)
  for it, s in zip(moved, states):
    it.set_state(s)
  later = [w for _ in range(steps) for it in moved for w in next(it)["where"]]
  assert sorted(later) == sorted(stream[prompts * steps:])  # nothing read twice, nothing skipped
  assert states[0]["rows"]["total_ok"] == prompts * steps and all(s["rows"]["total_ok"] == 0 for s in states[1:])


def test_uneven_data_positions_read_the_gap_again_and_bad_states_are_named(caplog):
  def state(taken, ok):
    return {"parent": {"next_index": taken}, "rows": dict(epoch=0, ok=ok, bad={"too_long": 1}, total_ok=ok,
                                                          total_bad={"too_long": 1}, examples={"too_long": ["f:1"]},
                                                          reported=-1)}
  # Process 0 took elements 0, 2, 4, 6; process 1 took 1, 3: the first element not taken is 5, and 6 is read again.
  with caplog.at_level(logging.WARNING, logger="rlt_jax"):
    (one,) = checkpointing.redeal_data_states([state(4, 3), state(2, 1)], 1)
  assert one["parent"]["next_index"] == 5
  assert "data: 1 rows taken by some of the 2 old processes are read again by the 1 new ones" in caplog.text
  assert one["rows"]["total_ok"] == 4 and one["rows"]["bad"] == {"too_long": 2}
  three = checkpointing.redeal_data_states([state(4, 3), state(2, 1)], 3)
  assert [s["parent"]["next_index"] for s in three] == [2, 2, 1]
  with pytest.raises(run_config.ConfigError, match=r"written by 2 processes\) cannot be re-dealt to 1"):
    checkpointing.redeal_data_states([{"parent": {}}, {"parent": {}}], 1)
