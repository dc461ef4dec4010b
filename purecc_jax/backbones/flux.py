"""FLUX.1 (dev, schnell) as a PureCC backbone: the package's first one, wrapped without changing it.

Training latents are the VAE latents packed 2x2 into tokens (B, N, 64) with their RoPE ids in
the cache; the context is T5's hidden states, the pooled vector CLIP-L's; FLUX.1-dev embeds the
training guidance. Concept embeddings: none, token (CLIP-L and T5 rows), layerwise.
Exports: diffusers LoRA, kohya, diffusers transformer folder, BFL single file (`weights.formats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from purecc_jax.backbones.base import Backbone
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig, FluxTransformer


class FluxBackbone(Backbone):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    module_class = FluxTransformer
    config_class = FluxConfig
    concept_embeddings = ("none", "token", "layerwise")
    weight_formats = ("diffusers-lora", "kohya", "diffusers-full", "bfl")

    def is_folder(self, path: str | Path) -> bool:
        # Older tiny FLUX folders name no pipeline class; FLUX is the fallback for every non-SD3 folder.
        from purecc_jax.pipeline.sd3 import is_sd3_folder

        return (Path(path) / "model_index.json").is_file() and not is_sd3_folder(path)

    def check_folder(self, path: str | Path, config: Any) -> None:
        from purecc_jax.pipeline.folder import check_folder, check_guidance

        check_folder(path)
        check_guidance(path, config.train_guidance)

    def load(self, path: str | Path, *, mesh: Any = None, rules: Any = None, **runtime: Any) -> Any:
        from purecc_jax import sharding
        from purecc_jax.pipeline.folder import load_pipeline

        return load_pipeline(path, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None else rules, **runtime)

    def train_guidance(self, parts: Any, config: Any) -> float | None:
        return config.train_guidance if parts.transformer_config.guidance_embed else None

    def lora_targets(self, targets: str | Sequence[str]) -> tuple[str, ...]:
        return lora_lib.resolve_targets(targets)

    def velocity(self, model, variables, xt, t, text, cache, guidance, injection):
        t5, pooled = text
        g = None if guidance is None else jnp.full((xt.shape[0],), guidance, jnp.float32)
        txt_ids = jnp.zeros((t5.shape[1], 3), jnp.float32)
        return model.apply(variables, xt, t5, pooled, t, cache["img_ids"], txt_ids, g, injection)

    def check_identifier(self, parts: Any, identifier: str, kind: str) -> None:
        parts.tokenizers.check_identifier(identifier, kind)

    def build_cache(self, concept, images, view_image, parts, codec, max_sequence_length, extra):
        from purecc_jax.data import cache as cache_lib

        return cache_lib.build(concept, images, view_image, codec, parts.text, max_sequence_length, extra)

    def sample(self, parts, prompts, settings, *, seed, lora=None, concept_embedding="none", identifier="",
               embeddings=None, codec=None):
        from purecc_jax.pipeline.generate import generate
        from purecc_jax.purecc import embeddings as emb_lib

        text, injection = emb_lib.embed_prompts(parts.text, prompts, settings.max_sequence_length,
                                                concept_embedding, identifier, embeddings)
        return generate(parts, prompts, settings, seeds=(seed,), text=text, lora=lora, concept=injection,
                        codec=codec).images

    def resolve_formats(self, formats, has_lora, merge_lora):
        from purecc_jax.weights import formats as formats_lib

        return formats_lib.resolve(formats, has_lora, merge_lora)

    def write_weights(self, fmt, folder, trainable, lora_cfg, transformer_config, *, dtype, merge_lora=False,
                      base_params=None):
        from purecc_jax.weights import formats as formats_lib

        return formats_lib.write(fmt, folder, trainable, lora_cfg, transformer_config, dtype=dtype,
                                 merge_lora=merge_lora, base_params=base_params)

    def read_lora(self, path, transformer_config, scanned=True):
        from purecc_jax.weights import formats as formats_lib

        return formats_lib.read_lora(path, transformer_config, scanned=scanned)

    def model_card(self, meta, info, lora_cfg, folder, grid):
        from purecc_jax import model_card

        return model_card.render(meta, info, lora_cfg, folder, grid)

    def read_config(self, pretrained, **runtime):
        from purecc_jax.weights import flux_io

        return flux_io.read_config(pretrained, **runtime)

    def load_merge_base(self, pretrained, scan_layers):
        from purecc_jax.weights import flux_io

        return flux_io.load_transformer(pretrained, scan_layers=scan_layers,
                                        param_dtype=flux_io.checkpoint_dtype(pretrained).name)


FLUX = FluxBackbone()
