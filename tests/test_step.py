"""The fused train step against a plain transcription of METHOD.md Eq. 8-15, frozen-weight
invariance, and equality on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from purecc_jax import sharding
from purecc_jax.models import lora
from purecc_jax.models.flux import ConceptInjection, FluxTransformer, init_fn
from purecc_jax.purecc import flow
from purecc_jax.purecc.objective import ObjectiveConfig
from purecc_jax.purecc.step import StepConfig, init_state, make_loss_fn, make_optimizer, make_train_step
from step_fixtures import batch, random_cache, random_lora, tiny_flux

LCFG = lora.LoRAConfig(rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def setup():
    cfg, params = tiny_flux()
    cache = random_cache(cfg)
    extractor = random_lora(params, LCFG, seed=1)
    trainable = random_lora(params, LCFG, seed=2)
    return cfg, params, cache, extractor, trainable


def _unfused_loss(model, params, cache, extractor, trainable, b, rng, cfg: StepConfig, layerwise=None):
    """Four separate forward passes and Eq. 8-15 written out, as in the paper."""
    x0 = cache["latents"][b["image"]]
    noise_rng, t_rng = jax.random.split(rng)
    x1 = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    t = flow.sample_timesteps(t_rng, x0.shape[0], cfg.timesteps)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    g = jnp.full((x0.shape[0],), cfg.guidance)
    txt_ids = jnp.zeros((cache["t5"].shape[1], 3))

    def v(adapter, kind):
        inj = None
        if layerwise is not None:
            inj = ConceptInjection(cache["ident_mask"][b[kind]], layerwise["double"], layerwise["single"])
        return model.apply({"params": params, "lora": lora.variables(adapter, LCFG)}, xt, cache["t5"][b[kind]],
                           cache["pooled"][b[kind]], t, cache["img_ids"], txt_ids, g, inj)

    r_tar = jax.lax.stop_gradient(v(extractor, "target") - v(extractor, "null"))       # (8)
    v_c, v_b = v(trainable, "complete"), v(trainable, "base")                           # (9)
    r_learn = v_c - v_b                                                                  # (10)
    lam = jax.lax.stop_gradient(
        jnp.sum(r_learn * r_tar, axis=(1, 2)) / (jnp.sum(r_tar**2, axis=(1, 2)) + 1e-8))  # (12)
    v_pure = v_b + lam[:, None, None] * r_tar                                            # (13)
    l_pure = jnp.mean(jnp.mean((v_pure - v_c) ** 2, axis=(1, 2)))                        # (14)
    l_cc = jnp.mean(jnp.mean(((x1 - x0) - v_c) ** 2, axis=(1, 2)))
    return l_cc + cfg.objective.eta * l_pure, (l_cc, l_pure, lam)                        # (15)


@pytest.mark.parametrize("layerwise", [False, True])
def test_fused_equals_unfused(setup, layerwise):
    cfg, params, cache, extractor, trainable = setup
    model = FluxTransformer(cfg)
    scfg = StepConfig(objective=ObjectiveConfig(eta=1.5), trainable_lora=LCFG, extractor_lora=LCFG,
                      concept_embedding="layerwise" if layerwise else "none")
    emb = None
    if layerwise:
        k1, k2 = jax.random.split(jax.random.key(5))
        emb = dict(double=jax.random.normal(k1, (cfg.depth, cfg.hidden_size)),
                   single=jax.random.normal(k2, (cfg.depth_single, cfg.hidden_size)))
    frozen = dict(params=params, cache=cache, extractor_lora=extractor)
    if emb is not None:
        frozen["embeddings"] = emb
    b, rng = batch(), jax.random.key(3)

    fused = jax.jit(jax.value_and_grad(make_loss_fn(model, scfg), has_aux=True))
    (loss, m), grads = fused({"lora": trainable}, frozen, b, rng)
    ref = jax.jit(jax.value_and_grad(
        lambda tr: _unfused_loss(model, params, cache, extractor, tr, b, rng, scfg, emb), has_aux=True))
    (ref_loss, (l_cc, l_pure, lam)), ref_grads = ref(trainable)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose([m["l_cc"], m["l_pure"]], [l_cc, l_pure], rtol=1e-5)
    np.testing.assert_allclose([m["lambda_mean"], m["lambda_min"], m["lambda_max"]],
                               [lam.mean(), lam.min(), lam.max()], rtol=1e-4, atol=1e-6)
    assert float(l_pure) > 0 and float(jnp.abs(lam).max()) > 0
    for a, r in zip(jax.tree_util.tree_leaves(grads["lora"]), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-7)


def test_frozen_weights_stay_bit_identical(setup):
    cfg, params, cache, extractor, trainable = setup
    model = FluxTransformer(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    tx = make_optimizer({"lora": 1e-2})
    frozen = dict(params=params, cache=cache, extractor_lora=extractor)
    before = jax.tree_util.tree_map(np.array, frozen)
    state = init_state({"lora": jax.tree_util.tree_map(jnp.copy, trainable)}, tx, seed=0)  # donated below
    start = jax.tree_util.tree_map(np.array, state.trainable)
    step = jax.jit(make_train_step(model, scfg, tx), donate_argnums=(0,))
    for i in range(3):
        state, metrics = step(state, frozen, batch(seed=i))
    after = jax.tree_util.tree_map(np.array, frozen)
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        assert np.array_equal(x, y)
    assert int(state.step) == 3
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(state.trainable))]
    assert all(moved)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_step_on_mesh_equals_single_device(setup):
    cfg, params, cache, extractor, trainable = setup
    model = FluxTransformer(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    sched = optax.constant_schedule(1e-2)
    tx = make_optimizer({"lora": sched})
    step = make_train_step(model, scfg, tx, sched)
    frozen = dict(params=params, cache=cache, extractor_lora=extractor)
    b = batch(b=2)

    ref_state, ref_m = jax.jit(step)(init_state({"lora": trainable}, tx, 0), frozen, b)

    mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    _, pshard = sharding.abstract_and_shardings(init_fn(cfg, jax.random.key(0)), mesh)
    lshard = lora.shardings(trainable, pshard)
    rep = sharding.replicated(mesh)
    frozen_sh = dict(params=pshard, cache=jax.tree_util.tree_map(lambda _: rep, cache), extractor_lora=lshard)
    state0 = init_state({"lora": trainable}, tx, 0)
    state_sh = jax.tree_util.tree_map(lambda _: rep, state0).replace(trainable={"lora": lshard})
    state_sh = state_sh.replace(opt_state=jax.tree_util.tree_map(lambda _: rep, state0.opt_state))
    batch_sh = jax.tree_util.tree_map(lambda x: sharding.batch_sharding(mesh, x.shape), b)
    with sharding.activate(mesh):
        jstep = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep))
        state, m = jstep(jax.device_put(state0, state_sh), jax.device_put(frozen, frozen_sh), jax.device_put(b, batch_sh))
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["lambda_mean"], ref_m["lambda_mean"], rtol=1e-4)
    for a, r in zip(jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(ref_state.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
    q_a = state.trainable["lora"]["double_blocks"]["img_attn"]["q"]["a"]
    assert q_a.addressable_shards[0].data.shape[1] == cfg.hidden_size // 4  # LoRA follows the fsdp kernel
