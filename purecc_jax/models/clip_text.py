"""CLIP text encoder (transformers `CLIPTextModel`) in Flax Linen.

FLUX uses its pooled output: the final-LayerNorm hidden state at the EOS position. SD3 uses
`CLIPTextModelWithProjection` (config `projection_dim` set): the pooled output projected by
`text_projection`, and the penultimate layer's hidden states (`penultimate=True`).
Pre-LN transformer with a causal mask, learned positions and no padding mask (FluxPipeline
passes none). `weights/clip_rules.py` maps the parameters to transformers' names.

Pooling follows transformers: configs with the legacy `eos_token_id == 2` (the original
openai/clip-vit-large-patch14 config, which FLUX ships) pool at the argmax of the ids
(the EOS token has the largest id in CLIP's vocabulary); otherwise at the first position
equal to `eos_token_id`. One deliberate difference: extra-token ids (>= vocab_size, see
text_common) never win the legacy argmax, so remapping a concept token to an extra row
does not move the pooled position away from the EOS token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from purecc_jax.models.layers import BTD, BTHD, BTM, Dense, constrain
from purecc_jax.models.text_common import (
    ACTIVATIONS,
    attention_implementation,
    check_runtime,
    embed_tokens,
)
from purecc_jax.models.runtime import Runtime, layer_stack

LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(Runtime):
    """Architecture (transformers' defaults); the runtime choices are `Runtime`'s."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # CLIPTextModelWithProjection: pooled output projected to this width

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        super().__post_init__()
        check_runtime(self.hidden_act, self.attention)

    def replace(self, **kw) -> CLIPTextConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **runtime) -> CLIPTextConfig:
        """From a transformers CLIPTextConfig json dict (or a CLIPConfig's `text_config`)."""
        if "text_config" in cfg:
            cfg = cfg["text_config"]
        eos = cfg.get("eos_token_id", cls.eos_token_id)
        if not isinstance(eos, int):
            raise ValueError(f"CLIP text config: eos_token_id must be one integer, got {eos!r}")
        d = cls()
        with_projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or ())
        return cls(
            vocab_size=cfg.get("vocab_size", d.vocab_size),
            hidden_size=cfg.get("hidden_size", d.hidden_size),
            intermediate_size=cfg.get("intermediate_size", d.intermediate_size),
            num_layers=cfg.get("num_hidden_layers", d.num_layers),
            num_heads=cfg.get("num_attention_heads", d.num_heads),
            max_positions=cfg.get("max_position_embeddings", d.max_positions),
            hidden_act=cfg.get("hidden_act", d.hidden_act),
            layer_norm_eps=cfg.get("layer_norm_eps", d.layer_norm_eps),
            eos_token_id=eos,
            projection_dim=cfg.get("projection_dim", 512) if with_projection else None,
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """transformers CLIPTextConfig json (the inverse of `from_hf`)."""
        architecture = "CLIPTextModel" if self.projection_dim is None else "CLIPTextModelWithProjection"
        return {"architectures": [architecture], "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "max_position_embeddings": self.max_positions, "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps, "eos_token_id": self.eos_token_id,
                "projection_dim": self.projection_dim or self.hidden_size}


PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 text tower as FLUX's text_encoder/config.json has it.
    "clip-l": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                             eos_token_id=LEGACY_EOS_ID),
    # OpenCLIP ViT-bigG/14 text tower with projection, as SD3's text_encoder_2/config.json has it.
    "clip-g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
                             projection_dim=1280, eos_token_id=LEGACY_EOS_ID),
    "tiny": CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           max_positions=16, eos_token_id=99),
}


def preset(name: str, **overrides) -> CLIPTextConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown CLIP text preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (scale and bias), statistics in float32."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class CLIPLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)) (causal), then x + mlp(ln2(x)).

    The carry is (hidden, the previous block's input); the second member ends as the penultimate
    hidden states SD3 reads.
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array]):
        c = self.config
        x = layer_input = carry[0]
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        split = lambda y: constrain(y.reshape(*y.shape[:2], c.num_heads, c.head_dim), BTHD)

        h = LayerNorm(c.layer_norm_eps, c.param_dtype, name="ln1")(x)
        q = split(Dense(c.hidden_size, ("embed", "heads"), name="q", **kw)(h))
        k = split(Dense(c.hidden_size, ("embed", "heads"), name="k", **kw)(h))
        v = split(Dense(c.hidden_size, ("embed", "heads"), name="v", **kw)(h))
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        a = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c.head_dim), is_causal=True,
                                         implementation=attention_implementation(c.attention))
        a = checkpoint_name(constrain(a, BTHD), "attn_out").reshape(*x.shape[:2], c.hidden_size)
        x = x + Dense(c.hidden_size, ("heads", "embed"), name="out", **kw)(a)

        h = LayerNorm(c.layer_norm_eps, c.param_dtype, name="ln2")(x)
        h = Dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h)
        h = checkpoint_name(constrain(ACTIVATIONS[c.hidden_act](h), BTM), "mlp_hidden")
        x = x + Dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
        return (constrain(x, BTD), layer_input), None


def pool_positions(input_ids: jax.Array, vocab_size: int, eos_token_id: int) -> jax.Array:
    """Index (B,) of the token whose final state is the pooled output (see module doc)."""
    if eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(jnp.where(input_ids < vocab_size, input_ids, -1), axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextEncoder(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None, *, penultimate: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """(last_hidden_state (B, L, width), pooled (B, width or projection_dim)) for token ids (B, L).

        `extra_embeddings` (n_extra, width): rows read by ids >= vocab_size. `penultimate`: return
        transformers' `hidden_states[-2]` (the second-to-last block's output, no final LayerNorm) instead
        of the last hidden state.
        """
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"CLIP text input has {length} tokens, the model has {c.max_positions} positions")
        init = nn.initializers.normal(0.02)
        table = self.param("token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                           (c.vocab_size, c.hidden_size), c.param_dtype)
        positions = self.param("position_embedding", nn.with_logical_partitioning(init, ("positions", "embed")),
                               (c.max_positions, c.hidden_size), c.param_dtype)
        x = embed_tokens(table, input_ids, extra_embeddings) + positions[None, :length]
        x = constrain(x.astype(c.dtype), BTD)

        x, before_last = layer_stack(CLIPLayer, c, c.num_layers, "layers")((x, x))
        x = LayerNorm(c.layer_norm_eps, c.param_dtype, name="final_ln")(x)
        pos = pool_positions(input_ids, c.vocab_size, c.eos_token_id)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        if c.projection_dim is not None:
            pooled = Dense(c.projection_dim, ("embed", "projection"), use_bias=False, dtype=c.dtype,
                           param_dtype=c.param_dtype, name="text_projection")(pooled)
        return (before_last if penultimate else x), pooled


def init_fn(config: CLIPTextConfig, rng: jax.Array, batch: int = 1, length: int | None = None):
    """A zero-argument function returning the boxed `params` of a fresh encoder (for sharded init)."""
    model = CLIPTextEncoder(config)
    ids = jnp.zeros((batch, length or config.max_positions), jnp.int32)
    return lambda: model.init(rng, ids)["params"]
