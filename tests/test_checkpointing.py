"""Checkpoints: a run's data position (the iterator states written by one process count, re-dealt to another,
continue the one-process stream: nothing read twice, nothing skipped; uneven positions and bad states); faults (a
damaged latest step set aside and the one before resumed, a failed write stopping the run in one line with the
earlier steps intact); the run config saved with each step and compared on resume. (Orbax checkpoints moved between
process counts by real runs: test_distributed.py; resumes of real runs: test_train.py, test_sft.py.)"""
import errno
import glob
import json
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import set_fields
from rlt_jax import checkpointing, data, loop, run_config, sft


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


# ----------------------------------------------------------------------------------- faults: damaged steps, full disk
def _state(step: int):
  return {"params": {"w": jnp.arange(4096, dtype=jnp.float32) + step, "b": jnp.full((16,), float(step))},
          "step": jnp.asarray(step, jnp.int32)}


def _saved(tmp_path, steps=(1, 2, 3), config=None, keep=3):
  """A checkpoint directory holding `steps` (state values = the step), written with `config`."""
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep, config=config)
  for s in steps:
    ckpt.save(s, _state(s), {"pos": s})
  ckpt.wait()
  return str(tmp_path / "checkpoints")


def _restore(directory, config=None, steps=None):
  ckpt = checkpointing.Checkpointer(directory, 3, config=config)
  state, data_state = ckpt.restore_latest(_state(0), resume=True, steps=steps)
  return ckpt, int(state["step"]), data_state


def _truncate(paths):
  for p in paths:
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)


DAMAGE = {  # ways to damage a step directory, as a disk, a copy or a killed sync leaves it
    "truncated array files": lambda d: _truncate(glob.glob(f"{d}/state/ocdbt.process_0/d/*")),
    "deleted array files": lambda d: [os.remove(p) for p in glob.glob(f"{d}/state/ocdbt.process_0/d/*")],
    "deleted state manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "deleted data position": lambda d: os.remove(f"{d}/data/metadata"),
    "truncated run config": lambda d: _truncate([f"{d}/config/{checkpointing.CONFIG_FILE}"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_unreadable_latest_step_is_set_aside_and_the_one_before_resumed(tmp_path, caplog, damage):
  cfg = run_config.default_config()
  directory = _saved(tmp_path, config=cfg)
  DAMAGE[damage](f"{directory}/3")
  with caplog.at_level(logging.INFO, logger="rlt_jax"):
    ckpt, step, data_state = _restore(directory, cfg)
  assert step == 2 and data_state == {"pos": 2}
  assert re.search(rf"checkpoint step 3 in {re.escape(directory)} cannot be read \(.+\); trying step 2", caplog.text)
  assert f"the unreadable step(s) 3 moved to {directory}_unreadable (nothing deleted)" in caplog.text
  assert sorted(os.listdir(directory)) == ["1", "2"] and os.listdir(f"{directory}_unreadable") == ["3"]
  assert os.listdir(f"{directory}_unreadable/3/state")  # moved whole, nothing deleted
  ckpt.save(3, _state(3), {"pos": 3})  # the resumed run writes its own step 3
  ckpt.wait()
  assert _restore(directory, cfg)[1] == 3


def test_two_unreadable_steps_fall_back_further_and_none_readable_names_the_directory(tmp_path, caplog):
  directory = _saved(tmp_path)
  DAMAGE["truncated array files"](f"{directory}/3")
  DAMAGE["deleted state manifest"](f"{directory}/2")
  with caplog.at_level(logging.WARNING, logger="rlt_jax"):
    assert _restore(directory)[1] == 1
  assert "checkpoint step 2 in" in caplog.text and "trying step 1" in caplog.text
  assert sorted(os.listdir(f"{directory}_unreadable")) == ["2", "3"]
  DAMAGE["deleted array files"](f"{directory}/1")
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf"^no checkpoint in {re.escape(directory)} can be read \(step 1: .+\); nothing was "
                           r"moved or deleted: move .* away \(or use another workdir\)") as e:
    _restore(directory)
  assert "\n" not in str(e.value) and os.listdir(directory) == ["1"]


def _fail_json_writes(monkeypatch, step):
  """A full disk from the moment step `step` is written: orbax's background write of its JSON items fails."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith(f"{step}."):
      raise OSError(errno.ENOSPC, "No space left on device")
    return await write(self, x, directory)
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)


def _fail_mkdir(monkeypatch, step):
  """A read-only directory: orbax cannot create the step's temporary directory."""
  from orbax.checkpoint._src.path import async_path
  mkdir = async_path.mkdir

  async def read_only(path, *a, **kw):
    if os.path.basename(str(path)).startswith(f"{step}."):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return await mkdir(path, *a, **kw)
  monkeypatch.setattr(async_path, "mkdir", read_only)


@pytest.mark.parametrize("fault,reason", [
    (_fail_json_writes, r"\[Errno 28\] No space left on device"),
    (_fail_mkdir, r"\[Errno 30\] Read-only file system: '.*/3\.orbax-checkpoint-tmp'")])
def test_a_failed_write_stops_with_one_line_and_keeps_the_earlier_steps(tmp_path, caplog, monkeypatch, fault, reason):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), 2)
  directory = ckpt.directory
  for s in (1, 2):
    ckpt.save(s, _state(s), {"pos": s})
  fault(monkeypatch, 3)
  with caplog.at_level(logging.DEBUG), pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.save(3, _state(3), {"pos": 3})  # the write runs in the background: its failure shows when it is waited on
    ckpt.wait()
  ckpt.wait()  # the loop's cleanup: raises nothing more
  message = str(e.value)
  assert "\n" not in message and re.match(
      rf"cannot write the checkpoint of step 3 in {re.escape(directory)}: {reason}; the run stopped, and the "
      r"checkpoints before it \(steps 1, 2\) are intact", message), message
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name != "rlt_jax"], "an orbax wall"
  assert any(r.name == "rlt_jax.orbax" for r in caplog.records)  # the details, at DEBUG
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["1", "2"]
  ocp = ckpt._ocp
  for s in (1, 2):  # every earlier step still reads back whole
    out = checkpointing.Checkpointer(directory, 2).manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(_state(0)), data=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(out["state"]["params"]["w"], _state(s)["params"]["w"])
    assert out["data"] == {"pos": s}


