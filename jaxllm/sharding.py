"""Meshes from config, logical-axis rules, and placement helpers.

Parameters and activations are named with logical axes ("embed", "act_batch", ...); one rules
table (config.ShardingRules) maps them to mesh axes. Changing parallelism is a config change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # config imports the models, which import this module
    from jaxllm.config import MeshConfig, ShardingRules

AXES = ("data", "fsdp", "tensor", "sequence")


class MeshError(ValueError):
    pass


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int, num_slices: int = 1):
    """(ici sizes, dcn sizes) as tuples over AXES with the single -1 filled in."""
    ici = [getattr(cfg.ici, a) for a in AXES]
    dcn = [getattr(cfg.dcn, a) for a in AXES]
    per_slice = num_devices // num_slices
    for name, sizes, total in (("mesh.ici", ici, per_slice), ("mesh.dcn", dcn, num_slices)):
        fills = [i for i, s in enumerate(sizes) if s == -1]
        if len(fills) > 1:
            raise MeshError(f"{name}: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"{name}: axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
        known = math.prod(s for s in sizes if s != -1)
        if fills:
            if total % known:
                raise MeshError(f"{name}: fixed axes {dict(zip(AXES, sizes))} (product {known}) "
                                f"do not divide {total} devices")
            sizes[fills[0]] = total // known
        if math.prod(sizes) != total:
            raise MeshError(f"{name}: axis sizes {dict(zip(AXES, sizes))} multiply to "
                            f"{math.prod(sizes)}, but there are {total} "
                            f"{'devices per slice' if name == 'mesh.ici' else 'slices'}")
    return tuple(ici), tuple(dcn)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh over AXES. dcn sizes span slices (TPU) or processes (GPU nodes, CPU hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    if cfg.devices is not None and cfg.devices != len(devices):
        what = f"mesh.preset={cfg.preset}" if cfg.preset else f"mesh.devices={cfg.devices}"
        raise MeshError(f"{what} is for {cfg.devices} devices, but this run has {len(devices)} "
                        f"(set mesh.devices=null to use the layout anyway)")
    num_slices = 1
    if any(getattr(cfg.dcn, a) != 1 for a in AXES):
        slices = {getattr(d, "slice_index", d.process_index) for d in devices}
        num_slices = len(slices)
    ici, dcn = resolve_axis_sizes(cfg, len(devices), num_slices)
    if num_slices > 1:
        granule_is_process = not hasattr(devices[0], "slice_index")
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                   process_is_granule=granule_is_process)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)
    return Mesh(arr, AXES)


def single_device_mesh(device=None) -> Mesh:
    device = device or jax.devices()[0]
    return Mesh(np.asarray([device]).reshape(1, 1, 1, 1), AXES)


def logical_to_spec(names, rules: ShardingRules, mesh: Mesh, shape=None) -> PartitionSpec:
    """Map a tuple of logical names (or None) to a PartitionSpec on `mesh`.

    Mesh axes of size 1, axes already used by an earlier dimension, and axes that do not divide
    the dimension (when `shape` is given) are dropped, so one rules table serves every mesh."""
    used, spec = set(), []
    for i, name in enumerate(names):
        axes = [] if name is None else list(getattr(rules, name))
        kept, size = [], 1
        for a in axes:
            n = mesh.shape[a]
            if n == 1 or a in used:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            kept.append(a)
            size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


# ----------------------------------------------------------------------------- active mesh

_ACTIVE: list[tuple[Mesh, ShardingRules]] = []


@contextlib.contextmanager
def use(mesh: Mesh, rules: ShardingRules):
    """Make `mesh` and `rules` the ones that `constrain` and the model's kernels see."""
    _ACTIVE.append((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def current() -> tuple[Mesh | None, ShardingRules | None]:
    return _ACTIVE[-1] if _ACTIVE else (None, None)


def constrain(x: jax.Array, names) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use(...)`."""
    mesh, rules = current()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def sequence_sharded() -> bool:
    """Whether activations are split along the sequence (act_length) on the active mesh."""
    mesh, rules = current()
    return mesh is not None and _shards("act_length", mesh, rules) > 1


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules: ShardingRules):
    """NamedShardings for a tree of logical-name tuples, given the matching shapes."""
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)  # noqa: E731
    return jax.tree.map(
        lambda names, shp: NamedSharding(mesh, logical_to_spec(names, rules, mesh, shp.shape)),
        logical_tree, shapes_tree, is_leaf=is_names)


def batch_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    """Sharding of input arrays along their batch dimension (any rank: [batch] weights too;
    the model constrains activations along the sequence itself)."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",), rules, mesh))


def batch_shards(mesh: Mesh, rules: ShardingRules) -> int:
    """How many ways the batch dimension is split (the global batch must divide by it)."""
    return _shards("act_batch", mesh, rules)


def shards(name: str) -> int:
    """How many ways the logical axis `name` is split on the active mesh (1 outside `use`)."""
    mesh, rules = current()
    return 1 if mesh is None else _shards(name, mesh, rules)


def _shards(name: str, mesh: Mesh, rules: ShardingRules) -> int:
    return math.prod(mesh.shape[a] for a in spec_axes(logical_to_spec((name,), rules, mesh)[0]))


def spec_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())


def with_sizes(cfg: MeshConfig, **ici) -> MeshConfig:
    """A copy of cfg with the given ici axis sizes (others 1). Handy in tests and presets."""
    from jaxllm.config import AxisSizes
    sizes = {a: 1 for a in AXES} | ici
    return dataclasses.replace(cfg, ici=AxisSizes(**sizes))
