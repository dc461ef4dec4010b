"""Image codecs the sampler decodes through: the FLUX VAE, or anything with the same three members.

`PixelCodec` works in pixel space (the toy world): `encode` folds each 2x2 pixel block into
channels ((B, H, W, 3) -> (B, H/2, W/2, 12)), so after FLUX's 2x2 packing a token is a 4x4
pixel patch. A pipeline folder selects it with `vae/config.json` = {"_class_name":
"PixelShuffleCodec", ...}; it has no weights.

    decode(latents (B, h, w, latent_channels), normalised as the transformer sees them)
        -> images (B, h * downsample_factor, w * downsample_factor, C) in about [-1, 1]
    latent_channels, downsample_factor
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

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


PIXEL_CODEC = "PixelShuffleCodec"


@dataclasses.dataclass(frozen=True)
class PixelCodec:
    factor: int = 2
    channels: int = 3

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    @property
    def downsample_factor(self) -> int:
        return self.factor

    def encode(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        f = self.factor
        x = jnp.asarray(images, jnp.float32).reshape(b, h // f, f, w // f, f, c)
        return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // f, w // f, c * f * f)

    def decode(self, latents: jax.Array) -> jax.Array:
        b, h, w, _ = latents.shape
        f, c = self.factor, self.channels
        x = jnp.asarray(latents, jnp.float32).reshape(b, h, w, c, f, f)
        return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * f, w * f, c)

    def config(self) -> dict:
        return {"_class_name": PIXEL_CODEC, "factor": self.factor, "channels": self.channels}
