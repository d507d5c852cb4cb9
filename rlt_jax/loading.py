"""Building a run from its config: tokenizer, format, mesh and rules, models (Hugging Face folders, or the tiny local
ones), the RL data pipeline and the rollout layout, all in `setup(cfg, workdir) -> RunSetup`; the pieces on their own
for SFT and evaluation (`tiny_model_paths`, `make_format`, `make_mesh`, `load_model`).

The chat format of a run (`make_format`): the config's explicit fields (`format.style`, the system prompts given
inline or by `format.*_system_file`) over the formats the models recorded (`model_format`: the teacher's prompt and
tags from the teacher's directory, the student's from the student's), over the style's defaults. An explicit prompt
or style that differs from a model's recorded one is used, with a warning naming both."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from rlt_jax import (data, data_survey, formats, grpo, heldout, hf_checkpoint, model_format, rewards, rows, run_config,
                     sharding, storage, tiny)
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig

_log = logging.getLogger("rlt_jax")


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
  row_prompts: model_format.RowPrompts = None  # warns when a row's `system` differs from the student's record
  heldout: heldout.HeldOut = None  # the prompts evaluated during RL (config.eval), never in `dataset`


@dataclasses.dataclass(frozen=True)
class Rollout:
  """The layout sampling reads (sharding.rollout_mesh): its mesh, rules and the teacher params' shardings on it."""
  mesh: jax.sharding.Mesh
  rules: tuple
  shardings: object


def make_rollout(cfg, mesh, teacher_config: ModelConfig, teacher_params) -> Rollout:
  c = run_config.Checker(cfg)
  rules = c.call("rollout_rules", sharding.normalize_rules, cfg.rollout_rules or sharding.ROLLOUT_RULES)
  tensor = c.call("rollout_tensor", sharding.rollout_tensor, mesh, teacher_config.num_heads,
                  teacher_config.num_kv_heads, int(cfg.rollout_tensor))
  rmesh = sharding.rollout_mesh(mesh, tensor)
  return Rollout(rmesh, rules, sharding.tree_shardings(decoder.param_logical_axes(teacher_config), teacher_params,
                                                       rmesh, rules))


def tiny_model_paths(cfg, workdir: str) -> dict[str, str]:
  """Paths of the tiny tokenizer, teacher and student under <workdir>/tiny_models, built once from the bundled
  sample in the config's format and `tiny` shape (CPU runs, tests, notebooks; no network)."""
  with open(data.SAMPLE_PATH) as f:
    sample = [rows.read_row(json.loads(line)) for line in f if line.strip()]
  overrides = format_overrides(cfg)
  # With several processes, process 0 builds first, so processes sharing the workdir's filesystem never write the
  # same files at once; the others then find them built (or, on a disk of their own, build the same seeded models).
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    _barrier("rlt_jax tiny models")
  # A bucket workdir builds them on this machine's disk (they are rebuilt, seeded, wherever the run resumes).
  base = storage.scratch_dir(workdir) if storage.is_url(workdir) else workdir
  paths = tiny.ensure_assets(os.path.join(base, "tiny_models"), sample, format_overrides=overrides,
                             **cfg.tiny.to_dict())
  if several and jax.process_index() == 0:
    _barrier("rlt_jax tiny models")
  return paths


def format_overrides(cfg) -> dict:
  """The config's explicit format fields: `format.style` when set, and each system prompt given inline
  (`format.teacher_system`) or as a text file (`format.teacher_system_file`; trailing newlines dropped)."""
  c = run_config.Checker(cfg)
  out = {"style": cfg.format.style} if cfg.format.style else {}
  for role in model_format.ROLES:
    field, file_field = f"{role}_system", f"{role}_system_file"
    text, path = cfg.format.get(field, ""), cfg.format.get(file_field, "")
    c.need(not (text and path), f"format.{file_field}", f"set config.format.{field} or this, not both")
    if path:
      try:
        with open(path, encoding="utf-8") as f:
          text = f.read().rstrip("\n")
      except (OSError, UnicodeDecodeError) as e:
        raise run_config.ConfigError(f"config.format.{file_field}={path!r}: cannot be read ({e})") from None
      c.need(text.strip(), f"format.{file_field}", "holds no prompt (the file is empty)")
    if text:
      out[field] = text
  return out


