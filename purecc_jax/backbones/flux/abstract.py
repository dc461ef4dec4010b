"""FLUX.1 as shapes: a pipeline's parts, concept cache, embeddings and sampler without weights.

What `purecc_jax.preflight` compiles a run's programs from: every parameter a ShapeDtypeStruct in
the sharding `folder.load_pipeline` would stream it into, the architecture read from a pipeline
folder's config.json files (no safetensors needed) or named by a preset:

    flux-dev       FLUX.1-dev (guidance embedding), CLIP-L, T5-XXL, FLUX's VAE
    flux-schnell   the same without the guidance embedding
    flux-tiny      two blocks of width 128 with tiny text encoders and VAE, for tests
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax import paths, sharding
from purecc_jax.backbones.flux import sampler
from purecc_jax.backbones.flux.folder import FluxParts, _pixel_codec
from purecc_jax.backbones.flux.text import TextEmbeddings, TextEncoders, encode_ids
from purecc_jax.models import clip_text, flux, runtime as runtime_lib, t5, vae
from purecc_jax.models.clip_text import CLIPTextConfig
from purecc_jax.models.flux import ConceptInjection, FluxConfig
from purecc_jax.models.t5 import T5Config
from purecc_jax.models.vae import VAEConfig
from purecc_jax.pipeline import placement
from purecc_jax.pipeline.latents import latent_image_ids, pack
from purecc_jax.weights import vae_rules

_SHARED_RUNTIME = ("dtype", "param_dtype")  # the text encoders' and VAE's, as `load_pipeline` sets them
PRESETS: dict[str, tuple[FluxConfig, CLIPTextConfig, T5Config, VAEConfig]] = {
    "flux-dev": (flux.preset("flux-dev"), clip_text.preset("clip-l"), t5.preset("t5-v1_1-xxl"), vae.preset("flux")),
    "flux-schnell": (flux.preset("flux-schnell"), clip_text.preset("clip-l"), t5.preset("t5-v1_1-xxl"),
                     vae.preset("flux")),
    "flux-tiny": (flux.preset("tiny", num_heads=2, head_dim=64, axes_dim=(16, 24, 24), depth=1, depth_single=1,
                              context_dim=64, pooled_dim=32, in_channels=64, guidance_embed=True),
                  clip_text.preset("tiny", max_positions=77), t5.preset("tiny", d_model=64),
                  vae.preset("tiny")),
}


def _json(file: Any) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def configs(source: str | Path, **runtime: Any) -> tuple[FluxConfig, CLIPTextConfig, T5Config, VAEConfig | None]:
    """The transformer's, CLIP-L's, T5's and the VAE's configs (None for a pixel-space pipeline) of a
    preset name or a pipeline folder (local or a bucket), `runtime` applied as `load_pipeline` applies it."""
    shared = lambda cls: runtime_lib.select(cls, runtime, _SHARED_RUNTIME)  # noqa: E731
    if str(source) in PRESETS:
        transformer, clip, t5_cfg, vae_cfg = PRESETS[str(source)]
        return (transformer.replace(**runtime_lib.select(FluxConfig, runtime)), clip.replace(**shared(CLIPTextConfig)),
                t5_cfg.replace(**shared(T5Config)), vae_cfg.replace(**shared(VAEConfig)))
    folder = paths.path(source)
    transformer = FluxConfig.from_diffusers(_json(folder / "transformer" / "config.json"),
                                            **runtime_lib.select(FluxConfig, runtime))
    clip = CLIPTextConfig.from_hf(_json(folder / "text_encoder" / "config.json"), **shared(CLIPTextConfig))
    t5_cfg = T5Config.from_hf(_json(folder / "text_encoder_2" / "config.json"), **shared(T5Config))
    vae_cfg = None
    if paths.is_remote(source) or _pixel_codec(Path(str(folder))) is None:
        vae_cfg = VAEConfig.from_diffusers(_json(folder / "vae" / "config.json"), **shared(VAEConfig))
    return transformer, clip, t5_cfg, vae_cfg


def parts(source: str | Path, *, mesh: Any, rules: Any = sharding.DEFAULT_RULES, **runtime: Any) -> FluxParts:
    """`load_pipeline`'s parts with ShapeDtypeStruct parameters in their shardings; no tokenizers."""
    transformer, clip, t5_cfg, vae_cfg = configs(source, **runtime)
    key = jax.random.key(0)
    text = TextEncoders(clip, sharding.abstract_params(clip_text.init_fn(clip, key, length=1), mesh, rules),
                        t5_cfg, sharding.abstract_params(t5.init_fn(t5_cfg, key, length=1), mesh, rules),
                        None, mesh, rules)
    vae_params, pixel_codec = None, None
    if vae_cfg is None:
        pixel_codec = _pixel_codec(Path(str(paths.path(source))))
    else:
        abstract, shardings = vae_rules.placement(vae_cfg, mesh, rules)
        vae_params = sharding.with_shardings(abstract, shardings)
    scheduler = None
    if str(source) not in PRESETS and (paths.path(source) / "scheduler" / "scheduler_config.json").exists():
        scheduler = _json(paths.path(source) / "scheduler" / "scheduler_config.json")
    return FluxParts(transformer, sharding.abstract_params(flux.init_fn(transformer, key), mesh, rules), text,
                     vae_cfg, vae_params, scheduler, mesh, rules, pixel_codec)


