"""FLUX text conditioning: CLIP pooled output and T5 last hidden state (FluxPipeline.encode_prompt).

Both encoders see the padded ids with no attention mask, as in FluxPipeline. `PromptCache`
encodes each distinct (prompt, max_sequence_length) once; cached embeddings are those of
the frozen encoders (learned concept rows go through `TextEncoders.encode` directly).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from purecc_jax.models.t5 import T5Config, T5Encoder
from purecc_jax.pipeline import placement
from purecc_jax.pipeline.tokenizers import Tokenizers


class TextEmbeddings(NamedTuple):
    """The transformer's text inputs for a batch of prompts."""

    t5: jax.Array  # (B, L, t5 width): context tokens
    pooled: jax.Array  # (B, clip width): CLIP pooled output


@functools.partial(jax.jit, static_argnums=(0, 1))
def encode_ids(clip_cfg: CLIPTextConfig, t5_cfg: T5Config, clip_params, t5_params, clip_ids, t5_ids,
               clip_extra, t5_extra) -> TextEmbeddings:
    """(T5 hidden states, CLIP pooled output) of token ids; `*_extra`: learned rows of ids past each vocabulary."""
    _, pooled = CLIPTextEncoder(clip_cfg).apply({"params": clip_params}, clip_ids, clip_extra)
    hidden = T5Encoder(t5_cfg).apply({"params": t5_params}, t5_ids, t5_extra)
    return TextEmbeddings(hidden, pooled)


@dataclasses.dataclass
class TextEncoders:
    """CLIP-L and T5 encoders (configs, parameters) with their tokenizers."""

    clip_config: CLIPTextConfig
    clip_params: Any
    t5_config: T5Config
    t5_params: Any
    tokenizers: Tokenizers | None = None
    mesh: Mesh | None = None
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES

    def encode(self, clip_ids: jax.Array, t5_ids: jax.Array, clip_extra: jax.Array | None = None,
               t5_extra: jax.Array | None = None) -> TextEmbeddings:
        """(t5 hidden (B, L, 4096), pooled (B, 768)) for token ids (B, 77), (B, L); jitted.

        `clip_extra` / `t5_extra` (n, width): embeddings of ids >= each encoder's vocab_size
        (concept tokens, see tokenizers). With a mesh the batch is sharded over the data axes.
        """
        batch = clip_ids.shape[0]
        if t5_ids.shape[0] != batch:
            raise ValueError(f"clip_ids has {batch} rows, t5_ids {t5_ids.shape[0]}")
        rows = placement.padded_size(batch, placement.batch_multiple(self.mesh, self.rules))
        ids = [placement.pad_rows(jnp.asarray(x, jnp.int32), rows) for x in (clip_ids, t5_ids)]
        ids = placement.place(ids, self.mesh, self.rules)
        with placement.maybe_activate(self.mesh, self.rules):
            out = encode_ids(self.clip_config, self.t5_config, self.clip_params, self.t5_params, *ids,
                          clip_extra, t5_extra)
        return TextEmbeddings(*(x[:batch] for x in out)) if rows != batch else out

    def encode_prompts(self, prompts: str | Sequence[str], max_sequence_length: int = 512,
                       clip_extra: jax.Array | None = None, t5_extra: jax.Array | None = None) -> TextEmbeddings:
        """Tokenizes (FluxPipeline's padding) and encodes `prompts`."""
        if self.tokenizers is None:
            raise ValueError("these TextEncoders have no tokenizers; pass token ids to `encode`")
        clip_ids, t5_ids = self.tokenizers.tokenize(prompts, max_sequence_length)
        return self.encode(clip_ids, t5_ids, clip_extra, t5_extra)


class PromptCache:
    """Embeddings of prompts by (prompt, max_sequence_length), each encoded once.

    `encoded` counts the prompts that went through the encoders.
    """

    def __init__(self, encoders: TextEncoders):
        self.encoders = encoders
        self._store: dict[tuple[str, int], TextEmbeddings] = {}
        self.encoded = 0

    def __call__(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> TextEmbeddings:
        """Stacked embeddings (len(prompts), ...) in the order given; new prompts encoded in one batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = list(dict.fromkeys(p for p in prompts if (p, max_sequence_length) not in self._store))
        if new:
            out = self.encoders.encode_prompts(new, max_sequence_length)
            for i, prompt in enumerate(new):
                self._store[(prompt, max_sequence_length)] = TextEmbeddings(out.t5[i], out.pooled[i])
            self.encoded += len(new)
        rows = [self._store[(p, max_sequence_length)] for p in prompts]
        return TextEmbeddings(jnp.stack([r.t5 for r in rows]), jnp.stack([r.pooled for r in rows]))

    def __len__(self) -> int:
        return len(self._store)
