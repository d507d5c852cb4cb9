"""The planner's command line and its text report (`python -m rlt_jax.plan ...`: the flags are `plan`'s, the run is
`main` here): the config's own mesh or a mesh search, the plan of an RL or SFT run, and per-device GiB by buffer and
phase, or one JSON object."""
from __future__ import annotations

import json
import sys

from rlt_jax import plan, run_config, sharding
from rlt_jax.memory import CHIPS, GiB
from rlt_jax.models import decoder


def report(p: dict, *, header: list[str]) -> str:
  ph = p["phases"]
  s, r, u = ph["sample"], ph["reward"], ph["update"]
  gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
  row = lambda label, b, extra="": f"  {label:<40}{gib(b):>9}  {extra}".rstrip()  # noqa: E731
  by_remat = ", ".join(f"{k} {gib(v)}" for k, v in p["activation_bytes_by_remat"].items())
  lines = header + ["", f"  {'per device':<40}{'GiB':>9}",
                    row("teacher params", p["params_bytes"]),
                    row("AdamW state (mu, nu, count)", p["opt_state_bytes"]),
                    row("compute copy of the teacher", p["compute_params_bytes"], "read by the reward"),
                    row("rollout copy of the teacher", p["rollout_params_bytes"],
                        "read by sampling, on mesh " + _mesh_text(p["rollout_mesh"])),
                    row("reference params", p["ref_params_bytes"]),
                    row("student params", p["student_params_bytes"]),
                    row("resident in every phase", p["resident_bytes"], "the copies come and go by phase"),
                    row("sample: KV cache", p["kv_cache_bytes"],
                        f"{p['sampling_prompts']} prompts x {p['group_size']} samples in one call"),
                    row("sample: prefill working set", s["prefill"]),
                    row("sample: decode working set", s["decode"], "prompt cache, its copy, generation cache"),
                    row("reward: teacher forward", r["teacher_forward"]),
                    row("reward: student forward", r["student_forward"]),
                    row("reward: log-prob chunk buffers", r["logprob_chunks"], "fp32 [rows, chunk, vocab]"),
                    row("update: gradients", u["grads"]),
                    row(f"update: activations (remat {p['remat']})", u["activations"], f"by remat: {by_remat}"),
                    row("update: of which saved residuals", u["saved_residuals"]),
                    row("update: log-prob chunk buffers", u["logprob_chunks"]),
                    ""]
  lines += [row(f"phase {k} (resident + copies + inputs + working set)", ph[k]["total"]) for k in ph]
  lines.append(f"peak: {p['peak_phase']}, {gib(p['total_bytes'])} GiB of {gib(p['usable_bytes'])} GiB usable "
               f"({gib(p['device_bytes'])} GiB a device): " + ("fits" if p["fits"] else "does NOT fit"))
  k = p["max_sampling_prompts"]
  lines.append(f"largest sampling call that fits: {k} prompts x {p['group_size']} samples = {k * p['group_size']} "
               f"completions (the config samples {p['sampling_prompts'] * p['group_size']} in one call)")
  lines += [f"note: {n}" for n in p["notes"]]
  return "\n".join(lines)


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _sft_main(cfg, config_path, chip, sizes, as_json, model, usable) -> None:
  try:
    m, source = plan.sft_model_config(cfg, model=model, config_path=config_path)
    p = plan.plan_sft(cfg, m, sizes, CHIPS[chip].hbm_bytes, usable=usable)
  except (ValueError, run_config.ConfigError) as e:
    sys.exit(f"error: {e}")
  p.update(chip=chip, config=config_path, models=source, remat=cfg.remat)
  if as_json:
    print(json.dumps(p, indent=1))
    return
  u, gib = p["phases"]["update"], lambda b: f"{b / GiB:.2f}"  # noqa: E731
  print(f"rlt_jax.plan: {config_path} (SFT) on {p['devices']} x {chip} (mesh {_mesh_text(sizes)}); {source}, params "
        f"{cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}\n"
        f"  params {gib(p['params_bytes'])}, AdamW state {gib(p['opt_state_bytes'])}, gradients {gib(u['grads'])}, "
        f"activations {gib(u['activations'])} GiB a device\n"
        f"peak: update, {gib(p['total_bytes'])} GiB of {gib(p['usable_bytes'])} GiB usable: "
        + ("fits" if p["fits"] else "does NOT fit"))


def _mesh_text(sizes) -> str:
  return " ".join(f"{a}={sizes[a]}" for a in sharding.MESH_AXES)


def main(cfg, config_path: str, chip: str, mesh: str | None, as_json: bool, model: str | None, usable: float,
         max_devices: int) -> None:
  """The CLI. Without `mesh`, the config's own mesh when it sets every axis (no -1), else a search."""
  try:
    if chip not in CHIPS:
      raise ValueError(f"--chip={chip!r}: unknown chip; one of {sorted(CHIPS)}")
    if not 0 < usable <= 1:
      raise ValueError(f"--usable={usable}: must be in (0, 1]")
    if max_devices < 1:
      raise ValueError(f"--max_devices={max_devices}: must be >= 1")
    own = {a: int(cfg.mesh[a]) for a in sharding.MESH_AXES}
    if mesh is None and min(own.values()) >= 1:
      mesh = ",".join(f"{a}={n}" for a, n in own.items())
    if "max_len" in cfg and "kind" in cfg:  # an SFT config (sft.default_config)
      if mesh is None:
        raise ValueError("--mesh: required for an SFT config whose config.mesh has a -1 axis")
      return _sft_main(cfg, config_path, chip, plan.parse_mesh(mesh), as_json, model, usable)
    device = CHIPS[chip].hbm_bytes
    teacher, student, source = plan.model_configs(cfg, model=model, config_path=config_path)
    # decoder.attention_block_size on accelerators
    kw = dict(usable=usable, attention_block=512, host_devices=CHIPS[chip].host_devices)
    search = None
    if mesh is None:
      search, closest = plan.search_meshes(cfg, teacher, student, device, max_devices=max_devices, **kw)
      sizes = search[0][1][0][0] if search else closest[0]
    else:
      sizes = plan.parse_mesh(mesh)
    p = plan.plan(cfg, teacher, student, sizes, device, **kw)
  except (ValueError, run_config.ConfigError) as e:
    sys.exit(f"error: {e}")
  p.update(chip=chip, config=config_path, models=source, remat=cfg.remat, group_size=cfg.group_size,
           max_sampling_prompts=plan.max_sampling_prompts(cfg, teacher, student, sizes, device, **kw),
           teacher_params=decoder.num_params(decoder.param_shapes(teacher)),
           student_params=decoder.num_params(decoder.param_shapes(student)))
  if search is not None:
    p["mesh_search"] = [dict(devices=n, meshes=[dict(m, total_bytes=t) for m, t in fits]) for n, fits in search]
  if as_json:
    print(json.dumps(p, indent=1))
    return
  header = [f"rlt_jax.plan: {config_path} on {p['devices']} x {chip} (mesh {_mesh_text(sizes)})",
            f"  models: {source}; {_count(p['teacher_params'])} / {_count(p['student_params'])} params, "
            f"params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}",
            f"  chip: {CHIPS[chip].note}; usable {usable:.0%}"]
  if search is not None:
    header.append("  mesh search (powers of two up to %d devices):" % max_devices)
    header += [f"    {n} devices: " + "; ".join(
        f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({t / GiB:.1f} GiB)" for m, t in fits[:4])
        for n, fits in search] or ["    nothing fits; shown: the mesh with the lowest peak"]
  print(report(p, header=header))
