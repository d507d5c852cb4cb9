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
# gcsfs's bucket-type probe (a gRPC call to the storage-control API) never answers on the local GCS emulator and
# waits 60 s a bucket: off before gcsfs is first imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

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


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator on localhost (gcp-storage-emulator through tests/gcs_emulator.py, in memory, a subprocess) with
  the bucket `rlt-test`; gcsfs and tensorstore (hence orbax) talk to it through STORAGE_EMULATOR_HOST /
  TENSORSTORE_GCS_HTTP_URL and a fake token (GOOGLE_AUTH_TOKEN_FOR_TESTING). Gives the bucket's URL; each test
  writes under a prefix of its own. The local cache goes to a temporary folder."""
  import socket
  import subprocess
  import sys
  import time
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), "start", "--host", "127.0.0.1",
                           "--port", str(port), "--in-memory", "--default-bucket", "rlt-test", "-q"],
                          stdout=log, stderr=log)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), 0.5).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.1)
  env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "RLT_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield "gs://rlt-test"
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(10)
    log.close()
