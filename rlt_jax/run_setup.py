"""Run plumbing shared by the training entry points: the default config, its validation (errors name the field),
models/tokenizer/mesh/data from config, orbax checkpoints, the progress bar and the end-of-run summary."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np

from rlt_jax import checkpoint, data, decode, distributed, formats, grpo, memory, precision, rewards, sharding, \
    tiny
from rlt_jax.models import qwen2
from rlt_jax.models.config import ModelConfig

_log = logging.getLogger("rlt_jax")


class ConfigError(ValueError):
  """A bad config value, reported before any work starts."""


def default_config() -> ml_collections.ConfigDict:
  """Every field of an RL run, with the paper's recipe where it has one (METHOD_SPEC §3, §8)."""
  c = ml_collections.ConfigDict()
  c.workdir = "runs/rlt"
  c.seed = 42
  c.teacher_path = ""        # HF model dir of the teacher (required unless tiny_models)
  c.student_path = ""        # HF model dir of the frozen student that scores explanations
  c.tiny_models = False      # True with empty paths: build tiny warmed-up models under <workdir>/tiny_models
  c.tokenizer_path = ""      # "" = the teacher's directory (teacher and student must share the tokenizer)
  c.tiny = ml_collections.ConfigDict(dict(vocab_size=1024, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                          warmup_steps=100))
  c.param_dtype = "float32"  # the trained params and AdamW moments (fp32 masters with a bf16 `dtype`)
  c.dtype = "float32"        # compute dtype of matmuls and activations; the student, the reference and the
                             # once-a-step copy that sampling and the reward read are stored in it
  c.remat = "none"           # none | full | dots
  c.data = ml_collections.ConfigDict(dict(path="", reader="auto", strict=False,  # path "" = bundled GSM8K sample
                                          tfds_data_dir=""))  # where tfds:NAME:SPLIT paths live ("" = TFDS's default)
  c.format = ml_collections.ConfigDict(dict(style="stratos", teacher_system="", student_system=""))  # "" = default
  c.batch_size = 1024        # completions per step (prompts × group_size)
  c.group_size = 64          # G samples per prompt
  c.max_prompt_len = 16384
  c.max_new_tokens = 16384
  c.max_student_len = 32768
  c.temperature = 0.7
  c.top_p = 1.0
  c.steps = 125
  c.grpo = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig()))
  c.reward = ml_collections.ConfigDict(dataclasses.asdict(rewards.RewardConfig()))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.num_devices = 0          # 0 = every device; n = only the first n (to compare layouts on one machine)
  c.sharding_rules = ()      # () = sharding.DEFAULT_RULES; else (logical, mesh axes) pairs
  c.rollout_tensor = 0       # devices a rollout (sampling) copy is split over; 0 = most that divide the heads in a host
  c.rollout_rules = ()       # () = sharding.ROLLOUT_RULES: the rollout copy's rules on its (data, 1, tensor) mesh
  c.logprob_chunk_size = 512
  c.sample_micro_batch = 0   # prompts per sampler call (0 = the step's prompts in one call); see rlt_jax.plan
  c.reward_micro_batch = 0   # rows per reward part inside the reward call (0 = all at once)
  c.decode = ml_collections.ConfigDict(decode.Schedule()._asdict())  # how decode sheds work (rlt_jax.decode.Schedule)
  c.overlap = False          # sample step k+1 from θ_k while the update θ_k → θ_k+1 runs (one step off-policy)
  c.checkpoint_every = 25
  c.keep_checkpoints = 3
  c.resume = True
  c.log_completions_fraction = 0.1
  c.tensorboard = True
  c.max_bad_steps = 3
  c.export_dir = "export"    # under workdir: the final teacher in HF format ("" = none)
  c.export_dtype = ""        # dtype of the exported tensors ("" = param_dtype, e.g. the fp32 masters)
  c.preflight = True         # plan the run's memory for the real mesh and devices before loading (rlt_jax.preflight)
  c.chip = ""                # "" = detect from the devices; a rlt_jax.plan chip name (h100, tpu-v5p, ...) declares it
  return c


