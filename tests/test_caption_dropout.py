"""Caption dropout (config.concept.caption_dropout): a row's complete text replaced by the null text,
drawn per (seed, step) without changing the views; base, target and null texts never dropped; a dropped
row of stage B adds no L_PureCC term; resumed bit-exact; refused out of [0, 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purecc_jax import defaults, train
from purecc_jax.data import cache as cache_lib
from purecc_jax.purecc import loop
from purecc_jax.purecc.objective import ObjectiveConfig, per_sample_mse, purecc_loss
from purecc_jax.purecc.step import Frozen, OptimizerConfig, StepConfig, init_state, make_optimizer, make_train_step
from test_optimizers import LRS, ToyDenoiser, assert_trees_equal, toy

COMPLETE, BASE, TARGET = 1, 2, 3


def concept_cache(views: int = 3) -> cache_lib.ConceptCache:
    return cache_lib.ConceptCache(arrays={}, texts=["", "a sks dog", "a dog", "sks dog"],
                                  view_texts={"complete": np.full(views, COMPLETE, np.int32),
                                              "base": np.full(views, BASE, np.int32),
                                              "target": np.full(views, TARGET, np.int32)},
                                  view_image=np.arange(views, dtype=np.int32))


def test_dropout_replaces_only_the_complete_text_deterministically():
    cache = concept_cache()
    dropped = []
    for step in range(400):
        plain = cache.batch(step, 4, seed=7)
        got = cache.batch(step, 4, seed=7, caption_dropout=0.25)
        for key in ("image", "base", "target", "null"):  # the views and the other texts are as without dropout
            np.testing.assert_array_equal(got[key], plain[key])
        assert set(got["complete"].tolist()) <= {COMPLETE, cache_lib.NULL} and got["complete"].dtype == np.int32
        again = cache.batch(step, 4, seed=7, caption_dropout=0.25)
        np.testing.assert_array_equal(again["complete"], got["complete"])
        dropped += (got["complete"] == cache_lib.NULL).tolist()
    assert 0.2 < np.mean(dropped) < 0.3
    assert cache.texts[cache_lib.NULL] == ""  # the dropped rows read the null text's encodings


def test_dropped_rows_add_no_purecc_term():
    rng = np.random.default_rng(0)
    v_c, v_b, r_tar, x0, x1 = (jnp.asarray(rng.standard_normal((3, 8, 4)), jnp.float32) for _ in range(5))
    kept = jnp.asarray([True, False, True])
    cfg = ObjectiveConfig()
    _, m = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg, kept=kept)
    _, full = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg)
    assert float(m["l_cc"]) == float(full["l_cc"])  # L_CC of every row: the dropped one is unconditional
    lam = np.sum(np.asarray(v_c - v_b) * np.asarray(r_tar), axis=(1, 2)) / (np.sum(np.asarray(r_tar) ** 2,
                                                                                   axis=(1, 2)) + 1e-8)
    pure = np.asarray(per_sample_mse(v_b + lam[:, None, None] * r_tar, v_c))
    np.testing.assert_allclose(m["l_pure"], (pure[0] + pure[2]) / 3, rtol=1e-6)
    np.testing.assert_allclose([m["lambda_mean"], m["lambda_min"], m["lambda_max"]],
                               [lam[[0, 2]].mean(), lam[[0, 2]].min(), lam[[0, 2]].max()], rtol=1e-5)
    _, moved = purecc_loss(v_c, v_b.at[1].add(5.0), r_tar, x0, x1, cfg, kept=kept)
    assert float(moved["l_pure"]) == float(m["l_pure"])  # the dropped row's base text does not enter it
    _, none_kept = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg, kept=jnp.zeros(3, bool))
    assert float(none_kept["l_pure"]) == 0.0 and float(none_kept["lambda_mean"]) == 0.0


def program(dropout: bool):
    cache, params, trainable = toy()
    tx = make_optimizer(LRS, OptimizerConfig())
    cfg = StepConfig(stage="purecc", trainable_lora=None, extractor_lora=None, caption_dropout=dropout)
    step = jax.jit(make_train_step(ToyDenoiser(), cfg, tx), donate_argnums=(0,))
    return trainable, tx, step, Frozen(params=jax.tree_util.tree_map(jnp.copy, params), cache=cache)


def batches(dropout: float):
    cache = concept_cache()
    return lambda step: {k: jnp.asarray(v) for k, v in cache.batch(step, 2, seed=0, caption_dropout=dropout).items()}


def test_dropout_resumes_bit_exact(tmp_path):
    """4 steps straight vs 2 + checkpoint + 2: the same drops, the same weights; and dropout changes them."""

    def run(directory, steps, dropout=0.5):
        trainable, tx, step, frozen = program(dropout > 0)
        state = jax.jit(lambda tr: init_state(tr, tx, seed=0))(trainable)
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
        cfg = loop.LoopConfig(steps=steps, log_every=1, checkpoint_every=2, progress=False, async_checkpoints=False)
        return loop.run_stage("stage_b", directory, cfg, state, shardings, step, frozen, batches(dropout))

    assert any((batches(0.5)(s)["complete"] == cache_lib.NULL).any() for s in range(4))
    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert_trees_equal(resumed.trainable, straight.trainable)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    without = run(tmp_path / "without", 4, dropout=0.0)
    assert max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree_util.tree_leaves(without.trainable), jax.tree_util.tree_leaves(straight.trainable))) > 1e-6


def config(**overrides):
    return defaults.override(defaults.concept_config(), {"concept.path": "dog", "concept.class_word": "dog",
                                                         **overrides})


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_invalid_dropout_is_refused(value):
    with pytest.raises(ValueError, match=rf"config.concept.caption_dropout={value} must be in \[0, 1\)"):
        train.validate(config(**{"concept.caption_dropout": value}))


def test_dropout_reaches_the_step_only_when_on():
    assert defaults.concept_config().concept.caption_dropout == 0.0
    assert train.step_options(config())["caption_dropout"] is False
    assert train.step_options(config(**{"concept.caption_dropout": 0.05}))["caption_dropout"] is True
