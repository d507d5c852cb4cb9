"""The command line's faults (rlt_jax.cli): every error a user can cause by a flag, a path or the environment ends
with exit status 1 and one or two lines naming it; the traceback only with --verbose or RLT_JAX_VERBOSE=1; a bug keeps
its traceback. `PROBES` is the table the CLI subprocesses run: append a probe for each new fault a user can cause."""
import dataclasses
import errno
import json
import logging
import os
import re
import subprocess
import sys
from typing import Callable

import pytest

from conftest import REPO
from rlt_jax import cli, run_config


@dataclasses.dataclass
class Probe:
  """`python -m <module> --config <config> <argv...>` in the repo, its output (stdout and stderr together) checked.

  argv, config and prelude may hold {tmp} (the test's tmp_path) and, with `assets`, {teacher} {student}
  {tokenizer} (the session's tiny models; without `assets` no model is ever needed: the probe must stop before any
  loads). `prelude` is Python run in the process before the module (to simulate what a test cannot cause for real:
  a full disk, a read-only mount); `setup(tmp)` prepares files; `max_lines` bounds the non-empty output lines
  (None: not bounded)."""
  name: str
  argv: list
  status: int
  pattern: str  # re.search over the output, re.M
  max_lines: int | None = 2
  module: str = "rlt_jax.train"
  config: str = "configs/tiny.py"
  env: dict = dataclasses.field(default_factory=dict)
  prelude: str = ""
  setup: Callable | None = None
  assets: bool = False


def _file(name, text=""):
  return lambda tmp: (tmp / name).write_text(text)


def _raise_in_setup(exc: str) -> str:
  """A prelude making the run's first step (`loading.setup`, after the CLI's checks) raise `exc`."""
  return f"import errno, rlt_jax.loading as L\ndef boom(*a, **k):\n  {exc}\nL.setup = boom\n"


_READ_ONLY = """import errno, os
_makedirs = os.makedirs
def makedirs(p, *a, **k):
  if str(p).startswith("{tmp}/ro"):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
  return _makedirs(p, *a, **k)
os.makedirs = makedirs
"""

_ORBAX_FULL = ("raise ValueError('RESOURCE_EXHAUSTED: Error writing \"opt_state/0\" in OCDBT database at local file '"
               "'\"{tmp}/run/checkpoints/1\": Failed to write 1265603 bytes to file 4: No space left on device "
               "[os_error_code=28]')")


def _damaged_distill(tmp):
  """A distill workdir holding items 0 and 2 with a damaged line between them: item 1 is redone."""
  (tmp / "run").mkdir()
  (tmp / "run" / "distill.jsonl").write_text('{"index": 0}\n{"index": 1, "reas\n{"index": 2}\n')


