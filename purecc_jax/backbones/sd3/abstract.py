"""SD3 / SD3.5 as shapes: a pipeline's parts, concept cache and sampler without weights.

What `purecc_jax.preflight` compiles a run's programs from: every parameter a ShapeDtypeStruct in
the sharding `pipeline.load_sd3_pipeline` would stream it into, the architecture read from a
pipeline folder's config.json files (no safetensors needed) or named by a preset:

    sd3.5-medium   MMDiT-X, 24 blocks of width 1536, CLIP-L, CLIP-G, T5-XXL, the 16-channel VAE
    sd3.5-large    38 blocks of width 2432
    sd3-medium     SD3 Medium (no MMDiT-X blocks, no q/k norm)
    sd3-tiny       two blocks of width 128 with tiny text encoders and VAE, for tests
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from purecc_jax import paths, sharding
from purecc_jax.backbones.sd3 import pipeline as sd3_pipeline
from purecc_jax.backbones.sd3.pipeline import SD3Parts, SD3TextEncoders
from purecc_jax.models import clip_text, runtime as runtime_lib, sd3, t5, vae
from purecc_jax.models.clip_text import CLIPTextConfig
from purecc_jax.models.sd3 import SD3Config
from purecc_jax.models.t5 import T5Config
from purecc_jax.models.vae import VAEConfig
from purecc_jax.pipeline import placement
from purecc_jax.pipeline.codec import VAECodec
from purecc_jax.weights import vae_rules

_SHARED_RUNTIME = ("dtype", "param_dtype")  # the text encoders' and VAE's, as `load_sd3_pipeline` sets them
_CLIP_L = clip_text.preset("clip-l", projection_dim=768)
_CLIP_G = clip_text.preset("clip-g")
_T5 = t5.preset("t5-v1_1-xxl")
_VAE = vae.preset("flux", scaling_factor=1.5305, shift_factor=0.0609)
PRESETS: dict[str, tuple[SD3Config, CLIPTextConfig, CLIPTextConfig, T5Config | None, VAEConfig]] = {
    "sd3.5-medium": (sd3.preset("sd3.5-medium"), _CLIP_L, _CLIP_G, _T5, _VAE),
    "sd3.5-large": (sd3.preset("sd3.5-large"), _CLIP_L, _CLIP_G, _T5, _VAE),
    "sd3-medium": (sd3.preset("sd3-medium"), _CLIP_L, _CLIP_G, _T5, _VAE),
    "sd3-tiny": (SD3Config(sample_size=16, num_layers=2, num_heads=2, head_dim=64, context_dim=64, pooled_dim=32,
                           pos_embed_max_size=16, dual_attention_layers=(0,)),
                 clip_text.preset("tiny", max_positions=77, projection_dim=16),
                 clip_text.preset("tiny", max_positions=77, projection_dim=16), t5.preset("tiny", d_model=64),
                 vae.preset("tiny")),
}


def _json(file: Any) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def configs(source: str | Path, **runtime: Any
            ) -> tuple[SD3Config, CLIPTextConfig, CLIPTextConfig, T5Config | None, VAEConfig]:
    """The transformer's, CLIP-L's, CLIP-G's, T5's (None when the folder has none) and the VAE's configs
    of a preset name or a pipeline folder (local or a bucket), `runtime` applied as the loader applies it."""
    shared = lambda cls: runtime_lib.select(cls, runtime, _SHARED_RUNTIME)  # noqa: E731
    if str(source) in PRESETS:
        transformer, clip_l, clip_g, t5_cfg, vae_cfg = PRESETS[str(source)]
        return (transformer.replace(**runtime_lib.select(SD3Config, runtime)), clip_l.replace(**shared(CLIPTextConfig)),
                clip_g.replace(**shared(CLIPTextConfig)), t5_cfg.replace(**shared(T5Config)),
                vae_cfg.replace(**shared(VAEConfig)))
    folder = paths.path(source)
    transformer = SD3Config.from_diffusers(_json(folder / "transformer" / "config.json"),
                                           **runtime_lib.select(SD3Config, runtime))
    clip_l, clip_g = (CLIPTextConfig.from_hf(_json(folder / name / "config.json"), **shared(CLIPTextConfig))
                      for name in ("text_encoder", "text_encoder_2"))
    t5_cfg = None
    if (folder / "text_encoder_3" / "config.json").exists():
        t5_cfg = T5Config.from_hf(_json(folder / "text_encoder_3" / "config.json"), **shared(T5Config))
    vae_cfg = VAEConfig.from_diffusers(_json(folder / "vae" / "config.json"), **shared(VAEConfig))
    return transformer, clip_l, clip_g, t5_cfg, vae_cfg


def parts(source: str | Path, *, mesh: Any, rules: Any = sharding.DEFAULT_RULES, **runtime: Any) -> SD3Parts:
    """`load_sd3_pipeline`'s parts with ShapeDtypeStruct parameters in their shardings; no tokenizers."""
    transformer, clip_l, clip_g, t5_cfg, vae_cfg = configs(source, **runtime)
    key = jax.random.key(0)
    params = {name: sharding.abstract_params(clip_text.init_fn(cfg, key, length=1), mesh, rules)
              for name, cfg in (("clip_l", clip_l), ("clip_g", clip_g))}
    if t5_cfg is not None:
        params["t5"] = sharding.abstract_params(t5.init_fn(t5_cfg, key, length=1), mesh, rules)
    text = SD3TextEncoders(clip_l, clip_g, t5_cfg, params, (None, None, None), transformer.context_dim)
    vae_params = sharding.with_shardings(*vae_rules.placement(vae_cfg, mesh, rules))
    scheduler = {"shift": 3.0}  # FlowMatchEulerDiscreteScheduler of SD3 / SD3.5
    if str(source) not in PRESETS:
        scheduler = _json(paths.path(source) / "scheduler" / "scheduler_config.json")
    return SD3Parts(transformer, sharding.abstract_params(sd3.init_fn(transformer, key), mesh, rules), text,
                    VAECodec(vae_cfg, vae_params), scheduler, mesh, rules)


