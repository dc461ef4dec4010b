"""FLUX forward on a (data=2, fsdp=4) mesh of 8 virtual CPU devices equals the single-device forward."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from flux_reference import random_inputs
from purecc_jax import sharding
from purecc_jax.models.flux import FluxTransformer, init_fn, preset


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8, "conftest must provide 8 CPU devices"
    return sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])


@pytest.mark.parametrize("scan", [True, False])
def test_sharded_forward_matches_single_device(mesh, scan):
    cfg = preset("tiny", scan_layers=scan)
    params = sharding.sharded_init(init_fn(cfg, jax.random.key(0)), mesh)
    flat = traverse_util.flatten_dict(params)

    # Parameters are really partitioned: weight matrices have their embed dimension over fsdp.
    prefix = ("double_blocks",) if scan else ("double_blocks_0",)
    q_kernel = flat[prefix + ("img_attn", "q", "kernel")]
    assert q_kernel.sharding.spec == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
    shard_shape = q_kernel.addressable_shards[0].data.shape
    assert shard_shape[-2] == q_kernel.shape[-2] // 4
    assert sum(x.addressable_shards[0].data.size < x.size for x in flat.values()) > len(flat) // 2

    model = FluxTransformer(cfg)
    for batch in (8, 2):
        inputs = random_inputs(cfg, batch, 3, 5, 7)
        expected = model.apply({"params": jax.device_get(params)}, **inputs)
        with sharding.activate(mesh):
            out = jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, inputs)
        scale = np.abs(np.asarray(expected)).max()
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5 * scale, rtol=0)
        assert out.sharding.spec[0] is not None  # batch stays split over the data axes


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh(data=3, fsdp=4, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    mesh = sharding.make_mesh(data=-1, fsdp=2, devices=jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_rules_overrides():
    rules = dict(sharding.rules_from_config([("embed", None), ("act_seq", ["tensor"])]))
    assert rules["embed"] is None and rules["act_seq"] == ("tensor",)
    with pytest.raises(KeyError, match="unknown logical axis"):
        sharding.rules_from_config([("nonsense", None)])


def test_three_axis_mesh_forward():
    """data, fsdp and tensor all > 1: every batch row must still match (see sharding.DEFAULT_RULES)."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    cfg = preset("tiny", depth=1, depth_single=1)
    params = sharding.sharded_init(init_fn(cfg, jax.random.key(0)), mesh)
    model = FluxTransformer(cfg)
    inputs = random_inputs(cfg, 4, 3, 5, 7)
    expected = np.asarray(model.apply({"params": jax.device_get(params)}, **inputs))
    with sharding.activate(mesh):
        out = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, inputs))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=1e-5 * scale, rtol=0)
