"""TPU topologies from their names, per-chip figures from the TPU compiler, and the fit verdict."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from purecc_jax import sharding, topology
from purecc_jax.topology import GiB, CompileFigures

requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-test.txt): it is the TPU compiler these tests run")


@pytest.mark.parametrize("name,parsed", [
    ("v5e-8", ("v5e", (2, 4))), ("v5litepod-16", ("v5e", (4, 4))), ("v5e-1", ("v5e", (1, 1))),
    ("v6e-4", ("v6e", (2, 2))), ("v6e-256", ("v6e", (16, 16))),
    ("v5p-8", ("v5p", (2, 2, 1))), ("v5p-16", ("v5p", (2, 2, 2))), ("v5p-128", ("v5p", (4, 4, 4))),
    ("v4-8", ("v4", (2, 2, 1))), ("v4-32", ("v4", (2, 2, 4))),
    ("v5e:2x4", ("v5e", (2, 4))), ("V6E:4x8", ("v6e", (4, 8))), ("v5p:2x2x2", ("v5p", (2, 2, 2))),
])
def test_parse_names(name, parsed):
    assert topology.parse_topology(name) == parsed


@pytest.mark.parametrize("name,message", [
    ("v7x-8", "unknown generation 'v7x'"),
    ("v5e-6", "'v5e-6': v5e slice names count chips"),
    ("v5p-4", "'v5p-4': v5p slice names count TensorCores"),
    ("v5e:2x2x2", "'v5e:2x2x2': a v5e grid has 2 positive sizes"),
    ("v5p:2x2", "'v5p:2x2': a v5p grid has 3 positive sizes"),
    ("v5e:0x4", "'v5e:0x4'"),
    ("tpu-8x", "'tpu-8x' is neither a slice name"),
])
def test_malformed_names_are_named_in_the_error(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        topology.parse_topology(name)


def test_hbm_by_device_kind():
    assert {kind: topology.hbm_bytes(kind) // GiB for kind in
            ("TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v5p", "TPU v6 lite", "TPU v6e")} == {
        "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}
    with pytest.raises(ValueError, match="'TPU v7x'"):
        topology.hbm_bytes("TPU v7x")


def test_verdict_against_hbm_override():
    figures = CompileFigures(argument=600, output=300, alias=200, temporary=400, generated_code=100, peak=1200)
    assert topology.verdict(figures, hbm=1200).fits
    small = topology.verdict(figures, hbm=1000)
    assert not small.fits and str(small).startswith("DOES NOT FIT")
    assert topology.verdict(figures, "TPU v5 lite").hbm == 16 * GiB
    refused = CompileFigures(None, None, None, None, None, peak=1, refused="RESOURCE_EXHAUSTED: ...")
    assert not topology.verdict(refused, hbm=GiB).fits
    assert str(topology.verdict(refused, hbm=GiB)).startswith("DOES NOT FIT: at least")  # its size: a lower bound
    assert not small.lower_bound
    table = topology.format_table([("step", figures, small), ("sampler", refused, topology.verdict(refused, hbm=GiB))])
    assert "DOES NOT FIT" in table.splitlines()[1] and "compiler refused" in table.splitlines()[2]


@requires_libtpu
@pytest.mark.parametrize("name,chips,hosts,kind", [
    ("v5e:1x1", 1, 1, "TPU v5 lite"), ("v5e-8", 8, 1, "TPU v5 lite"), ("v5e:4x4", 16, 4, "TPU v5 lite"),
    ("v6e-4", 4, 1, "TPU v6 lite"), ("v5p-8", 4, 1, "TPU v5"), ("v5p:2x2x2", 8, 2, "TPU v5"), ("v4-8", 4, 1, "TPU v4"),
])
def test_topology_devices_and_hosts(name, chips, hosts, kind):
    topo = topology.tpu_topology(name)
    assert (topo.chips, topo.hosts, topo.device_kind) == (chips, hosts, kind)
    assert all(d.platform == "tpu" for d in topo.devices)


def _train_step(params, batch):
    def loss(params):
        h = jnp.tanh(batch @ params["w1"])
        return jnp.mean((h @ params["w2"]) ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value


@requires_libtpu
def test_multihost_slice_compiles_a_sharded_step():
    """v5e:4x4 is 16 chips on 4 hosts; a step on the (data 4, fsdp 4) mesh a 4-process run
    builds compiles, with its parameters split 4 ways and its batch 16 ways on every chip."""
    topo = topology.tpu_topology("v5e:4x4")
    mesh = sharding.make_mesh(4, 4, 1, devices=topo.devices)
    assert topo.hosts == 4 and {d.process_index for d in mesh.devices.flat} == {0, 1, 2, 3}
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp", None))
    batch = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    params = {name: jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=fsdp) for name in ("w1", "w2")}
    step = jax.jit(_train_step, donate_argnums=0, out_shardings=(fsdp, NamedSharding(mesh, PartitionSpec())))
    with sharding.activate(mesh):
        lowered = step.lower(params, batch)
    compiled, figures = topology.compile_and_measure(lowered)
    params_per_chip, batch_per_chip = 2 * 1024 * 1024 * 4 // 4, 64 * 1024 * 4 // 16
    assert not figures.refused
    assert figures.argument == params_per_chip + batch_per_chip
    assert figures.alias == params_per_chip  # donated parameters updated in place
    assert figures.peak == (figures.argument + figures.output - figures.alias + figures.temporary
                            + figures.generated_code)
    assert re.search(r"all-gather|reduce-scatter|all-reduce", compiled.as_text())
    assert topology.verdict(figures, topo.device_kind).fits


@requires_libtpu
def test_compiler_refusal_is_a_figure_not_an_error():
    """A program larger than a v5e chip's HBM: XLA:TPU refuses it at compile time."""
    topo = topology.tpu_topology("v5e:1x1")
    x = jax.ShapeDtypeStruct((5 << 30,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(topo.devices[0]))
    compiled, figures = topology.compile_and_measure(jax.jit(lambda x: x + 1).lower(x))
    assert compiled is None and figures.refused.startswith("RESOURCE_EXHAUSTED") and figures.argument is None
    assert figures.peak == 40 * GiB  # its input and its output, 20 GiB each
    assert not topology.verdict(figures, topo.device_kind).fits
