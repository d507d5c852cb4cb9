"""Paths that are local files or URLs (`gs://bucket/dir`, or any fsspec / etils-epath URL), for every path a run
reads or writes: the workdir, data files, model directories, exports and result files.

URLs go through fsspec (gcsfs for `gs://`). What needs a local file is served from a cache directory
(`cache_dir()`: `$RLT_JAX_CACHE`, else `~/.cache/rlt_jax`): `local_copy` / `local_model_dir` stream a bucket's files
to disk one at a time (never a whole checkpoint in host memory) and skip a file already there with the same size, so
a second run reuses the copy. Appended files (`Mirror`) are kept in a local copy and uploaded as one whole object
(an object store has no append; a whole-object write is atomic, so a reader never sees a torn line).
Orbax checkpoints need none of this: orbax and tensorstore write URLs directly.
"""
from __future__ import annotations

import hashlib
import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Weight formats other than safetensors that Hugging Face repos carry beside them: never needed, never copied.
_SKIP_MODEL_FILES = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt")


def is_url(path) -> bool:
  return bool(path) and bool(_URL.match(os.fspath(path)))


def _fs(path):
  """(fsspec filesystem, path as the filesystem names it), its listing cache dropped: other writers (tensorstore,
  another process) change a bucket behind fsspec's back."""
  import fsspec
  fs, p = fsspec.core.url_to_fs(os.fspath(path))
  fs.invalidate_cache()
  return fs, p


def join(base, *parts) -> str:
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def abspath(path) -> str:
  """A URL unchanged; a local path made absolute."""
  return os.fspath(path) if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def isfile(path) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def listdir(path) -> list[str]:
  """Names (not paths) in a directory; [] for a URL prefix that holds nothing."""
  if not is_url(path):
    return os.listdir(path)
  fs, p = _fs(path)
  if not fs.exists(p):
    return []
  return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False, refresh=True)} - {""})


def makedirs(path) -> None:
  """A local directory (and its parents); nothing for a URL (an object store has no directories)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def open_file(path, mode: str = "r", **kw):
  """`open` for a local path or a URL. Writing a URL uploads one object when the file is closed."""
  if not is_url(path):
    return open(path, mode, **kw)
  fs, p = _fs(path)
  return fs.open(p, mode, **kw)


def remove(path) -> None:
  if not is_url(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  fs.rm(p)


def move(src, dst) -> None:
  """Renames a file or directory (a URL: copied, then the source deleted)."""
  if not is_url(src):
    os.replace(src, dst)
    return
  fs, p = _fs(src)
  fs.mv(p, _fs(dst)[1], recursive=True)


def write_text(path, text: str) -> None:
  """The whole file at once, never half-written: a local path through a temporary file and `os.replace`, a URL as
  one object upload (visible only once complete)."""
  if is_url(path):
    fs, p = _fs(path)
    fs.pipe_file(p, text.encode("utf-8"))
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def upload(local: str, url: str) -> None:
  """A local file to `url` as one object (streamed from disk)."""
  fs, p = _fs(url)
  fs.put_file(local, p)


def upload_dir(local: str, url: str) -> None:
  """Every file directly in `local` to `url`/<name>, one at a time."""
  for name in sorted(os.listdir(local)):
    if os.path.isfile(os.path.join(local, name)):
      upload(os.path.join(local, name), join(url, name))


def cache_dir() -> str:
  """Where URLs are copied to and URL outputs staged: `$RLT_JAX_CACHE`, else `~/.cache/rlt_jax`."""
  return os.environ.get("RLT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlt_jax")


def cache_path(url: str, cache: str | None = None, kind: str = "files") -> str:
  """The local path `url` maps to under the cache: <cache>/<kind>/<scheme>/<bucket>/<path>."""
  scheme, rest = os.fspath(url).split("://", 1)
  parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
  return os.path.join(cache or cache_dir(), kind, scheme, *parts)


def scratch_dir(url: str, cache: str | None = None) -> str:
  """A local directory of this machine's own for the run at `url` (staged outputs, TensorBoard events, tiny
  models), named by the URL's hash so two runs never share one."""
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.fspath(url).split("://", 1)[-1])[-60:]
  path = os.path.join(cache or cache_dir(), "runs", f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:10]}")
  os.makedirs(path, exist_ok=True)
  return path


def _fetch(fs, remote: str, size: int, local: str) -> bool:
  """Copies one object to `local` (streamed to disk, then renamed into place) unless a file of that size is there;
  True when it was copied."""
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return False
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.part{os.getpid()}"
  fs.get_file(remote, tmp)
  os.replace(tmp, local)
  return True


def local_copy(path, cache: str | None = None) -> str:
  """A local path holding `path`: a local path itself; a URL's file, or its directory's files (recursively), copied
  into the cache (reused when already there with the same sizes). FileNotFoundError when the URL holds nothing."""
  path = os.fspath(path)
  if not is_url(path):
    return path
  fs, p = _fs(path)
  local = cache_path(path, cache)
  if fs.isfile(p):
    _fetch(fs, p, fs.size(p), local)
    return local
  found = fs.find(p, detail=True)
  if not found:
    raise FileNotFoundError(f"{path}: no such file or directory")
  for remote, info in found.items():
    _fetch(fs, remote, int(info["size"]), os.path.join(local, os.path.relpath(remote, p)))
  return local


def local_model_dir(path, cache: str | None = None) -> str:
  """A local Hugging Face model (or tokenizer) directory holding `path`'s files: a local path itself; a URL's
  top-level files (config.json, tokenizer files, *.safetensors and their index, rlt_format.json, ...) copied one at a
  time into the cache, skipping other weight formats (.bin, .pt, ...) and files already there with the same size."""
  path = os.fspath(path)
  if not is_url(path):
    return path
  fs, p = _fs(path)
  entries = fs.ls(p, detail=True, refresh=True) if fs.isdir(p) else []
  files = [e for e in entries if e["type"] == "file" and not e["name"].endswith(_SKIP_MODEL_FILES)]
  if not files:
    raise FileNotFoundError(f"{path}: no model files there")
  local = cache_path(path, cache, kind="models")
  for e in files:
    _fetch(fs, e["name"], int(e["size"]), os.path.join(local, e["name"].rstrip("/").rsplit("/", 1)[-1]))
  return local


class Mirror:
  """A file that grows by appends (a jsonl of results or metrics) at a local path or a URL. Writers append to
  `local`; `sync()` makes the destination hold it: nothing for a local path (it is the file itself), one whole-object
  upload for a URL. A URL's object is first downloaded (the run resumes where the object ends)."""

  def __init__(self, path: str, scratch: str | None = None):
    self.path = os.fspath(path)
    self.remote = is_url(self.path)
    if not self.remote:
      self.local = self.path
      return
    self.local = os.path.join(scratch or scratch_dir(self.path.rsplit("/", 1)[0]), self.path.rsplit("/", 1)[-1])
    os.makedirs(os.path.dirname(self.local), exist_ok=True)
    fs, p = _fs(self.path)
    if fs.exists(p):
      fs.get_file(p, self.local)
    elif os.path.exists(self.local):
      os.remove(self.local)  # a stale copy of an earlier run at the same URL
    self._synced = self._stamp()

  def _stamp(self):
    if not os.path.exists(self.local):
      return None
    st = os.stat(self.local)
    return st.st_mtime_ns, st.st_size

  def sync(self) -> None:
    if not self.remote or not os.path.exists(self.local) or self._stamp() == self._synced:
      return
    upload(self.local, self.path)
    self._synced = self._stamp()
