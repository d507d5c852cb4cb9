"""Multi-process runs: `jax.distributed` set up from the environment, and the host-side collectives of the RL loop.

Which setup `initialize` picks (`--distributed`, default "detect"):
  explicit  --coordinator HOST:PORT --num_processes N --process_id I (or RLT_COORDINATOR, RLT_NUM_PROCESSES,
            RLT_PROCESS_ID; flags win). "detect" takes it whenever any of the three is given.
  slurm     SLURM_NTASKS processes, this one SLURM_PROCID, the coordinator on the first host of
            SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) at RLT_COORDINATOR_PORT, else a port derived from
            SLURM_JOB_ID. "detect" takes it when SLURM_NTASKS > 1 and SLURM_PROCID is set (i.e. under srun).
  auto      `jax.distributed.initialize()` with no arguments: JAX finds TPU pod workers (and other clusters) itself.
            "detect" takes it when TPU_WORKER_HOSTNAMES names several hosts or MEGASCALE_COORDINATOR_ADDRESS is set;
            launch/tpu_pod.sh asks for it explicitly.
  off       one process (also what "detect" falls back to, and what a plan of one process means).
It must run before anything touches JAX devices; `cli.cli` calls it first thing.

With several processes every process runs the same program on one global mesh. The data loader deals the stream
round-robin to processes (element g goes to process g mod count); `gather_rows` puts every process's batch back
together in stream order on every process, so the step sees the same global batch as a one-process run would.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re

import jax
import numpy as np
from jax.sharding import NamedSharding

from rlt_jax import sharding

MODES = ("detect", "explicit", "slurm", "auto", "off")
_log = logging.getLogger(__name__)


class DistributedError(ValueError):
  """A multi-process setting that cannot work, named by its flag or environment variable."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does: mode "single" (nothing), "explicit"/"slurm" (these three values), "auto" (JAX's)."""
  mode: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  source: str = ""  # where the values came from, for messages


def _int(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name}={value!r}: expected an integer") from None


def first_host(nodelist: str) -> str:
  """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07" (zero padding kept), "a,b" -> "a"."""
  text = nodelist.strip()
  depth, end = 0, len(text)
  for i, ch in enumerate(text):  # the first comma outside brackets ends the first entry
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      end = i
      break
  entry = text[:end]
  if not entry or entry.count("[") != entry.count("]"):
    raise DistributedError(f"Slurm node list {nodelist!r}: cannot read its first host")
  # Each bracket group "[07-09,12]" contributes its first value, "07".
  return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)


