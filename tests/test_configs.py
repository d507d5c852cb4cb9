"""Every config file loads, names the command that runs it in its docstring, and the paper recipes hold the values
the issues and METHOD_SPEC give."""
import importlib.util
import re

import pytest

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.py"))
MODULE = {"rlt": "train", "tiny": "train", "sft": "sft", "teacher_sft": "sft", "student_sft": "sft",
          "distill": "distill", "eval": "evaluate"}


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_docstring_is_the_command_that_runs_it(path):
  module = _load(path)
  module.get_config()
  entry = next(v for k, v in sorted(MODULE.items(), key=lambda kv: -len(kv[0])) if path.stem.startswith(k))
  assert re.search(rf"python -m rlt_jax\.{entry} --config configs/{re.escape(path.name)}", module.__doc__)


def test_sft_recipes():
  t = _load(REPO / "configs" / "teacher_sft_qwen2.5_7b.py").get_config()
  assert (t.kind, t.learning_rate, t.lr_schedule, t.warmup_ratio, (t.b1, t.b2), t.weight_decay, t.batch_size,
          t.max_grad_norm, t.max_len) == ("teacher", 1e-5, "cosine", 0.05, (0.9, 0.95), 1e-4, 16, 1.0, 16384)
  s = _load(REPO / "configs" / "student_sft_qwen2.5_7b.py").get_config()
  assert (s.kind, s.learning_rate, s.epochs, s.batch_size, s.lr_schedule, s.warmup_ratio, s.max_len) == \
      ("student", 1e-5, 3, 96, "cosine", 0.1, 16384)
  d = _load(REPO / "configs" / "distill_qwen2.5_7b.py").get_config()
  assert (d.temperature, d.max_new_tokens, d.distill.candidates) == (0.7, 16384, 1)


SEVEN_B = {"rlt_qwen2.5_7b.py": "train", "rlt_qwen2.5_7b_8xh100.py": "train", "rlt_qwen2.5_7b_4x8xh100.py": "train",
           "rlt_qwen2.5_7b_v5p64.py": "train", "distill_qwen2.5_7b.py": "distill",
           "teacher_sft_qwen2.5_7b.py": "sft", "student_sft_qwen2.5_7b.py": "sft"}


@pytest.mark.parametrize("name", sorted(SEVEN_B))
def test_7b_configs_refuse_to_start_without_data(name, assets):
  """The 7B recipes never fall back to the bundled 300-row sample: an empty data.path stops the run before any
  work, naming the field; with a path they pass. The tiny configs keep the sample."""
  from rlt_jax import data, distill, run_config, sft
  cfg = _load(REPO / "configs" / name).get_config()
  if SEVEN_B[name] == "sft":
    cfg.model_path = assets["teacher"]
    check = lambda: sft.validate(cfg)  # noqa: E731
  else:
    cfg.teacher_path, cfg.student_path = assets["teacher"], assets["student"]
    # distill checks its own block, then loading.setup runs the RL validation (without the learning-rate check)
    check = (lambda: (distill.validate(cfg), run_config.validate(cfg, training=False))) \
        if SEVEN_B[name] == "distill" else (lambda: run_config.validate(cfg))
  with pytest.raises(run_config.ConfigError, match=r"^config\.data\.path='': is required by this config"):
    check()
  cfg.data.path = str(data.SAMPLE_PATH)
  check()


@pytest.mark.parametrize("name", ["tiny.py", "sft_tiny.py", "distill_tiny.py"])
def test_tiny_configs_keep_the_bundled_sample(name):
  from rlt_jax import run_config
  cfg = _load(REPO / "configs" / name).get_config()
  assert cfg.data.path == "" and not cfg.data.required
  run_config.check_common(cfg, run_config.Checker(cfg).need, lr_field=None)
