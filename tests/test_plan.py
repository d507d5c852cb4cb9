"""The memory planner against the real thing: per-device shards of real sharded params and optimizer state (exact),
XLA's buffer assignment of the compiled update step, reward forward, prefill and decode (within 15%, fp32 on CPU),
the published Qwen2.5 sizes and the mesh search (brute force). (The CLI's report: test_plan_report.py.)"""
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, SHARED
from rlt_jax import grpo, hf_checkpoint, optim, plan, precision, rewards, rl_step, run_config, sampling, sft, sharding
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

ONE = dict(data=1, fsdp=1, tensor=1)


def small_config(remat="none", **overrides):
  """A tiny-model run big enough that per-token buffers dominate XLA's fixed overheads, small enough to compile fast.
  fp32 only: XLA:CPU computes bf16 elementwise work in fp32 buffers, so CPU memory of a bf16 step says nothing about
  the bf16 buffers of a TPU or GPU."""
  cfg = run_config.default_config()
  cfg.tiny_models = True
  cfg.tiny.update(dict(vocab_size=2048, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512))
  cfg.remat = remat
  cfg.batch_size, cfg.group_size = 8, 2
  cfg.max_prompt_len, cfg.max_new_tokens, cfg.max_student_len = 256, 256, 512
  cfg.logprob_chunk_size = 128
  cfg.grpo.micro_batches = 1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def cpu_plan(cfg, mesh=ONE):
  teacher, student, _ = plan.model_configs(cfg)
  return teacher, student, plan.plan(cfg, teacher, student, mesh, 80 * 2**30,
                                     attention_block=decoder.attention_block_size(teacher))


def close(model, real, what):
  assert abs(model / real - 1) < 0.15, f"{what}: plan {model / 2**20:.1f} MiB, XLA {real / 2**20:.1f} MiB"


def sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("mesh,dtypes", [
    (dict(data=1, fsdp=2, tensor=4), ("bfloat16", "bfloat16")),
    (dict(data=2, fsdp=4, tensor=1), ("bfloat16", "bfloat16")),
    (dict(data=1, fsdp=8, tensor=1), ("float32", "bfloat16")),  # the 7B recipes' mixed precision
])
def test_resident_bytes_are_the_real_shards(mesh, dtypes):
  """kv_heads=2 does not split over tensor=4: those params are replicated there, and the plan must say so too.
  Mixed precision: fp32 params and moments; the compute copy, reference and student in bf16."""
  param_dtype, dtype = dtypes
  cfg = small_config(param_dtype=param_dtype, dtype=dtype)
  teacher, student, p = cpu_plan(cfg, mesh)
  devices = jax.devices()[:8]
  m = jax.sharding.Mesh(np.asarray(devices).reshape(mesh["data"], mesh["fsdp"], mesh["tensor"]),
                        ("data", "fsdp", "tensor"))
  params = hf_checkpoint.shard_params(decoder.init_params(teacher, jax.random.key(0)), m, teacher)
  # As train.run builds them.
  opt_state = optim.init_state(optim.make_optimizer(grpo.GRPOConfig(**cfg.grpo.to_dict()).optim), params)
  copy = precision.compute_copy(params, dtype)
  student_params = hf_checkpoint.shard_params(decoder.init_params(student, jax.random.key(1)), m, student)

  def on_device0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == devices[0])

  assert p["params_bytes"] == on_device0(params)
  assert p["ref_params_bytes"] == on_device0(copy) and p["student_params_bytes"] == on_device0(student_params)
  assert p["compute_params_bytes"] == (0 if param_dtype == dtype else on_device0(copy))
  assert p["opt_state_bytes"] == on_device0(opt_state)
  # mu and nu in the params' dtype, sharded like the params, plus step counts
  assert p["opt_state_bytes"] == 2 * on_device0(params) + 8
  if param_dtype != dtype:
    assert p["params_bytes"] == 2 * p["compute_params_bytes"] and jax.tree.leaves(opt_state)[1].dtype == jnp.float32
  if mesh["tensor"] == 4:
    assert any("num_kv_heads=2" in n for n in p["notes"])
  # The rollout copy, as train.rollout_params makes it: the compute-dtype params on the (data, 1, tensor) mesh.
  rmesh = sharding.rollout_mesh(m, sharding.rollout_tensor(m, teacher.num_heads, teacher.num_kv_heads))
  assert dict(rmesh.shape) == p["rollout_mesh"]
  rollout = precision.compute_copy(params, dtype, sharding.tree_shardings(decoder.param_logical_axes(teacher), params,
                                                                          rmesh, sharding.ROLLOUT_RULES))
  assert p["rollout_params_bytes"] == on_device0(rollout) > 0