class _Steps:
  """A trainer whose steps do nothing (the loop's own behaviour around a failed checkpoint write)."""
  state = _state(0)

  def dispatch(self, step):
    return None

  def report(self, step, out, seconds):
    return {"step": step}, None

  def check(self, step, metrics):
    pass

  def data_state(self):
    return {"pos": 0}


class _Closed:
  closed = 0

  def write(self, *a, **kw):
    pass

  def flush(self):
    pass

  def update(self, n):
    pass

  def close(self):
    self.closed += 1


def test_the_loop_stops_at_a_failed_write_with_its_error_and_closes_its_outputs(tmp_path, monkeypatch):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), 3)
  _fail_json_writes(monkeypatch, 2)
  writer, bar = _Closed(), _Closed()
  with pytest.raises(checkpointing.CheckpointError, match=r"step 2 .* \(step 1\) are intact"):
    loop.run(_Steps(), start=0, total=4, checkpoint_every=1, ckpt=ckpt, writer=writer, bar=bar)
  assert writer.closed == 1 and bar.closed == 1
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(ckpt.directory) if n.isdigit()) == ["1"]


# ------------------------------------------------------------------------------------ the run config on resume
def _rl(**overrides):
  return set_fields(run_config.default_config(), overrides)


def test_a_resume_that_changes_the_computation_stops_listing_each_field(tmp_path, caplog):
  directory = _saved(tmp_path, config=_rl(batch_size=32, group_size=8))
  changed = {"batch_size": 16, "group_size": 4, "seed": 7, "max_new_tokens": 99, "teacher_path": "/other/teacher",
             "grpo.learning_rate": 1e-5, "reward.not_matched_penalty": -2.0, "format.style": "r1", "overlap": True}
  safe = {"steps": 500, "checkpoint_every": 1, "keep_checkpoints": 9, "mesh.fsdp": 2, "mesh.data": 4,
          "num_devices": 4, "sharding_rules": (("embed", "fsdp"),), "rollout_tensor": 2, "sample_micro_batch": 1,
          "reward_micro_batch": 8, "decode.window": 64, "remat": "full", "logprob_chunk_size": 64,
          "grpo.micro_batches": 4, "tensorboard": False, "export_dir": "", "chip": "h100", "workdir": "/else"}
  with pytest.raises(run_config.ConfigError) as e:
    _restore(directory, _rl(**changed, **safe))
  message = str(e.value)
  assert message.startswith(f"the config differs from the one that wrote the checkpoint at step 3 in {directory} in "
                            "fields that change what a step computes: batch_size 32 → 16, ")
  for text in ("group_size 8 → 4", "seed 42 → 7", "max_new_tokens 16384 → 99",
               'teacher_path "" → "/other/teacher"', "grpo.learning_rate 1e-06 → 1e-05",
               "reward.not_matched_penalty -1.0 → -2.0", 'format.style "" → "r1"', "overlap false → true",
               "; set them back, use a new workdir, or pass --config.allow_config_change=True"):
    assert text in message, text
  assert message.count(" → ") == len(changed)
  assert not any(f"{f} " in message for f in safe) and "\n" not in message
  with caplog.at_level(logging.WARNING, logger="rlt_jax"):  # allowed: a warning with the same list, then the resume
    assert _restore(directory, _rl(**changed, **safe, allow_config_change=True))[1] == 3
  assert "config.allow_config_change=True: resuming the checkpoint at step 3" in caplog.text
  assert "batch_size 32 → 16" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="rlt_jax"):  # only safe fields: no word
    assert _restore(directory, _rl(batch_size=32, group_size=8, **safe))[1] == 3
  assert "differ" not in caplog.text and "changed" not in caplog.text


