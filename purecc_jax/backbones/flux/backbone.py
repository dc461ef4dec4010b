"""FLUX.1 (dev, schnell) as a PureCC backbone.

Training latents are the VAE latents packed 2x2 into tokens (B, N, 64) with their RoPE ids in
the cache; the context is T5's hidden states, the pooled vector CLIP-L's; FLUX.1-dev embeds the
training guidance. Concept embeddings: none, token (CLIP-L and T5 rows), layerwise.
Exports: diffusers LoRA, kohya, diffusers transformer folder, BFL single file (`formats`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from purecc_jax import sharding
from purecc_jax.backbones.base import Backbone
from purecc_jax.backbones.flux import abstract
from purecc_jax.backbones.flux import cache as cache_lib
from purecc_jax.backbones.flux import embeddings as emb_lib
from purecc_jax.backbones.flux import folder as folder_lib
from purecc_jax.backbones.flux import formats as formats_lib
from purecc_jax.backbones.flux import model_card
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.denoiser import FluxDenoiser
from purecc_jax.backbones.flux.generate import generate, trained_overrides
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig, FluxTransformer
from purecc_jax.pipeline.latents import pack


class FluxBackbone(Backbone):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    folder_parts = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                    "tokenizer", "tokenizer_2")
    config_class = FluxConfig
    concept_embeddings = emb_lib.KINDS
    weight_formats = formats_lib.FORMATS
    default_guidance = 3.5
    default_max_sequence_length = 512

    def is_folder(self, path: str | Path) -> bool:
        # Older tiny FLUX folders name no pipeline class.
        index = Path(path) / "model_index.json"
        return super().is_folder(path) or (index.is_file() and "_class_name" not in json.loads(index.read_text()))

    def check_folder(self, path: str | Path, config: Any) -> None:
        folder_lib.check_folder(path)
        folder_lib.check_guidance(path, config.train_guidance)

    def load(self, path: str | Path, *, mesh: Any = None, rules: Any = None, **runtime: Any) -> Any:
        return folder_lib.load_pipeline(path, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None else rules,
                                        **runtime)

    def lora_targets(self, targets: str | Sequence[str]) -> tuple[str, ...]:
        return lora_lib.resolve_targets(targets)

    def train_guidance(self, parts: Any, config: Any) -> float | None:
        return config.train_guidance if parts.transformer_config.guidance_embed else None

    # --- training

    def denoiser(self, parts: Any, config: Any) -> FluxDenoiser:
        text = parts.text
        return FluxDenoiser(FluxTransformer(parts.transformer_config), self.train_guidance(parts, config),
                            config.concept_embedding, text.clip_config, text.t5_config)

    def prepare_identifier(self, parts: Any, identifier: str, kind: str) -> None:
        tokenizers = parts.tokenizers
        tokenizers.check_identifier(identifier, kind)
        if kind == "token" and identifier not in tokenizers.concept_words:
            tokenizers.add_concept_token(identifier)

    def build_cache(self, concept, images, view_image, parts, codec, max_sequence_length, embeddings=None):
        return cache_lib.build(concept, images, view_image, codec, parts.text, max_sequence_length, embeddings)

    def loss_weights(self, weights, latent_channels):
        # packed as the latents are: 2x2 patches of every latent channel
        full = np.broadcast_to(np.asarray(weights, np.float32)[..., None], (*np.shape(weights), latent_channels))
        return np.asarray(pack(full))

    def initial_embeddings(self, parts, kind, concept, cache, seed, guidance):
        return emb_lib.initial(parts, kind, concept.class_word, cache, seed, guidance)

    def bake_embeddings(self, cache, parts, embeddings, kind):
        if kind != "token" or embeddings is None:
            return cache
        return cache_lib.encode_texts(cache, parts.text, embeddings)

    def text_params(self, parts: Any) -> dict[str, Any]:
        return {"clip": parts.text.clip_params, "t5": parts.text.t5_params}

    # --- sampling

    def generate(self, parts, prompts, settings, *, seeds, init_latents=None, trained=None, lora=None, codec=None,
                 progress=False):
        overrides = trained_overrides(parts, prompts, settings, trained)
        if lora is not None:
            if overrides.get("lora") is not None:
                raise ValueError("the trained concept already brings a LoRA; sample one LoRA at a time")
            overrides["lora"] = lora
        return generate(parts, prompts, settings, seeds=seeds, init_latents=init_latents, codec=codec,
                        progress=progress, **overrides).images

    # --- export

    def resolve_formats(self, formats, has_lora, merge_lora):
        return formats_lib.resolve(formats, has_lora, merge_lora)

    def write_weights(self, fmt, folder, trainable, lora_cfg, transformer_config, *, dtype, merge_lora=False,
                      base_params=None):
        return formats_lib.write(fmt, folder, trainable, lora_cfg, transformer_config, dtype=dtype,
                                 merge_lora=merge_lora, base_params=base_params)

    def write_embeddings(self, folder, kind, identifier, embeddings):
        return emb_lib.write_embeddings(folder, kind, identifier, embeddings)

    def export_files(self, fmt, kind):
        return (formats_lib.FILES[fmt].split("/")[0], *emb_lib.FILES.get(kind, ()))

    def read_export(self, folder, formats, kind, identifier, parts, lora_scale=1.0):
        parts, lora = formats_lib.read(Path(folder), parts, lora_scale, formats)
        return parts, lora, emb_lib.read_embeddings(folder, kind, identifier, parts)

    def read_lora(self, path, transformer_config, scanned=True):
        return formats_lib.read_lora(path, transformer_config, scanned=scanned)

    def lora_collection(self, path, parts, scale=1.0):
        return formats_lib.lora_variables(path, parts, scale)

    def model_card(self, meta, info, lora_cfg, folder, grid):
        return model_card.render(meta, info, lora_cfg, folder, grid)

    def read_config(self, pretrained, **runtime):
        return flux_io.read_config(pretrained, **runtime)

    def load_merge_base(self, pretrained, scan_layers):
        return flux_io.load_transformer(pretrained, scan_layers=scan_layers,
                                        param_dtype=flux_io.checkpoint_dtype(pretrained).name)

    # --- shapes

    presets = tuple(abstract.PRESETS)

    def abstract_parts(self, source, *, mesh, rules=None, **runtime):
        return abstract.parts(source, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None else rules, **runtime)

    def cache_shapes(self, parts, height, width, views, texts, max_sequence_length):
        return abstract.cache_shapes(parts, height, width, views, texts, max_sequence_length)

    def embedding_shapes(self, parts, kind):
        return abstract.embedding_shapes(parts, kind)

    def lower_sampler(self, parts, settings, images, trained=None):
        return abstract.lower_sampler(parts, settings, images, trained)

    def device_params(self, parts):
        return {"transformer": parts.transformer_params, "clip": parts.text.clip_params,
                "t5": parts.text.t5_params, "vae": parts.vae_params}


FLUX = FluxBackbone()
