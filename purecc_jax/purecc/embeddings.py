"""Learned concept embeddings (METHOD.md §3).

    none       no embedding; the identifier is a plain word, whatever its tokens mean to the
               encoders (one token or a few)
    token      the identifier becomes one added token of both tokenizers
               (`Tokenizers.add_concept_token`, as diffusers' textual-inversion loader adds
               it) with one new row in the CLIP-L and one in the T5 embedding table
               ({"clip": (1, D_clip), "t5": (1, D_t5)}), read through the encoders'
               `extra_embeddings`; initialised from the class word's token embeddings
    layerwise  one vector per transformer block ({"double": (depth, D), "single":
               (depth_single, D)}) written into the context stream at the identifier's T5
               token positions (all of its tokens when the plain word is several) at each
               block's input; initialised from the pretrained model's own context stream
               there, so training starts from the pretrained behaviour
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax.models.flux import ConceptInjection, FluxTransformer
from purecc_jax.pipeline.text import TextEmbeddings, TextEncoders

KINDS = ("none", "token", "layerwise")


def init_token(clip_table: jax.Array, t5_table: jax.Array, clip_class_ids: np.ndarray,
               t5_class_ids: np.ndarray) -> dict[str, jax.Array]:
    """Rows initialised to the mean embedding of the class word's tokens in each table."""
    if len(clip_class_ids) == 0 or len(t5_class_ids) == 0:
        raise ValueError("the class word tokenizes to no tokens; cannot initialise the concept token")
    return {
        "clip": jnp.mean(jnp.asarray(clip_table, jnp.float32)[np.asarray(clip_class_ids)], axis=0, keepdims=True),
        "t5": jnp.mean(jnp.asarray(t5_table, jnp.float32)[np.asarray(t5_class_ids)], axis=0, keepdims=True),
    }


def init_layerwise(model: FluxTransformer, variables: dict[str, Any], inputs: dict[str, jax.Array],
                   ident_mask: jax.Array) -> dict[str, jax.Array]:
    """Mean context-stream value at the identifier's positions at every block input.

    `inputs` are FluxTransformer keyword arguments for a batch whose texts contain the
    identifier where `ident_mask` (B, T) is true.
    """
    cfg = model.config
    if not bool(jnp.any(ident_mask)):
        raise ValueError("the identifier occurs in none of the texts; cannot initialise layer-wise embeddings")
    # An all-false injection changes nothing but makes the single blocks record the text part.
    probe = ConceptInjection(jnp.zeros_like(ident_mask), jnp.zeros((cfg.depth, cfg.hidden_size)),
                             jnp.zeros((cfg.depth_single, cfg.hidden_size)))
    # One compiled forward pass, not one dispatch per operation.
    forward = jax.jit(lambda v, x, c: model.apply(v, **x, concept=c, mutable=["intermediates"]))
    _, state = forward(variables, inputs, probe)
    inter = state["intermediates"]
    weights = ident_mask.astype(jnp.float32)

    def mean_at_identifier(ctx):  # (L, B, T, D) -> (L, D)
        return jnp.einsum("lbtd,bt->ld", ctx.astype(jnp.float32), weights) / jnp.sum(weights)

    def collect(prefix, depth):
        if prefix in inter:  # scanned: one stacked array
            return mean_at_identifier(inter[prefix]["context"][0])
        return jnp.stack([mean_at_identifier(inter[f"{prefix}_{i}"]["context"][0][None])[0] for i in range(depth)])

    return {"double": collect("double_blocks", cfg.depth), "single": collect("single_blocks", cfg.depth_single)}


def embed_prompts(text: TextEncoders, prompts: Sequence[str], max_sequence_length: int, kind: str,
                  identifier: str, embeddings: dict[str, Any] | None
                  ) -> tuple[TextEmbeddings, ConceptInjection | None]:
    """Text embeddings of `prompts` under learned concept embeddings, and the layer-wise injection.

    token: the identifier must already be a concept token of `text.tokenizers`
    (`add_concept_token`); its rows are passed to the encoders. layerwise: the vectors are
    written at the identifier's T5 positions. none, or no embeddings: the plain encoding.
    """
    if kind not in KINDS:
        raise ValueError(f"concept embedding kind {kind!r} is not one of {KINDS}")
    tok = text.tokenizers
    use_rows = kind == "token" and embeddings is not None
    if use_rows and identifier not in tok.concept_words:
        raise ValueError(f"token embeddings for {identifier!r}, but the tokenizers do not have it as a concept "
                         "token; call tokenizers.add_concept_token first")
    clip_ids, t5_ids = tok.tokenize(list(prompts), max_sequence_length)
    out = text.encode(clip_ids, t5_ids, embeddings["clip"] if use_rows else None,
                      embeddings["t5"] if use_rows else None)
    injection = None
    if kind == "layerwise" and embeddings is not None:
        mask = jnp.asarray(tok.word_mask(np.asarray(t5_ids), identifier))
        injection = ConceptInjection(mask, embeddings["double"], embeddings["single"])
    return out, injection
