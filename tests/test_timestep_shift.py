"""timesteps.shift="auto": the training timesteps shifted as the pipeline's scheduler shifts its sigmas at
each training resolution: FLUX.1-dev's mu (diffusers' calculate_shift) and exponential time shift
(FlowMatchEulerDiscreteScheduler.time_shift), the linear shift, a static scheduler's own shift (SD3.5),
carried per training size in the step's cache; refused values."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pipeline_reference
from purecc_jax import defaults, train
from purecc_jax.pipeline import flow, schedule
from purecc_jax.purecc.step import Frozen, StepConfig, make_loss_fn
from step_fixtures import batch, denoiser_of, random_cache, tiny_flux


@pytest.mark.parametrize("pixels", [(64, 64), (512, 512), (576, 448), (1024, 1024), (1024, 1536)])
@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_auto_shift_is_the_schedulers_at_each_resolution(pixels, shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(pipeline_reference.DEV_SCHEDULER, time_shift_type=shift_type)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    tokens = (pixels[0] // 16) * (pixels[1] // 16)  # FluxPipeline's image_seq_len: packed 2x2 latent patches
    mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    shift = schedule.training_shift(config, tokens)
    cfg = flow.TimestepConfig(shift="auto")
    t = flow.sample_timesteps(jax.random.key(0), 64, dataclasses.replace(cfg, shift=1.0))
    got = flow.sample_timesteps(jax.random.key(0), 64, cfg, jnp.float32(shift))
    want = scheduler.time_shift(mu, 1.0, torch.tensor(np.asarray(t), dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-7)
    # A static shift of the same value gives the same timesteps: "auto" only chooses the value.
    np.testing.assert_allclose(got, flow.sample_timesteps(jax.random.key(0), 64, flow.TimestepConfig(shift=shift)),
                               rtol=1e-6)


def test_static_schedulers_give_their_shift():
    assert schedule.training_shift({"shift": 3.0}, 1024) == 3.0  # SD3 / SD3.5
    assert schedule.training_shift(pipeline_reference.SCHNELL_SCHEDULER, 4096) == 1.0
    # No scheduler config (a preset's abstract parts): FluxPipeline's defaults, as flux_sigmas takes them.
    assert schedule.training_shift(None, 4096) == pytest.approx(np.exp(1.15))
    assert schedule.training_shift(None, 256) == pytest.approx(np.exp(0.5))


@dataclasses.dataclass
class Parts:
    scheduler: dict


def config(**overrides):
    return defaults.override(defaults.concept_config(), {"concept.path": "dog", "concept.class_word": "dog",
                                                         **overrides})


def test_each_training_size_carries_its_shift():
    parts = Parts(dict(pipeline_reference.DEV_SCHEDULER))
    arrays = {"latents": np.zeros((2, 4, 64), np.float32)}
    assert train.step_cache_arrays(config(), parts, arrays, (512, 512)) is arrays  # a fixed shift: nothing added
    auto = config(**{"timesteps.shift": "auto"})
    shifts = {size: float(train.step_cache_arrays(auto, parts, arrays, size)["timestep_shift"])
              for size in ((512, 512), (640, 384), (1024, 1024))}
    assert shifts[(512, 512)] == pytest.approx(np.exp(schedule.calculate_shift(1024)), rel=1e-6)
    assert shifts[(640, 384)] == pytest.approx(np.exp(schedule.calculate_shift(40 * 24)), rel=1e-6)
    assert shifts[(1024, 1024)] == pytest.approx(np.exp(1.15), rel=1e-6)
    abstract = train.step_cache_arrays(auto, parts, {"latents": jax.ShapeDtypeStruct((2, 4, 64), jnp.float32)},
                                       (512, 512))
    assert abstract["timestep_shift"].shape == () and abstract["timestep_shift"].dtype == jnp.float32


def test_the_step_reads_the_shift_from_its_cache():
    cfg, params = tiny_flux()
    cache = random_cache(cfg)
    denoiser = denoiser_of(cfg)
    b, rng = batch(), jax.random.key(3)
    trainable = {"params": params}

    def loss(timesteps, cache):
        fn = make_loss_fn(denoiser, StepConfig(stage="cc", timesteps=timesteps, trainable_lora=None))
        return float(jax.jit(fn)(trainable, Frozen(params=params, cache=cache), b, rng)[0])

    auto = loss(flow.TimestepConfig(shift="auto"), dict(cache, timestep_shift=jnp.float32(2.5)))
    assert auto == pytest.approx(loss(flow.TimestepConfig(shift=2.5), cache), rel=1e-6)
    assert auto != pytest.approx(loss(flow.TimestepConfig(), cache), rel=1e-4)
    with pytest.raises(ValueError, match="needs the resolution's shift"):
        loss(flow.TimestepConfig(shift="auto"), cache)


@pytest.mark.parametrize("value", ["fast", -1.0, 0.0, True])
def test_invalid_shift_is_refused(value):
    with pytest.raises(ValueError, match=r"config.timesteps.shift=.* must be a number > 0 \(1: none\) or 'auto'"):
        train.validate(config(**{"timesteps.shift": value}))
