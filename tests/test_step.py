"""The fused train step against a plain transcription of docs/method.md Eq. 8-15, frozen-weight
invariance, and equality on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from purecc_jax import sharding
from purecc_jax.models import lora
from purecc_jax.models.flux import ConceptInjection, FluxTransformer, init_fn
from purecc_jax.pipeline import flow
from purecc_jax.purecc.objective import ObjectiveConfig
from purecc_jax.purecc.step import (Extractor, Frozen, StepConfig, init_state, make_loss_fn, make_optimizer,
                                    make_train_step)
from step_fixtures import batch, denoiser_of, random_cache, random_lora, tiny_flux

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
    g = jnp.full((x0.shape[0],), 1.0)  # the training guidance of `denoiser_of`
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
    denoiser = denoiser_of(cfg, "layerwise" if layerwise else "none")
    scfg = StepConfig(objective=ObjectiveConfig(eta=1.5), trainable_lora=LCFG, extractor_lora=LCFG)
    emb = None
    if layerwise:
        k1, k2 = jax.random.split(jax.random.key(5))
        emb = dict(double=jax.random.normal(k1, (cfg.depth, cfg.hidden_size)),
                   single=jax.random.normal(k2, (cfg.depth_single, cfg.hidden_size)))
    frozen = Frozen(params=params, cache=cache, embeddings=emb, extractor=Extractor(lora=extractor))
    b, rng = batch(), jax.random.key(3)

    fused = jax.jit(jax.value_and_grad(make_loss_fn(denoiser, scfg), has_aux=True))
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
    denoiser = denoiser_of(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    tx = make_optimizer({"lora": 1e-2})
    frozen = Frozen(params=params, cache=cache, extractor=Extractor(lora=extractor))
    before = jax.tree_util.tree_map(np.array, frozen)
    state = init_state({"lora": jax.tree_util.tree_map(jnp.copy, trainable)}, tx, seed=0)  # donated below
    start = jax.tree_util.tree_map(np.array, state.trainable)
    step = jax.jit(make_train_step(denoiser, scfg, tx), donate_argnums=(0,))
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
    denoiser = denoiser_of(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    sched = optax.constant_schedule(1e-2)
    tx = make_optimizer({"lora": sched})
    step = make_train_step(denoiser, scfg, tx, sched)
    frozen = Frozen(params=params, cache=cache, extractor=Extractor(lora=extractor))
    b = batch(b=2)

    ref_state, ref_m = jax.jit(step)(init_state({"lora": trainable}, tx, 0), frozen, b)

    mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    _, pshard = sharding.abstract_and_shardings(init_fn(cfg, jax.random.key(0)), mesh)
    lshard = lora.shardings(trainable, pshard)
    rep = sharding.replicated(mesh)
    frozen_sh = Frozen(params=pshard, cache=jax.tree_util.tree_map(lambda _: rep, cache),
                       extractor=Extractor(lora=lshard))
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


def test_extractor_reads_its_own_embeddings(setup):
    """With `extractor_embeddings` (stage A's) the extractor ignores the embeddings stage B trains."""
    cfg, params, cache, extractor, trainable = setup
    model = FluxTransformer(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    keys = jax.random.split(jax.random.key(7), 4)
    stage_a = dict(double=jax.random.normal(keys[0], (cfg.depth, cfg.hidden_size)),
                   single=jax.random.normal(keys[1], (cfg.depth_single, cfg.hidden_size)))
    moving = dict(double=jax.random.normal(keys[2], (cfg.depth, cfg.hidden_size)),
                  single=jax.random.normal(keys[3], (cfg.depth_single, cfg.hidden_size)))
    frozen = Frozen(params=params, cache=cache, extractor=Extractor(lora=extractor, embeddings=stage_a))
    b, rng = batch(), jax.random.key(3)
    (_, m), _ = jax.jit(jax.value_and_grad(make_loss_fn(denoiser_of(cfg, "layerwise"), scfg), has_aux=True))(
        {"lora": trainable, "embeddings": moving}, frozen, b, rng)

    def reference(extractor_emb):
        """Eq. 8-15 with the trainable model on `moving` and the extractor on `extractor_emb`."""
        x0 = cache["latents"][b["image"]]
        noise_rng, t_rng = jax.random.split(rng)
        x1 = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        t = flow.sample_timesteps(t_rng, x0.shape[0], scfg.timesteps)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        txt_ids = jnp.zeros((cache["t5"].shape[1], 3))

        def v(adapter, kind, emb):
            inj = ConceptInjection(cache["ident_mask"][b[kind]], emb["double"], emb["single"])
            return model.apply({"params": params, "lora": lora.variables(adapter, LCFG)}, xt, cache["t5"][b[kind]],
                               cache["pooled"][b[kind]], t, cache["img_ids"], txt_ids, jnp.ones(2), inj)

        r_tar = v(extractor, "target", extractor_emb) - v(extractor, "null", extractor_emb)
        r_learn = v(trainable, "complete", moving) - v(trainable, "base", moving)
        return jnp.sum(r_learn * r_tar, axis=(1, 2)) / (jnp.sum(r_tar**2, axis=(1, 2)) + 1e-8)

    want, swapped = jax.jit(reference)(stage_a), jax.jit(reference)(moving)
    np.testing.assert_allclose([m["lambda_min"], m["lambda_max"]], [want.min(), want.max()], rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(swapped) - np.asarray(want)).max() > 1e-2  # the check can tell the two apart


def test_nonfinite_step_is_skipped(setup):
    """A NaN in the batch's latents: parameters and optimizer state stay bit-identical, the skip is
    counted, the next finite step updates again and ends the streak."""
    cfg, params, cache, extractor, trainable = setup
    denoiser = denoiser_of(cfg)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    tx = make_optimizer({"lora": 1e-2})
    poisoned = dict(cache, latents=cache["latents"].at[0, 0, 0].set(jnp.nan))
    frozen = Frozen(params=params, cache=poisoned, extractor=Extractor(lora=extractor))
    step = jax.jit(make_train_step(denoiser, scfg, tx))
    state = step(init_state({"lora": trainable}, tx, seed=0), frozen, dict(batch(), image=jnp.asarray([1, 2])))[0]
    before = jax.tree_util.tree_map(np.array, (state.trainable, state.opt_state))

    bad = dict(batch(), image=jnp.asarray([0, 1], jnp.int32))
    for i in range(2):
        state, m = step(state, frozen, bad)
        assert not np.isfinite(float(m["loss"]))
        assert (int(m["nonfinite_skipped"]), int(m["nonfinite_streak"])) == (i + 1, i + 1)
    after = jax.tree_util.tree_map(np.array, (state.trainable, state.opt_state))
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert int(state.step) == 3 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(after))

    state, m = step(state, frozen, dict(batch(), image=jnp.asarray([1, 2], jnp.int32)))
    assert (int(m["nonfinite_skipped"]), int(m["nonfinite_streak"])) == (2, 0) and np.isfinite(float(m["loss"]))
    moved = jax.tree_util.tree_leaves(state.trainable)
    assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(moved, jax.tree_util.tree_leaves(after[0])))


