"""Test setup: 8 fake CPU devices (set before JAX starts) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