def plan(mode: str = "detect", coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, env=None) -> Plan:
  """The setup for this process from the flags and `env` (default os.environ); touches no device."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}: expected one of {MODES}")
  coordinator = coordinator or env.get("RLT_COORDINATOR") or None
  num_processes = num_processes if num_processes is not None else _int(env.get("RLT_NUM_PROCESSES"),
                                                                       "RLT_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int(env.get("RLT_PROCESS_ID"), "RLT_PROCESS_ID")
  explicit = (coordinator, num_processes, process_id)
  if mode == "off":
    return Plan("single", source="--distributed=off")
  if mode == "explicit" or (mode == "detect" and any(v is not None for v in explicit)):
    return _explicit(*explicit)
  if mode == "slurm" or (mode == "detect" and _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") not in (None, 0, 1)
                         and env.get("SLURM_PROCID") is not None):
    return _slurm(env)
  if mode == "auto" or (mode == "detect" and (len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
                                              or env.get("MEGASCALE_COORDINATOR_ADDRESS"))):
    return Plan("auto", source="JAX cluster detection (TPU pod)")
  return Plan("single", source="no multi-process environment found")


def _explicit(coordinator, num_processes, process_id) -> Plan:
  if num_processes == 1 and coordinator is None and process_id in (None, 0):
    return Plan("single", source="--num_processes=1")
  missing = [f"--{n} (or RLT_{n.upper()})" for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                                          ("process_id", process_id)) if v is None]
  if missing:
    raise DistributedError(f"a multi-process run needs --coordinator, --num_processes and --process_id together; "
                           f"missing {', '.join(missing)}")
  if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5}", coordinator):
    raise DistributedError(f"--coordinator={coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
  if num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes}: must be >= 1")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id}: must be in [0, --num_processes={num_processes})")
  if num_processes == 1:
    return Plan("single", source="--num_processes=1")
  return Plan("explicit", coordinator, num_processes, process_id, "--coordinator/--num_processes/--process_id")


def _slurm(env) -> Plan:
  n = _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS")
  rank = _int(env.get("SLURM_PROCID"), "SLURM_PROCID")
  if n is None or rank is None:
    raise DistributedError("--distributed=slurm: SLURM_NTASKS and SLURM_PROCID are not set (start the program "
                           "with srun inside the allocation)")
  if n == 1:
    return Plan("single", source="SLURM_NTASKS=1")
  nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if not nodes:
    raise DistributedError("--distributed=slurm: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
  port = _int(env.get("RLT_COORDINATOR_PORT"), "RLT_COORDINATOR_PORT")
  if port is None:
    # One port per job (a node may run several jobs), above Linux's default ephemeral range 32768-60999.
    port = 61440 + (_int(env.get("SLURM_JOB_ID"), "SLURM_JOB_ID") or 0) % 4096
  if not 0 < port < 65536:
    raise DistributedError(f"RLT_COORDINATOR_PORT={port}: not a TCP port")
  if not 0 <= rank < n:
    raise DistributedError(f"SLURM_PROCID={rank}: must be in [0, SLURM_NTASKS={n})")
  return Plan("slurm", f"{first_host(nodes)}:{port}", n, rank, "SLURM_* variables")


def initialize(mode: str = "detect", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env=None) -> Plan:
  """Starts `jax.distributed` as `plan(...)` says (a no-op for one process, or when it is already running)."""
  p = plan(mode, coordinator, num_processes, process_id, env)
  if p.mode == "single" or jax.distributed.is_initialized():
    return p
  # CPU processes exchange data through gloo (JAX's CPU collectives); without it cross-process CPU programs fail.
  if not (os.environ if env is None else env).get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if p.mode == "auto":
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(p.coordinator, p.num_processes, p.process_id)
  except (RuntimeError, ValueError) as e:
    raise DistributedError(f"jax.distributed.initialize from {p.source} "
                           f"(coordinator={p.coordinator}, num_processes={p.num_processes}, "
                           f"process_id={p.process_id}) failed: {e}") from None
  if jax.process_index() == 0:
    _log.info("distributed: %d processes (%s), %d devices, %d local", jax.process_count(), p.source,
              jax.device_count(), jax.local_device_count())
  return p


def define_flags() -> dict:
  """The absl flags of `initialize`, for an entry point's command line; pass their values to `initialize`."""
  from absl import flags
  return {
      "mode": flags.DEFINE_enum("distributed", "detect", MODES, "How to start jax.distributed (see rlt_jax/"
                                "distributed.py): detect it from flags/RLT_*/SLURM_*/TPU variables, or force one."),
      "coordinator": flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (env RLT_COORDINATOR)."),
      "num_processes": flags.DEFINE_integer("num_processes", None, "Processes in the run (env RLT_NUM_PROCESSES)."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index (env RLT_PROCESS_ID)."),
  }


# ------------------------------------------------------------------------------------------------ host collectives
def allgather_objects(obj) -> list:
  """Every process's `obj` (any picklable value), in process order, on every process. One process: [obj].

  Pickle is safe here: the bytes only travel between the processes of this run."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(pickle.dumps(obj), np.uint8)
  if blob.size >= 2**31:
    raise ValueError(f"allgather_objects: {blob.size} bytes is too large to gather")
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)  # process_allgather needs one shape on every process
  padded[:blob.size] = blob
  parts = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(parts[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def gather_rows(batch: dict) -> dict:
  """The global batch on every process from each process's `batch` (dict of [b, ...] arrays and length-b lists).

  data.make_dataset deals stream element g to process g mod n, so process p's row j is element j·n + p of this
  step's slice of the stream: the rows are interleaved back into that order, the order one process would have read.
  """
  n = jax.process_count()
  if n == 1:
    return batch
  parts = allgather_objects(batch)
  out = {}
  for key, first in batch.items():
    values = [p[key] for p in parts]
    if len({len(v) for v in values}) != 1:
      raise ValueError(f"gather_rows: {key!r} has {[len(v) for v in values]} rows on the {n} processes")
    if isinstance(first, np.ndarray):
      if len({v.shape for v in values}) != 1:
        raise ValueError(f"gather_rows: {key!r} has shapes {[v.shape for v in values]} on the {n} processes "
                         "(use one bucket length so every process pads to the same shape)")
      out[key] = np.stack(values, 1).reshape(-1, *first.shape[1:])  # [b, n, ...]: row j·n + p = process p's row j
    else:
      out[key] = [v[j] for j in range(len(first)) for v in values]
  return out


def global_rows(x, mesh, rules=None):
  """A host array that is the same on every process, as one array over `mesh` with its rows split by the "batch"
  rule (each device receives only its rows): an explicit upload, so it passes `jax.transfer_guard("disallow")`."""
  x = np.asarray(x)
  spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), rules, mesh=mesh, shape=x.shape,
                                  what="activation")  # a row count the axes do not divide is replicated
  target = NamedSharding(mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(x, target)
  # Each local device's block, put there explicitly (make_array_from_callback's transfer is an implicit one).
  blocks = [jax.device_put(x[index], device)
            for device, index in target.addressable_devices_indices_map(x.shape).items()]
  return jax.make_array_from_single_device_arrays(x.shape, target, blocks)


def to_host(tree):
  """A pytree of arrays as NumPy on every process, in one explicit transfer: `jax.device_get` when this process
  holds all of each array (replicated ones included), else one all-gather of the tree."""
  leaves = jax.tree.leaves(tree)
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  with jax.transfer_guard("allow"):  # the all-gather's own copies: this call is the one explicit transfer
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
