"""The preflight: a run that cannot fit its (declared or detected) chip stops before any weights load, naming each
phase over, by how much, and the fields that shrink it; a suggested value really fits; preflight=False skips it."""
import re

import pytest

from conftest import set_fields, tiny_module_config
from rlt_jax import hf_checkpoint, plan, preflight, run_config, sft, train
from rlt_jax.memory import CHIPS, GiB


class Loaded(Exception):
  pass


@pytest.fixture
def no_loading(monkeypatch):
  """Loading any weights raises Loaded: the preflight must stop the run before that."""
  def load(*a, **kw):
    raise Loaded()
  monkeypatch.setattr(hf_checkpoint, "load_hf", load)


def too_big(assets, **overrides):
  """1,024 rows × 32,768 new tokens of the tiny model on one device: a 16 GiB KV cache, on a declared 16 GiB
  TPU v5e (every phase is over)."""
  cfg = tiny_module_config()
  set_fields(cfg, dict(teacher_path=assets["teacher"], student_path=assets["student"],
                       tokenizer_path=assets["tokenizer"], batch_size=1024, group_size=64, max_prompt_len=384,
                       max_new_tokens=32768, max_student_len=33400, chip="tpu-v5e", tensorboard=False,
                       num_devices=1))
  return set_fields(cfg, overrides)


def test_a_run_over_its_chip_stops_before_loading_with_the_fields_to_change(assets, tmp_path, no_loading):
  cfg = too_big(assets)
  with pytest.raises(run_config.ConfigError) as e:
    train.run(cfg, str(tmp_path))
  msg = str(e.value)
  assert "does not fit 1 x tpu-v5e" in msg and "14.40 GiB usable" in msg, msg
  for phase, field in (("sample", "sample_micro_batch"), ("reward", "reward_micro_batch"),
                       ("update", "grpo.micro_batches")):
    line = next(x for x in msg.splitlines() if x.strip().startswith(f"phase {phase} "))
    needs, over = (float(v) for v in re.findall(r"([\d.]+) GiB", line)[:2])
    assert f"config.{field}" in line and over > 0, line
    # The figures are the planner's own.
    teacher, student, _ = plan.model_configs(cfg)
    p = plan.plan(cfg, teacher, student, dict(data=1, fsdp=1, tensor=1), CHIPS["tpu-v5e"].hbm_bytes,
                  attention_block=64)
    assert needs == pytest.approx(p["phases"][phase]["total"] / GiB, abs=0.01)
    assert over == pytest.approx((p["phases"][phase]["total"] - p["usable_bytes"]) / GiB, abs=0.01)
    fix = re.search(r"; (\d+) fits\)", line)
    if fix:  # the suggestion, applied, brings that phase under the device
      fixed = set_fields(too_big(assets), {field: int(fix.group(1))})
      q = plan.plan(fixed, teacher, student, dict(data=1, fsdp=1, tensor=1), CHIPS["tpu-v5e"].hbm_bytes,
                    attention_block=64)
      assert q["phases"][phase]["total"] <= q["usable_bytes"]
  assert "sample_micro_batch (now 0; 8 fits)" in msg  # 16 prompts a call: the KV cache alone is 16 GiB
  assert "config.mesh" in msg and "--config.preflight=False" in msg
  assert not (tmp_path / "metrics.jsonl").exists()
  # Skipped, the same run goes on to load its weights.
  with pytest.raises(Loaded):
    train.run(too_big(assets, preflight=False), str(tmp_path / "skipped"))
  # A run that fits its declared chip passes the check and loads.
  with pytest.raises(Loaded):
    train.run(too_big(assets, batch_size=8, group_size=4, max_new_tokens=16, max_student_len=448),
              str(tmp_path / "fits"))


def test_sft_preflight(assets, tmp_path, no_loading):
  cfg = set_fields(sft.default_config(), dict(model_path=assets["teacher"], tokenizer_path=assets["tokenizer"],
                                              max_len=65536, batch_size=512, chip="tpu-v5e", tensorboard=False))
  with pytest.raises(run_config.ConfigError, match=r"phase update needs .* over: raise config.micro_batches \(now 1; "
                                                   r"\d+ fits\)"):
    sft.run(cfg, str(tmp_path))
  with pytest.raises(Loaded):
    sft.run(set_fields(cfg, dict(preflight=False)), str(tmp_path / "skipped"))


class FakeDevice:
  def __init__(self, kind, limit=None):
    self.device_kind, self._limit = kind, limit

  def memory_stats(self):
    return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_the_device_budget_comes_from_the_device_kind_and_the_allocator():
  h100 = CHIPS["h100"].hbm_bytes
  # JAX's default 75% preallocation caps what the run can use; raising it gives the planner's 90%.
  assert preflight.device_budget("", FakeDevice("NVIDIA H100 80GB HBM3", int(0.75 * h100))) == \
      ("h100", h100, pytest.approx(0.75))
  assert preflight.device_budget("", FakeDevice("NVIDIA H100 80GB HBM3", int(0.95 * h100)))[2] == 0.9
  assert preflight.device_budget("", FakeDevice("TPU v5 lite"))[:2] == ("tpu-v5e", CHIPS["tpu-v5e"].hbm_bytes)
  assert preflight.device_budget("", FakeDevice("TPU v5p"))[0] == "tpu-v5p"
  assert preflight.device_budget("", FakeDevice("NVIDIA H200"))[0] == "h200"
  assert preflight.device_budget("", FakeDevice("cpu")) is None  # nothing known: skipped
  assert preflight.device_budget("", FakeDevice("Some GPU", 40 * GiB)) == ("Some GPU", 40 * GiB, 0.9)
  assert preflight.device_budget("h100", FakeDevice("cpu")) == ("h100", h100, 0.9)  # declared


def test_an_unknown_chip_is_a_config_error(assets, tmp_path):
  with pytest.raises(run_config.ConfigError, match=r"config.chip='h1000': must be '' \(detect\) or one of"):
    train.run(too_big(assets, chip="h1000"), str(tmp_path))