def config_file(path: str, *, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (a path relative to the file `relative_to`, when given): how a hardware
  config starts from the recipe it sizes."""
  import importlib.util
  if relative_to:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix(".py").replace(".", "_"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _field(name, fn, *args, **kw):
  try:
    return fn(*args, **kw)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{name}: {e}") from None


def field_value(cfg, field: str):
  """cfg's value at a dotted field name ("data.path"), or None when there is none."""
  node = cfg
  for k in field.split("."):
    if not hasattr(node, "keys") or k not in node:
      return None
    node = node[k]
  return node


def requirer(cfg):
  """need(ok, field, message): a ConfigError naming the field as the user types it (`config.data.path='x': ...`)."""
  def need(ok, field, msg):
    if not ok:
      raise ConfigError(f"config.{field}={field_value(cfg, field)!r}: {msg}")
  return need


def check_common(cfg, need, *, lr_field: str | None, learning_rate: float = 0.0) -> None:
  """Checks that RL, SFT and distillation share: dtypes (and, when `lr_field` names the learning rate of a training
  run, one the stored params can take), export dtype, chip, data."""
  for f in ("param_dtype", "dtype") + (("export_dtype",) if cfg.export_dtype else ()):
    need(cfg[f] in precision.DTYPES, f, f"must be one of {sorted(precision.DTYPES)}")
  msg = lr_field and precision.check_learning_rate(learning_rate, cfg.param_dtype, lr_field, "param_dtype")
  if msg:
    raise ConfigError(msg)
  need(cfg.chip in ("",) + memory.CHIP_NAMES, "chip", f"must be '' (detect) or one of {sorted(memory.CHIP_NAMES)}")
  if cfg.data.path:
    why = data.check_source(cfg.data.path, data_dir=cfg.data.get("tfds_data_dir") or None)
    need(why is None, "data.path", f"cannot be read: {why} (expected a .jsonl/.json/.parquet/.array_record file, "
         "a Hugging Face save_to_disk folder, or tfds:NAME:SPLIT)")


def validate(cfg, *, training: bool = True) -> tuple[grpo.GRPOConfig, rewards.RewardConfig]:
  """Checks the config before any work; every error names the field. `training=False` (distillation: the teacher
  only samples) skips the check that the learning rate survives the params' dtype."""
  need = requirer(cfg)
  need(cfg.group_size >= 1, "group_size", "must be >= 1")
  need(cfg.batch_size >= 1 and cfg.batch_size % cfg.group_size == 0, "batch_size",
       f"must be a positive multiple of config.group_size={cfg.group_size}")
  prompts = cfg.batch_size // cfg.group_size
  need(prompts % jax.process_count() == 0, "batch_size",
       f"gives {prompts} prompts a step, not divisible by the {jax.process_count()} processes")
  need(cfg.num_devices == 0 or jax.process_count() == 1, "num_devices",
       f"must be 0 (every device) with {jax.process_count()} processes: the mesh needs every process's devices")
  for f in ("max_prompt_len", "max_new_tokens", "max_student_len", "steps", "checkpoint_every",
            "logprob_chunk_size", "max_bad_steps", "keep_checkpoints"):
    need(int(cfg[f]) >= 1, f, "must be >= 1")
  need(cfg.sample_micro_batch >= 0 and (not cfg.sample_micro_batch or prompts % cfg.sample_micro_batch == 0),
       "sample_micro_batch", f"must be 0 or divide the {prompts} prompts of a step")
  need(cfg.reward_micro_batch >= 0 and (not cfg.reward_micro_batch or cfg.batch_size % cfg.reward_micro_batch == 0),
       "reward_micro_batch", f"must be 0 or divide config.batch_size={cfg.batch_size}")
  need(cfg.temperature > 0, "temperature", "must be > 0 (GRPO needs sampled, not greedy, completions)")
  need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
  need(0 <= cfg.log_completions_fraction <= 1, "log_completions_fraction", "must be in [0, 1]")
  for f in ("teacher_path", "student_path", "tokenizer_path"):
    path = cfg[f]
    need(not path or os.path.isdir(path), f, "is not a directory")
    need(not path or f == "tokenizer_path" or os.path.isfile(os.path.join(path, "config.json")), f,
         "has no config.json (a Hugging Face model directory is expected)")
  need(bool(cfg.teacher_path) == bool(cfg.student_path), "student_path",
       "set teacher_path and student_path together (both empty builds tiny local models)")
  need(bool(cfg.teacher_path) or cfg.tiny_models, "teacher_path",
       "is required (a Hugging Face model directory), unless config.tiny_models=True")
  g = _field("grpo", grpo.GRPOConfig, **cfg.grpo.to_dict())
  check_common(cfg, need, lr_field="grpo.learning_rate" if training else None, learning_rate=g.learning_rate)
  r = _field("reward", rewards.RewardConfig, **cfg.reward.to_dict())
  need(cfg.batch_size % g.micro_batches == 0, "batch_size",
       f"must be divisible by config.grpo.micro_batches={g.micro_batches}")
  need(abs(r.teacher_temperature - cfg.temperature) < 1e-9, "reward.teacher_temperature",
       f"must equal config.temperature={cfg.temperature}: the reward's teacher log-probs are GRPO's old log-probs")
  _field("mesh", lambda: [int(v) for v in cfg.mesh.values()])
  _field("sharding_rules", sharding.normalize_rules, cfg.sharding_rules or sharding.DEFAULT_RULES)
  _field("rollout_rules", sharding.normalize_rules, cfg.rollout_rules or sharding.ROLLOUT_RULES)
  need(int(cfg.rollout_tensor) >= 0, "rollout_tensor", "must be >= 0 (0 = chosen from the heads and devices)")
  need(int(cfg.decode.window) >= 0, "decode.window", "must be >= 0 (0 = every step reads every cache slot)")
  need(int(cfg.decode.buckets) >= 1, "decode.buckets", "must be >= 1 (1 = no packing of finished rows)")
  need(int(cfg.decode.min_rows) >= 1, "decode.min_rows", "must be >= 1")
  return g, r


@dataclasses.dataclass
class RunSetup:
  config: ml_collections.ConfigDict
  tokenizer: object
  fmt: formats.RLTFormat
  mesh: jax.sharding.Mesh
  rules: tuple
  teacher_config: ModelConfig
  teacher_params: dict
  student_config: ModelConfig
  student_params: dict
  grpo_config: grpo.GRPOConfig
  reward_config: rewards.RewardConfig
  dataset: object
  eos_ids: tuple[int, ...]
  rollout: Rollout = None


@dataclasses.dataclass(frozen=True)
class Rollout:
  """The layout sampling reads (sharding.rollout_mesh): its mesh, rules and the teacher params' shardings on it."""
  mesh: jax.sharding.Mesh
  rules: tuple
  shardings: object


def make_rollout(cfg, mesh, teacher_config: ModelConfig, teacher_params) -> Rollout:
  rules = _field("rollout_rules", sharding.normalize_rules, cfg.rollout_rules or sharding.ROLLOUT_RULES)
  tensor = _field("rollout_tensor", sharding.rollout_tensor, mesh, teacher_config.num_heads,
                  teacher_config.num_kv_heads, int(cfg.rollout_tensor))
  rmesh = sharding.rollout_mesh(mesh, tensor)
  return Rollout(rmesh, rules, sharding.tree_shardings(qwen2.param_logical_axes(teacher_config), teacher_params,
                                                       rmesh, rules))


def tiny_model_paths(cfg, workdir: str) -> dict[str, str]:
  """Paths of the tiny tokenizer, teacher and student under <workdir>/tiny_models, built once from the bundled
  sample in the config's format and `tiny` shape (CPU runs, tests, notebooks; no network)."""
  with open(data.SAMPLE_PATH) as f:
    rows = [formats.read_row(json.loads(line)) for line in f if line.strip()]
  overrides = {k: v for k, v in cfg.format.to_dict().items() if v}
  # With several processes, process 0 builds first, so processes sharing the workdir's filesystem never write the
  # same files at once; the others then find them built (or, on a disk of their own, build the same seeded models).
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    _barrier("rlt_jax tiny models")
  paths = tiny.ensure_assets(os.path.join(workdir, "tiny_models"), rows, format_overrides=overrides,
                             **cfg.tiny.to_dict())
  if several and jax.process_index() == 0:
    _barrier("rlt_jax tiny models")
  return paths


def make_format(cfg, tokenizer) -> formats.RLTFormat:
  overrides = {k: v for k, v in cfg.format.to_dict().items() if k != "style" and v}
  return _field("format", formats.RLTFormat, tokenizer, style=cfg.format.style, **overrides)


def make_mesh(cfg) -> tuple[jax.sharding.Mesh, tuple]:
  """The config's mesh (over its first `num_devices` devices, 0 = all) and sharding rules."""
  devices = jax.devices()[:cfg.num_devices] if cfg.num_devices else None
  mesh = _field("mesh", sharding.make_mesh, cfg.mesh.to_dict(), devices)
  return mesh, _field("sharding_rules", sharding.normalize_rules, cfg.sharding_rules or sharding.DEFAULT_RULES)


def load_model(cfg, path: str, tokenizer, mesh, rules, *, param_dtype: str | None = None,
               **model_kw) -> tuple[ModelConfig, dict]:
  """A Hugging Face model directory onto the mesh (params in `param_dtype`, default config.param_dtype; `model_kw`
  set compute options such as dtype and remat); a tokenizer with more ids than the embedding has rows is a config
  error."""
  config, params = checkpoint.load_hf(path, mesh=mesh, dtype=param_dtype or cfg.param_dtype, rules=rules)
  if len(tokenizer) > config.vocab_size:
    raise ConfigError(f"config.tokenizer_path: the tokenizer has {len(tokenizer)} ids but the model in {path} has "
                      f"{config.vocab_size} embedding rows")
  return config.replace(**model_kw), params


def setup(cfg, workdir: str, *, before_loading=None, training: bool = True) -> RunSetup:
  """Everything an RL run needs, from its config. `before_loading(cfg, mesh)` runs once the mesh exists and before
  any weights load (train.run passes the memory preflight); `training` as in `validate`."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl
  if jax.process_index() != 0:  # progress and info once, from process 0; warnings (e.g. bad rows) from every one
    logging.getLogger("rlt_jax").setLevel(logging.WARNING)
  g, r = validate(cfg, training=training)
  os.makedirs(workdir, exist_ok=True)
  teacher_path, student_path = cfg.teacher_path, cfg.student_path
  tok_path = cfg.tokenizer_path or teacher_path
  if not teacher_path:  # the default tiny run: everything built locally, no network
    paths = tiny_model_paths(cfg, workdir)
    teacher_path, student_path, tok_path = paths["teacher"], paths["student"], paths["tokenizer"]
  tokenizer = checkpoint.load_tokenizer(tok_path)
  fmt = make_format(cfg, tokenizer)
  mesh, rules = make_mesh(cfg)
  if cfg.rollout_tensor:  # a size that cannot fit stops the run before any weights load
    _field("rollout_tensor", sharding.rollout_tensor, mesh, 1, 1, int(cfg.rollout_tensor))
  if before_loading is not None:
    before_loading(cfg, mesh)
  model_kw = dict(dtype=cfg.dtype, remat=cfg.remat)
  tc, tp = load_model(cfg, teacher_path, tokenizer, mesh, rules, **model_kw)
  # The student is frozen: it only runs forwards, so it is stored in the compute dtype (no master copy).
  sc, sp = load_model(cfg, student_path, tokenizer, mesh, rules, param_dtype=cfg.dtype, **model_kw)
  _check_student_len(cfg, fmt)
  stats = data.RowStats()
  dataset = data.make_dataset([cfg.data.path or str(data.SAMPLE_PATH)], fmt, kind="prompt",
                              batch_size=cfg.batch_size // cfg.group_size // jax.process_count(),
                              buckets=(cfg.max_prompt_len,), seed=cfg.seed, num_epochs=None,
                              reader=cfg.data.reader, strict=cfg.data.strict, stats=stats,
                              data_dir=cfg.data.tfds_data_dir or None)
  eos_ids = tuple(sorted({i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id)
                          if isinstance(i, int) and i >= 0}))
  return RunSetup(cfg, tokenizer, fmt, mesh, rules, tc, tp, sc, sp, g, r, dataset, eos_ids,
                  make_rollout(cfg, mesh, tc, tp))


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _check_student_len(cfg, fmt: formats.RLTFormat) -> None:
  """The student sequence = teacher prompt − teacher chat overhead + student chat overhead + completion; a config
  whose `max_student_len` cannot hold the longest one fails here, not in the middle of a run."""
  question, solution = "q", "s"
  prompt = len(fmt.teacher_prompt(question, solution))
  student = len(fmt.student_example(question, solution, np.zeros(0, np.int32)).input_ids)
  need = cfg.max_prompt_len - prompt + student + cfg.max_new_tokens + 8  # 8: BPE merges at the splice points
  if cfg.max_student_len < need:
    raise ConfigError(f"config.max_student_len={cfg.max_student_len}: student sequences can reach {need} tokens "
                      f"with max_prompt_len={cfg.max_prompt_len} and max_new_tokens={cfg.max_new_tokens}; "
                      f"set it to at least {need}")


class Checkpointer:
  """Orbax checkpoints of the train state plus the data-iterator state (JSON), async, keeping the last K."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                             create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state) -> None:
    """Every process calls it. Each process's data iterator stands at its own place in its own shard, and orbax
    writes JSON from process 0 only: with several processes the states of all of them are gathered and saved."""
    ocp = self._ocp
    if jax.process_count() > 1:
      data_state = {"process_states": distributed.allgather_objects(data_state)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)))

  def restore_latest(self, state, *, resume: bool):
    """(state, data-iterator state) of the latest checkpoint, or (state, None) when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return state, None
    if not resume:
      raise ConfigError(f"config.resume=False, but {self.directory} holds checkpoints (latest step {step}); "
                        "use a new workdir or resume=True")
    ocp = self._ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    _log.info("resumed from %s at step %d", self.directory, step)
    saved = out["data"]
    states = saved["process_states"] if isinstance(saved, dict) and "process_states" in saved else [saved]
    if len(states) != jax.process_count():
      _log.info("data position written by %d processes, re-dealt to %d", len(states), jax.process_count())
      states = redeal_data_states(states, jax.process_count())
    return out["state"], states[jax.process_index()]

  def wait(self) -> None:
    self.manager.wait_until_finished()


def redeal_data_states(states: list[dict], processes: int) -> list[dict]:
  """Data-iterator states of a run with len(states) processes, for the same stream read by `processes` processes.

  data.make_dataset deals stream element g to process g mod count, and a state's parent.next_index counts the
  elements that process has taken (rows.* are statistics only). Everything before the first element some process has
  not taken is consumed; the new processes start right there. When bad rows made the old processes take different
  numbers of elements, the few later elements already taken are read again (logged)."""
  n = len(states)
  try:
    taken = [int(s["parent"]["next_index"]) for s in states]
    stats = [s["rows"] for s in states]
    add = lambda key: sum((collections.Counter(r[key]) for r in stats), collections.Counter())  # noqa: E731
    examples = {}
    for r in stats:
      for reason, wheres in r["examples"].items():
        examples[reason] = (examples.get(reason, []) + list(wheres))[:3]
    merged = dict(epoch=min(r["epoch"] for r in stats), ok=sum(r["ok"] for r in stats), bad=dict(add("bad")),
                  total_ok=sum(r["total_ok"] for r in stats), total_bad=dict(add("total_bad")), examples=examples,
                  reported=min(r["reported"] for r in stats))
  except (KeyError, TypeError, ValueError, AttributeError):
    raise ConfigError(f"the checkpoint's data position (written by {n} processes) cannot be re-dealt to {processes} "
                      "processes: unexpected iterator state (packed SFT data?); resume with the process count that "
                      "wrote it") from None
  first = min(p + n * m for p, m in enumerate(taken))
  again = sum(max(0, m - math.ceil((first - p) / n)) for p, m in enumerate(taken))
  if again:
    _log.warning("data: %d rows taken by some of the %d old processes are read again by the %d new ones", again, n,
                 processes)
  empty = dict(merged, ok=0, bad={}, total_ok=0, total_bad={}, examples={})
  # New process q takes elements q, q + processes, ...: those below `first` are consumed.
  return [{"parent": dict(states[0]["parent"], next_index=max(0, math.ceil((first - q) / processes))),
           "rows": merged if q == 0 else empty} for q in range(processes)]


def progress(total: int, initial: int, desc: str = "rlt", unit: str = "step"):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=jax.process_index() != 0,
              dynamic_ncols=True)


def completion_rows(rs: RunSetup, step: int, batch, ro, reward, rm) -> list[dict]:
  """A seeded fraction of the step's completions, with their rewards, for completions.jsonl."""
  n = len(ro["lengths"])
  pick = np.flatnonzero(np.random.RandomState(step).rand(n) < rs.config.log_completions_fraction)
  reward = np.asarray(reward)
  G = rs.config.group_size
  rows = []
  for i in pick:
    ex = ro["examples"][i]
    rows.append({"step": step, "row": batch["where"][i // G], "question": batch["question"][i // G],
                 "explanation": ex.explanation_text, "matched": ex.matched, "length": int(ro["lengths"][i]),
                 "reward": float(reward[i]), "r_ss": float(np.asarray(rm["r_ss"])[i]),
                 "r_kl": float(np.asarray(rm["r_kl"])[i])})
  return rows


def print_summary(workdir: str, start: int, steps: int) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  if not rows:
    return
  first, last = rows[:5], rows[-5:]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs if r.get(k) is not None]))  # noqa: E731
  times = {k: mean(rows, f"time_{k}") for k in ("sample", "reward", "update")}
  print(f"\nrlt_jax: {steps - start} steps this run, {len(rows)} in {workdir}\n"
        f"  reward  first 5: {mean(first, 'reward_mean'):+.4f}   last 5: {mean(last, 'reward_mean'):+.4f}\n"
        f"  match rate last 5: {mean(last, 'match_rate'):.2f}   completion length last 5: "
        f"{mean(last, 'completion_len_mean'):.1f}\n"
        f"  seconds a step: sample {times['sample']:.2f}, reward {times['reward']:.2f}, update {times['update']:.2f}\n"
        f"  metrics: {path}")


def cli(run) -> None:
  """The command line of every entry point: `--config FILE [--workdir DIR] [--config.field=value ...]`, then
  `run(config, workdir)`; a ConfigError ends the program with its message, not a traceback."""
  import sys

  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (default: the config's `workdir`).")
  flags.mark_flag_as_required("config")
  dist = distributed.define_flags()

  def main(argv):
    del argv
    try:
      # Before anything touches JAX devices; a no-op for one process.
      distributed.initialize(**{k: v.value for k, v in dist.items()})
      run(config.value, workdir.value or config.value.workdir)
    except (ConfigError, distributed.DistributedError) as e:
      sys.exit(f"error: {e}")

  app.run(main)
