"""Image codecs the sampler decodes through: the FLUX VAE, or anything with the same three members.

    decode(latents (B, h, w, latent_channels), normalised as the transformer sees them)
        -> images (B, h * downsample_factor, w * downsample_factor, C) in about [-1, 1]
    latent_channels, downsample_factor
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax

from purecc_jax.models.vae import AutoencoderKL, VAEConfig
from purecc_jax.pipeline.latents import decode_latents, encode_latents


class ImageCodec(Protocol):
    latent_channels: int
    downsample_factor: int

    def decode(self, latents: jax.Array) -> jax.Array: ...


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(config: VAEConfig, params: Any, latents: jax.Array) -> jax.Array:
    return decode_latents(AutoencoderKL(config), params, latents)


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(config: VAEConfig, params: Any, images: jax.Array) -> jax.Array:
    return encode_latents(AutoencoderKL(config), params, images)


@dataclasses.dataclass(frozen=True)
class VAECodec:
    """The FLUX autoencoder as an ImageCodec (latents scaled and shifted as FLUX's)."""

    config: VAEConfig
    params: Any

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in about [-1, 1] from normalised NHWC latents; jitted."""
        return _vae_decode(self.config, self.params, latents)

    def encode(self, images: jax.Array) -> jax.Array:
        """Normalised NHWC latents (posterior mean) of images in [-1, 1]; jitted."""
        return _vae_encode(self.config, self.params, images)