def test_learning_rate_counts_updates_with_grad_accum(setup):
    """grad_accum=2, 8 micro-steps, linear decay to 0: the 4 updates use lr(0), lr(2), lr(4), lr(6) of the
    micro-step schedule (1, .75, .5, .25), not its first half. Adam with a constant gradient moves each
    parameter by about its learning rate, so the steps read the schedule back."""
    import ml_collections

    from purecc_jax import train

    stage = ml_collections.ConfigDict(dict(steps=8, warmup_steps=0, schedule="linear", grad_accum=2))
    tx = make_optimizer({"w": train.schedule(stage, 1.0)}, weight_decay=0.0, grad_clip=None, grad_accum=2)
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    deltas = []
    for _ in range(8):
        updates, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
        new = optax.apply_updates(params, updates)
        deltas.append(float(params["w"][0] - new["w"][0]))
        params = new
    np.testing.assert_allclose(deltas, [0, 1.0, 0, 0.75, 0, 0.5, 0, 0.25], atol=1e-4)

    # The logged learning rate is the one of the update a micro-step belongs to.
    cfg, params_, cache, extractor, trainable = setup
    sched = train.schedule(stage, 1e-3)
    tx = make_optimizer({"lora": sched}, grad_accum=2)
    step = jax.jit(make_train_step(denoiser_of(cfg), StepConfig(trainable_lora=LCFG, extractor_lora=LCFG),
                                   tx, sched, grad_accum=2))
    state = init_state({"lora": trainable}, tx, seed=0)
    frozen = Frozen(params=params_, cache=cache, extractor=Extractor(lora=extractor))
    logged = []
    for i in range(4):
        state, m = step(state, frozen, batch(seed=i))
        logged.append(float(m["learning_rate"]))
    np.testing.assert_allclose(logged, [1e-3, 1e-3, 0.75e-3, 0.75e-3], rtol=1e-6)


