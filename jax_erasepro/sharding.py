"""Data-parallel and FSDP placement on a ``jax.sharding.Mesh``: logical axis names plus one rules table.

The mesh has maxdiffusion's three axes ``(data, fsdp, tensor)``. Every param gets logical axis names from its
path and shape alone (no model code is touched); a ``Rules`` table maps logical names (``batch`` for
activations, ``linear_out``, ``conv_out``, ... for params) to mesh axes. A dim whose rule is missing, or
whose size the mesh axes do not divide, is replicated, so ``DEFAULT_RULES`` replicates every param.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over data *and* fsdp: FSDP is data parallelism whose params are sharded too.
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axis (or axes); params under ``min_size`` elements stay replicated."""

    table: tuple[tuple[str, str | tuple[str, ...]], ...] = (("batch", BATCH_AXES),)
    min_size: int = 0

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes a logical name maps to (empty: replicated)."""
        for logical, axes in self.table:
            if logical == name:
                return (axes,) if isinstance(axes, str) else tuple(axes)
        return ()


DEFAULT_RULES = Rules()
# Shard every large kernel's output dim (and the token embedding's vocab dim) along fsdp; 2**16 elements
# (256 KiB in float32) keeps biases, norms and tiny 1x1 convs replicated, where a gather would cost more.
FSDP_RULES = Rules(
    table=(("batch", BATCH_AXES), ("linear_out", "fsdp"), ("conv_out", "fsdp"), ("vocab", "fsdp")),
    min_size=2**16,
)

_LEAF_AXES = {  # (leaf name, ndim unstacked or stacked) -> the unstacked dims' logical names
    ("kernel", (2, 3)): ("linear_in", "linear_out"),
    ("kernel", (4, 5)): ("conv_h", "conv_w", "conv_in", "conv_out"),
    ("embedding", (2, 3)): ("vocab", "embed"),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all hosts); -1 takes the rest."""
    devices = jax.devices() if devices is None else list(devices)
    shape = [data, fsdp, tensor]
    known = math.prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or len(devices) % known:
        raise ValueError(f"mesh {shape} does not fit {len(devices)} devices")
    shape = [len(devices) // known if s == -1 else s for s in shape]
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {shape} has {math.prod(shape)} devices, not {len(devices)}")
    # Auto axes: jit propagates shardings from the inputs (jax.make_mesh's default is Explicit)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_logical_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical names of a param's dims from its path and shape; leading stacked-layer dims are ``layers``.

    Linear kernels (in, out) are ``(linear_in, linear_out)``, conv kernels HWIO ``(conv_h, conv_w, conv_in,
    conv_out)``, embeddings ``(vocab, embed)``; biases, norm scales and anything else get ``None`` per dim.
    """
    leaf = path[-1] if path else ""
    for (name, ndims), axes in _LEAF_AXES.items():
        if leaf == name and len(shape) in ndims:
            return ("layers",) * (len(shape) - len(axes)) + axes
    return (None,) * len(shape)


def logical_spec(
    names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of one array: each dim takes its rule's mesh axes if their sizes divide it."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = tuple(a for a in rules.mesh_axes(name) if a in mesh.shape and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A NamedSharding per array leaf of ``tree``: an nnx.State (optimizer state included) or any pytree."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        names = [_key_name(k) for k in path]
        while names and names[-1] == "value":  # an nnx.Variable's own pytree key
            names.pop()
        if math.prod(shape) < rules.min_size:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_spec(param_logical_axes(tuple(names), shape), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """device_put; on a multi-host mesh each host copies its own shards out of its full copy of ``x``."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: let jax reshard it
        return jax.device_put(x, sharding)
    # device_put would check that all hosts hold equal values, gathering every host's copy of the weights
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index]))


def place(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``tree`` put on ``mesh`` by ``rules`` (a no-op for leaves already placed so)."""
    return jax.tree.map(_put, tree, param_shardings(tree, mesh, rules))


def place_module(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """A copy of ``module`` with its state placed by ``rules``: place once, then generate or train often."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, place(state, mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split over the rules' ``batch`` mesh axes, the other axes replicated."""
    axes = tuple(a for a in rules.mesh_axes("batch") if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def batch_size_multiple(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """The number of shards the batch axis is split into: global batches must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in rules.mesh_axes("batch") if a in mesh.shape)


def global_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A batch every host holds in full -> global arrays split over ``batch`` (each host copies its rows)."""
    return jax.tree.map(lambda x: _put(x, batch_sharding(mesh, rules)), batch)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """This process's slice of a batch (the whole batch on one host) -> global arrays split over ``batch``.

    Every leaf's leading axis is the batch; on a multi-host mesh each host passes its own rows, in process
    order, via ``jax.make_array_from_process_local_data``.
    """
    sharding = batch_sharding(mesh, rules)
    n = batch_size_multiple(mesh, rules)

    def one(x: Any) -> jax.Array:
        rows = np.shape(x)[0] * jax.process_count()
        if rows % n:
            raise ValueError(f"global batch of {rows} rows does not split into {n} shards")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)