def _unusable_rows(tmp):
  """Rows of other layouts: a parquet with other column names, a jsonl whose rows miss the solution."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist([{"query": "1+1?", "response": "2"}, {"query": "2+2?", "response": "4"}]),
                 tmp / "other.parquet")
  (tmp / "missing.jsonl").write_text('{"question": "1+1?"}\n{"question": "2+2?"}\n')


_MODELS = ["--config.teacher_path={teacher}", "--config.student_path={student}", "--config.tokenizer_path={tokenizer}"]
_NO_USABLE_ROW = r"^error: config\.data\.path: no usable row in \S+/{file}: all 2 rows skipped \(missing_field 2\); " \
    r"first skipped: \S+/{file}{where} \(missing_field: field '{field}' is missing; its fields: {fields}\)"

PROBES = [
    # unknown fields: the flag and the nearest valid names; a value of the wrong type: the flag and the type
    Probe("unknown_field", ["--config.grpo.learnin_rate=1e-6"], 1,
          r"^error: --config\.grpo\.learnin_rate: no such field; did you mean config\.grpo\.learning_rate\?$", 1),
    Probe("unknown_top_field", ["--config.stpes=3"], 1,
          r"^error: --config\.stpes: no such field; did you mean config\.steps\?$", 1),
    Probe("unknown_block", ["--config.zzz.x=1"], 1,
          r"^error: --config\.zzz\.x: no such field; config has \w+, \w+, .*, \.\.\. \(\d+ fields\)$", 1),
    Probe("unknown_field_distill", ["--config.distill.candidatse=2"], 1,
          r"^error: --config\.distill\.candidatse: no such field; did you mean config\.distill\.candidates\?$", 1,
          module="rlt_jax.distill", config="configs/distill_tiny.py"),
    Probe("bad_value_type", ["--config.steps=abc"], 1,
          r"^error: --config\.steps=abc: .*\(config\.steps is of type int; the config file has \d+\)$", 1),
    Probe("missing_config_file", [], 1, r"^error: --config=\S+/no_such\.py: cannot load it: .*No such file", 1,
          config="{tmp}/no_such.py"),
    # an unusable workdir: --workdir and why, before any model loads
    Probe("workdir_is_a_file", ["--workdir={tmp}/file"], 1, r"^error: --workdir=\S+/file: is a file, not a directory$",
          1, setup=_file("file")),
    Probe("workdir_under_a_file", ["--workdir={tmp}/file/run"], 1,
          r"^error: --workdir=\S+/file/run: \S+/file is a file, not a directory$", 1, setup=_file("file")),
    Probe("workdir_is_a_file_evaluate", ["--workdir={tmp}/file"], 1,
          r"^error: --workdir=\S+/file: is a file, not a directory$", 1, module="rlt_jax.evaluate",
          config="configs/eval_tiny.py", setup=_file("file")),
    Probe("workdir_root_cannot_write", ["--workdir=/sys/rlt_jax_probe/run"], 1,  # EPERM here, EROFS in some containers
          r"^error: --workdir=/sys/rlt_jax_probe/run: not writable: ", 1),
    Probe("workdir_read_only_fs", ["--workdir={tmp}/ro/run"], 1,  # simulated: mounting needs privileges
          r"^error: --workdir=\S+/ro/run: not writable: read-only file system \(EROFS\)$", 1, prelude=_READ_ONLY),
    # the environment failing during the run (simulated in the run's first step): the path and the errno's meaning
    Probe("disk_full_orbax", ["--workdir={tmp}/run"], 1,
          r"^error: \S+/run/checkpoints/1: no space left on device \(ENOSPC\); free space", 2,
          prelude=_raise_in_setup(_ORBAX_FULL)),
    Probe("disk_full_no_path", ["--workdir={tmp}/run"], 1,
          r"^error: no space left on device \(ENOSPC\) while writing the run's outputs \(workdir \S+/run\); ", 1,
          prelude=_raise_in_setup("raise RuntimeError('write failed') from OSError(errno.ENOSPC, 'No space left')")),
    # the traceback: with --verbose or RLT_JAX_VERBOSE=1 only; a bug always keeps it
    Probe("verbose_flag", ["--config.stpes=3", "--verbose"], 1,
          r"^Traceback[\s\S]*^error: --config\.stpes: no such field", None),
    Probe("verbose_env", ["--workdir={tmp}/file"], 1, r"^Traceback[\s\S]*^error: --workdir=\S+/file: is a file",
          None, env={cli.VERBOSE_ENV: "1"}, setup=_file("file")),
    Probe("bug_keeps_traceback", ["--workdir={tmp}/run"], 1, r"^Traceback[\s\S]*^RuntimeError: a bug$", None,
          prelude=_raise_in_setup("raise RuntimeError('a bug')")),
    # data with no usable row: stops at start (no endless epochs), naming the file, the counts and the first row
    Probe("no_usable_row_train", ["--workdir={tmp}/run", "--config.data.path={tmp}/other.parquet"] + _MODELS, 1,
          _NO_USABLE_ROW.format(file=r"other\.parquet", where=r"\[row 0\]", field="question",
                                fields="query, response"), 3, setup=_unusable_rows, assets=True),
    Probe("no_usable_row_sft", ["--workdir={tmp}/run", "--config.data.path={tmp}/missing.jsonl",
                                "--config.model_path={teacher}", "--config.tokenizer_path={tokenizer}"], 1,
          _NO_USABLE_ROW.format(file=r"missing\.jsonl", where=":1", field="solution", fields="question"), 3,
          module="rlt_jax.sft", config="configs/sft_tiny.py", setup=_unusable_rows, assets=True),
    Probe("no_usable_row_distill", ["--workdir={tmp}/run", "--config.data.path={tmp}/missing.jsonl"] + _MODELS, 1,
          _NO_USABLE_ROW.format(file=r"missing\.jsonl", where=":1", field="solution", fields="question"), 3,
          module="rlt_jax.distill", config="configs/distill_tiny.py", setup=_unusable_rows, assets=True),
    # a benchmark that grades nothing: exit status 1, not a silent success
    Probe("evaluate_grades_nothing", ["--workdir={tmp}/run", "--config.benchmarks=bad={tmp}/other.parquet",
                                      "--config.model_path={student}", "--config.tokenizer_path={tokenizer}"], 1,
          r"^error: config\.benchmarks\[0\]: benchmark bad has nothing to grade: no usable row in \S+/other\.parquet",
          3, module="rlt_jax.evaluate", config="configs/eval_tiny.py", setup=_unusable_rows, assets=True),
    # distill's own output: a damaged line is reported as file:line and its item redone (exit 0)
    Probe("distill_damaged_line", ["--workdir={tmp}/run", "--config.teacher_path={teacher}",
                                   "--config.student_path={student}", "--config.tokenizer_path={tokenizer}",
                                   "--config.distill.limit=3", "--config.distill.items_per_batch=1",
                                   "--config.distill.candidates=1", "--config.max_new_tokens=8",
                                   "--config.distill.export_dataset=False"], 0,
          r"\S+/run/distill\.jsonl:2: damaged line .*its item will be done again", None, module="rlt_jax.distill",
          config="configs/distill_tiny.py", setup=_damaged_distill, assets=True),
]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_probe(probe, tmp_path, request):
  if "/sys/" in " ".join(probe.argv) and not os.path.isdir("/sys/kernel"):
    pytest.skip("no sysfs here")
  names = dict(tmp=str(tmp_path))
  if probe.assets:
    names.update(request.getfixturevalue("assets"))
  fill = lambda s: s.format(**names)  # noqa: E731
  if probe.setup:
    probe.setup(tmp_path)
  argv = ["--config", fill(probe.config)] + [fill(a) for a in probe.argv]
  code = (fill(probe.prelude) + f"\nimport runpy, sys\nsys.argv[0] = {probe.module!r}\n"
          f"runpy.run_module({probe.module!r}, run_name='__main__', alter_sys=True)\n")
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV} | probe.env
  proc = subprocess.run([sys.executable, "-c", code] + argv, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  out = (proc.stdout + proc.stderr).replace("\r", "\n")
  lines = [ln for ln in out.splitlines() if ln.strip() and not re.match(r"^\S+:\s+\d+%\|", ln)]  # no progress bars
  shown = "\n".join(lines[-40:])
  assert proc.returncode == probe.status, shown
  assert re.search(probe.pattern, "\n".join(lines), re.M), shown
  if probe.max_lines is not None:
    assert len(lines) <= probe.max_lines, shown


def test_distill_damaged_line_probe_redid_only_that_item(tmp_path):
  """What the distill_damaged_line probe's setup leaves to do: the damaged line's item only (items 0 and 2 done)."""
  _damaged_distill(tmp_path)
  from rlt_jax import distill
  assert distill._jsonl_done(str(tmp_path / "run" / "distill.jsonl")) == {0, 2}


# ------------------------------------------------------------------------------------- the handlers, in-process
def test_unknown_field_names_the_nearest_fields():
  cfg = run_config.default_config()
  assert cli.unknown_field(cfg, "grpo.learning_rate") is None
  assert cli.unknown_field(cfg, "grpo.learnin_rate") == "no such field; did you mean config.grpo.learning_rate?"
  assert "config.grpo.learning_rate" in cli.unknown_field(cfg, "learning_rate")  # a nested field typed at the top
  assert cli.unknown_field(cfg, "steps.x").startswith("no such field: config.steps is a value")
  assert cli.unknown_field(cfg, "data.zzzzzz").startswith("no such field; config.data has ")


def test_check_workdir(tmp_path):
  cli.check_workdir(str(tmp_path / "a" / "b"), "--workdir")
  assert os.listdir(tmp_path / "a" / "b") == []  # created, the probe file removed
  (tmp_path / "f").write_text("")
  with pytest.raises(cli.WorkdirError, match=r"^--workdir=\S+/f: is a file, not a directory$"):
    cli.check_workdir(str(tmp_path / "f"), "--workdir")
  with pytest.raises(cli.WorkdirError, match=r"^config\.workdir='': must name a directory$"):
    cli.check_workdir("", "config.workdir")
  assert issubclass(cli.WorkdirError, run_config.ConfigError)


def test_os_error_message():
  """A full disk, a read-only file system, a missing permission anywhere in the chain of causes; as an OSError (its
  path), as a library's text (the quoted path in it) or without a path (the workdir); anything else: None."""
  def chained(outer, inner):
    try:
      try:
        raise inner
      except BaseException as e:
        raise outer from e
    except BaseException as e:
      return e

  full = OSError(errno.ENOSPC, "No space left on device", "/w/distill.jsonl")
  assert cli.os_error_message(full) == ("error: /w/distill.jsonl: no space left on device (ENOSPC); free space there "
                                        "(or choose another --workdir) and run the same command again")
  ro = chained(RuntimeError("save failed"), OSError(errno.EROFS, "Read-only file system", "/w/ckpt"))
  assert cli.os_error_message(ro).startswith("error: /w/ckpt: read-only file system (EROFS); make it writable")
  text = ValueError('RESOURCE_EXHAUSTED: Error writing "x" at local file "/w/checkpoints/3": No space left on device')
  msg = cli.os_error_message(chained(RuntimeError("Save Finalize thread failed"), text))
  assert msg.startswith("error: /w/checkpoints/3: no space left on device (ENOSPC);") and msg.count("\n") == 1
  assert "while writing the run's outputs (workdir /w)" in cli.os_error_message(OSError(errno.EACCES, "x"), "/w")
  assert cli.os_error_message(FileNotFoundError(errno.ENOENT, "No such file", "/w/x")) is None  # not the environment
  assert cli.os_error_message(RuntimeError("a bug")) is None


def test_library_logs_about_a_full_disk_shrink_to_one_line():
  quiet = cli.QuietEnvErrors()
  try:
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
  except ValueError:
    exc = sys.exc_info()
  rec = lambda msg, exc_info=None: logging.LogRecord("absl", logging.ERROR, "f.py", 1, msg, (), exc_info)  # noqa
  first, again, other = rec("thread raised: No space left on device", exc), rec("commit failed", exc), rec("other")
  assert quiet.filter(first) and first.exc_info is None and quiet.filter(first)  # shown once, no traceback
  assert not quiet.filter(again) and quiet.filter(other)
  # tensorstore's callbacks reaching orbax's closed event loop after the failed write: dropped; anything else shown
  seen = []
  hook = cli._quiet_closed_loop(seen.append)
  for text in ("Event loop is closed", "something else"):
    hook(type("Unraisable", (), dict(exc_value=RuntimeError(text)))())
  assert [u.exc_value.args[0] for u in seen] == ["something else"]