@pytest.mark.parametrize("remat", ["none", "full"])
def test_update_step_memory_is_the_compiled_steps(remat):
  """rl_step.update as the step program runs it (donated state; the program's whole batch stays live beside it),
  lowered on abstract shapes."""
  cfg = small_config(remat)
  teacher, student, p = cpu_plan(cfg)
  g = grpo.GRPOConfig(**cfg.grpo.to_dict())
  sc = rl_step.StepConfig(teacher, student, g, rewards.RewardConfig(), cfg.dtype, cfg.group_size, cfg.max_new_tokens,
                          cfg.logprob_chunk_size, 0)
  optimizer = optim.make_optimizer(g.optim)
  params = decoder.param_shapes(teacher)
  state = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params), "ref_params": params,
           "step": sds((), jnp.int32), "bad_steps": sds((), jnp.int32)}
  B, T, S = cfg.batch_size, cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_student_len
  ids, mask = lambda T: sds((B, T), jnp.int32), lambda T: sds((B, T), bool)  # noqa: E731
  batch = rewards.RewardBatch(ids(T), mask(T), mask(T), ids(S), mask(S), mask(S), mask(S), sds((B,), bool))
  update = lambda s, b, adv: rl_step.update(sc, optimizer, s, rl_step.UpdateBatch(  # noqa: E731
      b.teacher_ids, b.teacher_mask, adv))
  ma = jax.jit(update, donate_argnums=0, keep_unused=True).lower(
      state, batch, sds((B,), jnp.float32)).compile().memory_analysis()
  upd = p["phases"]["update"]
  assert ma.argument_size_in_bytes == p["params_bytes"] + p["opt_state_bytes"] + p["ref_params_bytes"] + 8 + \
      upd["inputs"]
  close(upd["temp"], ma.temp_size_in_bytes, f"update temporaries, remat {remat}")
  assert p["activation_bytes"] == p["activation_bytes_by_remat"][remat]
  assert p["activation_bytes_by_remat"]["full"] < p["activation_bytes_by_remat"]["dots"] < \
      p["activation_bytes_by_remat"]["none"]


@pytest.mark.parametrize("micro_batch", [0, 2])  # all 8 rows at once | 4 parts of 2 rows
def test_reward_forward_memory_is_the_compiled_rewards(micro_batch):
  cfg = small_config(reward_micro_batch=micro_batch)
  teacher, student, p = cpu_plan(cfg)
  B, Tt, Ts = cfg.batch_size, cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_student_len
  ids, mask = lambda T: sds((B, T), jnp.int32), lambda T: sds((B, T), bool)  # noqa: E731
  batch = rewards.RewardBatch(ids(Tt), mask(Tt), mask(Tt), ids(Ts), mask(Ts), mask(Ts), mask(Ts), sds((B,), bool))
  ma = jax.jit(rewards.reward_rows, static_argnums=(0, 2, 5), static_argnames=("chunk_size", "micro_batch")).lower(
      teacher, decoder.param_shapes(teacher), student, decoder.param_shapes(student), batch, rewards.RewardConfig(),
      chunk_size=cfg.logprob_chunk_size, micro_batch=micro_batch).compile().memory_analysis()
  rew = p["phases"]["reward"]
  assert ma.argument_size_in_bytes == p["params_bytes"] + p["student_params_bytes"] + rew["inputs"]
  close(rew["temp"], ma.temp_size_in_bytes, "reward forward temporaries")
  # The vocabulary side: two fp32 [rows, chunk, V] buffers (the docstring of logprobs.token_logprobs).
  assert rew["logprob_chunks"] == 2 * (micro_batch or B) * cfg.logprob_chunk_size * teacher.vocab_size * 4


def test_kv_cache_and_sampler_memory_are_the_compiled_samplers():
  cfg = small_config(batch_size=32, group_size=8, max_new_tokens=512, max_student_len=768)  # 4 prompts x 8
  teacher, student, p = cpu_plan(cfg)
  prompts, P, N, G = 4, cfg.max_prompt_len, cfg.max_new_tokens, cfg.group_size
  assert p["kv_cache_bytes"] == sampling.kv_cache_bytes(teacher, prompts, P, N, G)
  # On data×fsdp = 4 and tensor = 2 the 4 prompts, their 32 rows and the 2 kv heads all split.
  assert cpu_plan(cfg, dict(data=1, fsdp=4, tensor=2))[2]["kv_cache_bytes"] * 8 == p["kv_cache_bytes"]
  params = decoder.param_shapes(teacher)
  ids, mask = sds((prompts, P), jnp.int32), sds((prompts, P), bool)
  pre = sampling.prefill.lower(teacher, params, ids, mask).compile().memory_analysis()
  cache, logits = jax.eval_shape(sampling.prefill, teacher, params, ids, mask)
  dec = sampling.decode.lower(teacher, params, cache, logits, sds((), jax.random.key(0).dtype), 0.7, 1.0,
                              (1,), 0, max_new_tokens=N, num_samples=G,
                              greedy=False, top_k=None, use_top_p=False).compile().memory_analysis()
  prompt_cache = 2 * math.prod(cache.k.shape) * cache.k.dtype.itemsize
  s = p["phases"]["sample"]
  close(s["prefill"], pre.temp_size_in_bytes + pre.output_size_in_bytes, "prefill: prompt cache + temporaries")
  close(s["decode"], dec.temp_size_in_bytes + prompt_cache, "decode: prompt cache + temporaries")


