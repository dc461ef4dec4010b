"""The trainer's loop settings: samples of the untrained model at step 0 (sample.at_start, in the run's
first stage, not redone on resume), sample grids of prompts of several sizes, W&B passed from
config.log (refused without wandb, ignored on resume), and the optimizer checks of `validate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from purecc_jax import defaults, train
from purecc_jax.purecc import loop
from purecc_jax.purecc.step import init_state, make_optimizer


def run_stage(directory: Path, steps: int, at_start: bool, calls: list[int]):
    """A toy stage (w += 1 per step) sampling an image of shade w / 10 at its end; `calls`: the step of the
    state each sample was drawn from."""
    tx = make_optimizer({"w": 1e-2})
    state = init_state({"w": jnp.ones(3)}, tx, seed=0)

    def step(state, frozen, batch):
        return state.replace(step=state.step + 1, trainable={"w": state.trainable["w"] + 1.0}), dict(loss=1.0)

    def sample(state):
        calls.append(int(state.step))
        return np.full((1, 16, 16, 3), float(state.trainable["w"][0]) / 10.0, np.float32), ["p"]

    cfg = loop.LoopConfig(steps=steps, log_every=1, checkpoint_every=2, progress=False, async_checkpoints=False,
                          sample_at_start=at_start)
    shardings = jax_shardings(state)
    return loop.run_stage("stage_a", directory, cfg, state, shardings, step, None, lambda s: None, sample)


def jax_shardings(state):
    import jax

    return jax.tree_util.tree_map(lambda x: x.sharding, state)


def shade(path: Path) -> float:
    return np.asarray(Image.open(path))[:16, :16].mean() / 255.0


def test_samples_at_step_0_show_the_untrained_weights(tmp_path):
    calls = []
    run_stage(tmp_path / "a", 2, True, calls)
    assert calls == [0, 2]
    samples = tmp_path / "a" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["000000.png", "000002.png"]
    assert shade(samples / "000000.png") == pytest.approx(0.1, abs=0.01)  # w = 1 before training
    assert shade(samples / "000002.png") == pytest.approx(0.3, abs=0.01)
    run_stage(tmp_path / "a", 4, True, calls)  # resumed from step 2: step 0 is not sampled again
    assert calls == [0, 2, 4]
    calls.clear()
    run_stage(tmp_path / "b", 2, False, calls)
    assert calls == [2] and not (tmp_path / "b" / "samples" / "000000.png").exists()


def test_grids_of_prompts_of_several_sizes():
    images = [np.zeros((16, 32, 3)), np.ones((32, 16, 3)), np.full((16, 16, 3), 0.5)]
    picture = loop.grid(images, ["wide", "tall", "square"])
    assert picture.shape == (32 + 14, 3 * 96, 3)
    np.testing.assert_array_equal(picture[:16, :32], 0)
    np.testing.assert_array_equal(picture[:32, 96:112], 255)
    same = loop.grid(np.stack([images[0], images[0]]), ["a", "b"])
    np.testing.assert_array_equal(same, loop.grid([images[0], images[0]], ["a", "b"]))


def config(**overrides):
    return defaults.override(defaults.concept_config(), {"concept.path": "dog", "concept.class_word": "dog",
                                                         **overrides})


def test_sample_sizes_per_prompt():
    c = config(**{"sample.height": (512, 768, 512), "sample.width": 512})
    assert train.sample_sizes(c) == [(512, 512), (768, 512), (512, 512)]
    settings = train.sample_settings(c)
    assert (settings.height, settings.width) == (768, 512)  # the largest, as the compile check lowers it
    assert train.sample_sizes(config()) == [(512, 512)] * 3
    for bad in ((512, 512), (512, 500, 512)):
        with pytest.raises(ValueError, match=r"config.sample.height=.* must be a positive multiple of 16, or one per"):
            train.validate(config(**{"sample.height": bad}))


def test_step_0_samples_in_the_first_stage_only():
    c = config()
    assert c.sample.at_start is True  # on by default (the exception to keeping today's defaults)
    assert train.loop_config(c, 4, first_stage=True).sample_at_start
    assert not train.loop_config(c, 4, first_stage=False).sample_at_start
    assert not train.loop_config(config(**{"sample.at_start": False}), 4).sample_at_start


def test_wandb_settings_reach_the_loop():
    assert train.loop_config(config(), 4).wandb is None
    c = config(**{"log.wandb_project": "purecc", "log.wandb_entity": "team"})
    wandb = train.loop_config(c, 4, run="dog_run").wandb
    assert (wandb.project, wandb.entity, wandb.run) == ("purecc", "team", "dog_run")
    assert wandb.config == json.loads(c.to_json_best_effort())
    assert "log" in train.RESUME_IGNORES


def test_wandb_without_the_package_is_refused_before_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="config.log.wandb_project='purecc'.*pip install wandb"):
        train.validate(config(**{"log.wandb_project": "purecc"}))
    train.validate(config())  # not needed without W&B


@pytest.mark.parametrize("overrides,message", [
    ({"optimizer.name": "lion"}, "config.optimizer.name='lion' is not one of"),
    ({"optimizer.name": "schedule_free_adamw", "stage_b.schedule": "cosine"},
     "config.stage_b.schedule='cosine': optimizer.name=schedule_free_adamw"),
    ({"optimizer.prodigy.estim_lr0": 0.0}, "config.optimizer.prodigy.estim_lr0=0.0 must be > 0"),
])
def test_optimizer_settings_are_checked_before_loading(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate(config(**overrides))
    # A decaying schedule of a stage that does not run (an extractor LoRA replaces stage A) is not refused.
    train.validate(config(**{"optimizer.name": "schedule_free_adamw", "method": "dreambooth",
                             "stage_b.schedule": "cosine"}))
