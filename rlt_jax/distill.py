"""Distillation data (stage 3): the trained teacher explains every (question, solution) row of a dataset.

  python -m rlt_jax.distill --config configs/distill_tiny.py [--workdir DIR] [--config.distill.candidates=4 ...]

The config is the RL config (same model, format, sampling and reward fields; `teacher_path` is the RL export) plus a
`distill` block. Items are the rows of `data.path` in file order. For each item the teacher samples `candidates`
explanations through the sampler (the prompt is prefilled once and shared); every candidate is scored with the RLT
reward under the configured student. The kept candidate is the best by (end tag matched, fits the student's context,
reward), in that order, the lowest candidate index winning ties (paper App. B.1: prefer traces that are complete and
fit, then rank by reward). An item none of whose candidates matched is kept with `matched: false` (the paper uses no
filtering) or, with `on_all_failed="drop"`, recorded in skipped.jsonl instead.

Outputs in the workdir:
  distill.jsonl   one Stratos-format student row per item (`system`, `conversations` = [question, thought =
                  explanation + solution]; also `question`, `reasoning_trace`, `solution` fields), with the reward,
                  its components, the candidate kept and every candidate's reward. `rlt_jax.sft` with kind=student
                  reads it directly.
  skipped.jsonl   items not explained: unreadable rows, prompts over `max_prompt_len`, dropped all-failed items.
  dataset/        the same rows as a Hugging Face `datasets` folder (written when every item is done).
Each batch's lines are appended and fsync'ed together; a restart with the same command skips the items already in
either file (a torn last line is discarded; a damaged line anywhere is logged as file:line, removed, and its item
done again), so a run killed at any moment still writes every item exactly once.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from rlt_jax import cli, data, data_survey, formats, loading, loop, run_config, sources, storage, train

ConfigError = run_config.ConfigError
_log = logging.getLogger("rlt_jax")
ON_ALL_FAILED = ("keep_best", "drop")


def default_config() -> ml_collections.ConfigDict:
  c = run_config.default_config()
  c.workdir = "runs/distill"
  c.distill = ml_collections.ConfigDict(dict(
      candidates=1,            # explanations sampled per item (k)
      items_per_batch=8,       # items per sampler call (k × items completions at once)
      limit=0,                 # 0 = every row of data.path; n = the first n rows
      student_context=0,       # a candidate "fits" when its student sequence has at most this many tokens
                               # (0 = max_student_len)
      on_all_failed="keep_best",
      export_dataset=True))
  return c


def choose(matched, fits, reward) -> int:
  """Index of the kept candidate: the best by (matched, fits, reward), the lowest index on ties (NaN reward = −inf)."""
  r = np.where(np.isnan(np.asarray(reward, np.float64)), -np.inf, reward)
  keys = [(bool(m), bool(f), float(x), -i) for i, (m, f, x) in enumerate(zip(matched, fits, r))]
  return max(range(len(keys)), key=lambda i: keys[i])


def _line_index(line: bytes) -> int | None:
  """The item index a written line records; None for a damaged line (not JSON, not an object, no integer `index`)."""
  try:
    rec = json.loads(line)
  except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
    return None
  i = rec.get("index") if isinstance(rec, dict) else None
  return i if isinstance(i, int) and not isinstance(i, bool) and i >= 0 else None


def _jsonl_done(path: str) -> set[int]:
  """Indices already written to `path`. A torn last line (the run was killed mid-write) is cut off; a damaged line
  anywhere else (not JSON, or no integer `index`) is logged as `path:line` and the file rewritten without it
  (atomically: a temporary file fsync'ed, then renamed), so its item, no longer done, is explained again: every item
  stays written exactly once."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    raw = f.read()
  end = raw.rfind(b"\n") + 1
  if end < len(raw):
    with open(path, "r+b") as f:
      f.truncate(end)
  done, kept, bad = set(), [], []
  for n, line in enumerate(raw[:end].splitlines(keepends=True), 1):
    if not line.strip():
      continue
    i = _line_index(line)
    if i is None:
      bad.append(n)
      snippet = line.strip()[:80].decode("utf-8", "replace")
      _log.warning("%s:%d: damaged line (not a JSON object with an integer 'index'): %r; removed, its item will be "
                   "done again", path, n, snippet)
    else:
      done.add(i)
      kept.append(line)
  if bad:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  return done


def _append(path: str, rows: list[dict]) -> None:
  """Appends `rows` to `path` as JSON lines, fsync'ed; the file exists afterwards even when `rows` is empty (both
  output files are always there once a run has started)."""
  try:
    with open(path, "a") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:  # a full disk's error names no file: name it (a torn line is cut off on the next run)
    if e.filename is None:
      raise OSError(e.errno, e.strerror, path) from e
    raise


def read_items(cfg, fmt: formats.RLTFormat) -> tuple[list[dict], list[dict]]:
  """(usable items, skipped records) of `data.path` (its first `distill.limit` rows) in file order, each with its
  `index` and `where`: read, tokenized and filtered by the RL data pipeline's own code (`data_survey.encode_rows`).
  Logs the data's summary line; no usable item, or a bad row with `data.strict`, is a ConfigError naming
  config.data.path."""
  t0 = time.perf_counter()
  path = cfg.data.path or str(data.SAMPLE_PATH)
  src = sources.open_source(path, data_dir=cfg.data.tfds_data_dir or None)
  n = len(src) if not cfg.distill.limit else min(len(src), int(cfg.distill.limit))
  summary = data_survey.DataSummary(path if n == len(src) else f"{path} (config.distill.limit={n})", "prompt",
                                    cfg.max_prompt_len, "max_prompt_len")
  items, skipped = [], []
  for r in data_survey.encode_rows(src, fmt, kind="prompt", max_len=cfg.max_prompt_len, indices=range(n),
                                   reader=cfg.data.reader, length_field="max_prompt_len"):
    summary.add(r)
    if r["bad"] is None:
      items.append(dict(r["example"], index=r["index"]))
    else:
      skipped.append(dict(index=r["index"], where=r["where"], reason=r["bad"][0], detail=r["bad"][1]))
  summary.seconds = time.perf_counter() - t0
  if cfg.data.strict and summary.first is not None:
    _, where, reason, detail, _ = summary.first
    raise ConfigError(f"config.data.path: {where}: bad row ({reason}): {detail} (config.data.strict=True)")
  if not items:
    raise ConfigError(f"config.data.path: {summary.error()}")
  _log.log(logging.WARNING if skipped else logging.INFO, "%s", summary.line())
  return items, skipped


def student_row(fmt: formats.RLTFormat, item: dict, explanation: str) -> dict:
  """The Stratos-format student row for one item (what `rows.read_row` and `rlt_jax.sft` read back)."""
  system = item["system"] or fmt.student_system
  text = fmt.student_text(item["question"], explanation, item["solution"], system)
  assistant = text[len(fmt.chat_text(system, item["question"])):-len("<|im_end|>\n")]
  row = dict(system=system, question=item["question"], reasoning_trace=explanation, solution=item["solution"])
  if fmt.style == "stratos":  # Bespoke-Stratos layout; other styles keep the plain fields only
    row["conversations"] = [{"from": "user", "value": item["question"]}, {"from": "assistant", "value": assistant}]
  return row


def _explain(rs: loading.RunSetup, params, items: list[dict], batch_no: int) -> list[dict]:
  """Samples, scores and picks the candidates of a batch of items (padded to the static batch with repeats)."""
  cfg, k = rs.config, rs.config.group_size
  want = cfg.distill.items_per_batch
  padded = items + [items[-1]] * (want - len(items))
  ids, mask = data.pad_left([it["prompt_ids"] for it in padded], (cfg.max_prompt_len,), rs.fmt.pad_id)
  batch = dict(prompt_ids=ids, prompt_mask=mask, question=[it["question"] for it in padded],
               solution=[it["solution"] for it in padded], system=[it["system"] for it in padded])
  ro = train.rollout(rs, params, batch, batch_no)
  reward, rm, _ = jax.device_get(train.rollout_rewards(rs, params, ro))
  limit = cfg.distill.student_context or cfg.max_student_len
  out = []
  for b, item in enumerate(items):
    rows = range(b * k, (b + 1) * k)
    matched = [ro["examples"][i].matched for i in rows]
    lens = [len(ro["examples"][i].input_ids) for i in rows]
    fits = [n <= limit for n in lens]
    j = b * k + choose(matched, fits, reward[rows.start:rows.stop])
    ex = ro["examples"][j]
    rec = dict(index=item["index"], where=item["where"], candidate=j - b * k, candidates=k,
               candidate_rewards=[float(reward[i]) for i in rows], candidate_matched=matched, candidate_fits=fits,
               matched=ex.matched, fits=lens[j - b * k] <= limit,
               student_len=lens[j - b * k], explanation_tokens=ex.explanation_len,
               completion_tokens=int(ro["lengths"][j]), reward=float(reward[j]),
               **{m: float(rm[m][j]) for m in ("r_ss", "r_kl", "solution_logp_mean", "solution_logp_min",
                                                "kl_mean", "kl_max")})
    if not any(matched) and cfg.distill.on_all_failed == "drop":
      out.append(("skipped", dict(rec, reason="no_end_tag", detail=f"none of {k} candidates closed the explanation")))
    else:
      out.append(("rows", dict(student_row(rs.fmt, item, ex.explanation_text), **rec)))
  return out


def validate(cfg) -> None:
  d, need = cfg.distill, run_config.Checker(cfg).need
  need(d.candidates >= 1, "distill.candidates", "must be >= 1")
  need(d.items_per_batch >= 1, "distill.items_per_batch", "must be >= 1")
  need(d.limit >= 0, "distill.limit", "must be >= 0 (0 = every row)")
  need(d.student_context >= 0, "distill.student_context", "must be >= 0 (0 = max_student_len)")
  need(d.on_all_failed in ON_ALL_FAILED, "distill.on_all_failed", f"must be one of {ON_ALL_FAILED}")
  if jax.process_count() > 1:
    raise ConfigError("rlt_jax.distill runs as one process (all its devices on one mesh); "
                      f"{jax.process_count()} processes were started")


def run(cfg, workdir: str) -> dict:
  """Explains every item not yet in `workdir`; returns counts {rows, skipped, total}."""
  validate(cfg)
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # the RL plumbing sees k samples per prompt, one batch a call
  cfg.group_size = int(cfg.distill.candidates)
  cfg.batch_size = int(cfg.distill.items_per_batch) * cfg.group_size
  cfg.grpo.micro_batches = 1
  rs = loading.setup(cfg, workdir, training=False)
  # A bucket workdir: both files are appended to on this machine and uploaded whole after every batch (an object
  # store has no append; an upload is all or nothing, so no line is ever torn there).
  scratch = storage.scratch_dir(workdir) if storage.is_url(workdir) else None
  mirrors = {name: storage.Mirror(storage.join(workdir, f"{name}.jsonl"), scratch) for name in ("distill", "skipped")}
  paths = {name: m.local for name, m in mirrors.items()}
  done = _jsonl_done(paths["distill"]) | _jsonl_done(paths["skipped"])
  items, skipped = read_items(cfg, rs.fmt)
  rs.row_prompts.check([it["system"] for it in items])  # rows with a prompt of their own other than the student's
  _append(paths["skipped"], [s for s in skipped if s["index"] not in done])
  _sync(mirrors)
  done |= {s["index"] for s in skipped}
  todo = [it for it in items if it["index"] not in done]
  total = len(items) + len(skipped)
  bar = loop.progress(total, total - len(todo), desc="distill", unit="item")
  per = int(cfg.distill.items_per_batch)
  for start in range(0, len(todo), per):
    chunk = todo[start:start + per]
    out = _explain(rs, rs.teacher_params, chunk, chunk[0]["index"])
    _append(paths["distill"], [r for kind, r in out if kind == "rows"])
    _append(paths["skipped"], [r for kind, r in out if kind == "skipped"])
    _sync(mirrors)
    bar.update(len(chunk))
  bar.close()
  counts = {name: len(_jsonl_done(p)) for name, p in paths.items()}
  if counts["distill"] + counts["skipped"] != total:
    raise RuntimeError(f"distill: {counts} items written, {total} expected (a concurrent run in {workdir}?)")
  _sync(mirrors)  # the torn or damaged lines _jsonl_done cut off
  if cfg.distill.export_dataset:
    if scratch:  # written here, then uploaded file by file (a save_to_disk folder is flat)
      _export(paths["distill"], os.path.join(scratch, "dataset"))
      storage.upload_dir(os.path.join(scratch, "dataset"), storage.join(workdir, "dataset"))
    else:
      _export(paths["distill"], os.path.join(workdir, "dataset"))
  print(f"\nrlt_jax.distill: {counts['distill']} rows in {mirrors['distill'].path}, {counts['skipped']} skipped "
        f"({mirrors['skipped'].path})")
  return dict(rows=counts["distill"], skipped=counts["skipped"], total=total)


def _sync(mirrors: dict) -> None:
  for m in mirrors.values():
    m.sync()


def _export(jsonl: str, directory: str) -> None:
  """distill.jsonl → a Hugging Face `datasets` folder, rows in item order."""
  import datasets
  with open(jsonl) as f:
    rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["index"])
  if rows:
    datasets.Dataset.from_list(rows).save_to_disk(directory)



if __name__ == "__main__":
  cli.cli(run)
