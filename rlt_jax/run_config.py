"""Run configs: the RL run's `default_config`, `config_file` (a config built from another file) and the validation
that stops a run before any work, every error (`ConfigError`) naming the field as the user types it. `Checker` is the
one helper of every validator (`validate` here for RL and distillation runs, `sft.validate`, `distill.validate`,
`evaluate.validate`, the planner's checks); `check_common` holds the checks RL, SFT and distillation share."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections

from rlt_jax import decode, grpo, memory, precision, rewards, sharding, sources, storage


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
  c.data = data_config()
  c.format = format_config()
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
  c.checkpoint_every_minutes = 0.0  # also checkpoint once this long has passed since the last (0 = off): bounds
                                   # what a kill without warning loses (SIGTERM/SIGUSR1 checkpoint and stop anyway)
  c.keep_checkpoints = 3
  c.resume = True
  c.log_completions_fraction = 0.1
  c.tensorboard = True
  c.wandb = wandb_config()   # W&B logging (off unless wandb.project is set)
  c.max_bad_steps = 3
  c.export_dir = "export"    # under workdir: the final teacher in HF format ("" = none)
  c.export_dtype = ""        # dtype of the exported tensors ("" = param_dtype, e.g. the fp32 masters)
  c.preflight = True         # plan the run's memory for the real mesh and devices before loading (rlt_jax.preflight)
  c.chip = ""                # "" = detect from the devices; a rlt_jax.plan chip name (h100, tpu-v5p, ...) declares it
  c.allow_config_change = False  # resume although fields outside RESUME_SAFE_FIELDS differ from the checkpoint's
  c.profile_steps = ""       # "START,END": a jax.profiler trace of steps START..END (from 1) in <workdir>/profile
  c.eval_every = 0           # held-out reward (eval/* metrics) every N steps and before the first; 0 = never
  c.eval = eval_config()
  return c


def eval_config() -> ml_collections.ConfigDict:
  """The held-out prompts of an RL run (`heldout`): evaluated every `eval_every` steps, never trained on."""
  return ml_collections.ConfigDict(dict(
      path="",          # "" = `num_prompts` rows of the training data, set aside at start (a seeded pick)
      num_prompts=0))   # 0 = no held-out set (every row trains); config.eval_every > 0 needs some


def data_config() -> ml_collections.ConfigDict:
  """The `data` fields of RL, SFT and distillation runs."""
  return ml_collections.ConfigDict(dict(
      path="",           # "" = the bundled 300-row GSM8K sample (tiny runs), unless `required`
      required=False,    # True (the 7B recipes): an empty path is an error, never a silent run on the sample
      reader="auto", strict=False,
      tfds_data_dir=""))  # where tfds:NAME:SPLIT paths live ("" = TFDS's default)


WANDB_MODES = ("", "online", "offline", "disabled")  # "" = wandb's own default (WANDB_MODE, else online)


def wandb_config() -> ml_collections.ConfigDict:
  """The `wandb` fields of RL and SFT runs (metrics.RunWriter logs to W&B): off while `project` is empty."""
  return ml_collections.ConfigDict(dict(
      project="",  # W&B project ("" = no W&B logging; wandb is not even imported)
      entity="",   # team or user ("" = the logged-in default)
      name="",     # the run's display name ("" = the workdir's name)
      group="", tags=(),
      mode=""))    # online | offline | disabled ("" = wandb's default: WANDB_MODE, else online)


def check_logging(need, cfg) -> None:
  """What RL and SFT share about writing: checkpoint_every_minutes, the `wandb` block (a known mode; wandb installed
  when a project is set)."""
  need(float(cfg.checkpoint_every_minutes) >= 0, "checkpoint_every_minutes",
       "must be >= 0 (0 = checkpoints only every config.checkpoint_every steps, at the end and on SIGTERM/SIGUSR1)")
  need(cfg.wandb.mode in WANDB_MODES, "wandb.mode", f"must be one of {WANDB_MODES[1:]} or '' (wandb's default)")
  if cfg.wandb.project:
    import importlib.util
    need(importlib.util.find_spec("wandb") is not None, "wandb.project",
         "W&B logging needs the wandb package: pip install -e '.[wandb]'")


def format_config() -> ml_collections.ConfigDict:
  """The `format` fields of every run. "" = the model's recorded value (`rlt_format.json` beside its weights), else
  the style's default; a value set here wins over the record, with a warning when they differ (loading.make_format)."""
  return ml_collections.ConfigDict(dict(
      style="",                # stratos | r1 ("" = the models' recorded style, else stratos)
      teacher_system="",       # the teacher's system prompt
      student_system="",       # the student's system prompt (a data row's own `system` still wins for that row)
      teacher_system_file="",  # or a text file holding it (e.g. a checkpoint's original prompt)
      student_system_file=""))


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


