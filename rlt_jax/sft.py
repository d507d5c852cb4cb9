"""Supervised fine-tuning: the teacher's warm-up (stage 1) and the student's distillation (stage 4), one module.

  python -m rlt_jax.sft --config configs/sft_tiny.py [--workdir DIR] [--config.kind=student ...]

`kind="teacher"` trains on teacher rows (the RL prompt, then explanation + end tag + <|im_end|>; loss on the
completion only); `kind="student"` on Stratos-format student rows (loss on the assistant turn). Both masks come from
`formats` at the token level. Rows are packed into `max_len`-token sequences with segment ids (attention never
crosses rows, positions restart per row); rows longer than `max_len` are cut, and a row left with nothing to train
on is skipped and counted. The loss is the mean negative log-likelihood over all trained tokens of the global
batch (exact under gradient accumulation). Checkpoints and resume work as in `rlt_jax.train`; at the end the model
is written in Hugging Face format to `<workdir>/export`, where the RL config's `teacher_path` (or a transformers
user) loads it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlt_jax import checkpointing, cli, data, hf_checkpoint, loading, loop, metrics, model_format, optim, preemption, \
    preflight, run_config, sharding, storage
from rlt_jax.models import logprobs
from rlt_jax.models.config import ModelConfig

ConfigError = run_config.ConfigError
KINDS = {"teacher": "teacher_sft", "student": "student_sft"}


def default_config() -> ml_collections.ConfigDict:
  """Every field of an SFT run; the defaults are the teacher warm-up of the paper (METHOD_SPEC §4)."""
  c = ml_collections.ConfigDict()
  c.workdir = "runs/sft"
  c.seed = 0
  c.kind = "teacher"         # teacher (warm-up on the teacher format) | student (distillation rows)
  c.model_path = ""          # HF model dir to start from (required unless tiny_models)
  c.tokenizer_path = ""      # "" = the model's directory
  c.tiny_models = False      # True with an empty model_path: start from the tiny local model (CPU runs, tests)
  c.tiny = run_config.default_config().tiny
  c.param_dtype = "float32"  # the trained params and AdamW moments (fp32 masters with a bf16 `dtype`)
  c.dtype = "float32"        # compute dtype of matmuls and activations
  c.remat = "none"           # none | full | dots
  c.data = run_config.data_config()
  c.format = run_config.format_config()
  c.max_len = 16384          # context; longer rows are truncated (trl's max_seq_length)
  c.pack = True              # pack rows into max_len sequences (segment ids); False = one row a sequence
  c.batch_size = 16          # sequences per optimizer step (all processes together)
  c.micro_batches = 1        # gradient accumulation: the batch is split into this many parts
  c.epochs = 10
  c.steps = 0                # 0 = as many as `epochs` passes over the data take (counted before training)
  c.learning_rate = 1e-5
  c.lr_schedule = "cosine"   # constant | cosine
  c.warmup_ratio = 0.05
  c.b1, c.b2, c.adam_eps = 0.9, 0.95, 1e-8
  c.weight_decay = 1e-4
  c.max_grad_norm = 1.0
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.num_devices = 0
  c.sharding_rules = ()
  c.logprob_chunk_size = 512
  c.checkpoint_every = 500
  c.checkpoint_every_minutes = 0.0  # also checkpoint once this long has passed since the last (0 = off)
  c.keep_checkpoints = 2
  c.resume = True
  c.tensorboard = True
  c.wandb = run_config.wandb_config()  # W&B logging (off unless wandb.project is set)
  c.export_dir = "export"    # under workdir: the final model in HF format ("" = none)
  c.export_dtype = ""        # dtype of the exported tensors ("" = param_dtype)
  c.preflight = True         # plan the step's memory for the real mesh and devices before loading (rlt_jax.preflight)
  c.chip = ""                # "" = detect from the devices; a rlt_jax.plan chip name declares it
  c.profile_steps = ""       # "START,END": a jax.profiler trace of steps START..END (from 1) in <workdir>/profile
  c.allow_config_change = False  # resume although fields outside run_config.RESUME_SAFE_FIELDS differ from the
                                 # checkpoint's (steps too, unless the schedule is constant: resume_safe_fields)
  return c


@dataclasses.dataclass(frozen=True)
class SFTStepConfig:
  model: ModelConfig
  chunk_size: int
  micro_batches: int


def sequence_loss(model: ModelConfig, params, batch, *, chunk_size: int, denominator):
  """Sum of −log p over the batch's trained tokens, divided by `denominator`. `batch`: input_ids, loss_mask,
  segment_ids (0 = padding), positions [B, T]. A token is trained on only if it continues its own segment."""
  seg = batch["segment_ids"]
  lp = logprobs.token_logprobs(model, params, batch["input_ids"], seg > 0, positions=batch["positions"],
                               segment_ids=seg, chunk_size=chunk_size)
  same_segment = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], axis=1)
  mask = batch["loss_mask"].astype(bool) & same_segment & (seg > 0)
  return -jnp.sum(jnp.where(mask, lp, 0.0)) / denominator, jnp.sum(mask)


def _sft_step(sc: SFTStepConfig, optimizer, schedule, state, batch):
  denominator = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

  def loss_fn(params, b):
    loss, n = sequence_loss(sc.model, params, b, chunk_size=sc.chunk_size, denominator=denominator)
    return loss, {"loss": loss, "tokens": n}  # each part's share: summed over the parts

  grads, m = optim.accumulate_gradients(loss_fn, state["params"], batch, sc.micro_batches)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
  new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
  return new_state, {"loss": m["loss"], "tokens": m["tokens"], "grad_norm": grad_norm, "lr": schedule(state["step"])}


def validate(cfg) -> None:
  need = run_config.Checker(cfg).need
  run_config.profile_window(cfg)
  run_config.check_logging(need, cfg)
  need(cfg.kind in KINDS, "kind", f"must be one of {sorted(KINDS)}")
  for f in ("max_len", "batch_size", "micro_batches", "logprob_chunk_size", "checkpoint_every", "keep_checkpoints"):
    need(int(cfg[f]) >= 1, f, "must be >= 1")
  need(cfg.steps >= 0 and (cfg.steps > 0 or cfg.epochs >= 1), "epochs", "must be >= 1 when config.steps=0")
  need(cfg.batch_size % jax.process_count() == 0, "batch_size",
       f"must be divisible by the {jax.process_count()} processes")
  need((cfg.batch_size // jax.process_count()) % cfg.micro_batches == 0, "micro_batches",
       f"must divide the per-process batch {cfg.batch_size // jax.process_count()}")
  need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
  need(cfg.lr_schedule in optim.LR_SCHEDULES, "lr_schedule", f"must be one of {optim.LR_SCHEDULES}")
  for f in ("model_path", "tokenizer_path"):
    need(not cfg[f] or storage.isdir(cfg[f]), f, "is not a directory")
  need(not cfg.model_path or storage.isfile(storage.join(cfg.model_path, "config.json")), "model_path",
       "has no config.json (a Hugging Face model directory is expected)")
  need(bool(cfg.model_path) or cfg.tiny_models, "model_path",
       "is required (a Hugging Face model directory), unless config.tiny_models=True")
  run_config.check_common(cfg, need, lr_field="learning_rate", learning_rate=cfg.learning_rate)


def _buckets(cfg) -> tuple[int, ...]:
  """Sequence lengths: packed, always max_len; unpacked, the smallest of three lengths that holds the batch (three
  compilations at most)."""
  if cfg.pack:
    return (cfg.max_len,)
  return tuple(sorted({max(cfg.max_len // 4, 1), max(cfg.max_len // 2, 1), cfg.max_len}))


def _dataset(cfg, fmt, *, num_epochs, stats=None):
  return data.make_dataset([cfg.data.path or str(data.SAMPLE_PATH)], fmt, kind=KINDS[cfg.kind],
                           batch_size=cfg.batch_size // jax.process_count(), buckets=_buckets(cfg), seed=cfg.seed,
                           num_epochs=num_epochs, reader=cfg.data.reader, strict=cfg.data.strict, stats=stats,
                           data_dir=cfg.data.tfds_data_dir or None, truncate=True, pack=cfg.pack, drop_remainder=False,
                           length_field="max_len")


def count_steps(cfg, fmt) -> int:
  """Optimizer steps in `epochs` passes: one pass of the real pipeline (tokenize, cut, pack) counting batches.
  With several processes every process runs the largest count (one that runs out feeds empty batches)."""
  n = sum(1 for _ in _dataset(cfg, fmt, num_epochs=cfg.epochs))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
  if n == 0:
    raise ConfigError(f"config.data.path={cfg.data.path!r}: no usable rows for kind={cfg.kind!r}")
  return n


def _fill(batch: dict, rows: int, pad_id: int) -> dict:
  """A short last batch (or none) padded with empty sequences (no tokens, no loss) to the static batch size."""
  length = next(iter(batch.values())).shape[1]
  out = {}
  for k, v in batch.items():
    pad = np.full((rows - len(v), length), pad_id if k == "input_ids" else 0, v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


def _empty_batch(rows: int, length: int, pad_id: int) -> dict:
  z = lambda dt: np.zeros((0, length), dt)  # noqa: E731
  return _fill(dict(input_ids=z(np.int32), loss_mask=z(bool), segment_ids=z(np.int32), positions=z(np.int32),
                    attention_mask=z(bool)), rows, pad_id)


def _load(cfg, workdir):
  """(tokenizer, format, mesh, rules, model config, params) from the config (the tiny model when asked)."""
  # Model directories in a bucket: read from their copies in the local cache.
  model_path = loading.model_dir(cfg.model_path)
  tok_path = loading.model_dir(cfg.tokenizer_path) or model_path
  if not model_path:
    paths = loading.tiny_model_paths(cfg, workdir)
    model_path, tok_path = paths[cfg.kind], paths["tokenizer"]
  tokenizer = hf_checkpoint.load_tokenizer(tok_path)
  # The format the model itself recorded, if any (an SFT run that continues from an earlier export).
  fmt = loading.make_format(cfg, tokenizer, **{f"{cfg.kind}_dir": model_path}, path_field="model_path")
  # Every row read once, before any weights load: a summary line, or an error naming config.data.path when no row is
  # usable (at 7B the load takes minutes).
  loading.survey_data(cfg, fmt, kind=KINDS[cfg.kind], max_len=cfg.max_len, length_field="max_len", truncate=True)
  mesh, rules = loading.make_mesh(cfg)
  preflight.check(cfg, mesh, kind="sft")  # before any weights load
  mc, params = loading.load_model(cfg, model_path, tokenizer, mesh, rules, dtype=cfg.dtype, remat=cfg.remat)
  return tokenizer, fmt, mesh, rules, mc, params


def export(cfg, fmt, mc: ModelConfig, params, tokenizer, directory: str) -> None:
  """The trained model in Hugging Face format, with the format it was trained in (`model_format`): a student's
  prompt is the one its rows carried (distillation rows carry their own), else the format's."""
  hf_checkpoint.save_hf(mc, params, directory, tokenizer=tokenizer, dtype=cfg.export_dtype or None)
  system = None
  if cfg.kind == "student":
    system, distinct = model_format.data_system_prompt(cfg.data.path or str(data.SAMPLE_PATH),
                                                       reader=cfg.data.reader, data_dir=cfg.data.tfds_data_dir or None)
    if distinct > 1:
      logging.getLogger("rlt_jax").warning("sft: the rows carry %d different system prompts; %s records the most "
                                           "common one", distinct, model_format.FILE)
  model_format.write(directory, fmt, cfg.kind, student_system=system)


