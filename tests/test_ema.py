"""EMA of the trained weights (config.ema): the average after N steps against a hand computation (with
and without diffusers' decay warmup, with gradient accumulation, across a skipped non-finite step),
resumed bit-exact from a checkpoint, the weights the trainer samples, hands on and exports, and the
refused settings.

The step runs on test_optimizers' toy denoiser, so that it compiles in a second."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purecc_jax import defaults, train
from purecc_jax.purecc import loop
from purecc_jax.purecc.step import (Frozen, OptimizerConfig, StepConfig, ema_decay_at, init_state, make_optimizer,
                                    make_train_step)
from test_optimizers import LRS, ToyDenoiser, assert_trees_equal, batch_fn, leaves, straight_and_resumed, toy

DECAY = 0.8


def program(decay: float = DECAY, warmup: bool = True, grad_accum: int = 1):
    cache, params, trainable = toy()
    tx = make_optimizer(LRS, OptimizerConfig(), grad_accum=grad_accum)
    cfg = StepConfig(stage="purecc", trainable_lora=None, extractor_lora=None, ema_decay=decay, ema_warmup=warmup)
    step = jax.jit(make_train_step(ToyDenoiser(), cfg, tx), donate_argnums=(0,))
    frozen = Frozen(params=jax.tree_util.tree_map(jnp.copy, params), cache=cache)
    return trainable, tx, step, frozen


def diffusers_decay(update: int, decay: float, warmup: bool) -> float:
    """diffusers' EMAModel.get_decay at optimization_step `update` (update_after_step 0, min_decay 0)."""
    if not warmup:
        return decay
    step = max(0, update - 1)
    return 0.0 if step <= 0 else min(decay, (1 + step) / (10 + step))


@pytest.mark.parametrize("warmup,grad_accum", [(True, 1), (False, 1), (True, 2)])
def test_ema_after_n_steps_is_the_hand_computed_average(warmup, grad_accum):
    trainable, tx, step, frozen = program(warmup=warmup, grad_accum=grad_accum)
    state = jax.jit(lambda tr: init_state(tr, tx, seed=0, ema=True))(trainable)
    average = leaves(state.trainable)
    updates = 0
    for i in range(6):
        before = leaves(state.trainable)
        state, _ = step(state, frozen, batch_fn(i))
        after = leaves(state.trainable)
        if (i + 1) % grad_accum == 0:
            updates += 1
            d = np.float32(diffusers_decay(updates, DECAY, warmup))
            average = [d * a + (np.float32(1) - d) * p for a, p in zip(average, after)]
        else:  # an accumulating micro-step leaves the weights and their average as they were
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
        assert int(state.ema.count) == updates
        for got, want in zip(leaves(state.ema.params), average):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert max(np.abs(a - t).max() for a, t in zip(leaves(state.ema.params), leaves(state.trainable))) > 1e-4

    # A step whose loss is not finite changes neither the weights nor their average.
    poisoned = frozen.replace(cache=dict(frozen.cache, latents=frozen.cache["latents"] * jnp.nan))
    for _ in range(grad_accum):
        state, _ = step(state, poisoned, batch_fn(0))
    assert int(state.ema.count) == updates
    for got, want in zip(leaves(state.ema.params), average):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_decay_schedule_is_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    ema = EMAModel([__import__("torch").nn.Parameter(__import__("torch").zeros(1))], decay=0.999)
    for update in range(1, 40):
        want = ema.get_decay(update)
        assert float(ema_decay_at(jnp.asarray(update), 0.999, True)) == pytest.approx(want, rel=1e-6), update
    assert float(ema_decay_at(jnp.asarray(1), 0.9, False)) == pytest.approx(0.9)


def test_ema_resumes_bit_exact(tmp_path):
    """4 steps straight, and 2 steps + an orbax checkpoint + 2 more after restoring it: the same average."""
    straight, resumed = straight_and_resumed(program, tmp_path, stage="stage_a", ema=True)
    assert_trees_equal(resumed.ema, straight.ema)
    assert_trees_equal(resumed.trainable, straight.trainable)
    assert int(resumed.ema.count) == 4
    # Only the EMA is read back for an export of it.
    restored, step = loop.restore_leaves(tmp_path / "resumed", lambda p: p[:2] == ("ema", "params"))
    assert step == 4 and set(restored) == {"ema"}
    assert_trees_equal(restored["ema"]["params"], straight.ema.params)


def test_the_trainer_samples_hands_on_and_exports_the_average():
    """`train.evaluated`: the EMA when the state keeps one (samples, stage A's hand-on, export.ema=True),
    the trained weights otherwise; without EMA the trained weights (schedule-free: its average)."""
    trainable, tx, step, frozen = program()
    state = jax.jit(lambda tr: init_state(tr, tx, seed=0, ema=True))(trainable)
    state, _ = step(state, frozen, batch_fn(0))
    state, _ = step(state, frozen, batch_fn(1))
    assert_trees_equal(train.evaluated(state), state.ema.params)
    assert_trees_equal(train.evaluated(state, ema=False), state.trainable)
    plain = init_state(toy()[2], tx, seed=0)
    assert plain.ema is None
    assert_trees_equal(train.evaluated(plain), plain.trainable)


def config(**overrides):
    return defaults.override(defaults.concept_config(), {"concept.path": "dog", "concept.class_word": "dog",
                                                         **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"ema.decay": 1.0}, r"config.ema.decay=1.0 must be in \[0, 1\)"),
    ({"ema.decay": -0.1}, r"config.ema.decay=-0.1 must be in \[0, 1\)"),
    ({"ema.decay": 0.99, "optimizer.name": "schedule_free_adamw"},
     "config.ema.decay=0.99: optimizer.name=schedule_free_adamw already averages"),
])
def test_invalid_ema_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate(config(**overrides))


def test_ema_defaults_keep_todays_runs():
    c = defaults.concept_config()
    assert c.ema.decay == 0.0 and c.export.ema is True
    train.validate(config(**{"ema.decay": 0.999}))
    options = train.step_options(config())
    assert options["ema_decay"] == 0.0
    assert train.step_options(config(**{"ema.decay": 0.9, "ema.warmup": False}))["ema_warmup"] is False
