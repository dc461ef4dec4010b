"""FluxPipeline's sigma schedule (diffusers `FlowMatchEulerDiscreteScheduler.set_timesteps`).

sigmas = linspace(1, 1/steps, steps), shifted, then a final 0:
  - dynamic shifting (FLUX.1-dev): sigma' = e^mu / (e^mu + (1/sigma - 1)) with mu linear in
    the packed image sequence length, from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len;
  - static (FLUX.1-schnell): sigma' = shift * sigma / (1 + (shift - 1) * sigma).
Arithmetic is float32 in the same order as diffusers, so the numbers agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# FluxPipeline's fallbacks when the scheduler config lacks a key.
DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
# Scheduler options FLUX folders leave off; a config that turns one on is refused.
_UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "stochastic_sampling", "use_flow_sigmas")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu, linear in the image sequence length (FluxPipeline's `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def training_shift(scheduler_config: Mapping[str, Any] | None, image_seq_len: int) -> float:
    """The shift s of t' = s t / (1 + (s - 1) t) that equals the pipeline's sigma shift at `image_seq_len`
    image tokens, for training timesteps (config.timesteps.shift="auto"): with dynamic shifting e^mu
    (exponential time shift; mu for linear), mu = `calculate_shift` as FluxPipeline computes it; otherwise
    the scheduler's static `shift`. `scheduler_config` None: FLUX.1-dev's dynamic shifting with
    FluxPipeline's defaults."""
    config = dict(scheduler_config if scheduler_config is not None else {"use_dynamic_shifting": True})
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = calculate_shift(image_seq_len, *(config.get(k, d) for k, d in DEFAULTS.items()))
    shift_type = config.get("time_shift_type", "exponential")
    if shift_type not in ("exponential", "linear"):
        raise ValueError(f"scheduler config time_shift_type={shift_type!r} is not 'exponential' or 'linear'")
    return math.exp(mu) if shift_type == "exponential" else mu


def flux_sigmas(steps: int, image_seq_len: int, scheduler_config: Mapping[str, Any] | None = None) -> np.ndarray:
    """(steps + 1,) float32 sigmas from 1 down to 0 for `image_seq_len` packed image tokens.

    `scheduler_config`: the pipeline's `scheduler/scheduler_config.json` dict (None: FLUX.1-dev's
    dynamic shifting with FluxPipeline's defaults).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    config = dict(scheduler_config if scheduler_config is not None else {"use_dynamic_shifting": True})
    turned_on = [k for k in _UNSUPPORTED if config.get(k)]
    if turned_on:
        raise ValueError(f"scheduler config sets {turned_on}: only FLUX's plain flow-match Euler schedule is supported")
    shift_type = config.get("time_shift_type", "exponential")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, *(config.get(k, d) for k, d in DEFAULTS.items()))
        if shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        elif shift_type == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            raise ValueError(f"scheduler config time_shift_type={shift_type!r} is not 'exponential' or 'linear'")
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])
