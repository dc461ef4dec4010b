"""LoRA overlay: equals merged weights, touches only targeted kernels, works scanned and unscanned."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flux_reference import random_inputs
from purecc_jax import sharding
from purecc_jax.models import lora
from purecc_jax.models.flux import FluxTransformer, init_fn, preset


def _params(cfg):
    return sharding.unbox(jax.jit(init_fn(cfg, jax.random.key(0)))())


def _randomise_b(tree, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("scan", [True, False])
def test_overlay_equals_merged(scan):
    cfg = preset("tiny", scan_layers=scan)
    params = _params(cfg)
    lcfg = lora.LoRAConfig(rank=3, alpha=6.0)
    adapter = _randomise_b(lora.init(jax.random.key(2), params, lcfg))
    model = FluxTransformer(cfg)
    inputs = random_inputs(cfg, 2, 2, 3, 5)
    overlay = model.apply({"params": params, "lora": lora.variables(adapter, lcfg)}, **inputs)
    merged = model.apply({"params": lora.merge(params, adapter, lcfg)}, **inputs)
    plain = model.apply({"params": params}, **inputs)
    np.testing.assert_allclose(overlay, merged, atol=1e-5)
    assert float(jnp.abs(overlay - plain).max()) > 1e-3


def test_targets_and_init():
    cfg = preset("tiny")
    params = _params(cfg)
    lcfg = lora.LoRAConfig(rank=4, alpha=4.0)
    adapter = lora.init(jax.random.key(0), params, lcfg)
    paths = {"/".join(p[:-1]) for p in traverse_util.flatten_dict(adapter)}
    assert paths == {
        "double_blocks/img_attn/q", "double_blocks/img_attn/k", "double_blocks/img_attn/v",
        "double_blocks/txt_attn/q", "double_blocks/txt_attn/k", "double_blocks/txt_attn/v",
        "double_blocks/img_attn_out", "double_blocks/txt_attn_out",
        "single_blocks/attn/q", "single_blocks/attn/k", "single_blocks/attn/v",
    }
    a = adapter["double_blocks"]["img_attn"]["q"]["a"]
    b = adapter["double_blocks"]["img_attn"]["q"]["b"]
    assert a.shape == (cfg.depth, cfg.hidden_size, 4) and b.shape == (cfg.depth, 4, cfg.hidden_size)
    assert float(jnp.abs(b).max()) == 0.0
    assert abs(float(jnp.std(a)) - 1 / 4) < 0.03  # PEFT "gaussian": std 1 / rank
    image_only = lora.init(jax.random.key(0), params, lora.LoRAConfig(targets=lora.resolve_targets("image_attention")))
    assert "txt_attn" not in image_only["double_blocks"]
    with pytest.raises(ValueError, match="match no Dense"):
        lora.init(jax.random.key(0), params, lora.LoRAConfig(targets=(r"^nothing$",)))
    with pytest.raises(KeyError, match="unknown LoRA target preset"):
        lora.resolve_targets("mlp_only")


def test_gradients_reach_only_lora():
    cfg = preset("tiny")
    params = _params(cfg)
    lcfg = lora.LoRAConfig()
    adapter = lora.init(jax.random.key(0), params, lcfg)
    model = FluxTransformer(cfg)
    inputs = random_inputs(cfg, 2, 2, 2, 3)

    def loss(adapter, params):
        return jnp.mean(model.apply({"params": params, "lora": lora.variables(adapter, lcfg)}, **inputs) ** 2)

    g_lora, g_params = jax.grad(loss, argnums=(0, 1))(adapter, params)
    # With B = 0 only B receives gradient at the first step (dL/dA = x^T (dL/dy) B^T = 0).
    flat = traverse_util.flatten_dict(g_lora)
    assert all(float(jnp.abs(v).max()) > 0 for k, v in flat.items() if k[-1] == "b")
    assert all(float(jnp.abs(v).max()) == 0 for k, v in flat.items() if k[-1] == "a")


def test_shardings_follow_kernel():
    cfg = preset("tiny")
    mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    abstract, shards = sharding.abstract_and_shardings(init_fn(cfg, jax.random.key(0)), mesh)
    lcfg = lora.LoRAConfig()
    adapter = jax.eval_shape(lambda: lora.init(jax.random.key(0), abstract, lcfg))
    out = lora.shardings(adapter, shards)
    q = out["double_blocks"]["img_attn"]["q"]
    assert tuple(q["a"].spec) == (None, "fsdp", None) and tuple(q["b"].spec) == (None, None, "tensor")


def test_compose_concatenates_ranks_and_keeps_one_lora_as_it_is():
    """compose: the sum of each adapter's update at its weight, ranks concatenated (diffusers' set_adapters)."""
    rng = np.random.default_rng(0)
    a1, b1, a2, b2 = (rng.standard_normal(s).astype(np.float32)  # a scanned layer axis first
                      for s in ((2, 4, 3), (2, 3, 5), (2, 4, 1), (2, 1, 5)))
    one = {"blocks": {"q": {"a": a1, "b": b1}}, "out": {"a": a1[0], "b": b1[0]}}
    two = {"blocks": {"q": {"a": a2, "b": b2}}}
    got = lora.compose([(one, 0.5), (None, 1.0), (two, 2.0)])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    q = got["blocks"]["q"]
    assert q["a"].shape == (2, 4, 4) and q["b"].shape == (2, 4, 5)
    update = lambda a, b: np.einsum("li,lir,lro->lo", x, a, b)  # noqa: E731
    np.testing.assert_allclose(update(q["a"], q["b"]), 0.5 * update(a1, b1) + 2.0 * update(a2, b2), rtol=1e-5)
    np.testing.assert_array_equal(got["out"]["b"], 0.5 * b1[0])  # only the first LoRA has `out`
    only = lora.compose([(one, 1.0)])
    for key, value in traverse_util.flatten_dict(one).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(only)[key], value)
    assert lora.compose([(None, 1.0)]) is None


@pytest.mark.parametrize("shape", [(2, 7, 12), (7, 12)])
def test_lora_delta_backward_is_autodiffs(shape):
    """layers.lora_delta's explicit backward: the same gradients as autodiff of (x @ a) @ b."""
    from purecc_jax.models.layers import lora_delta

    kx, ka, kb, kg = jax.random.split(jax.random.key(3), 4)
    x, a, b = jax.random.normal(kx, shape), jax.random.normal(ka, (12, 3)), jax.random.normal(kb, (3, 5))
    g = jax.random.normal(kg, (*shape[:-1], 5))
    got = jax.grad(lambda *p: jnp.sum(lora_delta(*p) * g), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(lambda x, a, b: jnp.sum(jnp.dot(jnp.dot(x, a), b) * g), argnums=(0, 1, 2))(x, a, b)
    for name, u, v in zip("xab", got, want):
        assert u.shape == v.shape, name
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("scan", [True, False])
def test_lora_backward_setting_reaches_every_block(scan):
    """`lora_backward` chooses the LoRA overlay's backward in every block, scanned or not (the model sets
    it for the Dense layers it traces), and both choices give the same gradients."""
    cfg = preset("tiny", scan_layers=scan)
    params = _params(cfg)
    lcfg = lora.LoRAConfig(rank=3, alpha=6.0)
    adapter = _randomise_b(lora.init(jax.random.key(2), params, lcfg))
    inputs = random_inputs(cfg, 2, 2, 3, 5)

    def forward(mode):
        model = FluxTransformer(cfg.replace(lora_backward=mode))
        return lambda ad: model.apply({"params": params, "lora": lora.variables(ad, lcfg)}, **inputs)

    def grads(mode):
        return jax.grad(lambda ad: jnp.mean(forward(mode)(ad) ** 2))(adapter)

    # custom_vjp calls: a whole number of them per targeted Dense (kernel path; a scan body stands for its blocks).
    calls = str(jax.make_jaxpr(forward("explicit"))(adapter)).count("custom_vjp_call")
    targeted = len(lora.target_paths(params, lcfg.targets))
    assert calls >= targeted and calls % targeted == 0
    assert "custom_vjp_call" not in str(jax.make_jaxpr(forward("autodiff"))(adapter))
    for u, v in zip(jax.tree_util.tree_leaves(grads("explicit")), jax.tree_util.tree_leaves(grads("autodiff"))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="lora_backward 'fast' is not one of"):
        preset("tiny", lora_backward="fast")