class Checker:
  """ConfigErrors that name the field as the user types it, for one config:

    c = Checker(cfg)
    c.need(cfg.steps >= 1, "steps", "must be >= 1")            # config.steps=0: must be >= 1
    g = c.call("grpo", grpo.GRPOConfig, **cfg.grpo.to_dict())  # config.grpo: <the constructor's ValueError>
  """

  def __init__(self, cfg):
    self.cfg = cfg

  def value(self, field: str):
    """The config's value at a dotted field name ("data.path"), or None when there is none."""
    node = self.cfg
    for k in field.split("."):
      if not hasattr(node, "keys") or k not in node:
        return None
      node = node[k]
    return node

  def need(self, ok, field: str, msg: str) -> None:
    """A ConfigError `config.<field>=<value>: <msg>` unless `ok`."""
    if not ok:
      raise ConfigError(f"config.{field}={self.value(field)!r}: {msg}")

  def call(self, field: str, fn, *args, **kw):
    """`fn(*args, **kw)`; a ValueError or TypeError it raises becomes the ConfigError `config.<field>: <error>`."""
    try:
      return fn(*args, **kw)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{field}: {e}") from None


def check_common(cfg, need, *, lr_field: str | None, learning_rate: float = 0.0) -> None:
  """Checks that RL, SFT and distillation share: dtypes (and, when `lr_field` names the learning rate of a training
  run, one the stored params can take), export dtype, chip, data."""
  for f in ("param_dtype", "dtype") + (("export_dtype",) if cfg.export_dtype else ()):
    need(cfg[f] in precision.DTYPES, f, f"must be one of {sorted(precision.DTYPES)}")
  msg = lr_field and precision.check_learning_rate(learning_rate, cfg.param_dtype, lr_field, "param_dtype")
  if msg:
    raise ConfigError(msg)
  need(cfg.chip in ("",) + memory.CHIP_NAMES, "chip", f"must be '' (detect) or one of {sorted(memory.CHIP_NAMES)}")
  need(cfg.data.path or not cfg.data.get("required", False), "data.path",
       "is required by this config (a dataset such as Bespoke-Stratos-17k: .jsonl, .parquet, a save_to_disk folder or "
       "tfds:NAME:SPLIT); the bundled GSM8K sample is only for the tiny runs")
  if cfg.data.path:
    why = sources.check_source(cfg.data.path, data_dir=cfg.data.get("tfds_data_dir") or None)
    need(why is None, "data.path", f"cannot be read: {why} (expected a .jsonl/.json/.parquet/.array_record file, "
         "a Hugging Face save_to_disk folder, or tfds:NAME:SPLIT)")


def profile_window(cfg) -> tuple[int, int] | None:
  """(START, END) of `config.profile_steps` ("START,END", steps counted from 1, both traced), or None when it is
  empty; anything else is a ConfigError naming the field."""
  text = str(cfg.get("profile_steps", "") or "").strip()
  if not text:
    return None
  try:
    first, last = (int(p) for p in text.split(","))
  except ValueError:
    raise ConfigError(f"config.profile_steps={text!r}: expected 'START,END' (steps counted from 1), e.g. '3,5'") \
        from None
  if not 1 <= first <= last:
    raise ConfigError(f"config.profile_steps={text!r}: needs 1 <= START <= END")
  return first, last