def test_every_safe_field_is_a_field_of_a_run_config():
  fields = set(run_config._flat(run_config.config_json(run_config.default_config()))) | \
      set(run_config._flat(run_config.config_json(sft.default_config())))
  for name in run_config.RESUME_SAFE_FIELDS:
    assert any(f == name or f.startswith(name + ".") for f in fields), name


def test_steps_below_the_checkpoint_is_a_clear_error(tmp_path):
  directory = _saved(tmp_path, config=_rl())
  with pytest.raises(run_config.ConfigError, match=rf"^config.steps=2: fewer than the 3 steps the checkpoint in "
                                                   rf"{re.escape(directory)} has done; set config.steps=3 or more"):
    _restore(directory, _rl(steps=2), steps=2)
  assert _restore(directory, _rl(steps=3), steps=3)[1] == 3  # = the checkpoint's step: nothing left but the export


def test_a_checkpoint_without_a_saved_config_resumes_with_an_info_line(tmp_path, caplog):
  directory = _saved(tmp_path, config=None)  # as written before run configs were saved
  with caplog.at_level(logging.INFO, logger="rlt_jax"):
    assert _restore(directory, _rl(batch_size=8))[1] == 3
  assert f"the checkpoint at step 3 in {directory} holds no run config" in caplog.text
  assert "could not be compared" in caplog.text


def test_fields_only_one_config_has_are_not_compared(tmp_path, caplog):
  directory = _saved(tmp_path, config=_rl())
  path = f"{directory}/3/config/{checkpointing.CONFIG_FILE}"
  saved = json.load(open(path))
  assert saved["batch_size"] == 1024 and saved["grpo"]["learning_rate"] == 1e-6  # human-readable JSON
  del saved["top_p"]  # a field added to the code after this checkpoint
  saved["retired_field"] = 1
  json.dump(saved, open(path, "w"))
  with caplog.at_level(logging.INFO, logger="rlt_jax"):
    assert _restore(directory, _rl())[1] == 3
  assert "(fields only one of the two has): retired_field, top_p" in caplog.text


def test_sft_steps_follow_its_learning_rate_schedule(tmp_path):
  def cfg(**overrides):
    return set_fields(sft.default_config(), {"steps": 20, **overrides})
  directory = _saved(tmp_path / "cosine", config=cfg())
  with pytest.raises(run_config.ConfigError, match=r"steps 20 → 40 \(an SFT run's learning-rate schedule"):
    _restore(directory, cfg(steps=40, micro_batches=4))
  assert _restore(directory, cfg(micro_batches=4, checkpoint_every=3))[1] == 3
  with pytest.raises(run_config.ConfigError, match=r"learning_rate 1e-05 → 0.0001"):
    _restore(directory, cfg(learning_rate=1e-4))
  constant = dict(lr_schedule="constant", warmup_ratio=0.0)
  directory = _saved(tmp_path / "constant", config=cfg(**constant))
  assert _restore(directory, cfg(steps=40, **constant))[1] == 3
  with pytest.raises(run_config.ConfigError, match=r"steps 20 → 0"):  # 0: the data's epochs decide: another stream
    _restore(directory, cfg(steps=0, **constant))
