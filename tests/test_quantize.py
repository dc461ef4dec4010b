"""Weight-only quantized base (models/quantize.py): velocity parity and a train step on a quantized base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from purecc_jax.models import lora as lora_lib
from purecc_jax.models import quantize
from purecc_jax.models.flux import FluxTransformer, init_fn, preset


def _unbox(tree):
    return jax.tree_util.tree_map(lambda x: getattr(x, "value", x), tree, is_leaf=lambda x: hasattr(x, "value"))


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    params = _unbox(jax.jit(init_fn(cfg, jax.random.key(0), batch=2, img_len=16, txt_len=8))())
    k = jax.random.split(jax.random.key(1), 5)
    inputs = dict(img=jax.random.normal(k[0], (2, 16, cfg.in_channels)),
                  txt=jax.random.normal(k[1], (2, 8, cfg.context_dim)), pooled=jax.random.normal(k[2], (2, cfg.pooled_dim)),
                  timesteps=jax.random.uniform(k[3], (2,)), img_ids=jax.random.uniform(k[4], (16, 3)) * 4,
                  txt_ids=jnp.zeros((8, 3)), guidance=jnp.full((2,), 3.5))
    return cfg, params, inputs


def test_kernel_round_trip_error_bounded():
    w = jax.random.normal(jax.random.key(0), (3, 64, 32)) * jnp.linspace(0.1, 3.0, 32)  # per-channel ranges
    for mode, rel in (("int8", 0.5 / 127), ("fp8", 2.0**-4)):
        q, s = quantize.quantize_kernel(w, mode)
        assert q.dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[mode] and s.shape == (3, 32)
        err = jnp.abs(quantize.dequantize(q, s) - w) / jnp.max(jnp.abs(w), axis=-2, keepdims=True)
        assert float(jnp.max(err)) <= rel * 1.01, mode


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("fp8", 0.08)])
def test_quantized_velocity_close_to_full_precision(tiny, mode, tol):
    """Relative L2 error of the velocity: int8 within 2%, fp8 (3 mantissa bits) within 8%."""
    cfg, params, inputs = tiny
    qparams = quantize.quantize(params, mode)
    flat = traverse_util.flatten_dict(qparams)
    kernels = [p for p in flat if p[-1] == "kernel" and quantize.BLOCKS.search("/".join(p))]
    assert kernels and all(flat[p].dtype.itemsize == 1 for p in kernels)
    assert flat[("img_in", "kernel")].dtype == jnp.float32  # outside the blocks: kept
    model = FluxTransformer(cfg)
    ref = model.apply({"params": params}, **inputs)
    out = model.apply({"params": qparams}, **inputs)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < tol, rel
    # The same model with the dequantised kernels written back: the scale is applied exactly once.
    deq = {p: (quantize.dequantize(v, flat[p[:-1] + ("kernel_scale",)]) if p in kernels else v)
           for p, v in flat.items() if p[-1] != "kernel_scale"}
    out_deq = model.apply({"params": traverse_util.unflatten_dict(deq)}, **inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_deq), rtol=1e-4, atol=1e-5)


def test_lora_on_quantized_base_gets_gradients(tiny):
    cfg, params, inputs = tiny
    qparams = quantize.quantize(params, "int8")
    lcfg = lora_lib.LoRAConfig()
    adapter = jax.tree_util.tree_map(lambda x: x + 0.1, lora_lib.init(jax.random.key(2), params, lcfg))
    model = FluxTransformer(cfg)
    loss = lambda a: jnp.mean(model.apply({"params": qparams, "lora": lora_lib.variables(a, lcfg)}, **inputs) ** 2)
    grads = jax.grad(loss)(adapter)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_bad_mode_and_double_quantization(tiny):
    _, params, _ = tiny
    with pytest.raises(ValueError, match="base_quantization='int4'"):
        quantize.quantize(params, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize(quantize.quantize(params, "int8"), "fp8")


def test_abstract_quantization_matches_concrete(tiny):
    cfg, params, _ = tiny
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    a = quantize.quantize(abstract, "fp8")
    c = quantize.quantize(params, "fp8")
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), a) == jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), c)


def test_train_step_on_quantized_base_updates_only_the_lora():
    """The fused stage-B step (benchmarks' inputs = the trainer's) with an int8 base: finite loss, LoRA moves."""
    from benchmarks.step_inputs import Shapes, Variant, compiled_step, pretrained
    from purecc_jax import sharding

    cfg = preset("tiny")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = pretrained(cfg, mesh)
    compiled, x = compiled_step(cfg, Variant("purecc"), lora_lib.LoRAConfig(), Shapes(2, 16, 8), mesh, params,
                                base_quantization="int8")
    assert quantize.is_quantized(x.frozen.params)
    before = jax.tree_util.tree_map(np.asarray, x.state.trainable)
    state, metrics = compiled(x.state, x.frozen, x.batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.trainable, before)
    assert all(jax.tree_util.tree_leaves(moved))


def test_config_rejects_quantized_base_with_full_finetuning():
    from purecc_jax import defaults, train

    config = defaults.concept_config()
    config.concept.path = "dog"
    config.model.base_quantization = "int8"
    config.stage_b.full_finetune = True
    with pytest.raises(ValueError, match="base_quantization='int8'.*LoRA in both stages"):
        train.validate(config)
    config.model.base_quantization = "int4"
    with pytest.raises(ValueError, match="base_quantization='int4'"):
        train.validate(config)