def check_eval(cfg, need) -> None:
  """`eval_every` and the `eval` block (a config without them, e.g. an older one, has no evaluation)."""
  if "eval" not in cfg:
    return
  every, n, path = cfg.get("eval_every", 0), cfg.eval.num_prompts, cfg.eval.path
  need(isinstance(every, int) and every >= 0, "eval_every", "must be an integer >= 0 (0 = no evaluation)")
  need(isinstance(n, int) and n >= 0, "eval.num_prompts", "must be an integer >= 0 (0 = no held-out set)")
  need(n or not every, "eval.num_prompts", f"must be >= 1 with config.eval_every={every}: the prompts to evaluate on")
  need(not path or n, "eval.num_prompts", f"must be >= 1 with config.eval.path={path!r}")
  if path:
    why = sources.check_source(path, data_dir=cfg.data.get("tfds_data_dir") or None)
    need(why is None, "eval.path", f"cannot be read: {why} (the held-out prompts: a .jsonl/.json/.parquet/"
         ".array_record file, a Hugging Face save_to_disk folder, or tfds:NAME:SPLIT; '' = rows of the training data)")


def validate(cfg, *, training: bool = True) -> tuple[grpo.GRPOConfig, rewards.RewardConfig]:
  """Checks the config before any work; every error names the field. `training=False` (distillation: the teacher
  only samples) skips the check that the learning rate survives the params' dtype."""
  c = Checker(cfg)
  need = c.need
  profile_window(cfg)
  check_logging(need, cfg)
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
  check_eval(cfg, need)
  for f in ("teacher_path", "student_path", "tokenizer_path"):
    path = cfg[f]
    need(not path or storage.isdir(path), f, "is not a directory")
    need(not path or f == "tokenizer_path" or storage.isfile(storage.join(path, "config.json")), f,
         "has no config.json (a Hugging Face model directory is expected)")
  need(bool(cfg.teacher_path) == bool(cfg.student_path), "student_path",
       "set teacher_path and student_path together (both empty builds tiny local models)")
  need(bool(cfg.teacher_path) or cfg.tiny_models, "teacher_path",
       "is required (a Hugging Face model directory), unless config.tiny_models=True")
  g = c.call("grpo", grpo.GRPOConfig, **cfg.grpo.to_dict())
  check_common(cfg, need, lr_field="grpo.learning_rate" if training else None, learning_rate=g.learning_rate)
  r = c.call("reward", rewards.RewardConfig, **cfg.reward.to_dict())
  need(cfg.batch_size % g.micro_batches == 0, "batch_size",
       f"must be divisible by config.grpo.micro_batches={g.micro_batches}")
  # One update per sampled batch, as in the paper: the step program derives the old log-probs from the current
  # policy (ratio exactly 1) or, off-policy, takes the sampler's; it does not re-use a batch for several updates.
  need(g.num_iterations == 1, "grpo.num_iterations",
       "must be 1: each sampled batch gets one update (the paper's setting); sample more rows a step instead")
  need(abs(r.teacher_temperature - cfg.temperature) < 1e-9, "reward.teacher_temperature",
       f"must equal config.temperature={cfg.temperature}: the reward's ℓ_t and the policy's log-probs in the update "
       "are at the sampling temperature")
  c.call("mesh", lambda: [int(v) for v in cfg.mesh.values()])
  c.call("sharding_rules", sharding.normalize_rules, cfg.sharding_rules or sharding.DEFAULT_RULES)
  c.call("rollout_rules", sharding.normalize_rules, cfg.rollout_rules or sharding.ROLLOUT_RULES)
  need(int(cfg.rollout_tensor) >= 0, "rollout_tensor", "must be >= 0 (0 = chosen from the heads and devices)")
  need(int(cfg.decode.window) >= 0, "decode.window", "must be >= 0 (0 = every step reads every cache slot)")
  need(int(cfg.decode.buckets) >= 1, "decode.buckets", "must be >= 1 (1 = no packing of finished rows)")
  need(int(cfg.decode.min_rows) >= 1, "decode.min_rows", "must be >= 1")
  return g, r


