"""Rectified-flow noising for training (docs/method.md §1): x_t = (1 - t) x0 + t x1, target x1 - x0."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("logit_normal", "uniform")


@dataclasses.dataclass(frozen=True)
class TimestepConfig:
    sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # resolution shift t' = s t / (1 + (s - 1) t); 1 = none

    def __post_init__(self):
        if self.sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampler {self.sampler!r} is not one of {TIMESTEP_SAMPLERS}")


def sample_timesteps(rng: jax.Array, batch: int, cfg: TimestepConfig) -> jax.Array:
    """t in (0, 1), float32, shape (batch,). Continuous: no discretisation to a grid."""
    if cfg.sampler == "logit_normal":
        t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    else:
        t = jax.random.uniform(rng, (batch,), jnp.float32)
    if cfg.shift != 1.0:
        t = cfg.shift * t / (1.0 + (cfg.shift - 1.0) * t)
    return t


def noisy(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - tb) * x0 + tb * x1
