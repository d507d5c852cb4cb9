"""The command line of every entry point (`python -m rlt_jax.<module> --config FILE ...`) and the end-of-run
summary of an RL run. Faults a user can cause (a flag, a path, the environment) end it with one or two lines naming the
culprit and exit status 1, the traceback only with `--verbose` or RLT_JAX_VERBOSE=1: `flag_error` (an unknown
`--config.<field>` with the nearest valid names, a bad value, a config file that does not load), `check_workdir`,
ConfigError / DistributedError, `os_error_message` (a full disk, a read-only file system, a missing permission while
the run writes). A run stopped by SIGTERM / SIGUSR1 after its checkpoint exits with `preemption.STOPPED_STATUS` (75).
Any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import re
import socket

import jax
import ml_collections
import numpy as np

from rlt_jax import data, distributed, preemption, run_config, storage


def print_summary(workdir: str, start: int, steps: int) -> None:
  if jax.process_index() != 0:
    return
  path = storage.join(workdir, "metrics.jsonl")
  rows = []
  with storage.open_file(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict):
        rows.append(row)
      else:  # a damaged line: the summary goes on without it
        logging.getLogger("rlt_jax").warning("%s:%d: not a JSON object; left out of the summary", path, n)
  evals = [r for r in rows if r.get("eval/reward_mean") is not None]
  rows = [r for r in rows if "reward_mean" in r]  # training steps (a step-0 line holds only the held-out baseline)
  if not rows:
    return
  first, last = rows[:5], rows[-5:]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs if r.get(k) is not None]))  # noqa: E731
  times = {k: mean(rows, f"time_{k}") for k in ("sample", "splice", "program", "step")}
  print(f"\nrlt_jax: {steps - start} steps this run, {len(rows)} in {workdir}\n"
        f"  reward  first 5: {mean(first, 'reward_mean'):+.4f}   last 5: {mean(last, 'reward_mean'):+.4f}\n"
        f"  match rate last 5: {mean(last, 'match_rate'):.2f}   completion length last 5: "
        f"{mean(last, 'completion_len_mean'):.1f}\n"
        f"  seconds a step: {times['step']:.2f} (waiting for samples {times['sample']:.2f}, splice {times['splice']:.2f}, "
        f"the step program {times['program']:.2f})\n" + (
            f"  held-out reward  step {evals[0]['step']}: {evals[0]['eval/reward_mean']:+.4f}   step "
            f"{evals[-1]['step']}: {evals[-1]['eval/reward_mean']:+.4f}   (match rate "
            f"{evals[0]['eval/match_rate']:.2f} → {evals[-1]['eval/match_rate']:.2f})\n" if evals else "") +
        f"  metrics: {path}")


VERBOSE_ENV = "RLT_JAX_VERBOSE"
# errnos that a full disk, a read-only mount or missing permissions give: the environment, not a bug
ENV_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}


class WorkdirError(run_config.ConfigError):
  """The run directory cannot be created or written."""


def config_fields(cfg, prefix: str = "") -> list[str]:
  """Every dotted field name of a config, blocks included ("grpo", "grpo.learning_rate", ...)."""
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += config_fields(v, prefix + k + ".")
  return out


def unknown_field(cfg, field: str) -> str | None:
  """None when `field` ("grpo.learning_rate") is a field of `cfg`, else why not and the nearest valid names."""
  node, parts = cfg, field.split(".")
  for i, k in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"no such field: config.{'.'.join(parts[:i])} is a value ({node!r}), not a block of fields"
    if k not in node:
      parent = ".".join(parts[:i])
      names = [n for n in config_fields(cfg) if not parent.startswith(n)]
      scored = sorted(((difflib.SequenceMatcher(None, field, n).ratio(), n) for n in names), reverse=True)
      near = [n for s, n in scored[:3] if s >= max(0.6, scored[0][0] - 0.1)] if scored else []
      if near:
        return "no such field; did you mean " + " or ".join(f"config.{n}" for n in near) + "?"
      keys = list(node.keys())
      return (f"no such field; config{'.' + parent if parent else ''} has " + ", ".join(keys[:12])
              + (f", ... ({len(keys)} fields)" if len(keys) > 12 else ""))
    node = node[k]
  return None


def _argv_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=V` / `--name V` in argv (the last one), or None."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    if re.fullmatch(rf"--?{re.escape(name)}", a) and i + 1 < len(argv):
      value = argv[i + 1]
    elif re.match(rf"--?{re.escape(name)}=", a):
      value = a.split("=", 1)[1]
  return value


def verbose_requested(argv: list[str]) -> bool:
  """`--verbose` on the command line (read from argv: it must work when flag parsing itself failed) or
  RLT_JAX_VERBOSE=1 in the environment."""
  on = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
  for a in argv[1:]:
    if re.fullmatch(r"--?verbose(=(1|true|t|yes|y))?", a, re.I):
      on = True
    elif re.fullmatch(r"--?(noverbose|verbose=(0|false|f|no|n))", a, re.I):
      on = False
  return on


def flag_error(argv: list[str], error: Exception, config_parser) -> str | None:
  """The one-line message for a command line that failed to parse (None: not one this knows; the traceback stays):
  an unknown `--config.<field>` (with the nearest valid names), a value of the wrong type, a config file that cannot
  be loaded, any other absl flag error."""
  from absl import flags
  path = _argv_value(argv, "config")
  cfg = None
  if path is not None:
    try:
      cfg = config_parser.parse(path)
      cfg.keys()  # a file that failed to load gives an object that raises here
    except (OSError, SyntaxError) as e:  # a missing file, a file that is not Python
      if not isinstance(error, flags.Error):
        return f"error: --config={path}: cannot load it: {_first_line(e)}"
      cfg = None
    except Exception:  # noqa: BLE001 -- a bug in the config file: its traceback stays
      return None
  if cfg is not None:
    for a in argv[1:]:
      m = re.match(r"--?(?:no)?config\.([^=]+)", a)
      why = m and unknown_field(cfg, m.group(1))
      if why:
        return f"error: --config.{m.group(1)}: {why}"
  if isinstance(error, flags.Error):
    msg = str(error).strip()
    m = re.match(r"flag (--config\.([\w.]+))=", msg)
    if m and cfg is not None and not unknown_field(cfg, m.group(2)):
      node = cfg
      for k in m.group(2).split("."):
        node = node[k]
      msg += (f" (config.{m.group(2)} is a block: set its fields, --config.{m.group(2)}.<field>=...)"
              if isinstance(node, ml_collections.ConfigDict) else
              f" (config.{m.group(2)} is of type {type(node).__name__}; the config file has {node!r})")
    return f"error: {msg.removeprefix('flag ')}"
  return None


def _first_line(e, limit: int = 300) -> str:
  """The line of an error's text that says what went wrong (the last non-empty one: ml_collections puts the
  attempted paths' errors last; a one-line message is itself), cut at `limit` characters."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  text = lines[-1] if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