class SFTTrainer:
  """`loop.Trainer` for SFT: each step's batch is uploaded once (rows split over the batch axes) and trained on by
  one program; its metrics are read back a step late."""

  def __init__(self, cfg, fmt, state, it, stats: data.RowStats, step_fn, batch_sharding, mesh, rules):
    self.cfg, self.fmt, self.state, self.it, self.stats, self.step_fn = cfg, fmt, state, it, stats, step_fn
    self.batch_sharding, self.mesh, self.rules = batch_sharding, mesh, rules
    self.rows = cfg.batch_size // jax.process_count()

  def dispatch(self, step: int):
    try:
      batch = next(self.it)
      batch = _fill(batch, self.rows, self.fmt.pad_id) if len(batch["input_ids"]) < self.rows else batch
    except StopIteration:  # another process has more sequences left (see count_steps)
      batch = _empty_batch(self.rows, _buckets(self.cfg)[0], self.fmt.pad_id)
    batch.pop("attention_mask", None)
    # This process's rows, each array uploaded once: the global batch is every process's rows.
    # (Its host-to-device copies are this explicit upload, allowed by name: with several processes jax routes
    # them through a path the transfer guard would count as implicit.)
    with jax.transfer_guard_host_to_device("allow"):
      dev = {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
    with sharding.use_mesh(self.mesh, self.rules):
      self.state, m = self.step_fn(self.state, dev)
    seg = batch["segment_ids"] > 0
    return m, dict(tokens=float(np.sum(seg)), fill=float(np.mean(seg)), rows_used=self.stats.total_ok,
                   rows_skipped=sum(self.stats.total_bad.values()))

  def report(self, step: int, out, seconds: float):
    m, host = out
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    tokens = host.pop("tokens")
    return dict(m, tokens_per_s=tokens / max(seconds, 1e-9), **host), None

  def check(self, step: int, metrics: dict) -> None:  # SFT has no stop condition of its own
    pass

  def data_state(self) -> dict:
    return self.it.get_state()


def run(cfg, workdir: str, *, on_step=None) -> dict:
  """Trains in `workdir` (resuming there if it holds checkpoints); returns the last step's metrics."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  validate(cfg)
  storage.makedirs(workdir)
  tokenizer, fmt, mesh, rules, mc, params = _load(cfg, workdir)
  total = int(cfg.steps) or count_steps(cfg, fmt)
  warmup = int(math.ceil(cfg.warmup_ratio * total))
  opt_cfg = optim.OptimConfig(learning_rate=cfg.learning_rate, lr_schedule=cfg.lr_schedule, warmup_steps=warmup,
                              total_steps=total, weight_decay=cfg.weight_decay, b1=cfg.b1, b2=cfg.b2,
                              adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm)
  optimizer, schedule = optim.make_optimizer(opt_cfg), optim.learning_rate_schedule(opt_cfg)
  sc = SFTStepConfig(mc, int(cfg.logprob_chunk_size), int(cfg.micro_batches))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"params": params, "opt_state": optim.init_state(optimizer, params),
           "step": jnp.zeros((), jnp.int32)}
  state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                       else jax.device_put(x, replicated), state)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh, 2, rules)  # every batch array is [B, T]
  axes = batch_sharding.spec[0] or ()
  shards = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  if (cfg.batch_size // cfg.micro_batches) % shards:
    raise ConfigError(f"config.batch_size={cfg.batch_size}: each micro-batch of {cfg.batch_size // cfg.micro_batches} "
                      f"sequences must split over the {shards} devices of the mesh's batch axes")
  step_fn = jax.jit(lambda s, b: _sft_step(sc, optimizer, schedule, s, b), donate_argnums=0,
                    in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), cfg.keep_checkpoints, config=cfg)
  state, data_state = ckpt.restore_latest(state, resume=cfg.resume, steps=total)
  stats = data.RowStats()
  it = iter(_dataset(cfg, fmt, num_epochs=None if cfg.steps else cfg.epochs, stats=stats))
  if data_state is not None:
    it.set_state(data_state)
  start = int(jax.device_get(state["step"]))
  writer = metrics.RunWriter(workdir, resume_step=start, config=cfg)
  trainer = SFTTrainer(cfg, fmt, state, it, stats, step_fn, batch_sharding, mesh, rules)
  last = loop.run(trainer, start=start, total=total, checkpoint_every=cfg.checkpoint_every, ckpt=ckpt, writer=writer,
                  bar=loop.progress(total, start, desc=f"sft/{cfg.kind}"), on_step=on_step,
                  postfix=lambda m: dict(loss=f"{m['loss']:.4f}"),
                  profile=loop.Profile(run_config.profile_window(cfg), os.path.join(workdir, "profile")),
                  watch=preemption.Watch(cfg.checkpoint_every_minutes))
  state = trainer.state
  if stats.total_bad:
    logging.getLogger("rlt_jax").warning("sft: rows skipped: %s", dict(stats.total_bad))
  if cfg.export_dir:
    export(cfg, fmt, mc, state["params"], tokenizer, storage.join(workdir, cfg.export_dir))
  if jax.process_index() == 0 and last:
    print(f"\nrlt_jax.sft ({cfg.kind}): {total} steps, last loss {last['loss']:.4f}; rows used "
          f"{stats.total_ok}, skipped {dict(stats.total_bad) or 0}; model: "
          f"{storage.join(workdir, cfg.export_dir) if cfg.export_dir else '(not exported)'}")
  return last



if __name__ == "__main__":
  cli.cli(run)
