"""The model card (`README.md`) of an export folder: what was trained and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from purecc_jax.models.lora import LoRAConfig

_COMFYUI = {
    "kohya": "copy `lora_kohya.safetensors` to `ComfyUI/models/loras/` and add a *LoraLoaderModelOnly* node "
             "after the FLUX.1 model loader (strength 1.0).",
    "diffusers-lora": "ComfyUI also reads `pytorch_lora_weights.safetensors` from `ComfyUI/models/loras/` "
                      "(*LoraLoaderModelOnly*); the kohya format is its native one.",
    "bfl": "copy `flux1-purecc.safetensors` to `ComfyUI/models/diffusion_models/` and load it with the "
           "*Load Diffusion Model* node in place of flux1-dev.safetensors.",
}


def _diffusers_code(meta: dict[str, Any], pretrained: str, folder: Path) -> list[str]:
    ident, kind, formats = meta["identifier"], meta["concept_embedding"], meta["formats"]
    code = ["import torch", "from diffusers import FluxPipeline, FluxTransformer2DModel", "",
            f'export = "{folder.absolute()}"  # this folder']
    if "diffusers-full" in formats:
        code += ['transformer = FluxTransformer2DModel.from_pretrained(f"{export}/transformer", '
                 'torch_dtype=torch.bfloat16)',
                 f'pipe = FluxPipeline.from_pretrained("{pretrained}", transformer=transformer, '
                 'torch_dtype=torch.bfloat16)']
    elif "bfl" in formats:
        code += ['transformer = FluxTransformer2DModel.from_single_file(f"{export}/flux1-purecc.safetensors", '
                 f'config="{pretrained}", subfolder="transformer", torch_dtype=torch.bfloat16)',
                 f'pipe = FluxPipeline.from_pretrained("{pretrained}", transformer=transformer, '
                 'torch_dtype=torch.bfloat16)']
    else:
        code.append(f'pipe = FluxPipeline.from_pretrained("{pretrained}", torch_dtype=torch.bfloat16)')
        name = "pytorch_lora_weights.safetensors" if "diffusers-lora" in formats else "lora_kohya.safetensors"
        code.append(f'pipe.load_lora_weights(export, weight_name="{name}")')
    if kind == "token":
        code += [f'pipe.load_textual_inversion(f"{{export}}/concept_clip_l.safetensors", token="{ident}",',
                 "                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                 f'pipe.load_textual_inversion(f"{{export}}/concept_t5.safetensors", token="{ident}",',
                 "                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
                 "# FLUX's CLIP config pools at the largest token id (legacy eos_token_id=2), now the concept",
                 "# token's; training pooled at the end-of-text token, as this line restores",
                 "# (transformers 5; on 4.x set pipe.text_encoder.text_model.eos_token_id).",
                 "pipe.text_encoder.eos_token_id = pipe.tokenizer.eos_token_id"]
    code.append(f'image = pipe("a photo of {ident} {meta["class_word"]}", guidance_scale=3.5).images[0]')
    return code


def _recipe(config: dict[str, Any] | None, lora: LoRAConfig | None) -> list[str]:
    """The training recipe in a few lines (`config`: the run's config.json; `lora`: the exported LoRA's)."""
    if not config:
        return []
    lines = [f"- method: {config.get('method')}, concept embedding: {config.get('concept_embedding')}"]
    for name in ("stage_a", "stage_b"):
        st = config.get(name)
        if not st or (name == "stage_b" and config.get("method") == "dreambooth"):
            continue
        what = "full fine-tune" if st.get("full_finetune") else \
            f"LoRA rank {st['lora']['rank']}, alpha {st['lora']['alpha']}, targets {st['lora']['targets']}"
        lines.append(f"- {name}: {st.get('steps')} steps, batch {st.get('batch_size')}, "
                     f"lr {st.get('learning_rate')}, {what}")
    if config.get("method") == "purecc" and config.get("objective"):
        o = config["objective"]
        lines.append(f"- objective: eta {o.get('eta')}, lambda {o.get('lambda_mode')}")
    if config.get("extractor_lora"):
        lines.append(f"- stage A skipped: the extractor was the LoRA file {config['extractor_lora']}")
    if lora is not None:
        lines.append(f"- exported LoRA: rank {lora.rank} (alpha / rank folded into the weights: load at scale 1)")
    return lines


def render(meta: dict[str, Any], info: Any, lora: LoRAConfig | None, folder: Path, grid: Path | None) -> str:
    """The README.md of an export folder (`meta`: its purecc.json; `info`: trained.ConceptInfo)."""
    pretrained = info.pretrained or "black-forest-labs/FLUX.1-dev"
    ident, cls, kind = meta["identifier"], meta["class_word"], meta["concept_embedding"]
    step = "" if meta.get("step") is None else f", step {meta['step']}"
    lines = [f"# PureCC: `{ident} {cls}`", "",
             f"A {cls} taught to FLUX.1 with PureCC ({meta['method']}, {meta['stage']}{step}).", "",
             f"- base model: `{pretrained}`",
             f"- identifier: `{ident}`, class word: `{cls}` — prompt e.g. `a photo of {ident} {cls} on the beach`",
             f"- formats: {', '.join(meta['formats'])}"
             + (" (LoRA merged into the base weights)" if meta.get("merged_lora") else "")
             + f", {meta['dtype']}", *_recipe(info.config, None if meta.get("merged_lora") else lora), ""]
    if grid is not None:
        lines += [f"![last samples of the run]({grid.name})", ""]
    lines += ["## diffusers", ""]
    if kind == "layerwise":
        lines += ["The layer-wise concept vectors (concept_layerwise.safetensors) have no diffusers loader:",
                  "sample with this package. In diffusers, only the weights load:", ""]
    lines += ["```python", *_diffusers_code(meta, pretrained, folder), "```", ""]
    if "bfl" in meta["formats"] and "diffusers-full" in meta["formats"]:
        lines += ["The single file loads the same transformer:", "", "```python",
                  'transformer = FluxTransformer2DModel.from_single_file(f"{export}/flux1-purecc.safetensors", '
                  f'config="{pretrained}", subfolder="transformer", torch_dtype=torch.bfloat16)', "```", ""]
    lines += ["## ComfyUI", ""]
    lines += [f"- {_COMFYUI[f]}" for f in meta["formats"] if f in _COMFYUI]
    if "diffusers-full" in meta["formats"]:
        lines.append("- ComfyUI does not read diffusers folders: export `--format=bfl` for it.")
    if kind != "none":
        lines.append(f"- the learned concept embedding ({kind}) has no ComfyUI loader here: prompts there use "
                     f"`{ident}` as a plain word, which matches training only with `concept_embedding=none`.")
    lines += ["", "## This package", "", "```",
              f'python -m purecc_jax.sample --export={folder.absolute()} --pretrained={pretrained} '
              f'--prompt="a photo of {ident} {cls}" --output=out.png', "```", "",
              "Files and their sha256 are listed in `export_manifest.json`; "
              "`python -m purecc_jax.export --verify=THIS_FOLDER` checks them.", "",
              "<details><summary>purecc.json</summary>", "", "```json", json.dumps(meta, indent=2), "```",
              "</details>", ""]
    return "\n".join(lines)
