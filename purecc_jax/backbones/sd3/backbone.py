"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X) as a PureCC backbone: the paper's own SD3.5-Medium.

    latents    the VAE's 16-channel latents, NHWC (B, H/8, W/8, 16), normalised (z - 0.0609) * 1.5305;
               the transformer patchifies them itself, so the cache holds them unpacked
    context    CLIP-L ++ CLIP-G penultimate states padded to T5's width, then T5's tokens
               (B, 77 + max_sequence_length, 4096), as StableDiffusion3Pipeline.encode_prompt
    pooled     CLIP-L ++ CLIP-G projected pooled outputs (B, 2048)
    velocity   SD3Transformer(x_t, context, pooled, t): no guidance embedding (guidance is
               classifier-free guidance, at sampling only)

Concept embedding: `none` only. The identifier stays a plain word of the three tokenizers, as in
DreamBooth and diffusers' train_dreambooth_lora_sd3.py; learned token rows in CLIP-L, CLIP-G and
T5 (`token`: StableDiffusion3Pipeline has no textual-inversion loader to read them) and the FLUX
block injection (`layerwise`) are refused with a config error.

Exports: `diffusers-lora` (pytorch_lora_weights.safetensors, `StableDiffusion3Pipeline
.load_lora_weights`) for a LoRA, `diffusers-full` (a transformer/ folder,
`SD3Transformer2DModel.from_pretrained`) for a full fine-tune.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax import sharding
from purecc_jax.backbones.base import Backbone
from purecc_jax.backbones.sd3 import abstract
from purecc_jax.backbones.sd3 import pipeline as sd3_pipeline
from purecc_jax.backbones.sd3 import weights as sd3_io
from purecc_jax.data import cache as cache_lib
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import sd3 as sd3_model
from purecc_jax.weights import diffusers_lora

LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FOLDER = "transformer"
FILES = {"diffusers-lora": LORA_FILE, "diffusers-full": FULL_FOLDER}
MAX_PLAIN_PIECES = 3  # as FLUX's tokenizers: a longer plain identifier is a phrase of common sub-words


