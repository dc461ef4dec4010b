"""FLUX's concept cache: packed VAE latents of every view, T5/CLIP encodings of every text.

    latents    (M, N, C)  packed latents of the M views (images x crops x flips)
    img_ids    (N, 3)     their RoPE positions
    t5         (K, T, D)  T5 hidden states of the K distinct texts (index 0 is the null text "")
    pooled     (K, P)     CLIP pooled outputs
    clip_ids   (K, 77), t5_ids (K, T)   token ids (for re-encoding with learned token embeddings)
    ident_mask (K, T)     the identifier's T5 token positions (layer-wise embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from purecc_jax.backbones.flux.text import TextEncoders
from purecc_jax.data.cache import ConceptCache, encode_images, index_texts
from purecc_jax.data.concept import Concept
from purecc_jax.pipeline.latents import latent_image_ids


def build(
    concept: Concept,
    images: np.ndarray,
    view_image: np.ndarray,
    codec: Any,
    text: TextEncoders,
    max_sequence_length: int,
    extra: dict[str, jax.Array] | None = None,
) -> ConceptCache:
    """Encodes the views and the texts. `extra`: learned token rows ({"clip", "t5"}) if any."""
    latents = encode_images(codec, images)
    f = codec.downsample_factor
    img_ids = latent_image_ids(images.shape[1] // f, images.shape[2] // f)

    texts, view_texts = index_texts(concept, view_image)
    clip_ids, t5_ids = text.tokenizers.tokenize(texts, max_sequence_length)
    arrays = dict(latents=latents, img_ids=np.asarray(img_ids, np.float32), clip_ids=np.asarray(clip_ids),
                  t5_ids=np.asarray(t5_ids),
                  ident_mask=np.asarray(text.tokenizers.word_mask(np.asarray(t5_ids), concept.identifier)))
    cache = ConceptCache(arrays, texts, view_texts, np.asarray(view_image, np.int32))
    return encode_texts(cache, text, extra)


def encode_texts(cache: ConceptCache, text: TextEncoders, extra: dict[str, jax.Array] | None = None,
                 chunk: int = 16) -> ConceptCache:
    """(Re-)encodes every text, with learned token rows `extra` when given."""
    ids = cache.arrays["clip_ids"], cache.arrays["t5_ids"]
    t5, pooled = [], []
    for i in range(0, len(cache.texts), chunk):
        out = text.encode(ids[0][i: i + chunk], ids[1][i: i + chunk],
                          None if extra is None else extra["clip"], None if extra is None else extra["t5"])
        t5.append(np.asarray(out.t5, np.float32))
        pooled.append(np.asarray(out.pooled, np.float32))
    arrays = dict(cache.arrays, t5=np.concatenate(t5), pooled=np.concatenate(pooled))
    return dataclasses.replace(cache, arrays=arrays)
