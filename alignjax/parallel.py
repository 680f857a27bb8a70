"""Meshes, logical-axis sharding rules and multi-host start-up.

Parameters and key activations carry logical axis names (`embed`, `mlp`, `heads`, ...).
A rules table maps each name to mesh axes (`data`, `fsdp`, `tensor`); a config changes the
mesh and the rules, never the model code. A dimension that the mapped mesh axes do not divide
is replicated instead (e.g. 2 KV heads on a tensor axis of 8).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. `batch` spans data and fsdp: FSDP is data parallel over batch
# with parameters sharded along `embed`.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
}

LOGICAL_AXES_KEY = "logical_axes"  # nnx.Variable metadata key holding the logical names.


def mesh_shape(sizes: Mapping[str, int], num_devices: int | None = None) -> tuple[int, ...]:
  """Resolves `{data, fsdp, tensor}` sizes, one of which may be -1 (inferred)."""
  num_devices = num_devices or jax.device_count()
  unknown = [k for k in MESH_AXES if int(sizes.get(k, 1)) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown} in {dict(sizes)}.")
  known = math.prod(int(sizes.get(k, 1)) for k in MESH_AXES if k not in unknown)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(sizes)}: {num_devices} devices are not divisible by {known}; "
          "change config.mesh.")
    return tuple(num_devices // known if k in unknown else int(sizes.get(k, 1)) for k in MESH_AXES)
  if known != num_devices:
    raise ValueError(
        f"mesh {dict(sizes)} has {known} devices but {num_devices} are available; set one "
        "of config.mesh.data/fsdp/tensor to -1 to infer it.")
  return tuple(int(sizes.get(k, 1)) for k in MESH_AXES)


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; default: all devices on `fsdp`."""
  sizes = dict(sizes or {"data": 1, "fsdp": -1, "tensor": 1})
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(overrides: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
  """DEFAULT_RULES updated with `{name: axis | [axes] | None}` overrides."""
  rules = dict(DEFAULT_RULES)
  for name, axes in (overrides or {}).items():
    if axes is None or axes == "":
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"config.sharding_rules.{name}: unknown mesh axes {bad}; use {MESH_AXES}.")
    rules[name] = tuple(axes)
  return rules


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Mapping[str, Sequence[str]] | None = None) -> P:
  """PartitionSpec for an array with logical axis `names`.

  Mesh axes of size 1, axes already used by an earlier dimension, and axes that do not divide
  the dimension are dropped (that dimension is then replicated over them).
  """
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in rules:
      raise KeyError(f"No sharding rule for logical axis {name!r}; add it to the rules table.")
    axes = []
    size = 1
    for ax in (rules[name] if name is not None else ()):
      n = mesh.shape[ax]
      if n == 1 or ax in used:
        continue
      if shape is not None and shape[i] % (size * n):
        continue
      axes.append(ax)
      size *= n
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


# ---------------------------------------------------------------- activation constraints
_RULES: contextvars.ContextVar[Mapping[str, Sequence[str]] | None] = contextvars.ContextVar(
    "alignjax_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
  """Makes `mesh` (jax.set_mesh) and `rules` current for tracing sharded code."""
  token = _RULES.set(dict(rules or DEFAULT_RULES))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical names; a no-op outside `use_mesh`."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


# ---------------------------------------------------------------- parameters and state
def state_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None) -> Any:
  """NamedShardings for a pytree of nnx Variables / arrays (abstract or concrete).

  A Variable with `logical_axes` metadata is sharded by the rules; anything else (optimizer
  step counters, RNG keys, scalars) is replicated. Optimizer moments inherit the parameter's
  metadata in nnx, so they shard like their parameter.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get(LOGICAL_AXES_KEY)
      value = x.get_value() if hasattr(x, "get_value") else x.value
      if names is not None and len(names) == len(value.shape):
        return x.replace(NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules)))
      return x.replace(NamedSharding(mesh, P()))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_with_shardings(tree: Any, mesh: Mesh,
                            rules: Mapping[str, Sequence[str]] | None = None) -> Any:
  """ShapeDtypeStructs that carry the rules' shardings (targets for checkpoint restores)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, state_shardings(tree, mesh, rules))


def create_sharded(init_fn: Callable[[], Any], mesh: Mesh,
                   rules: Mapping[str, Sequence[str]] | None = None) -> Any:
  """Runs `init_fn()` (returning an nnx object) under jit with sharded outputs.

  Every parameter is created directly in its shards; no device holds a full copy.
  """
  abstract = nnx.eval_shape(init_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(init_fn())

  with use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None,
                   ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` array: batch over the rules' batch axes."""
  rules = DEFAULT_RULES if rules is None else rules
  axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
  lead = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                rules: Mapping[str, Sequence[str]] | None = None) -> dict[str, jax.Array]:
  """Places this host's part of a global batch on the mesh (multi-host aware).

  Each host passes its own `[global_batch // process_count, ...]` rows; the result is one
  global array per key, split along batch over the `data` and `fsdp` axes.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, rules, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


# ---------------------------------------------------------------- multi-host
def _env_wants_distributed() -> bool:
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set on multi-host TPU VMs
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize_distributed(cfg: Mapping[str, Any] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when the config or environment asks for it.

  Explicit: `config.distributed.{coordinator_address, num_processes, process_id}` or the
  env vars JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/ sets them).
  Auto-detected: multi-host TPU VMs and Slurm jobs with more than one task.
  Returns True if initialised. `config.distributed.cpu_collectives` ('gloo') enables
  cross-process collectives on CPU (tests, laptops).
  """
  cfg = dict(cfg or {})
  addr = cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr and not cfg.get("enable") and not _env_wants_distributed():
    return False
  if jax.distributed.is_initialized():
    return True
  if cfg.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", cfg["cpu_collectives"])
  kwargs = {}
  if addr:
    nproc = cfg.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    pid = cfg.get("process_id")
    pid = pid if pid is not None and pid >= 0 else os.environ.get("JAX_PROCESS_ID")
    if nproc is None or pid is None:
      raise ValueError(
          "A coordinator address is set but the process count or id is missing: set "
          "config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID.")
    kwargs = dict(coordinator_address=addr, num_processes=int(nproc), process_id=int(pid))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d, %d devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True

