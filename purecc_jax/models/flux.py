"""The FLUX.1 rectified-flow transformer (double- and single-stream MMDiT) in Flax Linen.

Numerically this follows diffusers' `FluxTransformer2DModel`; parameter names follow the
FLUX vocabulary (`double_blocks`, `img_attn`, `txt_mlp`, ...). `weights/flux_rules.py`
maps them to the diffusers and BFL checkpoint names.

Call signature (packed latents, as FluxPipeline passes them):
    img       (B, N, in_channels)   packed 2x2 latent patches
    txt       (B, T, context_dim)   T5 hidden states
    pooled    (B, pooled_dim)       CLIP pooled output
    timesteps (B,)                  t in [0, 1] (multiplied by 1000 inside)
    img_ids   (N, 3), txt_ids (T, 3) RoPE positions
    guidance  (B,) or None          embedded guidance scale (FLUX-dev)
    concept   optional ConceptInjection: per-block vectors written into the context
              stream at the identifier's token positions (PureCC layer-wise embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from purecc_jax.models.attention import attention
from purecc_jax.models.layers import (
    BTD,
    BTHD,
    BTM,
    MLP,
    Dense,
    Modulation,
    MLPEmbedder,
    RMSNorm,
    apply_rope,
    constrain,
    layer_norm,
    lora_backward_from_config,
    rope_frequencies,
    timestep_embedding,
)
from purecc_jax.models.runtime import BROADCAST, SCANNED, Runtime, layer_stack

# A block's arguments after its carry: its concept vector (one row per block), then vec, cos, sin, mask.
PER_BLOCK = (SCANNED, BROADCAST, BROADCAST, BROADCAST, BROADCAST)

@dataclasses.dataclass(frozen=True)
class FluxConfig(Runtime):
    """Architecture; the runtime choices (dtype, scan_layers, remat_policy, attention) are `Runtime`'s."""

    in_channels: int = 64
    out_channels: int | None = None
    num_heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    context_dim: int = 4096  # T5 width
    pooled_dim: int = 768  # CLIP pooled width
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    guidance_embed: bool = True
    qkv_bias: bool = True

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def __post_init__(self):
        super().__post_init__()
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal head_dim={self.head_dim}")

    def replace(self, **kw) -> FluxConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **runtime) -> FluxConfig:
        """From a diffusers `transformer/config.json` dict."""
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"patch_size={cfg['patch_size']} is not supported (FLUX packs 2x2 outside the model)")
        return cls(
            in_channels=cfg.get("in_channels", 64),
            out_channels=cfg.get("out_channels"),
            num_heads=cfg.get("num_attention_heads", 24),
            head_dim=cfg.get("attention_head_dim", 128),
            depth=cfg.get("num_layers", 19),
            depth_single=cfg.get("num_single_layers", 38),
            context_dim=cfg.get("joint_attention_dim", 4096),
            pooled_dim=cfg.get("pooled_projection_dim", 768),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
            theta=float(cfg.get("rope_theta", 10000.0)),  # not a diffusers key: FLUX.1 is always 10000
            **runtime,
        )

    def to_diffusers(self) -> dict[str, Any]:
        extra = {} if self.theta == 10000.0 else {"rope_theta": self.theta}  # only the toy world changes it
        return extra | {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dim),
        }


PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(guidance_embed=True),
    "flux-schnell": FluxConfig(guidance_embed=False),
    # Small configurations for tests: same structure, a few blocks, narrow width.
    "tiny": FluxConfig(num_heads=2, head_dim=16, depth=2, depth_single=2, context_dim=32, pooled_dim=24,
                       in_channels=16, axes_dim=(4, 6, 6)),
}


def preset(name: str, **overrides) -> FluxConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown FLUX preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class ConceptInjection(NamedTuple):
    """Per-block vectors written into the context stream where `mask` is true.

    mask: (B, T) bool, the identifier's token positions.
    double: (depth, hidden) one vector per double-stream block.
    single: (depth_single, hidden) one vector per single-stream block.
    """

    mask: jax.Array
    double: jax.Array
    single: jax.Array


def _inject(txt: jax.Array, mask: jax.Array | None, vector: jax.Array | None) -> jax.Array:
    if vector is None:
        return txt
    return jnp.where(mask[:, :, None], vector.astype(txt.dtype)[None, None, :], txt)


