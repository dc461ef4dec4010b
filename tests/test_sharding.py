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


def test_train_state_is_sharded_like_the_trainable_tree():
    """The trainer's state initialiser shards every copy of a trainable leaf (the trainable itself, Adam's
    moments, the EMA) like that leaf and replicates the rest; left to the compiler, the moments came out
    replicated (a full fine-tune's float32 moments whole on every chip)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from purecc_jax import train
    from purecc_jax.purecc.step import OptimizerConfig, init_state, make_optimizer

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp", None))
    trainable = {"params": {"w": jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), fsdp)},
                 "embeddings": {"e": jax.device_put(jnp.ones(8), NamedSharding(mesh, PartitionSpec()))}}
    tx = make_optimizer({"params": 1e-3, "embeddings": 1e-2}, OptimizerConfig())
    init = train.StateInit(lambda tr: init_state(tr, tx, seed=0, ema=True))
    state = init(trainable)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state)}
    moments = [k for k in specs if k.endswith("['params']['w']") and (".mu" in k or ".nu" in k)]
    assert len(moments) == 2 and all(specs[k] == PartitionSpec("fsdp", None) for k in moments), specs
    assert specs[".ema.params['params']['w']"] == PartitionSpec("fsdp", None)
    assert specs[".trainable['params']['w']"] == PartitionSpec("fsdp", None)
    assert all(spec == PartitionSpec() for k, spec in specs.items() if "['w']" not in k)
    # the same values as the unconstrained initialiser
    plain = jax.jit(init.fn)(trainable)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # what the compile check lowers: the same shardings
    compiled = init.lower(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                 trainable)).compile()
    assert [s.spec for s in jax.tree_util.tree_leaves(compiled.output_shardings)] == \
        [x.sharding.spec for x in jax.tree_util.tree_leaves(state)]
