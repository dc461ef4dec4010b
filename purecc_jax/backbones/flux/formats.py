"""The PyTorch-side weight formats of an export, written and read tensor by tensor.

    diffusers-lora   pytorch_lora_weights.safetensors   FluxPipeline.load_lora_weights
    kohya            lora_kohya.safetensors             ComfyUI's LoRA loaders, sd-scripts, diffusers
    diffusers-full   transformer/ (config.json, shards, index)   FluxTransformer2DModel.from_pretrained
    bfl              flux1-purecc.safetensors           ComfyUI's diffusion-model loader, from_single_file

A LoRA writes the first two; full weights (a full fine-tune, or a LoRA merged into the
pretrained weights with `merge_lora`) the last two. Merging happens per tensor while
writing (`MergedKernel`), so the host never holds a second copy of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from purecc_jax.backbones.flux import kohya
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.folder import FluxParts
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig
from purecc_jax.weights import diffusers_lora
from purecc_jax.weights.safetensors_io import SafetensorsFile

FORMATS = ("diffusers-lora", "kohya", "diffusers-full", "bfl")
LORA_FORMATS = FORMATS[:2]
FILES = {"diffusers-lora": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors",
         "diffusers-full": "transformer", "bfl": "flux1-purecc.safetensors"}


def resolve(formats: Sequence[str], has_lora: bool, merge_lora: bool) -> list[str]:
    """The formats to write, checked against what the run trained; "default" picks the natural one."""
    out = []
    for fmt in formats:
        if fmt == "default":
            fmt = "diffusers-lora" if has_lora and not merge_lora else "diffusers-full"
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
        if fmt in LORA_FORMATS and not has_lora:
            raise ValueError(f"format {fmt} needs a LoRA, but this run fine-tuned the full weights: "
                             "export diffusers-full or bfl")
        if fmt in LORA_FORMATS and merge_lora:
            raise ValueError(f"--merge_lora writes full weights; format {fmt} is a LoRA: choose diffusers-full or bfl")
        if fmt not in LORA_FORMATS and has_lora and not merge_lora:
            raise ValueError(f"format {fmt} holds full weights, but this run trained a LoRA: pass --merge_lora "
                             "to merge it into the pretrained weights")
        if fmt not in out:
            out.append(fmt)
    if merge_lora and not has_lora:
        raise ValueError("--merge_lora: this run fine-tuned the full weights; there is no LoRA to merge")
    return out


@dataclasses.dataclass(frozen=True)
class MergedKernel:
    """A kernel leaf read with its LoRA update added, one layer at a time (float32)."""

    kernel: Any  # (in, out) or stacked (L, in, out)
    a: Any
    b: Any  # already scaled by alpha / rank

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def _merge(self, kernel, a, b) -> np.ndarray:
        f32 = lambda x: np.asarray(jax.device_get(x), np.float32)
        return f32(kernel) + f32(a) @ f32(b)

    def __getitem__(self, layer: int) -> np.ndarray:
        return self._merge(self.kernel[layer], self.a[layer], self.b[layer])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self._merge(self.kernel, self.a, self.b), dtype)


def merged_view(params: Any, adapter: Any, lora_cfg: lora_lib.LoRAConfig) -> Any:
    """`params` whose LoRA-targeted kernels read as kernel + A @ B * alpha / rank, lazily."""
    flat = dict(traverse_util.flatten_dict(params))
    flat_l = traverse_util.flatten_dict(adapter)
    for module in {k[:-1] for k in flat_l}:
        if module + ("kernel",) not in flat:
            raise KeyError(f"LoRA on {'/'.join(module)}: the pretrained transformer has no such kernel")
        flat[module + ("kernel",)] = MergedKernel(flat[module + ("kernel",)], flat_l[module + ("a",)],
                                                  flat_l[module + ("b",)] * lora_cfg.scale)
    return traverse_util.unflatten_dict(flat)


def write(fmt: str, folder: Path, trainable: dict[str, Any], lora_cfg: lora_lib.LoRAConfig | None,
          cfg: FluxConfig, *, dtype: Any, merge_lora: bool = False, base_params: Any = None) -> list[Path]:
    """Writes one format of `trainable` into `folder`, reloads it and checks it; returns its files."""
    target = folder / FILES[fmt]
    if fmt in LORA_FORMATS:
        adapter = trainable["lora"]
        scanned = flux_io.lora_layout(cfg).is_scanned(adapter)
        if fmt == "diffusers-lora":
            diffusers_lora.save(adapter, lora_cfg, flux_io.lora_layout(cfg), target, dtype)
            read = lambda p: diffusers_lora.load(p, flux_io.lora_layout(cfg), scanned)
        else:
            kohya.save(adapter, lora_cfg, cfg, target, dtype)
            read = lambda p: kohya.load(p, cfg, scanned)
        diffusers_lora.check_written(target, read, adapter, lora_cfg, dtype)
        return [target]
    if "lora" in trainable:
        if base_params is None:
            raise ValueError("merging a LoRA needs the pretrained transformer's parameters")
        params = merged_view(base_params, trainable["lora"], lora_cfg)
    else:
        params = trainable["params"]
    if fmt == "diffusers-full":
        files = flux_io.export_diffusers(params, cfg, target, dtype=dtype)
        files.append(target / "config.json")
        files += sorted(target.glob("*.index.json"))
        reread = flux_io.read_config(target)
        if dataclasses.replace(reread, **cfg.runtime()) != cfg:
            raise ValueError(f"{target / 'config.json'} does not read back as the exported config")
        return files
    return [flux_io.export_bfl(params, cfg, target, dtype=dtype)]


def present(folder: Path) -> list[str]:
    """The weight formats found in an export folder, in `FORMATS` order."""
    return [f for f in FORMATS if (folder / FILES[f]).exists()]


def read_lora(path: str | Path, cfg: FluxConfig, scanned: bool = True) -> tuple[Any, lora_lib.LoRAConfig]:
    """A FLUX LoRA file in diffusers/PEFT or kohya layout -> (adapter tree, LoRAConfig with scale 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if kohya.is_kohya(SafetensorsFile(path).keys()):
        return kohya.load(path, cfg, scanned)
    return diffusers_lora.load(path, flux_io.lora_layout(cfg), scanned)


def lora_variables(path: str | Path, parts: FluxParts, scale: float = 1.0) -> Any:
    """The `lora` collection of a LoRA file for `parts`' transformer, times `scale`; shapes checked."""
    cfg = parts.transformer_config
    tree, lcfg = read_lora(path, cfg, scanned=cfg.scan_layers)
    lora_lib.check_fits(tree, parts.transformer_params, path)
    flat = traverse_util.flatten_dict(lora_lib.variables(tree, lcfg))
    return traverse_util.unflatten_dict({k: jnp.asarray(v * scale if k[-1] == "b" else v) for k, v in flat.items()})


def read(folder: Path, parts: FluxParts, lora_scale: float = 1.0, listed: Sequence[str] | None = None
         ) -> tuple[FluxParts, Any]:
    """(parts, `lora` collection or None) of an export folder's weights: the first format of `listed`
    (purecc.json's), or of those present (exports written before purecc.json listed them)."""
    found = list(listed) if listed is not None else present(folder)
    if not found:
        return parts, None
    fmt = found[0]
    if not (folder / FILES[fmt]).exists():
        raise FileNotFoundError(f"{folder / FILES[fmt]} not found: purecc.json lists format {fmt}")
    if fmt in LORA_FORMATS:
        return parts, lora_variables(folder / FILES[fmt], parts, lora_scale)
    cfg = parts.transformer_config
    runtime = cfg.runtime()
    if fmt == "bfl":
        runtime["axes_dim"] = cfg.axes_dim  # a BFL file does not record the RoPE split
    cfg, params = flux_io.load_transformer(folder / FILES[fmt], mesh=parts.mesh, rules=parts.rules, **runtime)
    return dataclasses.replace(parts, transformer_config=cfg, transformer_params=params), None
