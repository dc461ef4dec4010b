"""Optimizers by name (config.optimizer): each is optax's with the options given, resumes bit-exact
from an orbax checkpoint of the TrainState, and schedule-free AdamW's evaluation parameters.

The step runs on a toy denoiser (one linear map and a text vector per text) so that every optimizer
compiles in a second; the step and the loop are the trainer's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from purecc_jax import defaults
from purecc_jax.purecc import loop
from purecc_jax.purecc.step import (OPTIMIZERS, AdafactorOptions, Frozen, OptimizerConfig, ProdigyOptions,
                                    ScheduleFreeOptions, StepConfig, Weights, eval_params, init_state,
                                    make_optimizer, make_train_step)

C = 8  # channels: the linear map is (C, C), factored by Adafactor at min_dim_size_to_factor <= 8
LRS = {"params": 3e-2, "embeddings": 1e-1}
# Every option away from its default, so a dropped option changes the numbers.
CUSTOM = OptimizerConfig(
    b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05, grad_clip=0.5,
    adafactor=AdafactorOptions(decay_rate=0.5, clipping_threshold=0.5, min_dim_size_to_factor=4,
                               multiply_by_parameter_scale=True, momentum=0.9, weight_decay_rate=0.01, eps=1e-20),
    prodigy=ProdigyOptions(beta3=0.9, estim_lr0=1e-3, estim_lr_coef=2.0, safeguard_warmup=True),
    schedule_free=ScheduleFreeOptions(weight_lr_power=1.0))


class ToyDenoiser:
    """v = tanh(x W + text (+ embedding)) (1 + t): a full fine-tune ("params") and learned embeddings."""

    def condition(self, weights: Weights, cache, kind, index):
        text = cache["text"][index]
        return text if weights.embeddings is None else text + weights.embeddings["e"]

    def velocity(self, weights: Weights, cache, xt, t, cond):
        return jnp.tanh(xt @ weights.params["w"] + cond[:, None, :]) * (1 + t[:, None, None])


def toy(seed: int = 0):
    rng = np.random.default_rng(seed)
    cache = dict(latents=jnp.asarray(rng.standard_normal((3, 4, C)), jnp.float32),
                 text=jnp.asarray(rng.standard_normal((4, C)), jnp.float32))
    params = {"w": jnp.asarray(rng.standard_normal((C, C)) / C, jnp.float32)}
    trainable = {"params": params, "embeddings": {"e": jnp.asarray(0.1 * rng.standard_normal(C), jnp.float32)}}
    return cache, params, trainable


def batch_fn(step: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(step)
    b = 2
    return dict(image=jnp.asarray(rng.integers(0, 3, b), jnp.int32), complete=jnp.zeros(b, jnp.int32),
                base=jnp.ones(b, jnp.int32), target=jnp.full(b, 2, jnp.int32), null=jnp.full(b, 3, jnp.int32))


def program(optimizer: OptimizerConfig, grad_accum: int = 1):
    cache, params, trainable = toy()
    tx = make_optimizer(LRS, optimizer, grad_accum=grad_accum)
    step = make_train_step(ToyDenoiser(), StepConfig(stage="purecc", trainable_lora=None, extractor_lora=None), tx)
    frozen = Frozen(params=jax.tree_util.tree_map(jnp.copy, params), cache=cache)
    return trainable, tx, jax.jit(step, donate_argnums=(0,)), frozen


def straight_and_resumed(make_program, directory, stage: str = "stage_b", ema: bool = False):
    """The trained state after 4 loop steps run straight, and after 2 steps + an orbax checkpoint + 2 more
    after restoring it (the loop's resume); `make_program()` gives (trainable, tx, step, frozen)."""

    def run(path, steps):
        trainable, tx, step, frozen = make_program()
        state = jax.jit(lambda tr: init_state(tr, tx, seed=0, ema=ema))(trainable)  # as the trainer makes it
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
        cfg = loop.LoopConfig(steps=steps, log_every=1, checkpoint_every=2, progress=False, async_checkpoints=False)
        return loop.run_stage(stage, path, cfg, state, shardings, step, frozen, batch_fn)

    straight = run(directory / "straight", 4)
    run(directory / "resumed", 2)
    return straight, run(directory / "resumed", 4)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


def updates(tx: optax.GradientTransformation, steps: int = 3) -> list[np.ndarray]:
    """Parameters after `steps` updates of `tx` on fixed pseudo-gradients of the toy trainable."""
    _, _, trainable = toy()
    state = tx.init(trainable)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda x: jnp.sin(x * (i + 2.0)) + 0.1 * (i + 1), trainable)
        u, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, u)
    return leaves(trainable)