# ------------------------------------------------------------------------------------------------- resume checks
# The fields a resumed run may change. Every other field of the run config (RL's, SFT's) is compared with the config
# saved with the checkpoint (<workdir>/checkpoints/<step>/config/run_config.json), and a difference stops the resume
# (`check_resume`) unless config.allow_config_change=True: an allowlist, so a field added later is checked until it is
# listed here. A name covers its sub-fields ("decode" is decode.*).
RESUME_SAFE_FIELDS = (
    # How long the run goes, where and how often it writes, when it gives up: not what a step computes.
    "steps", "workdir", "resume", "allow_config_change", "checkpoint_every", "checkpoint_every_minutes",
    "keep_checkpoints", "profile_steps",
    "eval_every",  # how often the held-out set is scored (`eval.*` picks it, and what the training data leaves out)
    "log_completions_fraction", "tensorboard", "wandb", "export_dir", "export_dtype", "max_bad_steps", "preflight",
    "chip",
    # Layout and memory: the same math on other hardware (resuming on another mesh or device count is supported).
    "mesh", "num_devices", "sharding_rules", "rollout_tensor", "rollout_rules", "sample_micro_batch",
    "reward_micro_batch", "decode", "remat", "logprob_chunk_size",
    "grpo.micro_batches", "micro_batches",  # gradient accumulation (RL, SFT): the parts sum to the batch's gradient
)


def resume_safe_fields(saved: dict, cfg) -> tuple[str, ...]:
  """RESUME_SAFE_FIELDS for resuming `cfg` from a checkpoint whose config is `saved`. SFT (a config with
  `lr_schedule`) spans its learning-rate schedule (cosine decay, warmup_ratio) over its step count, and with steps=0
  reads its data `epochs` times: there `steps` is safe to change only on a constant schedule without warmup, between
  two non-zero values."""
  if "lr_schedule" not in cfg:
    return RESUME_SAFE_FIELDS
  fixed = cfg.lr_schedule == "constant" and not cfg.warmup_ratio and cfg.steps and saved.get("steps")
  return RESUME_SAFE_FIELDS if fixed else tuple(f for f in RESUME_SAFE_FIELDS if f != "steps")


def config_json(cfg) -> dict:
  """The run config as the JSON a checkpoint saves (tuples become lists)."""
  return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), default=repr))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, cfg, *, safe=RESUME_SAFE_FIELDS) -> tuple[list[tuple[str, object, object]], list[str]]:
  """(changed, unmatched) between a checkpoint's config `saved` and `cfg`, fields in `safe` left out: changed as
  (dotted field, old, new), by name; unmatched the fields only one of them has (added to or removed
  from the code since the checkpoint: not compared)."""
  old, new = _flat(saved), _flat(config_json(cfg))
  is_safe = lambda f: any(f == s or f.startswith(s + ".") for s in safe)  # noqa: E731
  same = lambda a, b: a == b or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 NaN
  changed = [(f, old[f], v) for f, v in new.items() if f in old and not is_safe(f) and not same(old[f], v)]
  return changed, sorted(f for f in set(old) ^ set(new) if not is_safe(f))


def _show(value, limit: int = 60) -> str:
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit - 1] + "…"


def check_resume(saved: dict | None, cfg, *, where: str) -> None:
  """Stops the resume of `where` (e.g. "the checkpoint at step 10 in /w/checkpoints") when `cfg` differs from its
  saved config `saved` outside `resume_safe_fields`: a ConfigError listing each field old → new, or, with
  config.allow_config_change=True, a warning. `saved=None` (a checkpoint written before configs were saved with
  checkpoints): an info line, nothing compared."""
  log = logging.getLogger("rlt_jax")
  if saved is None:
    log.info("%s holds no run config (written before run configs were saved with checkpoints): the config could not "
             "be compared", where)
    return
  changed, unmatched = config_changes(saved, cfg, safe=resume_safe_fields(saved, cfg))
  if unmatched:
    log.info("not compared with the config of %s (fields only one of the two has): %s", where, ", ".join(unmatched))
  if not changed:
    return
  listing = ", ".join(f"{f} {_show(a)} → {_show(b)}" for f, a, b in changed)
  if cfg.get("allow_config_change", False):
    log.warning("config.allow_config_change=True: resuming %s with changed fields: %s", where, listing)
    return
  why = " (an SFT run's learning-rate schedule and data passes follow config.steps)" if any(
      f == "steps" for f, _, _ in changed) else ""
  raise ConfigError(f"the config differs from the one that wrote {where} in fields that change what a step computes: "
                    f"{listing}{why}; set them back, use a new workdir, or pass --config.allow_config_change=True to "
                    "resume anyway")
