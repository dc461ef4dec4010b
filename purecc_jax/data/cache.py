"""The concept cache: latents of every training view and encodings of every text, computed once.

A backbone's cache holds at least

    latents    (M, ...)   the M views' (images x crops x flips) latents, in its transformer's layout
    t5         (K, T, D)  the context tokens of the K distinct texts (index 0 is the null text "")
    pooled     (K, P)     the pooled text vectors
and, per view, the text indices `complete`, `base`, `target` (the null text is index 0); with a masked
loss also `loss_weight` (the latents' shape), L_CC's per-element weights. A run with several training
sizes (resolutions, aspect-ratio buckets) has one cache per size; a batch comes from one (`draw_bucket`).
Each backbone builds its own from `encode_images` and `index_texts` (`backbones.flux.cache`:
the arrays above; `backbones.sd3`: NHWC latents, `t5` the joint CLIP ++ T5 context, `pooled`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from purecc_jax.data.concept import Concept
from purecc_jax.pipeline.latents import pack

NULL = 0


@dataclasses.dataclass
class ConceptCache:
    arrays: dict[str, np.ndarray]  # the on-device part, see module doc
    texts: list[str]
    view_texts: dict[str, np.ndarray]  # "complete" / "base" / "target" -> (M,) text indices
    view_image: np.ndarray  # (M,) source image of each view
    # Views of prior preservation's class images, after the concept's (their complete text is the class prompt).
    class_views: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def n_views(self) -> int:
        """The concept's own views (the class images' views come after them)."""
        return len(self.view_image) - len(self.class_views)

    def batch(self, step: int, batch_size: int, seed: int, caption_dropout: float = 0.0) -> dict[str, np.ndarray]:
        """Indices of a batch of concept views and their texts, and with class views as many class examples
        (`class_image`, `class_text`); deterministic in (seed, step), so a resumed run sees the same batches.
        `caption_dropout`: the probability that a row's complete text is the null text (drawn after the views,
        which it leaves as they are); the base, target and null texts, and the class texts, are never dropped."""
        rng = np.random.default_rng([seed, step])
        views = rng.choice(self.n_views, batch_size, replace=self.n_views < batch_size).astype(np.int32)
        texts = {k: v[views] for k, v in self.view_texts.items()}
        if caption_dropout:
            texts["complete"] = np.where(rng.random(batch_size) < caption_dropout, NULL, texts["complete"])
            texts["complete"] = texts["complete"].astype(np.int32)
        out = dict(image=views, **texts, null=np.full(batch_size, NULL, np.int32))
        if len(self.class_views):
            n = len(self.class_views)
            picks = np.random.default_rng([seed, step, 2]).choice(n, batch_size, replace=n < batch_size)
            classes = self.class_views[picks].astype(np.int32)
            out.update(class_image=classes, class_text=self.view_texts["complete"][classes])
        return out


def draw_bucket(caches: Sequence[ConceptCache], step: int, seed: int) -> int:
    """Which cache (training size) step `step`'s batch comes from, deterministic in (seed, step) as the
    batches are, so every process of a multi-host run draws the same; each with probability proportional to
    its views, so every view is as likely as without buckets. One cache: 0, drawing nothing."""
    if len(caches) == 1:
        return 0
    views = np.asarray([c.n_views for c in caches], np.float64)
    return int(np.random.default_rng([seed, step, 1]).choice(len(caches), p=views / views.sum()))


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
