"""The plan of a run: per-device memory of each phase of an RL run (`train.run`) or an SFT run (`sft.run`) on a
chip and mesh, from shapes alone (no weights, devices or network), and the preflight that the entry points run with
it before loading any weights.

  python -m rlt_jax.plan --config configs/rlt_qwen2.5_7b_8xh100.py --chip h100 [--mesh data=1,fsdp=8,tensor=1]
      [--json] [--model 7b] [--usable 0.9] [--config.batch_size=256 ...]

Shapes come from the teacher's/student's (SFT: the model's) `config.json` when the config's path is a local HF
directory, else from the Qwen2.5 presets below (`--model 7b`, or a preset name such as "7B" in the model path or the
config file name), or from the config's `tiny` fields when `tiny_models=True`. Without `--mesh` the mesh is the
config's own when it names every axis, else the smallest device counts (powers of two up to 2048) whose
data×fsdp×tensor meshes fit are searched. The buffers counted are `memory`'s; the reported total is the peak phase.
The command line's run and its text report are `plan_report`'s.
"""
from __future__ import annotations

import json
import math
import re

from rlt_jax import grpo, memory, optim, run_config, sharding, storage, tiny
from rlt_jax.memory import CHIPS, F32
from rlt_jax.models.config import ModelConfig


# Published Qwen2.5 config.json values (base and Instruct share them): hidden, intermediate, layers, heads, kv heads,
# vocab, tied embeddings. Every size has rope_theta 1e6 and head_dim = hidden / heads.
QWEN25 = {
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "3b": (2048, 11008, 36, 16, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
    "14b": (5120, 13824, 48, 40, 8, 152064, False),
    "32b": (5120, 27648, 64, 40, 8, 152064, False),
}


def preset_config(name: str) -> ModelConfig:
  D, F, L, H, K, V, tied = QWEN25[name]
  return ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                     head_dim=D // H, rope_theta=1e6, tie_word_embeddings=tied)


def preset_in(text: str) -> str | None:
  """The Qwen2.5 preset a name mentions ("Qwen2.5-7B-Instruct", "rlt_qwen2.5_7b.py" -> "7b"), or None."""
  found = [m.lower() for m in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", text)]
  found = [f + "b" for f in found if f + "b" in QWEN25]
  return found[-1] if found else None


def model_configs(cfg, *, model: str | None = None, config_path: str = "") -> tuple[ModelConfig, ModelConfig, str]:
  """(teacher, student, where the shapes came from), with the config's dtypes and remat; the frozen student is
  stored in the compute dtype, as `loading.setup` loads it."""
  kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
  if model is not None and model.lower() not in QWEN25:
    raise ValueError(f"--model={model!r}: expected one of {sorted(QWEN25)} (Qwen2.5 sizes)")
  if cfg.tiny_models and not cfg.teacher_path and model is None:
    t = cfg.tiny
    c = tiny.tiny_config(t.vocab_size, hidden=t.hidden, layers=t.layers, heads=t.heads, kv_heads=t.kv_heads,
                         intermediate=t.intermediate).replace(**kw)
    return c, c.replace(param_dtype=cfg.dtype), (f"tiny models from config.tiny (vocab {t.vocab_size}, hidden "
                                                 f"{t.hidden}, {t.layers} layers)")
  out, where = [], []
  for field in ("teacher_path", "student_path"):
    path = cfg[field]
    if field == "student_path":
      kw = dict(kw, param_dtype=cfg.dtype)
    if path and storage.isfile(storage.join(path, "config.json")):
      out.append(_hf_config(path, **kw))
      where.append(f"{field.split('_')[0]} {path}/config.json")
      continue
    name = (model.lower() if model else None) or preset_in(path) or preset_in(cfg.teacher_path) or preset_in(
        config_path)
    if name is None:
      raise ValueError(f"config.{field}={path!r} is not a local HF directory and names no Qwen2.5 size: pass "
                       f"--model (one of {sorted(QWEN25)})")
    out.append(preset_config(name).replace(**kw))
    where.append(f"{field.split('_')[0]} Qwen2.5-{name.upper()} preset")
  return out[0], out[1], ", ".join(where)


def parse_mesh(text: str) -> dict[str, int]:
  """"data=1,fsdp=8,tensor=1" -> sizes of the three mesh axes (missing axes are 1)."""
  sizes = {a: 1 for a in sharding.MESH_AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"--mesh={text!r}: expected axis=size pairs with axes {sharding.MESH_AXES} and sizes >= 1, "
                       f"e.g. data=1,fsdp=8,tensor=1")
    sizes[name] = int(value)
  return sizes


# ------------------------------------------------------------------------------------------------------ the plan
def _check(cfg) -> grpo.GRPOConfig:
  c = run_config.Checker(cfg)
  for f in ("batch_size", "group_size", "max_prompt_len", "max_new_tokens", "max_student_len", "logprob_chunk_size"):
    c.need(int(cfg[f]) >= 1, f, "must be >= 1")
  c.need(cfg.batch_size % cfg.group_size == 0, "batch_size",
         f"must be a multiple of config.group_size={cfg.group_size}")
  g = c.call("grpo", grpo.GRPOConfig, **cfg.grpo.to_dict())
  c.need(cfg.batch_size % g.micro_batches == 0, "batch_size",
         f"must be divisible by config.grpo.micro_batches={g.micro_batches}")
  return g


def plan(cfg, teacher: ModelConfig, student: ModelConfig, mesh_sizes: dict, device_bytes: int, *,
         usable: float = 0.9, attention_block: int = 512, prompts: int | None = None, host_devices: int = 8) -> dict:
  """The per-device plan (bytes) of `cfg` on a `mesh_sizes` mesh of devices with `device_bytes` each.

  `attention_block`: `decoder.attention_block_size` of the target (512 on accelerators, 64 on CPU). `prompts`:
  prompts in one sampling call (default: the whole step's batch_size / group_size, as `train.rollout` does).
  `host_devices`: devices a host holds (the rollout copy's tensor group stays within one)."""
  g = _check(cfg)
  rules = sharding.normalize_rules(cfg.sharding_rules or sharding.DEFAULT_RULES)
  mesh = memory.abstract_mesh(mesh_sizes)
  G, block, chunk = cfg.group_size, attention_block, cfg.logprob_chunk_size
  if prompts is None:  # prompts per sampler call and rows per reward call, as train.run splits the step
    prompts = int(cfg.sample_micro_batch) or cfg.batch_size // G
  reward_rows = int(cfg.reward_micro_batch) or cfg.batch_size
  P, N, S = cfg.max_prompt_len, cfg.max_new_tokens, cfg.max_student_len
  # Sampling, the reward and the reference read compute-dtype weights (the copies, the frozen models); the update
  # reads the trained params themselves (the fp32 masters of a mixed-precision run).
  served = teacher.replace(param_dtype=teacher.dtype)
  sd, ud = (memory.dims(c, mesh, rules) for c in (student, teacher))
  td = memory.dims(served, mesh, rules)
  # Sampling runs on the rollout layout: the compute copy again, on a (data, 1, tensor) mesh of the same devices.
  rollout_sizes = run_config.Checker(cfg).call("rollout_tensor", memory.rollout_mesh_sizes, teacher, mesh_sizes,
                                               host_devices, int(cfg.rollout_tensor))
  rmesh = memory.abstract_mesh(rollout_sizes)
  rrules = sharding.normalize_rules(cfg.rollout_rules or sharding.ROLLOUT_RULES)
  same = teacher.param_dtype == teacher.dtype and math.prod(mesh_sizes.values()) == 1  # the params themselves
  resident = dict(params=memory.params_device_bytes(teacher, mesh, rules),
                  opt_state=memory.opt_state_device_bytes(teacher, g.optim, mesh, rules),
                  ref_params=memory.params_device_bytes(served, mesh, rules),
                  student_params=memory.params_device_bytes(student, mesh, rules))
  copies = dict(compute=(0 if teacher.param_dtype == teacher.dtype else memory.params_device_bytes(served, mesh, rules)),
                rollout=0 if same else memory.params_device_bytes(served, rmesh, rrules))
  resident_total = sum(resident.values()) + 8  # + step counters
  rows = memory.local("batch", cfg.batch_size, mesh, rules)
  rd = memory.dims(served, rmesh, rrules)  # what one device of the rollout mesh holds of the sampled model
  samp = memory.sample_bytes(rd, memory.local("batch", prompts, rmesh, rrules),
                             memory.local("batch", prompts * G, rmesh, rrules), P, N, block,
                             window=int(cfg.decode.window))
  fw_rows = memory.local("batch", reward_rows, mesh, rules)  # one reward micro-batch's rows on a device
  t_fw, s_fw = memory.forward_bytes(td, fw_rows, P + N, block, chunk), memory.forward_bytes(sd, fw_rows, S, block, chunk)
  # The step program's arguments, live through the reward and the update: int32 ids, bool masks, and with overlap
  # the sampler's fp32 log-probs of the completions.
  reward_inputs = rows * ((P + N) * 6 + S * 7 + 1 + (N * F32 if cfg.overlap else 0))
  # The two forwards are independent, so XLA may start one while the other runs: allow for the other's embedded
  # input and residual stream (2·D a token) beside each, and the teacher's [rows, P+N] fp32 log-probs.
  stream = lambda d, T: 2 * fw_rows * T * d.D * d.c  # noqa: E731
  reward_temp = max(t_fw["temp"] + stream(sd, S), s_fw["temp"] + stream(td, P + N)) + rows * (P + N) * F32
  if reward_rows < cfg.batch_size:  # in parts (a lax.map), XLA keeps both output kernels live across the loop
    reward_temp += sum(d.D * d.V * d.c for d in (td, sd) if d.tied or d.fsdp > 1)
  mb_rows = memory.local("batch", cfg.batch_size // g.micro_batches, mesh, rules)
  by_remat = {r: memory.update_bytes(ud, mb_rows, P + N, r, block, chunk) for r in ("none", "dots", "full")}
  upd = by_remat[cfg.remat]
  grads = resident["params"] * (2 if g.micro_batches > 1 else 1)  # + the scan's accumulator
  # After the backward pass: the gradients, and the clipped gradients and Adam's updates in flight before the
  # non-finite check selects the new state (2.5× the params in XLA's buffer assignment of a step with tiny batches).
  optimizer_step = int(2.5 * resident["params"])
  update_inputs = reward_inputs + rows * F32  # + the advantages
  # Copies alive in each phase: the rollout copy while sampling; inside the step program the compute copy for the
  # reward, then the rollout copy of the new params that the program lays out for the next sampling.
  held = dict(sample=copies["rollout"], reward=copies["compute"], update=copies["rollout"])
  phases = {
      "sample": dict(temp=samp["temp"], inputs=memory.local("batch", prompts, rmesh, rrules) * P * 5,
                     kv_cache=samp["kv_cache"], prefill=samp["prefill"], decode=samp["decode"]),
      "reward": dict(temp=reward_temp, inputs=reward_inputs, teacher_forward=t_fw["temp"],
                     student_forward=s_fw["temp"], logprob_chunks=max(t_fw["chunks"], s_fw["chunks"])),
      "update": dict(temp=max(grads + upd["temp"], optimizer_step), inputs=update_inputs, grads=grads,
                     activations=upd["temp"], saved_residuals=upd["saved"], logprob_chunks=upd["chunks"]),
  }
  for name, p in phases.items():
    p["copies"] = held[name]
    p["total"] = resident_total + held[name] + p["inputs"] + p["temp"]
  peak = max(phases, key=lambda k: phases[k]["total"])
  total = phases[peak]["total"]
  notes = _notes(cfg, teacher, td, rd, mesh_sizes, rollout_sizes, prompts, mb_rows, g.micro_batches)
  if peak == "reward" and reward_rows == cfg.batch_size:
    notes.append(f"the reward scores all {cfg.batch_size} rows of a step at once ({rows} a device); set "
                 "config.reward_micro_batch to score them in parts")
  return dict(
      mesh=dict(mesh_sizes), devices=math.prod(mesh_sizes.values()), params_bytes=resident["params"],
      opt_state_bytes=resident["opt_state"], ref_params_bytes=resident["ref_params"],
      student_params_bytes=resident["student_params"], compute_params_bytes=copies["compute"],
      rollout_params_bytes=copies["rollout"], rollout_mesh=rollout_sizes,
      resident_bytes=resident_total, kv_cache_bytes=samp["kv_cache"],
      activation_bytes=upd["temp"], activation_bytes_by_remat={r: v["temp"] for r, v in by_remat.items()},
      logprob_chunk_bytes=max(phases["reward"]["logprob_chunks"], upd["chunks"]), phases=phases, peak_phase=peak,
      total_bytes=total, device_bytes=device_bytes, usable_bytes=int(device_bytes * usable),
      fits=total <= device_bytes * usable, sampling_prompts=prompts, notes=notes)


def _notes(cfg, teacher, td: memory.Dims, rd: memory.Dims, mesh_sizes, rollout_sizes, prompts, mb_rows,
           micro_batches) -> list[str]:
  notes = []
  df = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if df > 1 and (cfg.batch_size // micro_batches) % df:
    notes.append(f"an update micro-batch has {cfg.batch_size // micro_batches} rows (batch_size / grpo.micro_batches),"
                 f" which data×fsdp={df} does not divide: every device computes all {mb_rows} of them")
  t = mesh_sizes["tensor"]
  if t > 1 and td.K == teacher.num_kv_heads:
    notes.append(f"num_kv_heads={teacher.num_kv_heads} does not split over tensor={t}: k/v weights are replicated "
                 "over tensor")
  rdata, t = rollout_sizes["data"], rollout_sizes["tensor"]
  if rdata > 1 and prompts % rdata and rdata % prompts:
    notes.append(f"{prompts} prompts a sampling call neither split over nor divide the rollout mesh's data={rdata}: "
                 "every device holds every prompt's KV cache, and the sampler cannot shed finished rows")
  if t > 1 and rd.K == teacher.num_kv_heads:
    notes.append(f"num_kv_heads={teacher.num_kv_heads} does not split over the rollout mesh's tensor={t}: k/v weights "
                 "and the KV cache are replicated over tensor")
  return notes


def max_sampling_prompts(cfg, teacher, student, mesh_sizes, device_bytes, **kw) -> int:
  """The most prompts (each with group_size samples) one sampling call can take on this mesh; 0 if not even one."""
  lo, hi = 0, cfg.batch_size // cfg.group_size
  while lo < hi:  # sampling memory grows with the prompt count
    mid = (lo + hi + 1) // 2
    p = plan(cfg, teacher, student, mesh_sizes, device_bytes, prompts=mid, **kw)
    ok = p["resident_bytes"] + p["phases"]["sample"]["inputs"] + p["phases"]["sample"]["temp"] <= p["usable_bytes"]
    lo, hi = (mid, hi) if ok else (lo, mid - 1)
  return lo


def search_meshes(cfg, teacher, student, device_bytes, *, max_devices: int = 2048, counts: int = 2, **kw):
  """The `counts` smallest power-of-two device counts (≤ max_devices) with a fitting data×fsdp×tensor mesh (tensor
  a power of two dividing num_kv_heads): ([(devices, [(mesh, total_bytes), ...] best first)], the mesh with the
  lowest total of all tried, fitting or not)."""
  found, n, closest = [], 1, None
  tensors = [t for t in (2**i for i in range(12)) if teacher.num_kv_heads % t == 0]
  while n <= max_devices and len(found) < counts:
    fits = []
    for t in (t for t in tensors if n % t == 0):
      for f in (2**i for i in range(int(math.log2(n // t)) + 1)):
        mesh = dict(data=n // t // f, fsdp=f, tensor=t)
        p = plan(cfg, teacher, student, mesh, device_bytes, **kw)
        closest = min(closest or (mesh, p["total_bytes"]), (mesh, p["total_bytes"]), key=lambda x: x[1])
        if p["fits"]:
          fits.append((mesh, p["total_bytes"]))
    if fits:
      found.append((n, sorted(fits, key=lambda x: x[1])))
    n *= 2
  return found, closest


def _hf_config(path: str, **kw) -> ModelConfig:
  """A model directory's config.json (a local one, or one in a bucket: only that file is read)."""
  if not storage.is_url(path):
    return ModelConfig.from_hf(path, **kw)
  with storage.open_file(storage.join(path, "config.json")) as f:
    return ModelConfig.from_hf_dict(json.load(f), source=storage.join(path, "config.json"), **kw)


def sft_model_config(cfg, *, model: str | None = None, config_path: str = "") -> tuple[ModelConfig, str]:
  """The SFT config's model (`model_path`'s config.json, a Qwen2.5 preset, or config.tiny), with its dtypes."""
  kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
  if cfg.model_path and storage.isfile(storage.join(cfg.model_path, "config.json")) and model is None:
    return _hf_config(cfg.model_path, **kw), f"model {cfg.model_path}/config.json"
  if cfg.tiny_models and not cfg.model_path and model is None:
    t = cfg.tiny
    return tiny.tiny_config(t.vocab_size, hidden=t.hidden, layers=t.layers, heads=t.heads, kv_heads=t.kv_heads,
                            intermediate=t.intermediate).replace(**kw), "tiny model from config.tiny"
  name = (model.lower() if model else None) or preset_in(cfg.model_path) or preset_in(config_path)
  if name is None:
    raise ValueError(f"config.model_path={cfg.model_path!r} is not a local HF directory and names no Qwen2.5 size: "
                     f"pass --model (one of {sorted(QWEN25)})")
  return preset_config(name).replace(**kw), f"model Qwen2.5-{name.upper()} preset"


def plan_sft(cfg, model: ModelConfig, mesh_sizes: dict, device_bytes: int, *, usable: float = 0.9,
             attention_block: int = 512) -> dict:
  """The per-device plan of an SFT run (`sft.run`): params and AdamW state resident, and one phase, the update of
  one of `micro_batches` parts of `batch_size` sequences of `max_len` tokens."""
  c = run_config.Checker(cfg)
  for f in ("batch_size", "micro_batches", "max_len", "logprob_chunk_size"):
    c.need(int(cfg[f]) >= 1, f, "must be >= 1")
  rules = sharding.normalize_rules(cfg.sharding_rules or sharding.DEFAULT_RULES)
  mesh = memory.abstract_mesh(mesh_sizes)
  o = optim.OptimConfig(b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  d = memory.dims(model, mesh, rules)
  resident = dict(params=memory.params_device_bytes(model, mesh, rules),
                  opt_state=memory.opt_state_device_bytes(model, o, mesh, rules))
  resident_total = sum(resident.values()) + 4  # + the step counter
  rows = memory.local("batch", cfg.batch_size, mesh, rules)
  mb_rows = memory.local("batch", max(cfg.batch_size // cfg.micro_batches, 1), mesh, rules)
  upd = memory.update_bytes(d, mb_rows, cfg.max_len, cfg.remat, attention_block, cfg.logprob_chunk_size)
  grads = resident["params"] * (2 if cfg.micro_batches > 1 else 1)
  update = dict(temp=max(grads + upd["temp"], int(2.5 * resident["params"])), grads=grads,
                inputs=rows * cfg.max_len * 13,  # int32 ids, segment ids and positions, bool loss mask
                activations=upd["temp"], saved_residuals=upd["saved"], logprob_chunks=upd["chunks"])
  update["total"] = resident_total + update["inputs"] + update["temp"]
  return dict(mesh=dict(mesh_sizes), devices=math.prod(mesh_sizes.values()), params_bytes=resident["params"],
              opt_state_bytes=resident["opt_state"], resident_bytes=resident_total, phases={"update": update},
              peak_phase="update", total_bytes=update["total"], device_bytes=device_bytes,
              usable_bytes=int(device_bytes * usable), fits=update["total"] <= device_bytes * usable, notes=[])


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from rlt_jax import plan_report

  _CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py).",
                                            lock_config=True)
  _CHIP = flags.DEFINE_string("chip", None, f"Accelerator: one of {sorted(CHIPS)}.")
  _MESH = flags.DEFINE_string("mesh", None, "data=A,fsdp=B,tensor=C; without it, the config's mesh when it has no -1, "
                              "else a search for the smallest meshes that fit.")
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object (bytes per device).")
  _MODEL = flags.DEFINE_string("model", None, f"Qwen2.5 size when the config's paths are not local: {sorted(QWEN25)}.")
  _USABLE = flags.DEFINE_float("usable", 0.9, "Fraction of a device's memory the run may use (runtime, fragmentation; "
                               "JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says more).")
  _MAX = flags.DEFINE_integer("max_devices", 2048, "Largest device count the mesh search tries.")
  flags.mark_flags_as_required(["config", "chip"])
  app.run(lambda argv: plan_report.main(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]),
                                        _CHIP.value, _MESH.value, _JSON.value, _MODEL.value, _USABLE.value, _MAX.value))
