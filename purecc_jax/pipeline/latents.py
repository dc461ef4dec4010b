"""Images <-> FLUX latents: VAE encode/decode with the latent normalisation, 2x2 packing, position ids.

Layouts: images (B, H, W, 3) in [-1, 1]; latents (B, H/8, W/8, 16) NHWC; packed latents
(B, H/16 * W/16, 64), the transformer's input. Packing matches diffusers FluxPipeline's
`_pack_latents` on the NCHW transpose: feature index = channel * 4 + dy * 2 + dx.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax.models.vae import AutoencoderKL


def encode_latents(
    vae: AutoencoderKL, params: Any, images: jax.Array, rng: jax.Array | None = None, sample: bool = False
) -> jax.Array:
    """Normalised latents `(z - shift) * scale` of NHWC images in [-1, 1].

    z is the posterior mean, or with `sample=True` a draw mean + exp(logvar / 2) * eps, eps ~ N(0, 1) from `rng`.
    """
    if sample and rng is None:
        raise ValueError("encode_latents(sample=True) needs an `rng`")
    c = vae.config
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean
    if sample:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (z - c.shift_factor) * c.scaling_factor


def decode_latents(vae: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Images in (about) [-1, 1] from normalised NHWC latents: decodes `latents / scale + shift`."""
    c = vae.config
    z = latents.astype(jnp.float32) / c.scaling_factor + c.shift_factor
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode)


def pack(latents: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, row-major over patches."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack needs even latent height and width, got {h}x{w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, h/2, w/2, C, dy, dx)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: jax.Array, height: int, width: int) -> jax.Array:
    """(B, height/2 * width/2, 4C) -> (B, height, width, C); height and width in latent pixels."""
    b, n, f = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or f % 4:
        raise ValueError(f"cannot unpack {packed.shape} into latents of {height}x{width}")
    c = f // 4
    x = packed.reshape(b, height // 2, width // 2, c, 2, 2)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, h/2, dy, w/2, dx, C)
    return x.reshape(b, height, width, c)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """RoPE ids [0, row, col] of the packed tokens of (height, width) latents: (height/2 * width/2, 3) float32."""
    h, w = height // 2, width // 2
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w, dtype=np.float32)[None, :]
    return ids.reshape(h * w, 3)
