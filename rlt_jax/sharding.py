"""Device meshes and logical-axis sharding: what Flax's logical partitioning leaves to us.

Every param (`nn.with_logical_partitioning` in the model modules) and the main activations carry *logical* axis
names ("embed", "q_heads", "batch", ...). A list of rules (from the config) maps each logical name to mesh axes of
the (data, fsdp, tensor) mesh, MaxText-style; the rules are Flax's (`nn.logical_axis_rules`, resolved by
`nn.logical_to_mesh_axes`). Changing how a model is sharded is a config change, never a model change. Here: the mesh
from the config, a logical name without a rule as an error naming it, mesh axes of size 1 dropped, and a dimension
the mesh axes do not divide replicated with a warning (params) or an error (`on_indivisible="error"`), where Flax
would leave an uneven sharding to fail deep inside jit; and the rollout layout.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# The rollout layout (`rollout_mesh`): what sampling reads, laid out once a step. Weights are split over tensor
# only, so each device of a tensor group holds its slice whole and the decode loop gathers no weights (with the
# training rules' embed -> fsdp it would all-gather every layer's weights on every generated token).
ROLLOUT_RULES: tuple[tuple[str, Any], ...] = tuple((name, None if name == "embed" else axes)
                                                   for name, axes in DEFAULT_RULES)

ON_INDIVISIBLE = ("replicate", "error")
_log = logging.getLogger(__name__)


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh. Sizes come as a dict or in that order; one size may be -1 (the rest)."""
  if isinstance(axis_sizes, Mapping):
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in axis_sizes]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} do not fit {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, but there are {n}")
  # mesh_utils orders devices so that the fastest links serve the innermost (tensor) axis.
  from jax.experimental import mesh_utils
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices=list(devices.flat))
  except (ValueError, NotImplementedError, AssertionError):
    grid = devices.reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def normalize_rules(rules) -> tuple[tuple[str, Any], ...]:
  """Rules from a config (list of pairs, or a dict) as a hashable tuple; mesh axes are validated."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  out = []
  for name, axes in items:
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {a!r} (axes: {MESH_AXES})")
    out.append((str(name), axes))
  return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=None):
  """Makes `mesh` the context mesh (so `constrain` shards activations) and `rules` Flax's active logical-axis rules
  (unchanged when None)."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    if rules is not None:
      stack.enter_context(nn.logical_axis_rules(normalize_rules(rules)))
    yield mesh


def active_rules():
  """Flax's active logical-axis rules (`nn.logical_axis_rules`), `DEFAULT_RULES` outside any."""
  return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def _mesh_axes(names: Sequence[str | None], rules) -> list[tuple[str, ...]]:
  """Each dimension's mesh axes by Flax's resolution (rules in order, a mesh axis used once an array)."""
  known = {r[0] for r in rules}
  for name in names:
    if name is not None and name not in known:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add one to the rules (known: "
                     f"{[r[0] for r in rules]})")
  out = []
  for axes in nn.logical_to_mesh_axes(tuple(names), rules):
    out.append(() if axes is None else tuple(axes) if isinstance(axes, (tuple, list)) else (axes,))
  return out


def logical_to_spec(names: Sequence[str | None], rules=None, *, mesh=None, shape=None, what: str = "array",
                    on_indivisible: str = "replicate") -> P:
  """PartitionSpec for an array with logical axis `names`.

  A mesh axis is used at most once per array (Flax: the first rule that asks for it wins). With `mesh` and
  `shape`, a dimension whose size the mesh axes do not divide is replicated (with a warning) or raises, as
  `on_indivisible` says.
  """
  if on_indivisible not in ON_INDIVISIBLE:
    raise ValueError(f"on_indivisible={on_indivisible!r}: expected one of {ON_INDIVISIBLE}")
  rules = active_rules() if rules is None else rules
  spec = []
  for dim, (name, axes) in enumerate(zip(names, _mesh_axes(names, rules))):
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    if axes and mesh is not None and shape is not None:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        ok = [d for d in range(1, shape[dim] + 1) if shape[dim] % d == 0]
        msg = (f"{what}: dimension {dim} ({name}={shape[dim]}) is not divisible by mesh axes {axes} "
               f"(size {size}); sizes that divide it: {ok}")
        if on_indivisible == "error":
          raise ValueError(msg + ". Change the mesh, or set on_indivisible='replicate' to replicate this dimension.")
        if what != "activation":
          _log.warning("%s; replicating this dimension", msg)
        axes = ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=None, on_indivisible: str = "replicate"):
  """NamedShardings for a params pytree, from its logical-axes tree and its shapes (arrays or ShapeDtypeStructs)."""
  rules = active_rules() if rules is None else normalize_rules(rules)

  def one(path, names, leaf):
    what = "param " + "/".join(str(getattr(k, "key", k)) for k in path)
    spec = logical_to_spec(names, rules, mesh=mesh, shape=leaf.shape, what=what, on_indivisible=on_indivisible)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Shards an activation by logical names under the context mesh; a no-op outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(names, mesh=mesh, shape=x.shape, what="activation")
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the rule for "batch", the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh=mesh))


def shard_count(name: str, size: int) -> int:
  """Devices a dimension of `size` with logical name `name` is split over under the context mesh (1 outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = logical_to_spec((name,), mesh=mesh, shape=(size,), what="activation")[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def rollout_tensor_size(devices: int, host_devices: int, num_heads: int, num_kv_heads: int, requested: int = 0) -> int:
  """Devices one rollout copy is split over: `requested`, or (0) the most that divide the query and kv heads and the
  devices of one host, so that a tensor group never spans hosts."""
  if requested:
    if devices % requested:
      raise ValueError(f"rollout tensor size {requested} does not divide the mesh's {devices} devices")
    return requested
  local = math.gcd(devices, host_devices)
  return max(t for t in range(1, local + 1) if local % t == 0 and num_heads % t == 0 and num_kv_heads % t == 0)


def host_devices(mesh: Mesh) -> int:
  """Devices of the mesh that one process holds."""
  return mesh.devices.size // len({d.process_index for d in mesh.devices.flat})


def rollout_tensor(mesh: Mesh, num_heads: int, num_kv_heads: int, requested: int = 0) -> int:
  """`rollout_tensor_size` for this mesh, one process's devices being a host."""
  return rollout_tensor_size(mesh.devices.size, host_devices(mesh), num_heads, num_kv_heads, requested)


def rollout_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """The training mesh's devices as a (data = n / tensor, fsdp = 1, tensor) mesh, in the same device order, so that
  one jitted cast moves the params from one layout to the other (jit needs one device order)."""
  devices = np.asarray(mesh.devices).reshape(-1, 1, tensor)
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
