"""The concept cache: VAE latents of every training view and encodings of every text, once.

    latents    (M, N, C)  packed latents of the M views (images x crops x flips)
    img_ids    (N, 3)     their RoPE positions
    t5         (K, T, D)  T5 hidden states of the K distinct texts (index 0 is the null text "")
    pooled     (K, P)     CLIP pooled outputs
    clip_ids   (K, 77), t5_ids (K, T)   token ids (for re-encoding with learned token embeddings)
    ident_mask (K, T)     the identifier's T5 token positions (layer-wise embeddings)
and, per view, the text indices `complete`, `base`, `target` (the null text is index 0).
This is FLUX's cache (`build`); another backbone builds its own from `encode_images` and
`index_texts` (backbones/sd3.py: NHWC latents, `t5` the joint CLIP ++ T5 context, `pooled`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax.data.concept import Concept
from purecc_jax.pipeline.latents import latent_image_ids, pack
from purecc_jax.pipeline.text import TextEncoders

NULL = 0


@dataclasses.dataclass
class ConceptCache:
    arrays: dict[str, np.ndarray]  # the on-device part, see module doc
    texts: list[str]
    view_texts: dict[str, np.ndarray]  # "complete" / "base" / "target" -> (M,) text indices
    view_image: np.ndarray  # (M,) source image of each view

    @property
    def n_views(self) -> int:
        return len(self.view_image)

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Deterministic in (seed, step), so a resumed run sees the same batches."""
        rng = np.random.default_rng([seed, step])
        views = rng.choice(self.n_views, batch_size, replace=self.n_views < batch_size).astype(np.int32)
        return dict(image=views, **{k: v[views] for k, v in self.view_texts.items()},
                    null=np.full(batch_size, NULL, np.int32))


def encode_images(codec: Any, images: np.ndarray, chunk: int = 8, to_tokens: Any = pack) -> np.ndarray:
    """Packed latents (M, N, C) of images (M, H, W, 3) in [-1, 1], `chunk` at a time; `to_tokens=None`
    keeps the codec's NHWC latents (a backbone that patchifies inside its transformer)."""
    to_tokens = to_tokens or (lambda x: x)
    out = [np.asarray(to_tokens(codec.encode(jnp.asarray(images[i: i + chunk])))) for i in range(0, len(images), chunk)]
    return np.concatenate(out)


def index_texts(concept: Concept, view_image: np.ndarray) -> tuple[list[str], dict[str, np.ndarray]]:
    """The distinct texts (the null text "" first) and, per view, the indices of its complete, base, target."""
    texts = [""]
    index = {"": NULL}
    view_texts = {k: [] for k in ("complete", "base", "target")}
    for i in view_image:
        for kind in view_texts:
            t = getattr(concept.texts[i], kind)
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
            view_texts[kind].append(index[t])
    return texts, {k: np.asarray(v, np.int32) for k, v in view_texts.items()}


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
