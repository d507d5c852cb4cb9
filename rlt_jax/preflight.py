"""Preflight: before any weights load, `train.run` and `sft.run` plan the run (`plan`) for the real mesh and device
kind, and a run that will not fit stops with a message naming each phase over the device, by how much, and the
config fields that shrink it, instead of failing after minutes of sampling. `--config.preflight=False` skips it;
`--config.chip=NAME` declares the chip (e.g. to check a cluster's config from a CPU machine)."""
from __future__ import annotations

import logging

import ml_collections

from rlt_jax import plan, run_config, sharding
from rlt_jax.memory import GiB, MiB
from rlt_jax.models import decoder

_log = logging.getLogger("rlt_jax")

# jax Device.device_kind substrings -> CHIPS names (first match wins).
_DEVICE_KINDS = (("h200", "h200"), ("h100", "h100"), ("a100-sxm4-80gb", "a100-80g"), ("a100 80gb", "a100-80g"),
                 ("a100", "a100-40g"), ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v6 lite", "tpu-v6e"),
                 ("v6e", "tpu-v6e"), ("v5", "tpu-v5p"), ("v4", "tpu-v4"))


def device_budget(chip: str, device) -> tuple[str, int, float] | None:
  """(chip name, bytes of one device, usable share) for a run on `device`: the declared `chip` (a CHIPS name), else
  the chip its device kind names; the allocator's own limit (`memory_stats()["bytes_limit"]`, e.g. after
  XLA_PYTHON_CLIENT_MEM_FRACTION) caps the usable share. None on a device with neither (CPU)."""
  stats = {}
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  backends without memory statistics
    pass
  limit = int(stats.get("bytes_limit", 0))
  name = chip or next((c for k, c in _DEVICE_KINDS if k in str(device.device_kind).lower()), None)
  if name is None:
    return (str(device.device_kind), limit, 0.9) if limit else None
  hbm = plan.CHIPS[name].hbm_bytes
  return name, hbm, min(0.9, limit / hbm) if limit and not chip else 0.9


def _levers(kind: str) -> dict[str, tuple[str, str]]:
  """phase -> (config field that shrinks it, how)"""
  if kind == "sft":
    return {"update": ("micro_batches", "raise")}
  return {"sample": ("sample_micro_batch", "lower"), "reward": ("reward_micro_batch", "lower"),
          "update": ("grpo.micro_batches", "raise")}


def _candidates(cfg, field: str) -> list[int]:
  """Values of `field` that validate, in the order that shrinks its phase."""
  if field == "sample_micro_batch":
    n = cfg.batch_size // cfg.group_size
    return [d for d in range(n - 1, 0, -1) if n % d == 0 and d < (cfg.sample_micro_batch or n)]
  if field == "reward_micro_batch":
    n = cfg.batch_size
    return [d for d in range(n - 1, 0, -1) if n % d == 0 and d < (cfg.reward_micro_batch or n)]
  now = cfg.grpo.micro_batches if field == "grpo.micro_batches" else cfg.micro_batches
  return [m for m in range(now + 1, cfg.batch_size + 1) if cfg.batch_size % m == 0]


def _with(cfg, field: str, value):
  c = ml_collections.ConfigDict(cfg.to_dict())
  *parents, leaf = field.split(".")
  node = c
  for k in parents:
    node = node[k]
  node[leaf] = value
  return c


def check(cfg, mesh, *, kind: str = "rl"):
  """Plans the run for `mesh` and its device kind (or `config.chip`) before any weights load, and stops it with a
  ConfigError that names each phase over the device, by how much, and the fields that shrink it. Returns the plan,
  or None when skipped (`config.preflight=False`, or a device without a known memory size such as the CPU)."""
  if not cfg.preflight:
    return None
  budget = device_budget(cfg.chip, mesh.devices.flat[0])
  if budget is None:
    _log.info("preflight: skipped on %s (no memory size known; --config.chip=NAME plans for one of %s)",
              mesh.devices.flat[0].device_kind, sorted(plan.CHIPS))
    return None
  chip, device_bytes, usable = budget
  sizes = {a: int(mesh.shape[a]) for a in sharding.MESH_AXES}
  if kind == "sft":
    model, _ = plan.sft_model_config(cfg)
    block = decoder.attention_block_size(model)
    plan_of = lambda c: plan.plan_sft(c, model, sizes, device_bytes, usable=usable, attention_block=block)  # noqa: E731
  else:
    teacher, student, _ = plan.model_configs(cfg)
    block = decoder.attention_block_size(teacher)
    plan_of = lambda c: plan.plan(c, teacher, student, sizes, device_bytes, usable=usable,  # noqa: E731
                                  attention_block=block, host_devices=sharding.host_devices(mesh))
  p = plan_of(cfg)
  gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 100 else f"{b / MiB:.1f} MiB"  # noqa: E731
  where = f"{p['devices']} x {chip} (mesh {' '.join(f'{a}={sizes[a]}' for a in sharding.MESH_AXES)})"
  if p["fits"]:
    _log.info("preflight: peak %s (%s) of %s usable a device on %s", gib(p["total_bytes"]), p["peak_phase"],
              gib(p["usable_bytes"]), where)
    return p
  lines = [f"preflight: this run does not fit {where}: {gib(p['usable_bytes'])} usable a device."]
  for phase, (field, how) in _levers(kind).items():
    over = p["phases"][phase]["total"] - p["usable_bytes"]
    if over <= 0:
      continue
    fix = next((v for v in _candidates(cfg, field)
                if plan_of(_with(cfg, field, v))["phases"][phase]["total"] <= p["usable_bytes"]), None)
    lines.append(f"  phase {phase} needs {gib(p['phases'][phase]['total'])} a device, {gib(over)} over: {how} "
                 f"config.{field} (now {run_config.Checker(cfg).value(field)}; " +
                 (f"{fix} fits)" if fix is not None else "no value fits alone)"))
  names = dict(params="trained params", opt_state="AdamW state", ref_params="reference", student_params="student")
  lines.append(f"  resident in every phase: {gib(p['resident_bytes'])} (" + ", ".join(
      f"{label} {gib(p[k + '_bytes'])}" for k, label in names.items() if p.get(k + "_bytes")) + ")")
  lines.append("  Other levers: config.mesh (more fsdp shards the resident state and the batch), config.remat="
               f"'full'. `python -m rlt_jax.plan --config FILE --chip {chip} --mesh "
               f"{','.join(f'{a}={n}' for a, n in sizes.items())}` prints the whole plan; "
               "--config.preflight=False skips this check.")
  raise run_config.ConfigError("\n".join(lines))
