"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and main activation in this package carries logical axis names
("embed", "mlp", "act_batch", ...). Which mesh axis each name lands on is decided
here and nowhere else, so data / FSDP / tensor parallelism is a config change.

Mesh axes:
  data    pure data parallelism (parameters replicated across it)
  fsdp    data parallelism whose devices also shard the parameters (ZeRO-3)
  tensor  Megatron-style tensor parallelism over heads and MLP width
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Parameter names and activation names are
# kept apart ("embed" vs "act_embed") so a weight dimension can be sharded while
# the same dimension of an activation stays whole.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations. The batch is split over fsdp first, then data: with ("data", "fsdp") the
    # XLA CPU partitioner of jax 0.10.2 returned wrong rows on a (2, 2, 2) mesh
    # (tests/test_sharding.py covers that mesh).
    ("act_batch", ("fsdp", "data")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_channels", None),
    ("act_height", None),
    ("act_width", None),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("head_dim", None),
    ("in_channels", None),
    ("out_channels", None),
    ("context_embed", "fsdp"),
    ("pooled_embed", None),
    ("time_freq", None),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    ("positions", None),  # learned absolute position tables (CLIP text)
    ("projection", None),  # CLIP's text projection output (SD3's pooled text)
    ("lora_rank", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
)


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int,
               batch_sizes: Sequence[int] = ()) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes a training run uses on `num_devices` devices.

    `data=-1` (the default config) is not "all remaining devices" but the largest data axis that
    divides every batch in `batch_sizes`; the devices left over join fsdp, which shards the weights
    and splits the batch where it divides (ZeRO-3). So a batch of 2 on 8 devices runs on
    (data=2, fsdp=4), not on 8 replicas computing the same rows. An explicit data axis that does
    not divide a batch is refused: its devices would compute the same rows twice.
    """
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be >= 1 or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes and num_devices % known:
        raise ValueError(f"{num_devices} devices cannot be split into mesh {sizes} (config.mesh)")
    if data == -1:
        rest = num_devices // known
        data = int(np.gcd.reduce([rest, *batch_sizes]))
        return data, fsdp * (rest // data), tensor
    if -1 in sizes:
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, {num_devices} are available")
    for b in batch_sizes:
        if b % sizes[0]:
            raise ValueError(
                f"a batch of {b} cannot be split over config.mesh.data={sizes[0]}: its devices would compute the "
                f"same rows. Make the batch size a multiple of {sizes[0]}, or set config.mesh.data to a divisor "
                "of it (data=-1 picks one; the other devices then shard the weights, fsdp)")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one size may be -1 to take the rest (checked by `mesh_sizes`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(overrides: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with the given (name, mesh_axes) pairs replacing their defaults."""
    table = dict(DEFAULT_RULES)
    for name, axes in overrides or ():
        if name not in table:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(table)}")
        table[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(table.items())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so logical constraints inside modules resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from eval_shape of init)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fit_spec(shape: Sequence[int], names: Sequence[str | None], rules: Sequence[tuple[str, Any]], mesh_shape) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical `names`, keeping for each dimension only
    the mesh axes (in rule order) whose sizes divide it; an axis is used by one dimension at most.

    So a batch of 2 on a (data=2, fsdp=4) mesh is split 2 ways rather than refused or replicated.
    """
    table = dict(rules)
    taken: set[str] = set()
    spec = []
    for size, name in zip(shape, names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        used, prod = [], 1
        for axis in axes:
            if axis in taken or axis not in mesh_shape:
                continue
            if size % (prod * mesh_shape[axis]) == 0:
                used.append(axis)
                prod *= mesh_shape[axis]
        taken.update(used)
        spec.append(tuple(used) if len(used) > 1 else (used[0] if used else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation under the current mesh and rules (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, names, rules, dict(mesh.shape)))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch (split as "act_batch", where it divides)."""
    names = ("act_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, fit_spec(shape, names, rules, dict(mesh.shape)))


def unbox(tree: Any) -> Any:
    """Strips `nn.Partitioned` boxes, leaving plain arrays / ShapeDtypeStructs."""
    return nn.meta.unbox(tree)


def abstract_and_shardings(
    init_fn, mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree, Sharding tree) of `init_fn()`'s boxed output, no memory used.

    With `mesh=None` every parameter sits on the first device.
    """
    boxed = jax.eval_shape(init_fn)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return unbox(boxed), jax.tree_util.tree_map(lambda _: device, unbox(boxed))
    return unbox(boxed), logical_shardings(boxed, mesh, rules)


def abstract_params(init_fn, mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """ShapeDtypeStructs of `init_fn()`'s parameters, each carrying the sharding a loader places it in:
    a model's parameters for compiling ahead of time, without weights."""
    abstract, shardings = abstract_and_shardings(init_fn, mesh, rules)
    return with_shardings(abstract, shardings)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) in `shardings` (a tree, or one for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def sharded_init(init_fn, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Runs `init_fn()` under jit so every parameter is created directly in its sharding."""
    _, shardings = abstract_and_shardings(init_fn, mesh, rules)
    with activate(mesh, rules):
        return jax.jit(lambda: unbox(init_fn()), out_shardings=shardings)()