class QKV(nn.Module):
    """q, k, v projections with RMS-normalised q and k, shaped (B, S, H, D)."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        kw = dict(use_bias=c.qkv_bias, dtype=c.dtype, param_dtype=c.param_dtype)
        split = lambda y: constrain(y.reshape(*y.shape[:2], c.num_heads, c.head_dim), BTHD)
        q = split(Dense(c.hidden_size, ("embed", "heads"), name="q", **kw)(x))
        k = split(Dense(c.hidden_size, ("embed", "heads"), name="k", **kw)(x))
        v = split(Dense(c.hidden_size, ("embed", "heads"), name="v", **kw)(x))
        q = RMSNorm(1e-6, param_dtype=c.param_dtype, name="norm_q")(q)
        k = RMSNorm(1e-6, param_dtype=c.param_dtype, name="norm_k")(k)
        return q, k, v


def _joint_attention(c: FluxConfig, qkvs, cos, sin) -> jax.Array:
    q, k, v = (jnp.concatenate(parts, axis=1) for parts in zip(*qkvs))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (checkpoint_name(x, "qkv") for x in (q, k, v))
    out = attention(q, k, v, c.attention)
    out = checkpoint_name(constrain(out, BTHD), "attn_out")
    return out.reshape(*out.shape[:2], c.hidden_size)


class DoubleBlock(nn.Module):
    """Double-stream block: separate weights for image and text, joint attention."""

    config: FluxConfig

    @nn.compact
    def __call__(self, carry, inject_vector, vec, cos, sin, inject_mask):
        c = self.config
        img, txt = carry
        txt = _inject(txt, inject_mask, inject_vector)
        self.sow("intermediates", "context", txt)  # block-input context stream (layer-wise embedding init)
        kw = dict(hidden=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = Modulation(6, name="img_mod", **kw)(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = Modulation(6, name="txt_mod", **kw)(vec)

        img_qkv = QKV(c, name="img_attn")(layer_norm(img) * (1 + i_scale1) + i_shift1)
        txt_qkv = QKV(c, name="txt_attn")(layer_norm(txt) * (1 + t_scale1) + t_shift1)
        attn = _joint_attention(c, (txt_qkv, img_qkv), cos, sin)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        dense = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        img = img + i_gate1 * Dense(c.hidden_size, ("heads", "embed"), name="img_attn_out", **dense)(img_attn)
        img = img + i_gate2 * MLP(c, name="img_mlp")(layer_norm(img) * (1 + i_scale2) + i_shift2)
        txt = txt + t_gate1 * Dense(c.hidden_size, ("heads", "embed"), name="txt_attn_out", **dense)(txt_attn)
        txt = txt + t_gate2 * MLP(c, name="txt_mlp")(layer_norm(txt) * (1 + t_scale2) + t_shift2)
        return (constrain(img, BTD), constrain(txt, BTD)), None


class SingleBlock(nn.Module):
    """Single-stream block over [txt; img]: parallel attention and MLP, one output projection."""

    config: FluxConfig

    @nn.compact
    def __call__(self, carry, inject_vector, vec, cos, sin, inject_mask):
        c = self.config
        x, n_txt = carry, inject_mask.shape[1] if inject_mask is not None else None
        if inject_vector is not None:
            x = jnp.concatenate([_inject(x[:, :n_txt], inject_mask, inject_vector), x[:, n_txt:]], axis=1)
        if n_txt is not None:
            self.sow("intermediates", "context", x[:, :n_txt])
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        shift, scale, gate = Modulation(3, c.hidden_size, c.dtype, c.param_dtype, name="modulation")(vec)
        h = layer_norm(x) * (1 + scale) + shift
        attn = _joint_attention(c, (QKV(c, name="attn")(h),), cos, sin)
        mlp = Dense(c.mlp_hidden, ("embed", "mlp"), name="mlp_in", **kw)(h)
        mlp = checkpoint_name(constrain(nn.gelu(mlp, approximate=True), BTM), "mlp_hidden")
        out = Dense(c.hidden_size, ("mlp", "embed"), name="out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
        return constrain(x + gate * out, BTD), None


class FluxTransformer(nn.Module):
    config: FluxConfig

    @nn.compact
    @lora_backward_from_config
    def __call__(
        self,
        img: jax.Array,
        txt: jax.Array,
        pooled: jax.Array,
        timesteps: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
        concept: ConceptInjection | None = None,
    ) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        if c.guidance_embed and guidance is None:
            raise ValueError("this FLUX config has a guidance embedding: pass `guidance` (B,)")

        img = constrain(Dense(c.hidden_size, ("in_channels", "embed"), name="img_in", **kw)(img), BTD)
        txt = constrain(Dense(c.hidden_size, ("context_embed", "embed"), name="txt_in", **kw)(txt), BTD)

        vec = MLPEmbedder(c.hidden_size, "time_freq", name="time_in", **kw)(timestep_embedding(timesteps * 1000.0))
        if c.guidance_embed:
            vec = vec + MLPEmbedder(c.hidden_size, "time_freq", name="guidance_in", **kw)(
                timestep_embedding(guidance * 1000.0))
        vec = vec + MLPEmbedder(c.hidden_size, "pooled_embed", name="vector_in", **kw)(pooled)

        cos, sin = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0), c.axes_dim, c.theta)
        mask = None if concept is None else concept.mask
        double_vecs = None if concept is None else concept.double
        single_vecs = None if concept is None else concept.single

        double = layer_stack(DoubleBlock, c, c.depth, "double_blocks", PER_BLOCK)
        img, txt = double((img, txt), double_vecs, vec, cos, sin, mask)
        x = jnp.concatenate([txt, img], axis=1)
        single = layer_stack(SingleBlock, c, c.depth_single, "single_blocks", PER_BLOCK)
        x = single(x, single_vecs, vec, cos, sin, mask)
        img = x[:, txt.shape[1]:]

        scale, shift = Modulation(2, c.hidden_size, c.dtype, c.param_dtype, name="final_mod")(vec)
        img = layer_norm(img) * (1 + scale) + shift
        out = Dense(c.output_channels, ("embed", "out_channels"), name="final_out", **kw)(img)
        return out.astype(jnp.float32)


def example_inputs(config: FluxConfig, batch: int = 1, img_len: int = 16, txt_len: int = 8) -> dict[str, Any]:
    """ShapeDtypeStructs of a forward call, for `jax.eval_shape` / AOT lowering / init."""
    f32 = jnp.float32
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
    return dict(
        img=spec(batch, img_len, config.in_channels),
        txt=spec(batch, txt_len, config.context_dim),
        pooled=spec(batch, config.pooled_dim),
        timesteps=spec(batch),
        img_ids=spec(img_len, 3),
        txt_ids=spec(txt_len, 3),
        guidance=spec(batch) if config.guidance_embed else None,
    )


def init_fn(config: FluxConfig, rng: jax.Array, **shapes):
    """A zero-argument function returning the boxed `params` of a fresh model (for sharded init)."""
    model = FluxTransformer(config)
    inputs = example_inputs(config, **shapes)

    def init():
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
        return model.init(rng, **zeros)["params"]

    return init
