"""Graded evaluation of a (distilled) student on math and science benchmarks: pass@1 with its standard error.

  python -m rlt_jax.evaluate --config configs/eval_tiny.py [--workdir DIR] [--config.limit=50 ...]

Benchmarks are files (.jsonl, .csv, .parquet) whose layout `rows.detect_reader` recognises: GSM8K, MATH500 / AIME,
custom {question, answer} rows, and GPQA (e.g. GPQA-Diamond: `Question`, `Correct Answer`, `Incorrect Answer 1..3`).
Each problem is asked the way a distilled student is trained to answer (`RLTFormat.student_prompt_text`: the student
system prompt, the question, an open assistant turn). The model samples `num_samples` responses (greedy at
temperature 0); each response is graded against the row's gold answer by `grading.is_correct`.

A GPQA problem is multiple choice (`choices.MultipleChoice`): its four options are shuffled with a seed made from
`config.seed` and the row's index in its file (the same on every run), listed under the question as "A) ..." to
"D) ...", and the response must give the letter in \\boxed{}. Its gold is the correct letter after the shuffle; a
response is right when the letter it picks (its final answer read as a letter, else the one option whose text that
answer equals) is that letter.

pass@1 of a benchmark = mean over its N problems of (correct samples / num_samples); the standard error is the
sample standard deviation of those per-problem rates (ddof=1) over sqrt(N).

Outputs under the workdir: `results.json` (per benchmark: pass@1, stderr, counts, skipped rows), `results.md` (the
same as a markdown table, also printed at the end) and `<benchmark>.jsonl` (one line per problem: question, gold,
responses, extracted answers, verdicts, pass rate; for multiple choice also `choice_seed` with the `row_index` it
came from, `answer_letter`, `choices` {letter: option}, `choice_columns` {letter: its release column} and the letters
`picked`). Rows with no gold answer, unreadable rows and prompts over `max_prompt_len` are skipped, counted per
reason and logged with their file:line, with one summary line per benchmark (`data_survey.DataSummary`); every
benchmark is read before the model loads, and one with nothing to grade stops the run with a ConfigError naming it,
its file, the skips per reason and the first skipped row. Single host.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time

import jax
import ml_collections
import numpy as np
import tqdm

from rlt_jax import (choices, cli, data, data_survey, formats, grading, hf_checkpoint, loading, rows, run_config,
                     sampling, sharding, sources, storage)

_log = logging.getLogger("rlt_jax")
ConfigError = run_config.ConfigError
SAMPLE_NAMES = ("", "sample")  # a benchmark path meaning the bundled GSM8K sample (data.SAMPLE_PATH)
_DTYPES = ("float32", "bfloat16", "float16")
_SKIP_REASONS = ("no_answer", "too_long", "bad_row")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/eval"
  c.seed = 0
  c.model_path = ""          # HF model dir of the student to evaluate (required unless tiny_models)
  c.tokenizer_path = ""      # "" = the model's directory
  c.tiny_models = False      # True with an empty model_path: evaluate the tiny local student (built if missing)
  c.tiny = run_config.default_config().tiny  # shape of the tiny models (same as the tiny RL run's)
  # "name=path" specs; path: a .jsonl/.csv/.parquet file of GSM8K rows (question, answer ending "#### N"), MATH/AIME
  # rows (problem, solution, answer), GPQA rows (Question, Correct Answer, Incorrect Answer 1-3: multiple choice,
  # shuffled by config.seed) or custom rows (question, answer: the final answer; solution optional); "" or
  # "sample" = the bundled GSM8K sample. The name names the output file <name>.jsonl.
  c.benchmarks = ("gsm8k=sample",)
  c.limit = 0                # problems per benchmark (the first usable rows in file order); 0 = all
  c.num_samples = 1          # n responses per problem
  c.temperature = 0.0        # 0 = greedy
  c.top_p = 1.0
  c.max_new_tokens = 4096
  c.max_prompt_len = 2048
  c.batch_size = 32          # problems per sampler call (the sampler runs batch_size × num_samples rows)
  # The student prompt: "" = the one the model recorded (rlt_format.json), else the style's default.
  # teacher_system is only used to build the tiny models the way the tiny RL run does (same warm-up rows).
  c.format = run_config.format_config()
  c.param_dtype = "float32"
  c.dtype = "float32"        # compute dtype
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.num_devices = 0          # 0 = every device
  c.sharding_rules = ()      # () = sharding.DEFAULT_RULES
  return c


# ------------------------------------------------------------------------------------------------------------ config
def _benchmark_specs(cfg) -> list[tuple[str, str]]:
  specs = cfg.benchmarks
  # A config file may give one comma-separated string; the command line takes a tuple literal:
  # --config.benchmarks="('math500=a.jsonl','aime24=b.jsonl')" (or one spec: --config.benchmarks=gsm8k=c.jsonl).
  if isinstance(specs, str):
    specs = [s for s in specs.split(",") if s.strip()]
  if not specs:
    raise ConfigError("config.benchmarks: no benchmark given (expected specs such as 'gsm8k=path/test.jsonl')")
  out, seen = [], set()
  for i, spec in enumerate(specs):
    where = f"config.benchmarks[{i}]={spec!r}"
    if not isinstance(spec, str) or "=" not in spec:
      raise ConfigError(f"{where}: expected 'name=path' (e.g. 'math500=../shared/data/math500/test.jsonl')")
    name, path = (s.strip() for s in spec.split("=", 1))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
      raise ConfigError(f"{where}: the name must be letters, digits, '_', '.' or '-' (it names <name>.jsonl)")
    if name in seen:
      raise ConfigError(f"{where}: the name {name!r} is used twice")
    seen.add(name)
    path = str(data.SAMPLE_PATH) if path in SAMPLE_NAMES else path
    if not storage.exists(path):
      raise ConfigError(f"{where}: file {path!r} does not exist")
    out.append((name, path))
  return out


def validate(cfg) -> list[tuple[str, str]]:
  """Checks the config before any work (every error names the field); returns the (name, path) benchmarks."""
  c = run_config.Checker(cfg)
  need = c.need
  for f in ("max_new_tokens", "max_prompt_len", "batch_size"):
    need(isinstance(cfg[f], int) and cfg[f] >= 1, f, "must be an int >= 1")
  need(isinstance(cfg.limit, int) and cfg.limit >= 0, "limit", "must be an int >= 0 (0 = every problem)")
  need(isinstance(cfg.num_samples, int) and cfg.num_samples >= 1, "num_samples", "must be an int >= 1")
  need(math.isfinite(cfg.temperature) and cfg.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
  need(cfg.temperature > 0 or cfg.num_samples == 1, "num_samples",
       "greedy decoding (config.temperature=0) gives identical samples; set num_samples=1 or temperature > 0")
  need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
  for f in ("dtype", "param_dtype"):
    need(cfg[f] in _DTYPES, f, f"must be one of {_DTYPES}")
  need(bool(cfg.model_path) or cfg.tiny_models, "model_path",
       "is required (a Hugging Face model directory), unless config.tiny_models=True")
  need(not cfg.model_path or storage.isdir(cfg.model_path), "model_path", "is not a directory")
  need(not cfg.model_path or storage.isfile(storage.join(cfg.model_path, "config.json")), "model_path",
       "has no config.json (a Hugging Face model directory is expected)")
  need(not cfg.tokenizer_path or storage.isdir(cfg.tokenizer_path), "tokenizer_path", "is not a directory")
  layout = "mesh / config.sharding_rules"  # one error names both fields
  c.call(layout, lambda: [int(v) for v in cfg.mesh.values()])
  c.call(layout, sharding.normalize_rules, cfg.sharding_rules or sharding.DEFAULT_RULES)
  return _benchmark_specs(cfg)


# ------------------------------------------------------------------------------------------------------------ data
def load_problems(path: str, fmt: formats.RLTFormat, *, limit: int, max_prompt_len: int, seed: int = 0):
  """(problems, skipped counts, skipped locations): the first `limit` usable rows of a benchmark file, each with its
  student prompt ids; rows without a gold answer, unreadable rows and over-long prompts are skipped. A GPQA row
  becomes a multiple-choice problem (`choice`: a `choices.MultipleChoice` shuffled by `seed` and the row's index;
  its gold is the correct letter)."""
  return read_problems(path, fmt, limit=limit, max_prompt_len=max_prompt_len, seed=seed)[:3]


def read_problems(path: str, fmt: formats.RLTFormat, *, limit: int, max_prompt_len: int, seed: int = 0,
                  batch_rows: int = 256):
  """`load_problems`, and the rows read as a `data_survey.DataSummary` (skips under the row readers' reasons, plus
  `no_answer`); the prompts are tokenized `batch_rows` at a time, rows past the limit-th problem are not counted."""
  t0 = time.perf_counter()
  try:
    src = sources.open_source(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"config.benchmarks: {e}") from None
  problems, skipped, where_skipped = [], dict.fromkeys(_SKIP_REASONS, 0), {r: [] for r in _SKIP_REASONS}
  summary = data_survey.DataSummary(path, "prompt", max_prompt_len, "max_prompt_len")

  def skip(i, where, reason, place, cause, detail, fields=None, length=None):
    skipped[reason] += 1
    where_skipped[reason].append(place)
    summary.add(dict(index=i, where=where, bad=(cause, detail), length=length, fields=fields))

  chunk = min(batch_rows, limit) if limit else batch_rows
  for start in range(0, len(src), chunk):
    if limit and len(problems) >= limit:
      break
    entries = []  # in file order: (i, where, BadRow) or (i, where, row, question, gold, choice, prompt text)
    for i in range(start, min(start + chunk, len(src))):
      rec, raw = src[i], None
      try:
        raw = sources.decode_payload(rec.payload)
        row = rows.read_row(raw)
        choice = choices.MultipleChoice.from_row(raw, config_seed=seed, row_index=i) \
            if rows.detect_reader(raw) == "gpqa" else None  # (read_row took raw, so it is a mapping)
      except rows.BadRow as e:
        entries.append((i, rec.where, e, list(raw)[:12] if isinstance(raw, dict) else None))
        continue
      question = choice.question_text(row["question"]) if choice else row["question"]
      gold = choice.answer if choice else row["answer"] or _short_answer(raw)
      entries.append((i, rec.where, row, question, gold, choice, fmt.student_prompt_text(question, row["system"])))
    texts = [e[6] for e in entries if len(e) == 7 and e[4]]
    ids_all = iter(fmt.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    for e in entries:
      if limit and len(problems) >= limit:
        break
      if len(e) == 4:
        i, where, err, fields = e
        skip(i, where, "bad_row", f"{where} ({err})", err.reason, err.detail, fields)
        continue
      i, where, row, question, gold, choice, _ = e
      if not gold:
        skip(i, where, "no_answer", where, "no_answer", "no gold answer (a GSM8K 'answer' without its '#### N' line, "
             "or no 'answer')")
        continue
      ids = np.asarray(next(ids_all), np.int32)
      if len(ids) > max_prompt_len:
        skip(i, where, "too_long", f"{where} ({len(ids)} tokens)", "too_long",
             f"{len(ids)} tokens, over max_prompt_len={max_prompt_len}", length=len(ids))
        continue
      summary.add(dict(index=i, where=where, bad=None, length=len(ids)))
      problems.append(dict(where=where, question=row["question"], gold=gold, prompt_ids=ids, choice=choice))
  summary.seconds = time.perf_counter() - t0
  return problems, skipped, where_skipped, summary


def _short_answer(raw) -> str | None:
  """The gold of a custom {question, answer} row: auto-detection reads it as GSM8K, whose gold is the text after
  "####"; an `answer` that is one line with no "####" is the final answer itself (a worked GSM8K solution missing
  its "####" line spans several lines and stays without a gold answer)."""
  if not isinstance(raw, dict) or rows.detect_reader(raw) != "gsm8k":
    return None
  ans = raw.get("answer")
  if isinstance(ans, (int, float)) and not isinstance(ans, bool):
    return str(ans)
  if isinstance(ans, str) and ans.strip() and "\n" not in ans.strip() and "####" not in ans:
    return ans.strip()
  return None


def prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """Powers of two from 64 up to max_prompt_len: at most ~log2(P) prompt shapes, so few sampler compiles."""
  sizes = {max_prompt_len}
  b = 64
  while b < max_prompt_len:
    sizes.add(b)
    b *= 2
  return tuple(sorted(sizes))


# ------------------------------------------------------------------------------------------------------------ run
def pass_at_1(rates) -> tuple[float | None, float | None]:
  """(mean of per-problem pass rates, its standard error std(ddof=1)/sqrt(N)); None where undefined."""
  r = np.asarray(rates, np.float64)
  if r.size == 0:
    return None, None
  return float(r.mean()), float(r.std(ddof=1) / math.sqrt(r.size)) if r.size > 1 else None


def _evaluate_benchmark(cfg, name: str, problems: list[dict], model_config, params, fmt, mesh, rules, key,
                        out_path: str) -> dict:
  n, B = cfg.num_samples, cfg.batch_size
  buckets = prompt_buckets(cfg.max_prompt_len)
  rates, lengths, truncated = [], [], 0
  bar = tqdm.tqdm(total=len(problems), desc=name, unit="problem", disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  with storage.open_file(out_path, "w") as out:  # a URL: one object, uploaded whole when complete
    for start in range(0, len(problems), B):
      chunk = problems[start: start + B]
      # A short last batch is filled with copies of its first prompt: one input shape, one compile.
      seqs = [p["prompt_ids"] for p in chunk] + [chunk[0]["prompt_ids"]] * (B - len(chunk))
      ids, mask = data.pad_left(seqs, buckets, fmt.pad_id)
      with sharding.use_mesh(mesh, rules):
        res = sampling.sample(model_config, params, ids, mask, jax.random.fold_in(key, start // B),
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p if cfg.top_p < 1 else None, eos_ids=tuple(int(i) for i in fmt.stop_ids),
                              num_samples=n, pad_id=fmt.pad_id)
      tokens, lens, finished = (np.asarray(x) for x in (res.tokens, res.lengths, res.finished))
      for j, p in enumerate(chunk):
        rows = range(j * n, (j + 1) * n)  # the sampler's rows b·n … b·n+n−1 are the samples of prompt b
        # A finished row's last token is its eos: not part of the response text.
        resp_ids = [tokens[r, : lens[r] - int(finished[r])] for r in rows]
        responses = [fmt.tokenizer.decode(x.tolist(), skip_special_tokens=False) for x in resp_ids]
        extracted = [grading.extract_answer(r) for r in responses]
        extra = {}
        if p["choice"] is not None:  # multiple choice: the letter picked, against the shuffled correct letter
          picked = [p["choice"].pick(r) for r in responses]
          verdicts = [x == p["choice"].answer for x in picked]
          extra = dict(p["choice"].record(), picked=picked)
        else:
          verdicts = [grading.is_correct(r, p["gold"]) for r in responses]
        rate = float(np.mean(verdicts))
        rates.append(rate)
        lengths.extend(int(lens[r]) for r in rows)
        truncated += sum(not finished[r] for r in rows)
        out.write(json.dumps(dict(index=start + j, where=p["where"], question=p["question"], gold=p["gold"],
                                  responses=responses, extracted=extracted, correct=verdicts, pass_rate=rate,
                                  response_tokens=[int(lens[r]) for r in rows],
                                  finished=[bool(finished[r]) for r in rows], **extra), ensure_ascii=False) + "\n")
      out.flush()
      bar.update(len(chunk))
      bar.set_postfix(pass1=f"{np.mean(rates):.3f}")
  bar.close()
  mean, se = pass_at_1(rates)
  return {"pass@1": mean, "stderr": se, "n_problems": len(problems), "n_samples": n,
          "mean_response_tokens": float(np.mean(lengths)) if lengths else None,
          "truncated_fraction": truncated / len(lengths) if lengths else None}


def markdown_table(results: dict) -> str:
  lines = ["| benchmark | pass@1 (%) | ± s.e. (%) | problems | samples each | skipped |",
           "|---|---:|---:|---:|---:|---:|"]
  pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
  for name, r in results["benchmarks"].items():
    lines.append(f"| {name} | {pct(r['pass@1'])} | {pct(r['stderr'])} | {r['n_problems']} | {r['n_samples']} | "
                 f"{sum(r['skipped'].values())} |")
  return "\n".join(lines) + "\n"


def run(cfg, workdir: str) -> dict:
  """Evaluates the model of `cfg` on every benchmark; writes the outputs under `workdir`; returns results.json."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  benchmarks = validate(cfg)
  storage.makedirs(workdir)
  model_path = loading.model_dir(cfg.model_path)  # a bucket's model: its copy in the local cache
  tok_path = loading.model_dir(cfg.tokenizer_path) or model_path
  if not model_path:  # the tiny student, built the way the tiny RL run builds it
    paths = loading.tiny_model_paths(cfg, workdir)
    model_path, tok_path = paths["student"], cfg.tokenizer_path or paths["tokenizer"]
  tokenizer = hf_checkpoint.load_tokenizer(tok_path)
  # The prompt the student was trained with (its rlt_format.json), unless the config sets one.
  fmt = loading.make_format(cfg, tokenizer, student_dir=model_path, path_field="model_path")
  loaded = []  # every benchmark read before the model loads: one that has nothing to grade stops the run at once
  for b, (name, path) in enumerate(benchmarks):
    problems, skipped, where, summary = read_problems(path, fmt, limit=cfg.limit, max_prompt_len=cfg.max_prompt_len,
                                                      seed=cfg.seed)
    for reason, places in where.items():
      if places:
        _log.warning("%s: skipped %d rows (%s), e.g. %s", name, len(places), reason, "; ".join(places[:5]))
    if not problems:
      raise ConfigError(f"config.benchmarks[{b}]: benchmark {name} has nothing to grade: {summary.error()}")
    _log.log(logging.WARNING if summary.skipped else logging.INFO, "%s: %s", name, summary.line())
    loaded.append((problems, skipped))
  mesh, rules = loading.make_mesh(cfg)
  model_config, params = loading.load_model(cfg, model_path, tokenizer, mesh, rules, dtype=cfg.dtype)
  if cfg.max_prompt_len + cfg.max_new_tokens > model_config.max_position_embeddings:
    _log.warning("max_prompt_len + max_new_tokens = %d is over the model's max_position_embeddings %d",
                 cfg.max_prompt_len + cfg.max_new_tokens, model_config.max_position_embeddings)
  _log.info("evaluate: %s; KV cache per sampler call up to %.2f GiB", model_path, sampling.kv_cache_bytes(
      model_config, cfg.batch_size, cfg.max_prompt_len, cfg.max_new_tokens, cfg.num_samples) / 2**30)
  results = {"model_path": cfg.model_path or model_path, "student_system": fmt.student_system,
             "temperature": cfg.temperature, "top_p": cfg.top_p, "num_samples": cfg.num_samples,
             "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "benchmarks": {}}
  for b, ((name, path), (problems, skipped)) in enumerate(zip(benchmarks, loaded)):
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(cfg.seed), b)
    r = _evaluate_benchmark(cfg, name, problems, model_config, params, fmt, mesh, rules, key,
                            storage.join(workdir, f"{name}.jsonl"))
    results["benchmarks"][name] = dict(r, path=path, skipped=skipped, seconds=time.perf_counter() - t0)
  table = markdown_table(results)
  storage.write_text(storage.join(workdir, "results.json"), json.dumps(results, indent=2))
  storage.write_text(storage.join(workdir, "results.md"), table)
  print("\n" + table + f"\nrlt_jax.evaluate: results in {storage.join(workdir, 'results.json')}")
  return results



if __name__ == "__main__":
  cli.cli(run)
