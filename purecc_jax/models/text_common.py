"""Pieces shared by the text encoders (CLIP text, T5): token lookup with learned extra
tokens, transformers' activation names, and the attention kernels they run on.

Extra-token contract: ids in [0, vocab_size) read the pretrained table; ids in
[vocab_size, vocab_size + n_extra) read row (id - vocab_size) of `extra_embeddings`.
PureCC's learned concept token enters this way, so the pretrained table stays frozen
and shared, and gradients reach only `extra_embeddings`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


# transformers ACT2FN names -> functions (the ones CLIP and T5 checkpoints use).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def check_runtime(activation: str, attention: str) -> None:
    """Raises ValueError naming a config value this package cannot run (beyond `Runtime`'s checks)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; known: {sorted(ACTIVATIONS)}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention {attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")


def attention_implementation(name: str) -> str | None:
    """`jax.nn.dot_product_attention`'s `implementation` argument for a config value."""
    return None if name == "auto" else name


def embed_tokens(table: jax.Array, input_ids: jax.Array, extra: jax.Array | None) -> jax.Array:
    """Rows of `table` for ids < vocab, rows of `extra` for ids >= vocab (see module doc).

    Ids outside [0, vocab + n_extra) are clipped (a jitted lookup cannot raise).
    """
    vocab = table.shape[0]
    out = jnp.take(table, jnp.clip(input_ids, 0, vocab - 1), axis=0)
    if extra is None:
        return out
    if extra.ndim != 2 or extra.shape[1] != table.shape[1]:
        raise ValueError(f"extra_embeddings must be (n_extra, {table.shape[1]}), got {extra.shape}")
    rows = jnp.take(extra.astype(out.dtype), jnp.clip(input_ids - vocab, 0, extra.shape[0] - 1), axis=0)
    return jnp.where((input_ids >= vocab)[..., None], rows, out)
