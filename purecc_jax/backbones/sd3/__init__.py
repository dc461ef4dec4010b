"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X): the pipeline folder, text encoding, sampler, weights and exports."""

from purecc_jax.backbones.sd3.backbone import SD3, SD3Backbone

__all__ = ["SD3", "SD3Backbone"]
