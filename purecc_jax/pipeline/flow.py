"""Rectified-flow noising for training (docs/method.md §1): x_t = (1 - t) x0 + t x1, target x1 - x0."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("logit_normal", "uniform")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class TimestepConfig:
    sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # resolution shift t' = s t / (1 + (s - 1) t); 1 = none; "auto": the pipeline's shift at each training
    # resolution (`pipeline.schedule.training_shift`), given to `sample_timesteps` per resolution
    shift: float | str = 1.0

    def __post_init__(self):
        if self.sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampler {self.sampler!r} is not one of {TIMESTEP_SAMPLERS}")
        if self.shift != AUTO and (isinstance(self.shift, (str, bool)) or not self.shift > 0):
            raise ValueError(f"config.timesteps.shift={self.shift!r} must be a number > 0 (1: none) or 'auto'")


def sample_timesteps(rng: jax.Array, batch: int, cfg: TimestepConfig, shift: jax.Array | None = None) -> jax.Array:
    """t in (0, 1), float32, shape (batch,). Continuous: no discretisation to a grid.
    `shift`: the resolution's shift (a scalar) when `cfg.shift` is "auto"; ignored otherwise."""
    if cfg.sampler == "logit_normal":
        t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    else:
        t = jax.random.uniform(rng, (batch,), jnp.float32)
    s = cfg.shift
    if s == AUTO:
        if shift is None:
            raise ValueError("timesteps.shift='auto' needs the resolution's shift (the cache's timestep_shift)")
        s = jnp.asarray(shift, jnp.float32)
    elif s == 1.0:
        return t
    return s * t / (1.0 + (s - 1.0) * t)


def noisy(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - tb) * x0 + tb * x1
