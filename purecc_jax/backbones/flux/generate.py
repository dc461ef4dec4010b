"""Text-to-image sampling of a FLUX pipeline as diffusers' FluxPipeline does it, as a library.

`generate(parts, prompts, settings)` samples a loaded pipeline (`backbones.flux.folder.load_pipeline`),
optionally with a LoRA collection, layer-wise concept vectors or precomputed text embeddings;
`pipeline.images.write_images` saves the result. The command line is `purecc_jax.sample`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax.backbones.flux import embeddings as emb_lib
from purecc_jax.backbones.flux.folder import FluxParts
from purecc_jax.backbones.flux.sampler import SampleOutput, Transformer, initial_noise, sample
from purecc_jax.backbones.flux.text import PromptCache, TextEmbeddings
from purecc_jax.models.flux import ConceptInjection
from purecc_jax.pipeline.codec import ImageCodec
from purecc_jax.pipeline.schedule import flux_sigmas
from purecc_jax.pipeline.settings import SampleSettings


def _per_image(x: Any, prompts: int, per_prompt: int, what: str) -> Any:
    """`x` with one row per image (prompt-major) from one row per image, per prompt, or for all."""
    if x is None or x.shape[0] == prompts * per_prompt:
        return x
    if x.shape[0] == prompts:
        return jnp.repeat(x, per_prompt, axis=0)
    if x.shape[0] == 1:
        return jnp.repeat(x, prompts * per_prompt, axis=0)
    raise ValueError(f"{what} has {x.shape[0]} rows; expected 1, {prompts} (one per prompt) or "
                     f"{prompts * per_prompt} (one per image)")


def generate(
    parts: FluxParts,
    prompts: Sequence[str] | None,
    settings: SampleSettings = SampleSettings(),
    *,
    seeds: Sequence[int] = (0,),
    init_latents: np.ndarray | jax.Array | None = None,
    text: TextEmbeddings | None = None,
    negative_text: TextEmbeddings | None = None,
    lora: Any = None,
    concept: ConceptInjection | None = None,
    cache: PromptCache | None = None,
    codec: ImageCodec | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Images (P * S, H, W, 3) in [0, 1] for P prompts x S seeds (prompt-major) and the final latents.

    `text` / `negative_text`: precomputed embeddings instead of encoding `prompts` /
    `settings.negative_prompt` (through `cache`, a fresh one by default); like the concept
    mask and `init_latents` (packed (.., N, 4C), replacing the seeds' noise) they have one
    row for all images, one per prompt, or one per image. Without prompts, each row of
    `text` counts as a prompt. `lora`: a `lora` collection for the transformer; `concept`:
    layer-wise concept vectors. `codec`: decodes the latents (default: the pipeline's VAE).
    """
    s = settings
    codec = codec or parts.codec
    f = codec.downsample_factor
    for name, value in (("height", s.height), ("width", s.width)):
        if value <= 0 or value % (2 * f):
            raise ValueError(f"{name}={value} must be a positive multiple of {2 * f}")
    cache = cache or PromptCache(parts.text)
    if text is None:
        if not prompts:
            raise ValueError("generate needs prompts or precomputed text embeddings")
        text = cache(prompts, s.max_sequence_length)
    n_prompts, n_seeds = len(prompts) if prompts else text.t5.shape[0], len(seeds)
    if negative_text is None and s.negative_prompt is not None and s.true_cfg_scale > 1:
        negative_text = cache([s.negative_prompt], s.max_sequence_length)
    text = TextEmbeddings(*(_per_image(x, n_prompts, n_seeds, "text embeddings") for x in text))
    if negative_text is not None:
        negative_text = TextEmbeddings(*(_per_image(x, n_prompts, n_seeds, "negative embeddings")
                                         for x in negative_text))
    if concept is not None:
        concept = concept._replace(mask=_per_image(jnp.asarray(concept.mask), n_prompts, n_seeds, "concept mask"))

    if init_latents is None:
        noise = initial_noise(seeds, s.height, s.width, codec.latent_channels, f)
        latents = jnp.tile(noise, (n_prompts, 1, 1))
    else:
        latents = _per_image(jnp.asarray(init_latents, jnp.float32), n_prompts, n_seeds, "init_latents")
    image_seq_len = (s.height // (2 * f)) * (s.width // (2 * f))
    sigmas = flux_sigmas(s.steps, image_seq_len, parts.scheduler)
    model = Transformer(parts.transformer_config, parts.transformer_params, lora)
    return sample(model, codec, text, latents, sigmas, height=s.height, width=s.width, guidance=s.guidance,
                  negative=negative_text, true_cfg_scale=s.true_cfg_scale, concept=concept, mesh=parts.mesh,
                  rules=parts.rules, progress=progress)


def trained_overrides(parts: FluxParts, prompts: Sequence[str], settings: SampleSettings,
                      trained: Any = None) -> dict[str, Any]:
    """Extra `generate` keyword arguments for a trained concept (`backbones.base.Trained`).

    The `lora` collection, the layer-wise `concept` injection, and `text` (and
    `negative_text`) embeddings computed with the learned concept tokens. Sampling the
    pretrained model (`trained=None`) adds nothing.
    """
    if trained is None:
        return {}

    def embed(texts):
        return emb_lib.embed_prompts(parts.text, texts, settings.max_sequence_length, trained.concept_embedding,
                                     trained.identifier, trained.embeddings)

    text, concept = embed(prompts)
    out = dict(text=text, lora=trained.lora, concept=concept)
    if settings.negative_prompt is not None and settings.true_cfg_scale > 1:
        negative, negative_concept = embed([settings.negative_prompt])
        if negative_concept is not None and bool(jnp.any(negative_concept.mask)):
            raise ValueError(f"the negative prompt {settings.negative_prompt!r} names the concept "
                             f"{trained.identifier!r}; layer-wise concept vectors apply to the positive prompts only")
        out["negative_text"] = negative
    return out
