"""The planner's command line (`python -m rlt_jax.plan`, run by `plan_report.main`): its JSON, and flag errors."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_module_config
from rlt_jax import plan_report


def test_cli_json_and_flag_errors(tmp_path):
  # A platform this machine lacks: the planner must start no backend (it runs on login nodes, and beside jobs that
  # hold the accelerators), so it plans from shapes alone or fails here.
  run = subprocess.run([sys.executable, "-m", "rlt_jax.plan", "--config", str(REPO / "configs" / "tiny.py"),
                        "--chip", "h100", "--mesh", "data=1,fsdp=8,tensor=1", "--json", "--config.batch_size=64"],
                       capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, JAX_PLATFORMS="tpu"))
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout)
  for k in ("params_bytes", "opt_state_bytes", "ref_params_bytes", "student_params_bytes", "kv_cache_bytes",
            "activation_bytes", "total_bytes", "device_bytes", "fits"):
    assert k in out, k
  assert out["device_bytes"] == 81559 * 2**20 and out["fits"] is True and out["mesh"] == dict(data=1, fsdp=8, tensor=1)
  assert out["total_bytes"] == out["phases"][out["peak_phase"]]["total"]
  assert out["max_sampling_prompts"] == 64 // 8  # the whole batch (the --config override) fits
  cfg = tiny_module_config()
  for flag, kw in (("--chip", dict(chip="tpu-v9")), ("--mesh", dict(mesh="data=1,fsdp=x")),
                   ("--mesh", dict(mesh="pipeline=2")), ("--model", dict(model="9b"))):
    args = {**dict(chip="h100", mesh="data=1,fsdp=8,tensor=1", model=None), **kw}
    with pytest.raises(SystemExit) as e:
      plan_report.main(cfg, "configs/tiny.py", args["chip"], args["mesh"], True, args["model"], 0.9, 2048)
    assert str(e.value).startswith("error: " + flag), e.value
