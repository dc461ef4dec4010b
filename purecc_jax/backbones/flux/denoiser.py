"""FLUX as the train step sees it (`purecc.step.Denoiser`): cached texts -> conditioning -> velocity.

Conditioning of a batch of cached texts is (T5 tokens, CLIP pooled vector, identifier mask):
    concept_embedding="token"      with `weights.text` set (the stage trains its token rows), the texts
                                   that name the identifier are re-encoded with the rows in `weights.embeddings`;
                                   otherwise the cache's encodings (frozen rows are baked into them)
    concept_embedding="layerwise"  the identifier's T5 positions, where the block vectors of
                                   `weights.embeddings` are written (`models.flux.ConceptInjection`)
The velocity is the transformer's, with the training guidance embedded (FLUX.1-dev) or none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from purecc_jax.backbones.flux.text import encode_ids
from purecc_jax.models.clip_text import CLIPTextConfig
from purecc_jax.models.flux import ConceptInjection, FluxTransformer
from purecc_jax.models.t5 import T5Config

IDENTIFIER_KINDS = ("complete", "target")  # the texts that name the identifier


@dataclasses.dataclass(frozen=True)
class FluxDenoiser:
    model: FluxTransformer
    guidance: float | None  # embedded guidance of training passes; None: the transformer has no embedder
    concept_embedding: str = "none"  # none | token | layerwise
    clip_config: CLIPTextConfig | None = None  # the text encoders, to re-encode with trained token rows
    t5_config: T5Config | None = None

    def condition(self, weights: Any, cache: Any, kind: str, index: jax.Array) -> Any:
        t5, pooled = cache["t5"][index], cache["pooled"][index]
        if self.concept_embedding == "token" and weights.text is not None and kind in IDENTIFIER_KINDS:
            emb = weights.embeddings
            t5, pooled = encode_ids(self.clip_config, self.t5_config, weights.text["clip"], weights.text["t5"],
                                    cache["clip_ids"][index], cache["t5_ids"][index], emb["clip"], emb["t5"])
        mask = cache["ident_mask"][index] if self.concept_embedding == "layerwise" else None
        return t5, pooled, mask

    def velocity(self, weights: Any, cache: Any, xt: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        t5, pooled, mask = cond
        variables = {"params": weights.params}
        if weights.lora is not None:
            variables["lora"] = weights.lora
        injection = None
        if self.concept_embedding == "layerwise":
            injection = ConceptInjection(mask=mask, double=weights.embeddings["double"],
                                         single=weights.embeddings["single"])
        g = None if self.guidance is None else jnp.full((xt.shape[0],), self.guidance, jnp.float32)
        txt_ids = jnp.zeros((t5.shape[1], 3), jnp.float32)
        return self.model.apply(variables, xt, t5, pooled, t, cache["img_ids"], txt_ids, g, injection)
