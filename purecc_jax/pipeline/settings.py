"""The sampling settings every backbone's pipeline reads (FluxPipeline's and StableDiffusion3Pipeline's arguments)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """A pipeline call's sampling arguments (FluxPipeline's defaults)."""

    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 3.5
    max_sequence_length: int = 512
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
