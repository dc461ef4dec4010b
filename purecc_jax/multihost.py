"""What changes when several processes (hosts) drive one mesh: who writes, how host data gets on and off it.

With `jax.distributed` every process runs the same program on its own devices of a global mesh.
Arrays of that mesh are global: a process holds only the shards on its devices, so host data
goes on through a callback that each process answers for its own devices (`put`), and comes off
through a gather that every process takes part in (`to_host`). Files are written by one
process (`is_main`) unless a library (orbax) coordinates the writers itself.
On one process all three are what a single-host program would do.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def is_main() -> bool:
    """True in the process that writes logs, samples, exports and other single files (process 0)."""
    return jax.process_index() == 0


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same in every process) as global arrays in `shardings` (a Sharding, or a tree of them).

    Each process reads only the slices its own devices hold, so a process feeds its part of a batch.
    """
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x, s: put(x, s), tree, shardings)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, shardings, lambda index: x[index])
    return jax.tree_util.tree_map(one, tree)


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x.addressable_data(0)) if not x.is_fully_addressable else np.asarray(x)
    # Sharded across processes: every process joins one jitted copy to a replicated layout.
    mesh = x.sharding.mesh if isinstance(x.sharding, NamedSharding) else None
    if mesh is None:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    whole = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    return np.asarray(whole.addressable_data(0))


def to_host(tree: Any) -> Any:
    """numpy copies of every array of `tree`, in every process. A collective when an array is sharded
    across processes: every process must call it, in the same order."""
    return jax.tree_util.tree_map(lambda x: _gather(x) if isinstance(x, jax.Array) else np.asarray(x), tree)


def any_process(flag: bool) -> bool:
    """True in every process when `flag` is true in any (a collective with several processes).

    So that all processes take the same branch around collectives, e.g. stopping after a SIGTERM
    that reached the hosts at different steps."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).any())