def make_format(cfg, tokenizer, *, teacher_dir: str | None = None, student_dir: str | None = None,
                path_field: str | None = None) -> formats.RLTFormat:
  """The run's format (module doc): explicit config fields over the teacher's and the student's recorded formats
  (`teacher_dir`, `student_dir`: the model directories, None when the run has no such model) over the defaults.
  A damaged record is a ConfigError naming `path_field` (default: teacher_path / student_path)."""
  explicit = format_overrides(cfg)
  spec, seen = {}, {}  # spec: the fields so far; seen: field -> (directory, role) it came from
  for role, directory in (("student", student_dir), ("teacher", teacher_dir)):
    if not directory:
      continue
    try:
      rec = model_format.read(directory)
    except ValueError as e:
      raise run_config.ConfigError(f"config.{path_field or role + '_path'}: {e}") from None
    if rec is None:
      continue
    if explicit.get("style", rec["style"]) != rec["style"]:
      _log.warning("config.format.style=%r, but the %s in %s was trained in the %r style; its recorded prompts and "
                   "tags are not used", explicit["style"], role, directory, rec["style"])
      continue
    got = model_format.fields(rec, role)
    for f in model_format.SHARED_FIELDS:  # the teacher's win (it is read last): the splice needs one value
      if f in spec and spec[f] != got[f]:
        _log.warning("format.%s: the teacher in %s was trained with %r, the student in %s with %r; using the "
                     "teacher's", f, directory, got[f], seen[f][0], spec[f])
    spec.update(got, style=rec["style"])
    seen.update({f: (directory, role) for f in got})
  for f in ("teacher_system", "student_system"):
    if f in explicit and f in spec and explicit[f] != spec[f]:
      _log.warning("config.format.%s overrides the prompt the %s in %s was trained with:\n  recorded: %r\n  "
                   "config:   %r", f, seen[f][1], seen[f][0], model_format.shorten(spec[f]),
                   model_format.shorten(explicit[f]))
  spec.update(explicit)
  style = spec.pop("style", "stratos")
  return run_config.Checker(cfg).call("format", formats.RLTFormat, tokenizer, style=style, **spec)


def make_mesh(cfg) -> tuple[jax.sharding.Mesh, tuple]:
  """The config's mesh (over its first `num_devices` devices, 0 = all) and sharding rules."""
  devices = jax.devices()[:cfg.num_devices] if cfg.num_devices else None
  c = run_config.Checker(cfg)
  mesh = c.call("mesh", sharding.make_mesh, cfg.mesh.to_dict(), devices)
  return mesh, c.call("sharding_rules", sharding.normalize_rules, cfg.sharding_rules or sharding.DEFAULT_RULES)


def load_model(cfg, path: str, tokenizer, mesh, rules, *, param_dtype: str | None = None,
               **model_kw) -> tuple[ModelConfig, dict]:
  """A Hugging Face model directory onto the mesh (params in `param_dtype`, default config.param_dtype; `model_kw`
  set compute options such as dtype and remat); a tokenizer with more ids than the embedding has rows is a config
  error."""
  config, params = hf_checkpoint.load_hf(path, mesh=mesh, dtype=param_dtype or cfg.param_dtype, rules=rules)
  if len(tokenizer) > config.vocab_size:
    raise run_config.ConfigError(f"config.tokenizer_path: the tokenizer has {len(tokenizer)} ids but the model in "
                                 f"{path} has {config.vocab_size} embedding rows")
  return config.replace(**model_kw), params


