"""T5 encoder (transformers `T5EncoderModel`, v1.1 flavour) in Flax Linen.

FLUX reads its last hidden state (T5-XXL v1.1, 4096 wide). Pre-norm blocks with RMS norms
(float32, no mean, no bias), attention logits without 1/sqrt(d) scaling plus a learned
bidirectional relative-position bias, and a gated-GELU (tanh approximation) feed-forward.
The bias table belongs to the first block in transformers; here it sits beside the stack,
is looked up once and shared by every block, exactly as transformers shares it.
No padding mask (FluxPipeline passes none). `weights/t5_rules.py` maps the names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from purecc_jax.models.layers import BTD, BTHD, BTM, Dense, RMSNorm, constrain
from purecc_jax.models.text_common import (
    ACTIVATIONS,
    attention_implementation,
    check_runtime,
    embed_tokens,
)
from purecc_jax.models.runtime import BROADCAST, Runtime, layer_stack


@dataclasses.dataclass(frozen=True)
class T5Config(Runtime):
    """Architecture (transformers' defaults); the runtime choices are `Runtime`'s."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_buckets: int = 32
    relative_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    gated: bool = False
    activation: str = "relu"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def __post_init__(self):
        super().__post_init__()
        check_runtime(self.activation, self.attention)

    def replace(self, **kw) -> T5Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **runtime) -> T5Config:
        """From a transformers T5Config json dict (`text_encoder_2/config.json`)."""
        gated, activation = parse_feed_forward_proj(cfg.get("feed_forward_proj", "relu"))
        d = cls()
        return cls(
            vocab_size=cfg.get("vocab_size", d.vocab_size),
            d_model=cfg.get("d_model", d.d_model),
            d_kv=cfg.get("d_kv", d.d_kv),
            d_ff=cfg.get("d_ff", d.d_ff),
            num_layers=cfg.get("num_layers", d.num_layers),
            num_heads=cfg.get("num_heads", d.num_heads),
            relative_buckets=cfg.get("relative_attention_num_buckets", d.relative_buckets),
            relative_max_distance=cfg.get("relative_attention_max_distance", d.relative_max_distance),
            layer_norm_eps=cfg.get("layer_norm_epsilon", d.layer_norm_eps),
            gated=gated,
            activation=activation,
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """transformers T5Config json for a T5EncoderModel (the inverse of `from_hf`)."""
        act = "gelu" if (self.gated and self.activation == "gelu_new") else self.activation
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_buckets,
                "relative_attention_max_distance": self.relative_max_distance,
                "layer_norm_epsilon": self.layer_norm_eps,
                "feed_forward_proj": f"gated-{act}" if self.gated else act, "is_encoder_decoder": False}


def parse_feed_forward_proj(value: str) -> tuple[bool, str]:
    """transformers' `feed_forward_proj` ("relu", "gated-gelu", ...) -> (gated, activation name)."""
    parts = value.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"T5 feed_forward_proj {value!r} is not 'ACT' or 'gated-ACT'")
    gated = len(parts) == 2
    # transformers maps the legacy name "gated-gelu" to the tanh approximation.
    activation = "gelu_new" if value == "gated-gelu" else parts[-1]
    if activation not in ACTIVATIONS:
        raise ValueError(f"T5 feed_forward_proj {value!r}: activation {activation!r} is not supported")
    return gated, activation


PRESETS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            gated=True, activation="gelu_new"),
    "tiny": T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_buckets=8, relative_max_distance=20, gated=True, activation="gelu_new"),
}


def preset(name: str, **overrides) -> T5Config:
    if name not in PRESETS:
        raise KeyError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bucket of key position minus query position, bidirectional.

    Half the buckets per direction; of those, half are exact offsets and the rest grow
    logarithmically up to `max_distance`. Float32 arithmetic as in transformers, so the
    bucket boundaries agree bit for bit.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    exact = half // 2
    scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return buckets + np.where(n < exact, n, large)


class T5Block(nn.Module):
    """x + attn(norm(x)) with the shared position bias, then x + ff(norm(x))."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array):
        c = self.config
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        split = lambda y: constrain(y.reshape(*y.shape[:2], c.num_heads, c.d_kv), BTHD)
        norm = lambda name: RMSNorm(c.layer_norm_eps, axis_name="norm", param_dtype=c.param_dtype, name=name)

        h = norm("attn_norm")(x)
        q = split(Dense(c.inner_dim, ("embed", "heads"), name="q", **kw)(h))
        k = split(Dense(c.inner_dim, ("embed", "heads"), name="k", **kw)(h))
        v = split(Dense(c.inner_dim, ("embed", "heads"), name="v", **kw)(h))
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        # T5 folds the scale into its weights: logits are plain q.k plus the position bias.
        a = jax.nn.dot_product_attention(q, k, v, bias=position_bias.astype(q.dtype), scale=1.0,
                                         implementation=attention_implementation(c.attention))
        a = checkpoint_name(constrain(a, BTHD), "attn_out").reshape(*x.shape[:2], c.inner_dim)
        x = x + Dense(c.d_model, ("heads", "embed"), name="o", **kw)(a)

        h = norm("ff_norm")(x)
        act = ACTIVATIONS[c.activation]
        if c.gated:
            gate = act(Dense(c.d_ff, ("embed", "mlp"), name="wi_0", **kw)(h))
            h = gate * Dense(c.d_ff, ("embed", "mlp"), name="wi_1", **kw)(h)
        else:
            h = act(Dense(c.d_ff, ("embed", "mlp"), name="wi", **kw)(h))
        h = checkpoint_name(constrain(h, BTM), "mlp_hidden")
        x = x + Dense(c.d_model, ("mlp", "embed"), name="wo", **kw)(h)
        return constrain(x, BTD), None


class T5Encoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """last_hidden_state (B, L, d_model) for token ids (B, L).

        `extra_embeddings` (n_extra, d_model): rows read by ids >= vocab_size.
        """
        c = self.config
        table = self.param("token_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("vocab", "embed")),
                           (c.vocab_size, c.d_model), c.param_dtype)
        bias_table = self.param("relative_attention_bias",
                                nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5),
                                                             ("relpos_buckets", "heads")),
                                (c.relative_buckets, c.num_heads), c.param_dtype)
        x = constrain(embed_tokens(table, input_ids, extra_embeddings).astype(c.dtype), BTD)

        buckets = relative_position_buckets(input_ids.shape[1], c.relative_buckets, c.relative_max_distance)
        position_bias = jnp.transpose(jnp.take(bias_table, jnp.asarray(buckets), axis=0), (2, 0, 1))[None]
        position_bias = constrain(position_bias.astype(jnp.float32), (None, "act_heads", None, None))

        x = layer_stack(T5Block, c, c.num_layers, "blocks", (BROADCAST,))(x, position_bias)
        return RMSNorm(c.layer_norm_eps, axis_name="norm", param_dtype=c.param_dtype, name="final_norm")(x)


def init_fn(config: T5Config, rng: jax.Array, batch: int = 1, length: int = 8):
    """A zero-argument function returning the boxed `params` of a fresh encoder (for sharded init)."""
    model = T5Encoder(config)
    ids = jnp.zeros((batch, length), jnp.int32)
    return lambda: model.init(rng, ids)["params"]
