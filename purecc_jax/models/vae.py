"""The FLUX autoencoder (diffusers `AutoencoderKL`) in Flax Linen, NHWC throughout.

Numerically this follows diffusers' `Encoder` / `Decoder` built from `DownEncoderBlock2D`,
`UpDecoderBlock2D`, `ResnetBlock2D` and `UNetMidBlock2D` (one single-head self-attention
between two resnets). Module names mirror diffusers' (`down_blocks_0/resnets_1/conv2`) so
that `weights/vae_rules.py` is a plain table.

    encode(images (B, H, W, in_channels) in [-1, 1]) -> mean, logvar (B, H/f, W/f, latent)
    decode(latents (B, H/f, W/f, latent)) -> images (B, H, W, out_channels)

with f = 2 ** (len(block_out_channels) - 1). Outputs are float32 whatever the compute
dtype; GroupNorm statistics and the attention softmax always run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from purecc_jax.models.attention import attention
from purecc_jax.models.layers import Dense, constrain

BHWC = ("act_batch", "act_height", "act_width", "act_channels")
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent normalisation (first block), runtime choices (second block)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise every resnet block in the backward pass
    attention: str = "xla"

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **kw) -> VAEConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **runtime) -> VAEConfig:
        """From a diffusers `vae/config.json` dict; missing keys take diffusers' defaults."""
        n = len(cfg.get("block_out_channels", (64,)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.get(key, (kind,)))
            if types != [kind] * n:
                raise ValueError(f"vae config {key}={types}: only {n} x {kind!r} is supported")
        if cfg.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"vae config act_fn={cfg['act_fn']!r}: only 'silu' is supported")
        for key in ("latents_mean", "latents_std"):
            if cfg.get(key) is not None:
                raise ValueError(f"vae config {key} is set: per-channel latent statistics are not supported")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_attention=bool(cfg.get("mid_block_add_attention", True)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=float(cfg.get("shift_factor") or 0.0),
            **runtime,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` config dict of this architecture."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_attention,
        }


PRESETS: dict[str, VAEConfig] = {
    "flux": VAEConfig(),
    # Same structure as FLUX's (16 latent channels, no quant convs, mid attention), tiny widths.
    "tiny": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
}


def preset(name: str, **overrides) -> VAEConfig:
    """A named configuration (`flux`, `tiny`) with some fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown VAE preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class Conv(nn.Module):
    """2D convolution on NHWC with an HWIO kernel; `padding` as ((top, bottom), (left, right))."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # None: k // 2 on every side
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis: groups of adjacent channels, float32 statistics."""

    groups: int
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
        g = x.astype(jnp.float32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _conv(c: VAEConfig, features: int, name: str, **kw) -> Conv:
    return Conv(features, dtype=c.dtype, param_dtype=c.param_dtype, name=name, **kw)


def _norm(c: VAEConfig, name: str) -> GroupNorm:
    return GroupNorm(c.norm_num_groups, param_dtype=c.param_dtype, name=name)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1-projected when widths differ) shortcut."""

    config: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _conv(c, self.features, "conv1")(nn.silu(_norm(c, "norm1")(x)))
        h = _conv(c, self.features, "conv2")(nn.silu(_norm(c, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(c, self.features, "conv_shortcut", kernel_size=1)(x)
        return constrain(x.astype(h.dtype) + h, BHWC)


class SelfAttention(nn.Module):
    """Single-head attention over all pixels, pre-GroupNorm, residual (diffusers mid-block Attention)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, hgt, wid, ch = x.shape
        h = _norm(c, "group_norm")(x).reshape(b, hgt * wid, ch)
        dense = lambda name: Dense(ch, ("conv_in", "conv_out"), dtype=c.dtype, param_dtype=c.param_dtype, name=name)
        q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
        out = attention(q, k, v, c.attention).reshape(b, hgt * wid, ch)
        out = dense("to_out")(out).reshape(x.shape)
        return constrain(x.astype(out.dtype) + out, BHWC)


def _resnet_cls(c: VAEConfig):
    return nn.remat(ResnetBlock) if c.remat else ResnetBlock


class MidBlock(nn.Module):
    """resnet, attention (unless `mid_block_attention` is off), resnet at the lowest resolution."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        resnet = _resnet_cls(c)
        x = resnet(c, x.shape[-1], name="resnets_0")(x)
        if c.mid_block_attention:
            x = SelfAttention(c, name="attention")(x)
        return resnet(c, x.shape[-1], name="resnets_1")(x)


class DownBlock(nn.Module):
    """Resnets, then (except in the last block) a stride-2 conv after padding bottom/right by one."""

    config: VAEConfig
    features: int
    downsample: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(c.layers_per_block):
            x = _resnet_cls(c)(c, self.features, name=f"resnets_{j}")(x)
        if self.downsample:
            x = _conv(c, self.features, "downsample", stride=2, padding=((0, 1), (0, 1)))(x)
        return constrain(x, BHWC)


class UpBlock(nn.Module):
    """Resnets (one more than the encoder's), then (except in the last block) nearest x2 and a conv."""

    config: VAEConfig
    features: int
    upsample: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(c.layers_per_block + 1):
            x = _resnet_cls(c)(c, self.features, name=f"resnets_{j}")(x)
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(c, self.features, "upsample")(constrain(x, BHWC))
        return constrain(x, BHWC)


class Encoder(nn.Module):
    """Images -> 2 * latent_channels moments (mean, logvar) before the optional quant conv."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        chans = c.block_out_channels
        x = constrain(_conv(c, chans[0], "conv_in")(x), BHWC)
        for i, features in enumerate(chans):
            x = DownBlock(c, features, i < len(chans) - 1, name=f"down_blocks_{i}")(x)
        x = MidBlock(c, name="mid_block")(x)
        x = nn.silu(_norm(c, "norm_out")(x))
        return _conv(c, 2 * c.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (after the optional post-quant conv) -> images."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        chans = tuple(reversed(c.block_out_channels))
        x = constrain(_conv(c, chans[0], "conv_in")(z), BHWC)
        x = MidBlock(c, name="mid_block")(x)
        for i, features in enumerate(chans):
            x = UpBlock(c, features, i < len(chans) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(c, "norm_out")(x))
        return _conv(c, c.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder; `__call__` (encode, then decode the mean) exists to initialise both halves."""

    config: VAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = _conv(c, 2 * c.latent_channels, "quant_conv", kernel_size=1)
        if c.use_post_quant_conv:
            self.post_quant_conv = _conv(c, c.latent_channels, "post_quant_conv", kernel_size=1)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, in_channels) in [-1, 1] -> posterior mean, logvar (clamped to [-30, 20]), float32."""
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(f"encode expects NHWC images with {c.in_channels} channels, got shape {images.shape}")
        h = self.encoder(constrain(images, BHWC))
        if c.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, out_channels), float32."""
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise ValueError(f"decode expects NHWC latents with {c.latent_channels} channels, got shape {latents.shape}")
        z = constrain(latents, BHWC)
        if c.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


def init_fn(config: VAEConfig, rng: jax.Array, image_size: int | None = None):
    """A zero-argument function returning the boxed `params` of a fresh model (for eval_shape / sharded init)."""
    model = AutoencoderKL(config)
    size = image_size or config.downsample_factor

    def init():
        return model.init(rng, jnp.zeros((1, size, size, config.in_channels), jnp.float32))["params"]

    return init
