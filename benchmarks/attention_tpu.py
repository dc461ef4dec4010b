r"""Per-chip memory of one joint attention, forward + backward, compiled by XLA:TPU for a TPU slice.

    python -m benchmarks.attention_tpu                               # v5e:2x2, FLUX and SD3 at 512² and 1024²
    python -m benchmarks.attention_tpu --topology=v6e-8 --batch=8

Needs `libtpu` (requirements-test.txt), no TPU: the slice's devices come from `purecc_jax.topology`.
Shapes are the backbones' joint sequences (text + image tokens) with 24 heads: FLUX.1 512 T5
tokens + (side/16)² image tokens at head dim 128; SD3.5-Medium 77 CLIP + 256 T5 + (side/16)² at head
dim 64 (1357 and 4429 tokens, which splash runs padded). The batch is split over an fsdp axis of
all chips, as training splits it. About 5-30 s per program on 2 CPU cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from purecc_jax import sharding, topology
from purecc_jax.models.attention import attention

_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU slice (v5e-8, v6e:2x4, v5p-8, ...)")
_BATCH = flags.DEFINE_integer("batch", 4, "sequences per step, over all chips")
_RESOLUTIONS = flags.DEFINE_list("resolutions", ["512", "1024"], "image sides in pixels")
_IMPLEMENTATIONS = flags.DEFINE_list("implementations", ["splash", "xla"], "attention implementations")

SEQUENCES = {  # backbone: (text tokens, heads, head_dim)
    "flux": (512, 24, 128),
    "sd3": (77 + 256, 24, 64),
}


def lower(topo: topology.Topology, seq: int, heads: int, head_dim: int, batch: int, implementation: str):
    """The forward + backward of one attention over `seq` tokens, on an fsdp mesh of every chip."""
    mesh = sharding.make_mesh(1, topo.chips, 1, devices=topo.devices)
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, implementation).astype(jnp.float32) ** 2)
    with sharding.activate(mesh):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x)


def main(argv):
    del argv
    topo = topology.tpu_topology(_TOPOLOGY.value)
    print(topo)
    rows = []
    for side in map(int, _RESOLUTIONS.value):
        for backbone, (text, heads, head_dim) in SEQUENCES.items():
            seq = text + (side // 16) ** 2
            for implementation in _IMPLEMENTATIONS.value:
                lowered = lower(topo, seq, heads, head_dim, _BATCH.value, implementation)
                _, figures = topology.compile_and_measure(lowered)
                rows.append((f"{backbone} {side}² ({seq} tokens) {implementation}", figures,
                             topology.verdict(figures, topo.device_kind)))
    print(topology.format_table(rows, unit="MiB"))


if __name__ == "__main__":
    app.run(main)