def check_workdir(path: str, flag: str) -> None:
  """Creates the run directory and writes and removes a probe file in it; a WorkdirError `<flag>=<path>: <why>`
  when that fails (a file, not writable, a read-only file system, a full disk, ...)."""
  where = f"{flag}={path}"
  if not path:
    raise WorkdirError(f"{flag}='': must name a directory")
  if storage.is_url(path):
    return _check_bucket(path, where)
  probe = os.path.join(path, f".rlt_jax_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "w") as f:
      f.write("probe\n")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    try:
      os.remove(probe)  # created, then the write failed (a full disk)
    except OSError:
      pass
    if os.path.exists(path) and not os.path.isdir(path):
      why = "is a file, not a directory"
    elif isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
      part = next((p for p in _parents(path) if os.path.exists(p) and not os.path.isdir(p)), None)
      why = f"{part} is a file, not a directory" if part else "a part of the path is not a directory"
    elif e.errno in ENV_ERRNOS:
      why = f"not writable: {ENV_ERRNOS[e.errno]} ({errno.errorcode[e.errno]})"
    else:
      why = f"cannot be created or written: {e.strerror or e}"
    raise WorkdirError(f"{where}: {why}") from e


def _check_bucket(url: str, where: str) -> None:
  """A workdir URL: a probe object written and deleted (the bucket exists and takes writes)."""
  probe = storage.join(url, f".rlt_jax_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    storage.write_text(probe, "probe\n")
    storage.remove(probe)
  except Exception as e:  # noqa: BLE001 -- fsspec's errors differ by backend (no bucket, no permission, no network)
    raise WorkdirError(f"{where}: cannot be written: {_first_line(e)}") from e


def _parents(path: str) -> list[str]:
  """The path's ancestors, outermost first."""
  out, p = [], os.path.abspath(path)
  while os.path.dirname(p) != p:
    p = os.path.dirname(p)
    out.append(p)
  return out[::-1]


def _env_errno(text: str) -> int | None:
  """The errno of ENV_ERRNOS whose strerror ("No space left on device", ...) `text` holds, if any."""
  low = text.lower()
  return next((n for n in ENV_ERRNOS if os.strerror(n).lower() in low), None)


def os_error_message(error: BaseException, workdir: str | None = None) -> str | None:
  """The short message (one or two lines) for an exception caused by the environment (a full disk, a read-only file
  system, missing permissions) anywhere in its chain of causes, naming the path where it is known (else the
  `workdir` the run writes to); None for anything else (a bug keeps its traceback). Libraries that write through their
  own I/O (orbax / tensorstore) report such an error as text (`ValueError: RESOURCE_EXHAUSTED: ... "/path/...": ...
  No space left on device`), not as an OSError: its text is matched too."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in ENV_ERRNOS:
      n, path, detail = e.errno, e.filename, ""
    else:
      n = _env_errno(str(e))
      m = n and re.search(r"[\"'](/[^\"']+)[\"']", str(e))
      path, detail = (m.group(1) if m else None), f"\n  ({_first_line(e, 200)})"
    if n:
      where = f"{path}: " if path else ""
      during = "" if path or not workdir else f" while writing the run's outputs (workdir {workdir})"
      return f"error: {where}{ENV_ERRNOS[n]} ({errno.errorcode[n]}){during}{_hint(n)}{detail}"
    e = e.__cause__ or e.__context__
  return None


class QuietEnvErrors(logging.Filter):
  """Shortens library log records about a full disk, a read-only file system or a missing permission: the first
  becomes one line without its traceback, later ones are dropped (orbax logs one traceback a background thread,
  hundreds of lines for one full disk). The error itself reaches the main thread and is reported there."""

  def __init__(self):
    super().__init__()
    self.shown = None  # the record shown (a logger's and its handlers' filters all see it)

  def filter(self, record: logging.LogRecord) -> bool:
    if record is self.shown:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += "\n" + str(record.exc_info[1])
    if _env_errno(text) is None:
      return True
    if self.shown is not None:
      return False
    self.shown = record
    record.msg, record.args = _first_line(record.getMessage(), 300), ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _hint(n: int) -> str:
  if n in (errno.ENOSPC, errno.EDQUOT):
    return "; free space there (or choose another --workdir) and run the same command again"
  return "; make it writable (or choose another --workdir) and run the same command again"


def _quiet_closed_loop(hook):
  """`sys.unraisablehook` without "RuntimeError: Event loop is closed": after a failed asynchronous checkpoint
  write, tensorstore's callbacks reach orbax's closed event loop, one traceback each (dozens for one full disk)."""
  def quiet(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      hook(unraisable)
  return quiet


def cli(run) -> None:
  """The command line of every entry point: `--config FILE [--workdir DIR] [--config.field=value ...] [--verbose]`,
  then `run(config, workdir)`. Every error the user can cause by a flag, a path or the environment ends the program
  with one or two lines naming it and exit status 1: an unknown `--config.<field>` (with the nearest valid names) or a
  bad value, a config file that does not load, an unusable workdir (checked first: created, a probe file written and
  removed), a ConfigError or DistributedError from the run, a full disk / read-only file system / missing permission
  while it writes. The traceback of these only with `--verbose` or RLT_JAX_VERBOSE=1; any other exception is a bug
  and keeps its traceback."""
  import sys
  import traceback

  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (default: the config's `workdir`).")
  flags.DEFINE_bool("verbose", False, f"Print the traceback of handled errors too (or set {VERBOSE_ENV}=1).")
  flags.mark_flag_as_required("config")
  dist = distributed.define_flags()

  def fail(message: str):
    if verbose_requested(sys.argv):
      traceback.print_exc()
    sys.exit(message)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- a bug in parsing keeps its traceback: re-raised when not known
      message = flag_error(argv, e, flags.FLAGS["config"].parser)
      if message is None:
        raise
      fail(message)

  def main(argv):
    del argv
    if not verbose_requested(sys.argv):
      quiet = QuietEnvErrors()
      for logger in (logging.getLogger(), logging.getLogger("absl")):
        logger.addFilter(quiet)
        for handler in logger.handlers:
          handler.addFilter(quiet)
      sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    wd = None
    try:
      try:
        cfg = config.value
        cfg.keys()  # a config file that failed to load raises here
      except OSError as e:
        raise run_config.ConfigError(f"--config={_argv_value(sys.argv, 'config')}: cannot load it: "
                                     f"{_first_line(e)}") from e
      wd = workdir.value or cfg.workdir
      check_workdir(wd, "--workdir" if workdir.value else "config.workdir")
      # Before anything touches JAX devices; a no-op for one process.
      distributed.initialize(**{k: v.value for k, v in dist.items()})
      run(cfg, wd)
    except preemption.Stopped as e:  # a signal: checkpointed; the launcher (or the user) runs the same command again
      print(f"rlt_jax: {e} (exit status {preemption.STOPPED_STATUS})", file=sys.stderr)
      sys.exit(preemption.STOPPED_STATUS)
    except (run_config.ConfigError, distributed.DistributedError, data.BadRowError, data.NoUsableRowsError) as e:
      fail(f"error: {e}")  # (the data's: strict mode's bad row, an epoch of the stream with no usable row)
    except Exception as e:  # noqa: BLE001 -- only the environment's errors are shortened; a bug is re-raised
      message = os_error_message(e, wd)
      if message is None:
        raise
      fail(message)

  app.run(main, flags_parser=parse)