def _text_shapes(text: SD3TextEncoders, rows: int, max_sequence_length: int) -> tuple[Any, Any]:
    """(context, pooled) ShapeDtypeStructs of `rows` prompts, as `SD3TextEncoders.encode_prompts` makes them."""
    ids = [jax.ShapeDtypeStruct((rows, cfg.max_positions), jnp.int32) for cfg in (text.clip_l_config,
                                                                                 text.clip_g_config)]
    ids.append(jax.ShapeDtypeStruct((rows, max_sequence_length), jnp.int32))
    return jax.eval_shape(lambda p, *a: sd3_pipeline._encode(text.clip_l_config, text.clip_g_config, text.t5_config,
                                                             p, *a, text.context_dim), text.params, *ids)


def cache_shapes(parts: SD3Parts, height: int, width: int, views: int, texts: int,
                 max_sequence_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of `SD3Backbone.build_cache` for `views` views of height x width and `texts` texts."""
    latents = jax.eval_shape(parts.codec.encode, jax.ShapeDtypeStruct((views, height, width, 3), jnp.float32))
    context, pooled = _text_shapes(parts.text, texts, max_sequence_length)
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731  (the cache keeps float32)
    return dict(latents=jax.ShapeDtypeStruct(latents.shape, latents.dtype), t5=shape(context), pooled=shape(pooled))


def lower_sampler(parts: SD3Parts, settings: Any, images: int, trained: Any = None) -> jax.stages.Lowered:
    """The Euler step `sample_sd3` runs for `images` images of `settings` with `trained` (its LoRA a tree of
    ShapeDtypeStructs), lowered on `parts.mesh`: latents and texts split over the batch axes (rows padded
    to them), the scalars `sample_sd3` makes on the default device replicated, where jit places them."""
    cfg, mesh, rules, f = parts.transformer_config, parts.mesh, parts.rules, parts.codec.downsample_factor
    rows = placement.padded_size(images, placement.batch_multiple(mesh, rules))
    batched = lambda x: jax.ShapeDtypeStruct(  # noqa: E731
        x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.shape, rules))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    x = batched(jax.ShapeDtypeStruct((rows, settings.height // f, settings.width // f, cfg.in_channels), jnp.float32))
    context, pooled = _text_shapes(parts.text, rows * (2 if settings.guidance > 1 else 1), settings.max_sequence_length)
    lora = None if trained is None else trained.lora
    variables = {"params": parts.transformer_params} | ({} if lora is None else {"lora": lora})
    with sharding.activate(mesh, rules):
        return sd3_pipeline._euler_step.lower(cfg, variables, x, scalar, scalar, batched(context), batched(pooled),
                                              scalar)
