"""Batches on a mesh: padding to the data-parallel size and placement over the data axes.

Activations are constrained to ("act_batch", ...), which the sharding rules map to the
data axes; a batch that those axes do not divide is padded (by repeating its last row)
before the call and cut back after it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from purecc_jax import sharding


def batch_multiple(mesh: Mesh | None, rules: Sequence[tuple[str, Any]]) -> int:
    """How many devices share the batch axis (1 without a mesh)."""
    if mesh is None:
        return 1
    axes = dict(rules).get("act_batch")
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def pad_rows(x: Any, rows: int) -> Any:
    """`x` (a batched array, or None) with its last row repeated up to `rows` rows."""
    if x is None or x.shape[0] == rows:
        return x
    extra = jnp.repeat(x[-1:], rows - x.shape[0], axis=0)
    return jnp.concatenate([x, extra], axis=0)


def padded_size(batch: int, multiple: int) -> int:
    return -(-batch // multiple) * multiple


def place(tree: Any, mesh: Mesh | None, rules: Sequence[tuple[str, Any]]) -> Any:
    """Puts every (batch-leading) array of `tree` in its batch sharding, or on the default device."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.shape, rules)), tree)


@contextlib.contextmanager
def maybe_activate(mesh: Mesh | None, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """`sharding.activate(mesh, rules)` with a mesh; the rules alone (constraints are no-ops) without."""
    if mesh is None:
        with nn.logical_axis_rules(rules):
            yield
    else:
        with sharding.activate(mesh, rules):
            yield