def test_sft_step_memory_is_the_compiled_sft_step():
  """sft._sft_step jitted as sft.run jits it (donated state, two micro-batches), lowered on abstract shapes."""
  cfg = sft.default_config()
  cfg.tiny_models = True
  cfg.tiny.update(dict(vocab_size=2048, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512))
  cfg.max_len, cfg.batch_size, cfg.micro_batches, cfg.logprob_chunk_size = 512, 8, 2, 128
  model, _ = plan.sft_model_config(cfg)
  p = plan.plan_sft(cfg, model, ONE, 80 * 2**30, attention_block=decoder.attention_block_size(model))
  o = optim.OptimConfig()
  optimizer, schedule = optim.make_optimizer(o), optim.learning_rate_schedule(o)
  params = decoder.param_shapes(model)
  state = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params), "step": sds((), jnp.int32)}
  B, L = cfg.batch_size, cfg.max_len
  batch = {"input_ids": sds((B, L), jnp.int32), "loss_mask": sds((B, L), bool), "segment_ids": sds((B, L), jnp.int32),
           "positions": sds((B, L), jnp.int32)}
  sc = sft.SFTStepConfig(model, cfg.logprob_chunk_size, cfg.micro_batches)
  ma = jax.jit(lambda s, b: sft._sft_step(sc, optimizer, schedule, s, b), donate_argnums=0).lower(
      state, batch).compile().memory_analysis()
  upd = p["phases"]["update"]
  assert ma.argument_size_in_bytes == p["resident_bytes"] + upd["inputs"]
  close(upd["temp"], ma.temp_size_in_bytes, "sft update temporaries")


@pytest.mark.parametrize("name,chip", [("rlt_qwen2.5_7b_8xh100", "h100"), ("rlt_qwen2.5_7b_4x8xh100", "h100"),
                                       ("rlt_qwen2.5_7b_v5p64", "tpu-v5p")])
def test_every_hardware_config_fits_its_target(name, chip):
  """The documented targets, planned exactly as the README says: the config's own mesh, fp32 master weights."""
  cfg = run_config.config_file(str(REPO / "configs" / f"{name}.py"))
  assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
  mesh = ",".join(f"{a}={cfg.mesh[a]}" for a in ("data", "fsdp", "tensor"))
  assert min(cfg.mesh.values()) >= 1  # explicit, no -1
  run = subprocess.run([sys.executable, "-m", "rlt_jax.plan", "--config", f"configs/{name}.py", "--chip", chip,
                        "--mesh", mesh, "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout)
  assert out["fits"] is True, (name, out["peak_phase"], out["total_bytes"] / 2**30)
  assert out["mesh"] == {a: cfg.mesh[a] for a in ("data", "fsdp", "tensor")}
  assert out["devices"] == {"rlt_qwen2.5_7b_8xh100": 8}.get(name, 32)
  assert out["params_bytes"] == 2 * out["compute_params_bytes"] > 0  # fp32 masters beside their bf16 copy


def test_presets_are_the_published_qwen25_sizes():
  real = ModelConfig.from_hf(SHARED / "qwen2.5-0.5b-instruct")
  preset = plan.preset_config("0.5b")
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "tie_word_embeddings", "rope_theta"):
    assert getattr(preset, f) == getattr(real, f), f
  # Parameter counts on the Qwen2.5 model cards (billions).
  for name, billions in {"0.5b": 0.49, "1.5b": 1.54, "3b": 3.09, "7b": 7.61, "14b": 14.7, "32b": 32.5}.items():
    n = decoder.num_params(decoder.param_shapes(plan.preset_config(name))) / 1e9
    assert abs(n / billions - 1) < 0.01, (name, n)
  assert plan.preset_in("/ckpt/Qwen2.5-14B-Instruct") == "14b" and plan.preset_in("configs/rlt_qwen2.5_7b.py") == "7b"


def test_mesh_search_finds_the_smallest_fitting_meshes():
  bf16 = dict(param_dtype="bfloat16", dtype="bfloat16")
  cfg = small_config(remat="full", max_prompt_len=2048, max_new_tokens=2048, max_student_len=4096, batch_size=64,
                     group_size=8, **bf16)
  student = plan.preset_config("1.5b").replace(**bf16)
  teacher = student.replace(remat="full")
  device = 16 * 2**30  # a TPU v5e
  found, closest = plan.search_meshes(cfg, teacher, student, device, max_devices=64)
  assert found and len(found) <= 2
  for n, meshes in found:
    for mesh, total in meshes:
      assert math.prod(mesh.values()) == n and teacher.num_kv_heads % mesh["tensor"] == 0
      assert plan.plan(cfg, teacher, student, mesh, device)["total_bytes"] == total <= 0.9 * device
  smallest = found[0][0]
  assert closest == found[-1][1][0]  # more devices, less a device
  for n in (2**i for i in range(int(math.log2(smallest)))):  # brute force: nothing smaller fits
    for t in (1, 2):
      for f in (x for x in range(1, n // t + 1) if (n // t) % x == 0):
        assert not plan.plan(cfg, teacher, student, dict(data=n // t // f, fsdp=f, tensor=t), device)["fits"]