def reference(name: str, lr: float, o: OptimizerConfig) -> optax.GradientTransformation:
    """The optax optimizer `name` with `o`'s options, written out."""
    a, p = o.adafactor, o.prodigy
    return {
        "adamw": lambda: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                     mu_dtype=jnp.float32),
        "adafactor": lambda: optax.adafactor(lr, min_dim_size_to_factor=a.min_dim_size_to_factor,
                                             decay_rate=a.decay_rate,
                                             multiply_by_parameter_scale=a.multiply_by_parameter_scale,
                                             clipping_threshold=a.clipping_threshold, momentum=a.momentum,
                                             weight_decay_rate=a.weight_decay_rate, eps=a.eps),
        "prodigy": lambda: optax.contrib.prodigy(lr, betas=(o.b1, o.b2), beta3=p.beta3, eps=o.eps,
                                                 estim_lr0=p.estim_lr0, estim_lr_coef=p.estim_lr_coef,
                                                 weight_decay=o.weight_decay, safeguard_warmup=p.safeguard_warmup),
        "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(
            lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
            weight_lr_power=o.schedule_free.weight_lr_power, state_dtype=jnp.float32),
    }[name]()


def test_defaults_are_todays_adamw():
    """config.optimizer's defaults build the AdamW of before (clip 1.0, b 0.9/0.999, eps 1e-8, wd 1e-4)."""
    assert OptimizerConfig.from_config(defaults.concept_config().optimizer) == OptimizerConfig()
    before = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {k: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, mu_dtype=jnp.float32)
         for k, lr in LRS.items()}, {"params": {"w": "params"}, "embeddings": {"e": "embeddings"}}))
    for got, want in zip(updates(make_optimizer(LRS)), updates(before)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_optax_with_its_options(name):
    """Per group at its learning rate, after global clipping: optax's optimizer with every option passed."""
    o = dataclasses.replace(CUSTOM, name=name)
    want = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.multi_transform(
        {k: reference(name, lr, o) for k, lr in LRS.items()},
        {"params": {"w": "params"}, "embeddings": {"e": "embeddings"}}))
    got = updates(make_optimizer(LRS, o))
    for g, w in zip(got, updates(want)):
        np.testing.assert_array_equal(g, w)
    plain = updates(make_optimizer(LRS, OptimizerConfig(name=name)))  # the options change the result
    assert max(np.abs(g - p).max() for g, p in zip(got, plain)) > 1e-4
    if name != "adamw":
        adamw = updates(make_optimizer(LRS, dataclasses.replace(CUSTOM, name="adamw")))
        assert max(np.abs(g - a).max() for g, a in zip(got, adamw)) > 1e-4


@pytest.mark.parametrize("name,grad_accum", [(n, 1) for n in OPTIMIZERS] + [("schedule_free_adamw", 2)])
def test_resume_from_a_checkpoint_is_bit_exact(name, grad_accum, tmp_path):
    """4 steps straight, and 2 steps + an orbax checkpoint + 2 more after restoring it (the loop's resume):
    bit-identical parameters and optimizer state."""
    o = dataclasses.replace(CUSTOM, name=name)
    straight, resumed = straight_and_resumed(lambda: program(o, grad_accum), tmp_path)
    assert loop.checkpoint_steps(tmp_path / "resumed") == [2, 4]
    assert_trees_equal(resumed.trainable, straight.trainable)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    assert int(resumed.step) == 4 and int(resumed.nonfinite_skipped) == 0
    _, _, start = toy()
    assert max(np.abs(a - b).max() for a, b in zip(leaves(straight.trainable), leaves(start))) > 1e-4


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_schedule_free_eval_params(grad_accum):
    """Schedule-free AdamW trains y and evaluates x = (y - (1 - b1) z) / b1 per group; others evaluate y."""
    o = dataclasses.replace(CUSTOM, name="schedule_free_adamw")
    trainable, tx, step, frozen = program(o, grad_accum)
    state = init_state(trainable, tx, seed=0)
    for i in range(4):
        state, _ = step(state, frozen, batch_fn(i))
    got = eval_params(state.trainable, state.opt_state)
    inner = state.opt_state.inner_opt_state if grad_accum > 1 else state.opt_state
    groups = inner[1].inner_states  # chain(clip, multi_transform)
    for k in LRS:
        sf = groups[k].inner_state
        assert float(sf.b1) == pytest.approx(o.b1)
        z = sf.z[k]  # the other groups' leaves are masked out
        want = jax.tree_util.tree_map(lambda y, zz: (y - (1 - sf.b1) * zz) / sf.b1, state.trainable[k], z)
        assert_trees_equal(got[k], want)
        assert max(np.abs(a - b).max() for a, b in zip(leaves(got[k]), leaves(state.trainable[k]))) > 1e-4
    trainable, tx, step, frozen = program(dataclasses.replace(CUSTOM, name="adamw"), grad_accum)
    state, _ = step(init_state(trainable, tx, seed=0), frozen, batch_fn(0))
    assert_trees_equal(eval_params(state.trainable, state.opt_state), state.trainable)