def _text_shapes(parts: FluxParts, rows: int, max_sequence_length: int, extra: Any = None) -> TextEmbeddings:
    t = parts.text
    ids = (jax.ShapeDtypeStruct((rows, t.clip_config.max_positions), jnp.int32),
           jax.ShapeDtypeStruct((rows, max_sequence_length), jnp.int32))
    extra = (None, None) if extra is None else (extra["clip"], extra["t5"])
    return jax.eval_shape(lambda p, q, *a: encode_ids(t.clip_config, t.t5_config, p, q, *a),
                          t.clip_params, t.t5_params, *ids, *extra)


def cache_shapes(parts: FluxParts, height: int, width: int, views: int, texts: int,
                 max_sequence_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of `cache.build` for `views` views of height x width and `texts` texts (see backbones.flux.cache)."""
    codec = parts.codec
    latents = jax.eval_shape(lambda x: pack(codec.encode(x)), jax.ShapeDtypeStruct((views, height, width, 3),
                                                                                   jnp.float32))
    f = codec.downsample_factor
    encoded = _text_shapes(parts, texts, max_sequence_length)
    shape = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)  # noqa: E731
    return dict(latents=shape(latents), img_ids=shape(np.asarray(latent_image_ids(height // f, width // f)), jnp.float32),
                clip_ids=jax.ShapeDtypeStruct((texts, parts.text.clip_config.max_positions), jnp.int32),
                t5_ids=jax.ShapeDtypeStruct((texts, max_sequence_length), jnp.int32),
                ident_mask=jax.ShapeDtypeStruct((texts, max_sequence_length), jnp.bool_),
                t5=shape(encoded.t5, jnp.float32), pooled=shape(encoded.pooled, jnp.float32))


def embedding_shapes(parts: FluxParts, kind: str) -> dict[str, jax.ShapeDtypeStruct] | None:
    """ShapeDtypeStructs of `embeddings.initial`'s result for `kind` (float32 rows or block vectors)."""
    f32 = jnp.float32
    if kind == "token":
        return {"clip": jax.ShapeDtypeStruct((1, parts.text.clip_config.hidden_size), f32),
                "t5": jax.ShapeDtypeStruct((1, parts.text.t5_config.d_model), f32)}
    if kind == "layerwise":
        cfg = parts.transformer_config
        return {"double": jax.ShapeDtypeStruct((cfg.depth, cfg.hidden_size), f32),
                "single": jax.ShapeDtypeStruct((cfg.depth_single, cfg.hidden_size), f32)}
    return None


def lower_sampler(parts: FluxParts, settings: Any, images: int, trained: Any = None) -> jax.stages.Lowered:
    """The denoising loop `generate` runs for `images` images of `settings` with `trained` (a
    `backbones.base.Trained` of ShapeDtypeStructs), lowered on `parts.mesh`."""
    mesh, rules, codec = parts.mesh, parts.rules, parts.codec
    f = codec.downsample_factor
    rows = placement.padded_size(images, placement.batch_multiple(mesh, rules))
    batched = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding.batch_sharding(mesh, shape, rules))
    lh, lw = settings.height // f, settings.width // f
    latents = batched((rows, (lh // 2) * (lw // 2), 4 * codec.latent_channels), jnp.float32)
    kind = "none" if trained is None else trained.concept_embedding
    embeddings = None if trained is None else trained.embeddings
    text = _text_shapes(parts, rows, settings.max_sequence_length, embeddings if kind == "token" else None)
    text = TextEmbeddings(*(batched(x.shape, x.dtype) for x in text))
    concept = None
    if kind == "layerwise" and embeddings is not None:
        concept = ConceptInjection(batched((rows, settings.max_sequence_length), jnp.bool_), embeddings["double"],
                                   embeddings["single"])
    model = sampler.Transformer(parts.transformer_config, parts.transformer_params,
                                None if trained is None else trained.lora)
    return sampler.lower_denoise(model, latents, text, settings.steps, latent_size=(lh, lw), guidance=settings.guidance,
                                 concept=concept, mesh=mesh, rules=rules)
