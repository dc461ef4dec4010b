"""The Stable Diffusion 3 / 3.5 transformer (MMDiT, MMDiT-X) in Flax Linen.

Numerically this follows diffusers' `SD3Transformer2DModel`: a patch embedding with a
cropped 2-D sin-cos position table, timestep + pooled-text conditioning, joint blocks
(image and context streams with their own weights, one joint attention) with optional
RMS q/k norms, MMDiT-X blocks that add a second, image-only attention (SD3.5's
`dual_attention_layers`), a last block whose context stream is "pre-only" (it feeds the
attention and is then dropped), and an adaptive-norm output. `backbones/sd3/rules.py` maps
the parameters to the diffusers and single-file (`sd3.5_medium.safetensors`) names.

Call signature (latents NHWC, as this package's VAE gives them):
    latents   (B, H, W, in_channels)  H, W multiples of patch_size
    txt       (B, T, context_dim)     CLIP-L ++ CLIP-G hidden states padded to T5's width, then T5
    pooled    (B, pooled_dim)         CLIP-L ++ CLIP-G projected pooled outputs
    timesteps (B,)                    t in [0, 1] (multiplied by 1000 inside, as the pipeline's)
returns the velocity (B, H, W, out_channels) in float32.

Blocks are three stacks, each an `nn.scan` (or a loop): `dual_blocks` (the MMDiT-X blocks,
which must be the first ones, as in every released SD3.5), `joint_blocks` (the rest but
the last) and `last_block` (the context-pre-only one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from purecc_jax.models.attention import attention
from purecc_jax.models.layers import (BTD, BTHD, MLP, Dense, MLPEmbedder, Modulation, RMSNorm, constrain, layer_norm,
                                      lora_backward_from_config,
                                      timestep_embedding)
from purecc_jax.models.runtime import BROADCAST, Runtime, layer_stack, remat

QK_NORMS = (None, "rms_norm")
# LoRA targets of the authors' SD3.5 recipe (PEFT target_modules to_q, to_k, to_v, to_out.0, which match
# the image stream's joint attention and the MMDiT-X second attention): regexes over Dense module paths.
LORA_TARGETS = (
    r"^(dual_blocks|joint_blocks|last_block)(_\d+)?/x_attn2?/(q|k|v)$",
    r"^(dual_blocks|joint_blocks|last_block)(_\d+)?/x_attn2?_out$",
)
# The default of the SD3 PureCC recipe: those and the context stream's projections of the joint attention
# (add_q_proj, add_k_proj, add_v_proj, to_add_out), diffusers' train_dreambooth_lora_sd3.py default set
# plus the MMDiT-X second attention that the authors' `to_q` pattern also matches.
LORA_ATTENTION = (
    r"^(dual_blocks|joint_blocks|last_block)(_\d+)?/(x_attn2?|ctx_attn)/(q|k|v)$",
    r"^(dual_blocks|joint_blocks|last_block)(_\d+)?/(x_attn2?|ctx_attn)_out$",
)
LORA_TARGET_PRESETS = {"attention": LORA_ATTENTION, "image_attention": LORA_TARGETS,
                       "all_blocks": (r"^(dual_blocks|joint_blocks|last_block)(_\d+)?/.*",)}


@dataclasses.dataclass(frozen=True)
class SD3Config(Runtime):
    """Architecture (defaults are SD3.5-Medium's); the runtime choices are `Runtime`'s."""

    sample_size: int = 128  # latent size the position table is centred for (base_size = sample_size / patch)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    context_dim: int = 4096  # T5 width (joint_attention_dim)
    pooled_dim: int = 2048  # CLIP-L + CLIP-G projections
    pos_embed_max_size: int = 384
    dual_attention_layers: tuple[int, ...] = tuple(range(13))
    qk_norm: str | None = "rms_norm"
    mlp_ratio: float = 4.0

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_dual(self) -> int:
        """MMDiT-X blocks among the first num_layers - 1 (the last block is built on its own)."""
        return len([i for i in self.dual_attention_layers if i < self.num_layers - 1])

    @property
    def num_joint(self) -> int:
        """Plain joint blocks among the first num_layers - 1 (the stack after the MMDiT-X ones)."""
        return self.num_layers - 1 - self.num_dual

    @property
    def last_dual(self) -> bool:
        return self.num_layers - 1 in self.dual_attention_layers

    def __post_init__(self):
        super().__post_init__()
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported; known: {QK_NORMS}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers}: SD3 needs at least one block")
        dual = sorted(self.dual_attention_layers)
        if dual != list(range(len(dual))) or (dual and dual[-1] >= self.num_layers):
            raise ValueError(f"dual_attention_layers={tuple(self.dual_attention_layers)}: only the first blocks "
                             f"(0, 1, ..., k-1 < num_layers={self.num_layers}) may be MMDiT-X blocks")
        if self.hidden_size % 4:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")

    def replace(self, **kw) -> SD3Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **runtime) -> SD3Config:
        """From a diffusers `transformer/config.json` dict of an SD3Transformer2DModel."""
        d = {f.name: f.default for f in dataclasses.fields(SD3Config)}
        heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
        caption = cfg.get("caption_projection_dim", 1152)
        if caption != heads * head_dim:
            raise ValueError(f"caption_projection_dim={caption} differs from the hidden size {heads * head_dim}: "
                             "SD3Transformer2DModel's blocks cannot run such a config")
        return cls(
            sample_size=cfg.get("sample_size", 128),
            patch_size=cfg.get("patch_size", 2),
            in_channels=cfg.get("in_channels", 16),
            out_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
            num_layers=cfg.get("num_layers", 18),
            num_heads=heads,
            head_dim=head_dim,
            context_dim=cfg.get("joint_attention_dim", 4096),
            pooled_dim=cfg.get("pooled_projection_dim", 2048),
            pos_embed_max_size=cfg.get("pos_embed_max_size", 96),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
            qk_norm=cfg.get("qk_norm"),
            mlp_ratio=d["mlp_ratio"],
            **runtime,
        )

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_dim,
            "pos_embed_max_size": self.pos_embed_max_size,
            "dual_attention_layers": list(self.dual_attention_layers),
            "qk_norm": self.qk_norm,
        }


PRESETS: dict[str, SD3Config] = {
    "sd3.5-medium": SD3Config(),
    "sd3-medium": SD3Config(pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None),
    "sd3.5-large": SD3Config(num_layers=38, num_heads=38, pos_embed_max_size=192, dual_attention_layers=()),
    "tiny": SD3Config(sample_size=8, num_layers=3, num_heads=2, head_dim=8, context_dim=24, pooled_dim=12,
                      in_channels=4, out_channels=4, pos_embed_max_size=12, dual_attention_layers=(0,)),
}


def preset(name: str, **overrides) -> SD3Config:
    if name not in PRESETS:
        raise KeyError(f"unknown SD3 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@functools.lru_cache(maxsize=16)
def position_table(c: SD3Config, height: int, width: int) -> np.ndarray:
    """The (height * width, hidden) window of diffusers' pos_embed_max_size^2 sin-cos table,
    centred as `PatchEmbed.cropped_pos_embed` crops it; height/width in patches.

    The first half of each vector encodes the column, the second half the row; positions are
    index * base_size / max_size in float32 and the sinusoids are taken in float64, as diffusers does.
    """
    m = c.pos_embed_max_size
    if height > m or width > m:
        raise ValueError(f"latent grid {height}x{width} patches exceeds pos_embed_max_size={m}")
    grid = np.arange(m, dtype=np.float32) / np.float32(m / (c.sample_size // c.patch_size))
    top, left = (m - height) // 2, (m - width) // 2
    quarter = c.hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def embed(pos):
        out = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols = np.broadcast_to(embed(grid[left:left + width])[None], (height, width, 2 * quarter))
    rows = np.broadcast_to(embed(grid[top:top + height])[:, None], (height, width, 2 * quarter))
    return np.concatenate([cols, rows], axis=-1).reshape(height * width, -1).astype(np.float32)


class QKV(nn.Module):
    """q, k, v projections shaped (B, S, H, D), q and k RMS-normalised when config.qk_norm says so."""

    config: SD3Config

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        split = lambda y: constrain(y.reshape(*y.shape[:2], c.num_heads, c.head_dim), BTHD)
        q, k, v = (split(Dense(c.hidden_size, ("embed", "heads"), name=n, **kw)(x)) for n in "qkv")
        if c.qk_norm == "rms_norm":
            q = RMSNorm(1e-6, param_dtype=c.param_dtype, name="norm_q")(q)
            k = RMSNorm(1e-6, param_dtype=c.param_dtype, name="norm_k")(k)
        return q, k, v


def _attend(c: SD3Config, qkvs) -> jax.Array:
    q, k, v = (checkpoint_name(jnp.concatenate(parts, axis=1), "qkv") for parts in zip(*qkvs))
    out = checkpoint_name(constrain(attention(q, k, v, c.attention), BTHD), "attn_out")
    return out.reshape(*out.shape[:2], c.hidden_size)


class JointBlock(nn.Module):
    """MMDiT block (diffusers `JointTransformerBlock`): image stream `x`, context stream `ctx`."""

    config: SD3Config
    dual: bool = False  # MMDiT-X: a second, image-only attention
    context_pre_only: bool = False  # the context stream only feeds the attention (last block)

    @nn.compact
    def __call__(self, carry, vec):
        c = self.config
        x, ctx = carry
        kw = dict(hidden=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype)
        dense = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        mods = Modulation(9 if self.dual else 6, name="x_mod", **kw)(vec)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        x_norm = layer_norm(x)
        x_qkv = QKV(c, name="x_attn")(x_norm * (1 + scale1) + shift1)
        if self.context_pre_only:
            c_scale1, c_shift1 = Modulation(2, name="ctx_mod", **kw)(vec)  # AdaLayerNormContinuous order
        else:
            c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = Modulation(6, name="ctx_mod", **kw)(vec)
        ctx_qkv = QKV(c, name="ctx_attn")(layer_norm(ctx) * (1 + c_scale1) + c_shift1)

        attn = _attend(c, (x_qkv, ctx_qkv))
        x_attn, ctx_attn = attn[:, : x.shape[1]], attn[:, x.shape[1]:]
        x = x + gate1 * Dense(c.hidden_size, ("heads", "embed"), name="x_attn_out", **dense)(x_attn)
        if self.dual:
            shift_a2, scale_a2, gate_a2 = mods[6:]
            attn2 = _attend(c, (QKV(c, name="x_attn2")(x_norm * (1 + scale_a2) + shift_a2),))
            x = x + gate_a2 * Dense(c.hidden_size, ("heads", "embed"), name="x_attn2_out", **dense)(attn2)
        x = x + gate2 * MLP(c, name="x_mlp")(layer_norm(x) * (1 + scale2) + shift2)

        if not self.context_pre_only:
            ctx = ctx + c_gate1 * Dense(c.hidden_size, ("heads", "embed"), name="ctx_attn_out", **dense)(ctx_attn)
            ctx = ctx + c_gate2 * MLP(c, name="ctx_mlp")(layer_norm(ctx) * (1 + c_scale2) + c_shift2)
        return (constrain(x, BTD), constrain(ctx, BTD)), None


class DualBlock(JointBlock):
    dual: bool = True


class LastBlock(JointBlock):
    context_pre_only: bool = True


class LastDualBlock(JointBlock):
    dual: bool = True
    context_pre_only: bool = True


class SD3Transformer(nn.Module):
    config: SD3Config

    @nn.compact
    @lora_backward_from_config
    def __call__(self, latents: jax.Array, txt: jax.Array, pooled: jax.Array, timesteps: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        b, h, w, ch = latents.shape
        p = c.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}")
        gh, gw = h // p, w // p

        # The patch conv (kernel = stride = p) as one matmul over flattened patches.
        kernel = self.param("patch_embed", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
            ("conv_height", "conv_width", "in_channels", "embed")), (p, p, c.in_channels, c.hidden_size), c.param_dtype)
        bias = self.param("patch_embed_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (c.hidden_size,), c.param_dtype)
        patches = latents.astype(c.dtype).reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x = jnp.einsum("bhwpqc,pqcd->bhwd", patches, kernel.astype(c.dtype)) + bias.astype(c.dtype)
        x = x.reshape(b, gh * gw, c.hidden_size) + jnp.asarray(position_table(c, gh, gw), c.dtype)[None]
        x = constrain(x, BTD)

        vec = MLPEmbedder(c.hidden_size, "time_freq", name="time_in", **kw)(timestep_embedding(timesteps * 1000.0))
        vec = vec + MLPEmbedder(c.hidden_size, "pooled_embed", name="vector_in", **kw)(pooled)
        ctx = constrain(Dense(c.hidden_size, ("context_embed", "embed"), name="txt_in", **kw)(txt), BTD)

        carry = (x, ctx)
        if c.num_dual:
            carry = layer_stack(DualBlock, c, c.num_dual, "dual_blocks", (BROADCAST,))(carry, vec)
        if c.num_joint:
            carry = layer_stack(JointBlock, c, c.num_joint, "joint_blocks", (BROADCAST,))(carry, vec)
        last = remat(LastDualBlock if c.last_dual else LastBlock, c.remat_policy)
        x, _ = last(c, name="last_block")(carry, vec)[0]

        scale, shift = Modulation(2, c.hidden_size, c.dtype, c.param_dtype, name="final_mod")(vec)
        x = layer_norm(x) * (1 + scale) + shift
        out = Dense(p * p * c.out_channels, ("embed", "out_channels"), name="final_out", **kw)(x)
        out = out.reshape(b, gh, gw, p, p, c.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c.out_channels).astype(jnp.float32)


def example_inputs(config: SD3Config, batch: int = 1, height: int = 8, width: int = 8,
                   txt_len: int = 8) -> dict[str, Any]:
    """ShapeDtypeStructs of a forward call (latent height/width in latent pixels), for eval_shape / AOT / init."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return dict(
        latents=spec(batch, height, width, config.in_channels),
        txt=spec(batch, txt_len, config.context_dim),
        pooled=spec(batch, config.pooled_dim),
        timesteps=spec(batch),
    )


def init_fn(config: SD3Config, rng: jax.Array, **shapes):
    """A zero-argument function returning the boxed `params` of a fresh model (for sharded init)."""
    model = SD3Transformer(config)
    inputs = example_inputs(config, **shapes)

    def init():
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
        return model.init(rng, **zeros)["params"]

    return init