@pytest.mark.parametrize("overrides,message", [
    (dict(name="lion"), "config.optimizer.name='lion' is not one of adamw, adafactor, prodigy, schedule_free_adamw"),
    (dict(b1=1.0), r"config.optimizer.b1=1.0 must be in \[0, 1\)"),
    (dict(name="schedule_free_adamw", b1=0.0), "config.optimizer.b1=0.0 must be > 0 for schedule_free_adamw"),
    (dict(b2=-0.1), r"config.optimizer.b2=-0.1 must be in \[0, 1\)"),
    (dict(eps=0.0), "config.optimizer.eps=0.0 must be > 0"),
    (dict(weight_decay=-1.0), "config.optimizer.weight_decay=-1.0 must be >= 0"),
    (dict(grad_clip=-1.0), "config.optimizer.grad_clip=-1.0 must be >= 0"),
    (dict(adafactor=dict(decay_rate=0.0)), r"config.optimizer.adafactor.decay_rate=0.0 must be in \(0, 1\]"),
    (dict(adafactor=dict(momentum=1.0)), "config.optimizer.adafactor.momentum=1.0 must be in"),
    (dict(adafactor=dict(min_dim_size_to_factor=0)), "config.optimizer.adafactor.min_dim_size_to_factor=0"),
    (dict(adafactor=dict(clipping_threshold=-1.0)), "config.optimizer.adafactor.clipping_threshold=-1.0"),
    (dict(adafactor=dict(weight_decay_rate=-1.0)), "config.optimizer.adafactor.weight_decay_rate=-1.0"),
    (dict(adafactor=dict(eps=0.0)), "config.optimizer.adafactor.eps=0.0 must be > 0"),
    (dict(prodigy=dict(beta3=1.0)), "config.optimizer.prodigy.beta3=1.0 must be < 1"),
    (dict(prodigy=dict(estim_lr0=0.0)), "config.optimizer.prodigy.estim_lr0=0.0 must be > 0"),
    (dict(prodigy=dict(estim_lr_coef=0.0)), "config.optimizer.prodigy.estim_lr_coef=0.0 must be > 0"),
    (dict(schedule_free=dict(weight_lr_power=-1.0)), "config.optimizer.schedule_free.weight_lr_power=-1.0"),
    (dict(lr=1.0), r"config.optimizer has unknown keys \['lr'\]"),
    (dict(prodigy=dict(d0=1.0)), r"config.optimizer.prodigy has unknown keys \['d0'\]"),
])
def test_invalid_options_are_refused_naming_the_key(overrides, message):
    config = defaults.concept_config().optimizer.to_dict()
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    with pytest.raises(ValueError, match=message):
        OptimizerConfig.from_config(config)


def test_schedule_free_refuses_a_decaying_schedule():
    o = OptimizerConfig(name="schedule_free_adamw")
    o.check_schedule("stage_a", "constant")
    OptimizerConfig().check_schedule("stage_a", "cosine")
    with pytest.raises(ValueError, match="config.stage_b.schedule='cosine': optimizer.name=schedule_free_adamw"):
        o.check_schedule("stage_b", "cosine")


def test_grad_clip_zero_is_no_clipping():
    o = OptimizerConfig.from_config({**defaults.concept_config().optimizer.to_dict(), "grad_clip": 0.0})
    assert o.grad_clip is None
    unclipped = optax.multi_transform({k: reference("adamw", lr, o) for k, lr in LRS.items()},
                                      {"params": {"w": "params"}, "embeddings": {"e": "embeddings"}})
    for got, want in zip(updates(make_optimizer(LRS, o)), updates(unclipped)):
        np.testing.assert_array_equal(got, want)