def test_bfloat16_step_follows_float32(setup):
    """The default compute path (bf16 weights and matmuls) against float32, same LoRA and batch.

    bf16 keeps 8 significant bits (relative rounding 2^-9 per value), compounded over the tiny
    model's ~20 matmuls and norms. Measured here: loss 0.1% and L_CC 0.2% off, λ* within 0.009
    (values 0.03-0.17), gradient error 2.4% of its norm, cosine 0.9997. The bounds leave 3-10x
    margin: loss and L_CC within 1%, λ* within 0.03 (R_learn is a difference of two close bf16
    velocities, so λ* is held in absolute terms), gradient error within 10%, cosine > 0.99.
    """
    cfg, params, cache, extractor, trainable = setup
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    scfg = StepConfig(trainable_lora=LCFG, extractor_lora=LCFG)
    b, rng = batch(), jax.random.key(3)
    out = {}
    for name, c, p in (("f32", cfg, params), ("bf16", cfg16, params16)):
        fn = jax.jit(jax.value_and_grad(make_loss_fn(denoiser_of(c), scfg), has_aux=True))
        out[name] = fn({"lora": trainable}, Frozen(params=p, cache=cache, extractor=Extractor(lora=extractor)), b, rng)
    (loss, m), g = out["f32"]
    (loss16, m16), g16 = out["bf16"]
    assert loss16.dtype == jnp.float32 and m16["lambda_mean"].dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), float(loss), rtol=1e-2)
    np.testing.assert_allclose(float(m16["l_cc"]), float(m["l_cc"]), rtol=1e-2)
    np.testing.assert_allclose([m16["lambda_min"], m16["lambda_max"]], [m["lambda_min"], m["lambda_max"]], atol=0.03)
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
    flat16 = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(g16)])
    assert np.linalg.norm(flat16 - flat) <= 0.1 * np.linalg.norm(flat), np.linalg.norm(flat16 - flat) / np.linalg.norm(flat)
    assert flat16 @ flat / (np.linalg.norm(flat16) * np.linalg.norm(flat)) > 0.99


def test_gradient_share_is_logged_every_k_steps(setup):
    """grad_share = η‖∇L_PureCC‖ / ‖∇L_CC‖ at the step's parameters and draws, on the steps it is asked for
    (nan on the others); the update itself is the one without it, to the bit."""
    cfg, params, cache, extractor, trainable = setup
    denoiser = denoiser_of(cfg)
    eta = 1.5
    scfg = StepConfig(objective=ObjectiveConfig(eta=eta), trainable_lora=LCFG, extractor_lora=LCFG)
    logged = StepConfig(objective=ObjectiveConfig(eta=eta), trainable_lora=LCFG, extractor_lora=LCFG,
                        gradient_share_every=2)
    tx = make_optimizer({"lora": 1e-2})
    frozen = Frozen(params=params, cache=cache, extractor=Extractor(lora=extractor))
    state = init_state({"lora": trainable}, tx, seed=0)
    plain, with_share = jax.jit(make_train_step(denoiser, scfg, tx)), jax.jit(make_train_step(denoiser, logged, tx))
    s1, m1 = with_share(state, frozen, batch())  # step 1: not a multiple of 2
    s0, _ = plain(state, frozen, batch())
    assert np.isnan(float(m1["grad_share"]))
    state, s1 = s1, None
    s1, m1 = with_share(state, frozen, batch())  # step 2
    s0, _ = plain(state, frozen, batch())
    for a, b in zip(jax.tree_util.tree_leaves(s1.trainable), jax.tree_util.tree_leaves(s0.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loss_fn = make_loss_fn(denoiser, scfg)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad = lambda key: jax.grad(lambda tr: loss_fn(tr, frozen, batch(), rng)[1][key])(state.trainable)  # noqa: E731
    want = eta * optax.tree.norm(grad("l_pure")) / optax.tree.norm(grad("l_cc"))
    np.testing.assert_allclose(float(m1["grad_share"]), float(want), rtol=1e-4)