def setup(cfg, workdir: str, *, before_loading=None, training: bool = True) -> RunSetup:
  """Everything an RL run needs, from its config. `before_loading(cfg, mesh)` runs once the mesh exists and before
  any weights load (train.run passes the memory preflight); `training` as in `run_config.validate`, and a training
  run reads its data once first (`survey_data`; distillation reads its own items)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl
  if jax.process_index() != 0:  # progress and info once, from process 0; warnings (e.g. bad rows) from every one
    logging.getLogger("rlt_jax").setLevel(logging.WARNING)
  g, r = run_config.validate(cfg, training=training)
  storage.makedirs(workdir)
  # Model directories in a bucket are read from their copies in the local cache (storage.local_model_dir).
  teacher_path, student_path = model_dir(cfg.teacher_path), model_dir(cfg.student_path)
  tok_path = model_dir(cfg.tokenizer_path) or teacher_path
  if not teacher_path:  # the default tiny run: everything built locally, no network
    paths = tiny_model_paths(cfg, workdir)
    teacher_path, student_path, tok_path = paths["teacher"], paths["student"], paths["tokenizer"]
  tokenizer = hf_checkpoint.load_tokenizer(tok_path)
  fmt = make_format(cfg, tokenizer, teacher_dir=teacher_path, student_dir=student_path)
  held = None
  if training:  # every row read once, before any weights load: a summary line, or an error if none is usable
    summary = survey_data(cfg, fmt, kind="prompt", max_len=cfg.max_prompt_len, length_field="max_prompt_len")
    held = heldout.select(cfg, fmt, train_used=summary.used) if "eval" in cfg else None
  mesh, rules = make_mesh(cfg)
  if cfg.rollout_tensor:  # a size that cannot fit stops the run before any weights load
    run_config.Checker(cfg).call("rollout_tensor", sharding.rollout_tensor, mesh, 1, 1, int(cfg.rollout_tensor))
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
                              data_dir=cfg.data.tfds_data_dir or None, length_field="max_prompt_len",
                              exclude=held.exclude if held else ())
  eos_ids = tuple(sorted({i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id)
                          if isinstance(i, int) and i >= 0}))
  return RunSetup(cfg, tokenizer, fmt, mesh, rules, tc, tp, sc, sp, g, r, dataset, eos_ids,
                  make_rollout(cfg, mesh, tc, tp), model_format.RowPrompts(student_path), held)


def model_dir(path: str) -> str:
  """A local directory holding the model (or tokenizer) at `path`: itself, or a URL's files in the local cache,
  copied once by process 0 first when several processes run (the others then find the copy, or make their own on a
  disk of their own)."""
  if not storage.is_url(path):
    return path
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    _barrier(f"rlt_jax cache {path}")
  local = storage.local_model_dir(path)
  if several and jax.process_index() == 0:
    _barrier(f"rlt_jax cache {path}")
  return local


def survey_data(cfg, fmt: formats.RLTFormat, *, kind: str, max_len: int, length_field: str,
                truncate: bool = False) -> data_survey.DataSummary:
  """`data_survey.survey` of the config's data (`data.path`, else the bundled sample): its summary line logged; no
  usable row (or, with `data.strict`, a bad one) is a ConfigError naming config.data.path."""
  try:
    return data_survey.survey([cfg.data.path or str(data.SAMPLE_PATH)], fmt, kind=kind, max_len=max_len,
                              length_field=length_field, reader=cfg.data.reader, truncate=truncate,
                              strict=cfg.data.strict, data_dir=cfg.data.tfds_data_dir or None)
  except (data.NoUsableRowsError, data.BadRowError) as e:
    raise run_config.ConfigError(f"config.data.path: {e}") from None


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _check_student_len(cfg, fmt: formats.RLTFormat) -> None:
  """The student sequence = teacher prompt − teacher chat overhead + student chat overhead + completion; a config
  whose `max_student_len` cannot hold the longest one fails here, not in the middle of a run."""
  question, solution = "q", "s"
  prompt = len(fmt.teacher_prompt(question, solution))
  student = len(fmt.student_example(question, solution, np.zeros(0, np.int32)).input_ids)
  longest = cfg.max_prompt_len - prompt + student + cfg.max_new_tokens + 8  # 8: BPE merges at the splice points
  run_config.Checker(cfg).need(cfg.max_student_len >= longest, "max_student_len",
                               f"student sequences can reach {longest} tokens with max_prompt_len={cfg.max_prompt_len} "
                               f"and max_new_tokens={cfg.max_new_tokens}; set it to at least {longest}")
