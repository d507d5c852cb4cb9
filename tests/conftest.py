"""Test setup: 8 fake CPU devices (set before JAX starts), a compilation cache the tests' subprocesses share, and
shared fixtures."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402,F401  -- reads its settings now: the cache below reaches the subprocesses only

# Tests that start `python -m rlt_jax.<module>` (kills and resumes, 2-process runs, preemption, the command line)
# compile the same programs again in each new process: a persistent XLA cache, private to this session, compiles
# them once (measured: a tiny 3-step run 166 s → 87 s on 2 busy cores). This process keeps its own in-memory caches,
# so the tests that count compilations see what a run compiles.
_XLA_CACHE = tempfile.mkdtemp(prefix="rlt_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (real tokenizer, config, datasets); a clear failure when it is not beside the checkout."""
  if not SHARED.is_dir():
    pytest.fail(f"../shared/data not found at {SHARED}: clone the project with shared/ beside it")
  return SHARED


@pytest.fixture(scope="session")
def qwen_dir(shared_data) -> pathlib.Path:
  return shared_data / "qwen2.5-0.5b-instruct"


@pytest.fixture(scope="session")
def tok(qwen_dir):
  """The real Qwen2.5 tokenizer."""
  from rlt_jax import hf_checkpoint
  return hf_checkpoint.load_tokenizer(qwen_dir)


@pytest.fixture(scope="session")
def fmt(tok):
  """The default (Stratos) RLT format on the real tokenizer."""
  from rlt_jax.formats import RLTFormat
  return RLTFormat(tok)


def tiny_module_config():
  """configs/tiny.py's get_config()."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def set_fields(cfg, overrides: dict):
  """cfg with dotted-name overrides applied ({"grpo.beta": 0.0} sets cfg.grpo.beta), as --config.x=y does."""
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
  """The default tiny run's tokenizer, teacher and student (built once per test session, as the run builds them)."""
  import json
  from rlt_jax import data, rows, tiny
  cfg = tiny_module_config()
  sample = [rows.read_row(json.loads(line)) for line in open(data.SAMPLE_PATH)]
  overrides = {k: v for k, v in cfg.format.to_dict().items() if v}
  return tiny.ensure_assets(tmp_path_factory.mktemp("assets"), sample, format_overrides=overrides, **cfg.tiny.to_dict())
