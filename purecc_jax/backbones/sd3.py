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
import numpy as np
from flax import traverse_util

from purecc_jax.backbones.base import Backbone
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import sd3 as sd3_model

LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FOLDER = "transformer"
_STACKS = ("dual_blocks", "joint_blocks")
MAX_PLAIN_PIECES = 3  # as pipeline.tokenizers: a longer plain identifier is a phrase of common sub-words


def is_scanned(adapter: Any) -> bool:
    """Whether an SD3 adapter (or parameter) tree holds stacked blocks."""
    return any(p[0] in _STACKS for p in traverse_util.flatten_dict(adapter))


class SD3Backbone(Backbone):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    module_class = sd3_model.SD3Transformer
    config_class = sd3_model.SD3Config
    concept_embeddings = ("none",)
    weight_formats = ("diffusers-lora", "diffusers-full")

    def check_folder(self, path, config):
        from purecc_jax.pipeline import sd3 as sd3_pipeline

        sd3_pipeline.check_folder(path)

    def load(self, path, *, mesh=None, rules=None, **runtime):
        from purecc_jax import sharding
        from purecc_jax.pipeline import sd3 as sd3_pipeline

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
        quant = config.model.get("base_quantization", "none")
        if quant != "none":
            raise ValueError(f"config.model.base_quantization={quant!r} is not supported for SD3 yet: use none")

    def train_guidance(self, parts, config):
        return None

    def lora_targets(self, targets):
        if isinstance(targets, str):
            if targets not in sd3_model.LORA_TARGET_PRESETS:
                raise KeyError(f"unknown SD3 LoRA target preset {targets!r}; known: "
                               f"{sorted(sd3_model.LORA_TARGET_PRESETS)}")
            return sd3_model.LORA_TARGET_PRESETS[targets]
        return tuple(targets)

    def velocity(self, model, variables, xt, t, text, cache, guidance, injection):
        if guidance is not None:
            raise ValueError(f"SD3 has no guidance embedding; the step was given guidance={guidance}")
        if injection is not None:
            raise ValueError("SD3 has no layer-wise concept injection")
        context, pooled = text
        return model.apply(variables, xt, context, pooled, t)

    def check_identifier(self, parts, identifier, kind):
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

    def build_cache(self, concept, images, view_image, parts, codec, max_sequence_length, extra, chunk=16):
        """latents (M, h, w, 16) NHWC, t5 (K, 77 + L, D) the joint context, pooled (K, P)."""
        from purecc_jax.data import cache as cache_lib

        if extra is not None:
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

    def sample(self, parts, prompts, settings, *, seed, lora=None, concept_embedding="none", identifier="",
               embeddings=None, codec=None):
        from purecc_jax.pipeline import sd3 as sd3_pipeline

        if concept_embedding != "none" and embeddings is not None:
            raise ValueError(f"concept embedding {concept_embedding!r} is not supported by the SD3 backbone")
        if codec is not None:
            parts = dataclasses.replace(parts, codec=codec)
        negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(prompts)
        return sd3_pipeline.sample_sd3(parts, prompts, height=settings.height, width=settings.width,
                                       steps=settings.steps, guidance=settings.guidance, negative_prompts=negative,
                                       seed=seed, max_sequence_length=settings.max_sequence_length, lora=lora)

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
        from purecc_jax.weights import sd3_io, sd3_lora

        if fmt == "diffusers-lora":
            path = sd3_lora.save(jax.device_get(trainable["lora"]), lora_cfg, transformer_config,
                                 Path(folder) / LORA_FILE, dtype)
            _check_lora(path, trainable["lora"], lora_cfg, transformer_config, dtype)
            return [path]
        target = Path(folder) / FULL_FOLDER
        files = sd3_io.export_diffusers(jax.device_get(trainable["params"]), transformer_config, target, dtype=dtype)
        return [*files, target / "config.json"] + sorted(target.glob("*.index.json"))

    def read_lora(self, path, transformer_config, scanned=True):
        from purecc_jax.weights import sd3_lora

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        return sd3_lora.load(path, transformer_config, scanned)

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
        from purecc_jax.weights import sd3_io

        return sd3_io.read_config(pretrained, **runtime)

    def load_merge_base(self, pretrained, scan_layers):
        raise ValueError("merging a LoRA into the SD3 weights is not supported: export diffusers-lora")

    # --- sampling an export

    def load_export(self, folder: str | Path, parts: Any, lora_scale: float = 1.0) -> tuple[Any, Any]:
        """(parts, `lora` collection or None) of an SD3 export folder (purecc.json's first format); a folder
        in a bucket is read from its checked copy on this host (`paths.local_copy`)."""
        from purecc_jax import paths
        from purecc_jax import trained as trained_lib
        from purecc_jax.weights import sd3_io, sd3_lora

        folder = paths.local_copy(folder)
        meta = trained_lib.read_meta(folder)
        if meta["concept_embedding"] != "none":
            raise ValueError(f"{folder / trained_lib.META}: concept_embedding={meta['concept_embedding']!r}; "
                             "SD3 exports have none")
        fmt = (meta.get("formats") or ["diffusers-lora"])[0]
        if fmt == "diffusers-lora":
            path = folder / LORA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: purecc.json lists format {fmt}")
            return parts, sd3_lora.collection(path, parts.transformer_config, lora_scale)
        if fmt != "diffusers-full":
            raise ValueError(f"{folder / trained_lib.META}: format {fmt!r} is not an SD3 export format")
        cfg = parts.transformer_config
        runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention")}
        cfg, params = sd3_io.load_transformer(folder / FULL_FOLDER, mesh=parts.mesh, rules=parts.rules, **runtime)
        return dataclasses.replace(parts, transformer_config=cfg, transformer_params=params), None


def _check_lora(path: Path, adapter: Any, lora_cfg: lora_lib.LoRAConfig, cfg: sd3_model.SD3Config,
                dtype: Any) -> None:
    """Reads a just-written LoRA file back: every module's update A @ B equals the adapter's (in `dtype`)."""
    from purecc_jax.weights import sd3_lora

    adapter = jax.device_get(adapter)
    tree, read_cfg = sd3_lora.load(path, cfg, scanned=is_scanned(adapter))
    want = traverse_util.flatten_dict(lora_lib.variables(adapter, lora_cfg))
    got = traverse_util.flatten_dict(lora_lib.variables(tree, read_cfg))
    tol = 1e-6 if np.dtype(dtype) == np.float32 else 2e-2
    for m in {k[:-1] for k in want}:
        if m + ("a",) not in got:
            raise ValueError(f"{path}: the LoRA of {'/'.join(m)} is missing when read back")
        w, g = (np.matmul(np.asarray(f[m + ("a",)], np.float32), np.asarray(f[m + ("b",)], np.float32))
                for f in (want, got))
        if np.abs(w - g).max() > tol * max(np.abs(w).max(), 1e-12):
            raise ValueError(f"{path}: the LoRA of {'/'.join(m)} reads back different from what was written")


SD3 = SD3Backbone()
