"""FLUX.1 (dev, schnell): the pipeline folder, text encoding, concept cache, sampler, weights and exports."""

from purecc_jax.backbones.flux.backbone import FLUX, FluxBackbone

__all__ = ["FLUX", "FluxBackbone"]