@dataclasses.dataclass(frozen=True)
class SD3Denoiser:
    """SD3 as the train step sees it (`purecc.step.Denoiser`): cached (context, pooled) -> velocity."""

    model: sd3_model.SD3Transformer

    def condition(self, weights: Any, cache: Any, kind: str, index: jax.Array) -> Any:
        return cache["t5"][index], cache["pooled"][index]

    def velocity(self, weights: Any, cache: Any, xt: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        context, pooled = cond
        variables = {"params": weights.params}
        if weights.lora is not None:
            variables["lora"] = weights.lora
        return self.model.apply(variables, xt, context, pooled, t)


class SD3Backbone(Backbone):
    name = "sd3"
    pipeline_classes = (sd3_pipeline.PIPELINE_CLASS,)
    folder_parts = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                    "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    config_class = sd3_model.SD3Config
    concept_embeddings = ("none",)
    weight_formats = tuple(FILES)
    default_guidance = sd3_pipeline.DEFAULT_GUIDANCE
    default_max_sequence_length = sd3_pipeline.DEFAULT_MAX_SEQUENCE_LENGTH

    def check_folder(self, path, config):
        sd3_pipeline.check_folder(path)

    def load(self, path, *, mesh=None, rules=None, **runtime):
        return sd3_pipeline.load_sd3_pipeline(path, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None
                                              else rules, **runtime)

    def check_config(self, config):
        if config.concept_embedding not in self.concept_embeddings:
            raise ValueError(
                f"config.concept_embedding={config.concept_embedding!r}: the SD3 backbone supports only 'none' "
                "(the identifier is a plain word of the CLIP-L, CLIP-G and T5 tokenizers); learned token rows "
                "and layer-wise vectors are FLUX-only here")
        if config.train_guidance:
            raise ValueError(f"config.train_guidance={config.train_guidance}: SD3 has no guidance embedding "
                             "(guidance is classifier-free, at sampling only): set it to 0")
        quant = config.model.base_quantization
        if quant != "none":
            raise ValueError(f"config.model.base_quantization={quant!r} is not supported for SD3 yet: use none")

    def lora_targets(self, targets):
        if isinstance(targets, str):
            if targets not in sd3_model.LORA_TARGET_PRESETS:
                raise KeyError(f"unknown SD3 LoRA target preset {targets!r}; known: "
                               f"{sorted(sd3_model.LORA_TARGET_PRESETS)}")
            return sd3_model.LORA_TARGET_PRESETS[targets]
        return tuple(targets)

    def train_guidance(self, parts, config):
        return None

    # --- training

    def denoiser(self, parts, config):
        return SD3Denoiser(sd3_model.SD3Transformer(parts.transformer_config))

    def prepare_identifier(self, parts, identifier, kind):
        if kind != "none":
            raise ValueError(f"concept embedding {kind!r} is not supported by the SD3 backbone (only 'none')")
        for name, tok in zip(("CLIP-L", "CLIP-G", "T5"), parts.text.tokenizers):
            if tok is None:
                continue
            pieces = tok.tokenize(identifier)
            if tok.unk_token is not None and tok.unk_token in pieces:
                raise ValueError(f"identifier {identifier!r}: the {name} tokenizer reads characters of it as "
                                 f"{tok.unk_token!r} ({pieces}); use letters and digits (e.g. 'sks')")
            if len(pieces) > MAX_PLAIN_PIECES:
                raise ValueError(f"identifier {identifier!r} is {len(pieces)} tokens of the {name} tokenizer "
                                 f"({pieces}); choose a rare word of 1-{MAX_PLAIN_PIECES} tokens (e.g. 'sks')")

    def build_cache(self, concept, images, view_image, parts, codec, max_sequence_length, embeddings=None,
                    chunk=16):
        """latents (M, h, w, 16) NHWC, t5 (K, 77 + L, D) the joint context, pooled (K, P)."""
        if embeddings is not None:
            raise ValueError("the SD3 backbone has no learned token rows")
        latents = cache_lib.encode_images(codec, images, to_tokens=None)
        texts, view_texts = cache_lib.index_texts(concept, view_image)
        context, pooled = [], []
        for i in range(0, len(texts), chunk):
            c, p = parts.text.encode_prompts(texts[i: i + chunk], max_sequence_length)
            context.append(np.asarray(c, np.float32))
            pooled.append(np.asarray(p, np.float32))
        arrays = dict(latents=latents, t5=np.concatenate(context), pooled=np.concatenate(pooled))
        return cache_lib.ConceptCache(arrays, texts, view_texts, np.asarray(view_image, np.int32))

    def loss_weights(self, weights, latent_channels):
        # NHWC, as the cached latents
        w = np.asarray(weights, np.float32)
        return np.ascontiguousarray(np.broadcast_to(w[..., None], (*w.shape, latent_channels)))

    # --- sampling

    def generate(self, parts, prompts, settings, *, seeds, init_latents=None, trained=None, lora=None, codec=None,
                 progress=False):
        """StableDiffusion3Pipeline's sampling of every prompt from every seed's noise (prompt-major);
        `init_latents`: its NCHW `latents=` array, one row per image. Guidance > 1 is classifier-free
        guidance against `settings.negative_prompt` (default "")."""
        if settings.true_cfg_scale != 1.0:
            raise ValueError(f"true_cfg_scale={settings.true_cfg_scale}: SD3 has no true CFG; its guidance is "
                             "classifier-free already (guidance with a negative prompt)")
        if trained is not None:
            if trained.concept_embedding != "none":
                raise ValueError(f"concept embedding {trained.concept_embedding!r} is not supported by the SD3 "
                                 "backbone")
            if lora is not None and trained.lora is not None:
                raise ValueError("the trained concept already brings a LoRA; sample one LoRA at a time")
            lora = trained.lora if lora is None else lora
        if codec is not None:
            parts = dataclasses.replace(parts, codec=codec)
        rows = [p for p in prompts for _ in seeds]
        if init_latents is None:
            cfg, f = parts.transformer_config, parts.codec.downsample_factor
            shape = (cfg.in_channels, settings.height // f, settings.width // f)
            noise = np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape, jnp.float32))
                              for s in seeds])
            init_latents = np.tile(noise, (len(prompts), 1, 1, 1))
        negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(rows)
        return sd3_pipeline.sample_sd3(parts, rows, height=settings.height, width=settings.width,
                                       steps=settings.steps, guidance=settings.guidance, negative_prompts=negative,
                                       init_latents=init_latents, max_sequence_length=settings.max_sequence_length,
                                       lora=lora)

    # --- export

    def resolve_formats(self, formats, has_lora, merge_lora):
        if merge_lora:
            raise ValueError("merging a LoRA into the SD3 weights is not supported: export the LoRA "
                             "(diffusers-lora) and load it with StableDiffusion3Pipeline.load_lora_weights")
        out = []
        for fmt in formats:
            if fmt == "default":
                fmt = "diffusers-lora" if has_lora else "diffusers-full"
            if fmt not in self.weight_formats:
                raise ValueError(f"export format {fmt!r} is not available for SD3; it writes {self.weight_formats}")
            if (fmt == "diffusers-lora") != has_lora:
                what = "a LoRA" if has_lora else "full weights"
                raise ValueError(f"format {fmt} does not hold what this run trained ({what})")
            if fmt not in out:
                out.append(fmt)
        return out

    def write_weights(self, fmt, folder, trainable, lora_cfg, transformer_config, *, dtype, merge_lora=False,
                      base_params=None):
        if fmt == "diffusers-lora":
            adapter = jax.device_get(trainable["lora"])
            layout = sd3_io.lora_layout(transformer_config)
            path = diffusers_lora.save(adapter, lora_cfg, layout, Path(folder) / LORA_FILE, dtype)
            scanned = layout.is_scanned(adapter)
            diffusers_lora.check_written(path, lambda p: diffusers_lora.load(p, layout, scanned), adapter, lora_cfg,
                                         dtype)
            return [path]
        target = Path(folder) / FULL_FOLDER
        files = sd3_io.export_diffusers(jax.device_get(trainable["params"]), transformer_config, target, dtype=dtype)
        return [*files, target / "config.json"] + sorted(target.glob("*.index.json"))

    def export_files(self, fmt, kind):
        return (FILES[fmt],)

    def read_export(self, folder, formats, kind, identifier, parts, lora_scale=1.0):
        if kind != "none":
            raise ValueError(f"{folder}: concept_embedding={kind!r}; SD3 exports have none")
        fmt = (list(formats or ()) or ["diffusers-lora"])[0]
        if fmt not in FILES:
            raise ValueError(f"{folder}: format {fmt!r} is not an SD3 export format")
        path = Path(folder) / FILES[fmt]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: purecc.json lists format {fmt}")
        if fmt == "diffusers-lora":
            return parts, self.lora_collection(path, parts, lora_scale), None
        cfg = parts.transformer_config
        cfg, params = sd3_io.load_transformer(path, mesh=parts.mesh, rules=parts.rules, **cfg.runtime())
        return dataclasses.replace(parts, transformer_config=cfg, transformer_params=params), None, None

    def read_lora(self, path, transformer_config, scanned=True):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        return diffusers_lora.load(path, sd3_io.lora_layout(transformer_config), scanned)

    def lora_collection(self, path, parts, scale=1.0):
        cfg = parts.transformer_config
        adapter, lcfg = self.read_lora(path, cfg, cfg.scan_layers)
        lora_lib.check_fits(adapter, parts.transformer_params, path)
        return lora_lib.variables(adapter, lora_lib.LoRAConfig(rank=lcfg.rank, alpha=lcfg.rank * scale, targets=()))

    def model_card(self, meta, info, lora_cfg, folder, grid):
        ident, cls = meta["identifier"], meta["class_word"]
        pretrained = info.pretrained or "stabilityai/stable-diffusion-3.5-medium"
        step = "" if meta.get("step") is None else f", step {meta['step']}"
        if "diffusers-lora" in meta["formats"]:
            load = [f'pipe = StableDiffusion3Pipeline.from_pretrained("{pretrained}", torch_dtype=torch.bfloat16)',
                    f'pipe.load_lora_weights("{Path(folder).absolute()}", weight_name="{LORA_FILE}")']
        else:
            load = [f'transformer = SD3Transformer2DModel.from_pretrained("{Path(folder).absolute()}/{FULL_FOLDER}", '
                    "torch_dtype=torch.bfloat16)",
                    f'pipe = StableDiffusion3Pipeline.from_pretrained("{pretrained}", transformer=transformer, '
                    "torch_dtype=torch.bfloat16)"]
        code = ["import torch", "from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline", "", *load,
                f'image = pipe("a photo of {ident} {cls}", num_inference_steps=28, guidance_scale=7.0).images[0]']
        lines = [f"# PureCC: `{ident} {cls}`", "",
                 f"{meta['method']} on Stable Diffusion 3 ({pretrained}), {meta['stage']}{step}. The identifier "
                 f"`{ident}` is a plain word (concept_embedding=none): write it in the prompt.", "",
                 "```python", *code, "```", "",
                 f"Or with this package: `python -m purecc_jax.sample --export={Path(folder).absolute()} "
                 f'--prompt="a photo of {ident} {cls}" --height=512 --width=512 --output=out.png`']
        if grid is not None:
            lines += ["", f"![last training samples]({Path(grid).name})"]
        return "\n".join(lines) + "\n"

    def read_config(self, pretrained, **runtime):
        return sd3_io.read_config(pretrained, **runtime)

    def load_merge_base(self, pretrained, scan_layers):
        raise ValueError("merging a LoRA into the SD3 weights is not supported: export diffusers-lora")

    # --- shapes

    presets = tuple(abstract.PRESETS)

    def abstract_parts(self, source, *, mesh, rules=None, **runtime):
        return abstract.parts(source, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None else rules, **runtime)

    def cache_shapes(self, parts, height, width, views, texts, max_sequence_length):
        return abstract.cache_shapes(parts, height, width, views, texts, max_sequence_length)

    def lower_sampler(self, parts, settings, images, trained=None):
        if trained is not None and trained.concept_embedding != "none":
            raise ValueError(f"concept embedding {trained.concept_embedding!r} is not supported by the SD3 backbone")
        return abstract.lower_sampler(parts, settings, images, trained)

    def device_params(self, parts):
        return {"transformer": parts.transformer_params, "text": parts.text.params, "vae": parts.codec.params}


SD3 = SD3Backbone()
