"""Hugging Face checkpoints in and out: `config.json` + `model.safetensors` (or a sharded index).

Loading memory-maps each safetensors file and builds every param with `jax.make_array_from_callback`: each device
reads only its own slice of one tensor at a time, straight into its `NamedSharding`, so no second full copy of the
model is ever held on the host. Saving streams one tensor at a time, gathered to process 0, into files that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from rlt_jax import precision, sharding, storage
from rlt_jax.models import decoder
from rlt_jax.models.config import ModelConfig
from rlt_jax.models.family import family_of

_ST_TO_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}
SAFE_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


class SafetensorsFile:
  """A read-only, memory-mapped safetensors file: `get(name)` is a lazy NumPy view."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      try:
        self.header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    self.header.pop("__metadata__", None)
    self._data_start = 8 + n
    self._mm = np.memmap(path, dtype=np.uint8, mode="r")

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _ST_TO_NP:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = self._mm[self._data_start + start:self._data_start + end]
    return raw.view(_ST_TO_NP[info["dtype"]]).reshape(info["shape"])


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _open_files(path: str) -> dict[str, SafetensorsFile]:
  """Tensor name -> the open file that holds it."""
  single, index = os.path.join(path, SAFE_NAME), os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
    return {name: files[fn] for name, fn in weight_map.items()}
  if os.path.isfile(single):
    f = SafetensorsFile(single)
    return {name: f for name in f.header}
  raise FileNotFoundError(f"{path}: neither {SAFE_NAME} nor {INDEX_NAME} found")


def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None, rules=None,
            on_indivisible: str = "replicate", config: ModelConfig | None = None):
  """(config, params) from a Hugging Face model directory.

  With a mesh, every param lands on its NamedSharding from the sharding rules (default: the active rules); without
  one, on the first device. `dtype` sets the params' storage dtype (default: `config.param_dtype`, float32).
  """
  path = os.fspath(path)
  config = config or ModelConfig.from_hf(path)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  files = _open_files(path)
  shapes = decoder.param_shapes(config)
  if mesh is not None:
    shardings = sharding.tree_shardings(decoder.param_logical_axes(config), shapes, mesh, rules, on_indivisible)
  else:
    device = jax.local_devices()[0]
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), shapes)

  def source(name):
    if name not in files:
      raise KeyError(f"{path}: tensor {name!r} is missing from the checkpoint")
    return files[name].get(name)

  params: dict = {}
  for t in family_of(config).hf_tensors(config):
    shape, target = _get(shapes, t.path), _get(shapes, t.path).dtype
    names = [t.hf_name.format(i) for i in range(config.num_layers)] if t.per_layer else [t.hf_name]
    views = [t.to_ours(source(n)) for n in names]
    expected = shape.shape[1:] if t.per_layer else shape.shape
    for n, v in zip(names, views):
      if tuple(v.shape) != tuple(expected):
        raise ValueError(f"{path}: tensor {n!r} has shape {v.shape} after layout, expected {expected}")

    def read(index, views=views, per_layer=t.per_layer, target=target):
      if per_layer:
        return np.stack([np.asarray(v[index[1:]], dtype=target) for v in views[index[0]]])
      return np.asarray(views[0][index], dtype=target)

    _set(params, t.path, jax.make_array_from_callback(shape.shape, _get(shardings, t.path), read))
  return config, params


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every process's host (an all-gather across processes when it spans several)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(config: ModelConfig, params, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
            tokenizer=None, dtype: str | None = None) -> None:
  """Writes `config.json` and safetensors (sharded above `max_shard_bytes`), one tensor in host memory at a time.

  `dtype` ("float32", "bfloat16", ...): the tensors' dtype in the files (default: the params' own, e.g. the fp32
  masters of a mixed-precision run), also written as the config's `torch_dtype`.
  Every process must call it (multi-host arrays are gathered); only process 0 writes. A URL `path` (gs://...): each
  file is written to a local staging directory (`storage.scratch_dir`), uploaded, then deleted there, so the disk
  holds at most one shard at a time.
  """
  path = os.fspath(path)
  writer = jax.process_index() == 0
  url, path = (path, storage.scratch_dir(path)) if storage.is_url(path) else (None, path)
  publish = (lambda name: _publish(path, url, name)) if url and writer else (lambda name: None)
  if dtype:
    config = config.replace(param_dtype=dtype)  # validates the name
  else:
    config = config.replace(param_dtype=str(jax.tree.leaves(params)[0].dtype))
  entries = []  # (hf name, shape, dtype, thunk)
  for t in family_of(config).hf_tensors(config):
    arr = _get(params, t.path)
    dt = precision.numpy_dtype(config.param_dtype)
    if t.per_layer:
      for i in range(config.num_layers):
        hf_shape = t.to_hf(np.empty(arr.shape[1:], np.uint8)).shape
        entries.append((t.hf_name.format(i), hf_shape, dt, lambda a=arr, i=i, f=t.to_hf: f(_to_host(a[i]))))
    else:
      hf_shape = t.to_hf(np.empty(arr.shape, np.uint8)).shape
      entries.append((t.hf_name, hf_shape, dt, lambda a=arr, f=t.to_hf: f(_to_host(a))))

  shards, size = [[]], 0
  for e in entries:
    nbytes = int(np.prod(e[1])) * e[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  if writer:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config.to_hf_dict(), f, indent=2)
    publish("config.json")
    for stale in (SAFE_NAME, INDEX_NAME):
      if storage.exists(storage.join(url or path, stale)):
        storage.remove(storage.join(url or path, stale))
  names = [SAFE_NAME] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fn, shard in zip(names, shards):
    _write_safetensors(os.path.join(path, fn), shard, writer)
    publish(fn)
    weight_map.update({e[0]: fn for e in shard})
  if writer and len(shards) > 1:
    total = sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)
    with open(os.path.join(path, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    publish(INDEX_NAME)
  if writer and tokenizer is not None:
    tokenizer.save_pretrained(path)
    if url:
      for name in sorted(os.listdir(path)):
        publish(name)


def _publish(local_dir: str, url: str, name: str) -> None:
  """Uploads local_dir/name to url/name and deletes the local file (an export to a bucket)."""
  storage.upload(os.path.join(local_dir, name), storage.join(url, name))
  os.remove(os.path.join(local_dir, name))


def _write_safetensors(file: str, entries, writer: bool) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dt, _ in entries:
    nbytes = int(np.prod(shape)) * dt.itemsize
    header[name] = {"dtype": _NP_TO_ST[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  f = open(file + ".tmp", "wb") if writer else None
  try:
    if f:
      f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dt, thunk in entries:
      data = np.ascontiguousarray(thunk(), dtype=dt)  # every process joins the gather
      if tuple(data.shape) != tuple(shape):
        raise AssertionError(f"{name}: produced {data.shape}, declared {shape}")
      if f:
        f.write(data.tobytes())
  finally:
    if f:
      f.close()
  if writer:
    os.replace(file + ".tmp", file)  # a reader never sees a half-written file


def shard_params(params, mesh: Mesh, config: ModelConfig, rules=None, on_indivisible: str = "replicate"):
  """Places an existing params tree on `mesh` by the sharding rules."""
  shardings = sharding.tree_shardings(decoder.param_logical_axes(config), params, mesh, rules, on_indivisible)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def load_tokenizer(path: str | os.PathLike):
  """A Hugging Face tokenizer from a local directory (never the network)."""
  import transformers
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
