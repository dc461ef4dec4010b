"""Diffusion backbones PureCC can drive, behind one interface (`base.Backbone`).

    flux   FLUX.1-dev / schnell          FluxPipeline folders             backbones/flux.py
    sd3    SD3 / SD3.5 (Medium, Large)   StableDiffusion3Pipeline folders backbones/sd3.py

`select(folder, name)` picks one: `config.model.backbone` when it names one, else the class in the
folder's model_index.json. Adding a backbone is a module here and one entry in BACKBONES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn

from purecc_jax.backbones.base import Backbone
from purecc_jax.backbones.flux import FLUX
from purecc_jax.backbones.sd3 import SD3

BACKBONES: dict[str, Backbone] = {b.name: b for b in (SD3, FLUX)}  # detection order: FLUX is the fallback
AUTO = "auto"


def get(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone={name!r} is not one of {[AUTO, *BACKBONES]}")
    return BACKBONES[name]


def from_folder(path: str | Path) -> Backbone:
    """The backbone whose pipeline folder `path` is (by model_index.json)."""
    for backbone in BACKBONES.values():
        if backbone.is_folder(path):
            return backbone
    raise FileNotFoundError(f"{path} is not a diffusers pipeline folder of a known backbone (no model_index.json "
                            f"naming one of {[c for b in BACKBONES.values() for c in b.pipeline_classes]})")


def select(path: str | Path, name: str = AUTO) -> Backbone:
    """`name`'s backbone (checked against the folder), or the folder's when `name` is "auto"."""
    if name == AUTO:
        return from_folder(path)
    backbone = get(name)
    if (Path(path) / "model_index.json").is_file() and not backbone.is_folder(path):
        raise ValueError(f"config.model.backbone={name!r}, but {path}/model_index.json names another pipeline; "
                         "set it to 'auto' or point config.pretrained at a matching folder")
    return backbone


def for_model(model: nn.Module) -> Backbone:
    """The backbone whose transformer `model` is."""
    for backbone in BACKBONES.values():
        if isinstance(model, backbone.module_class):
            return backbone
    raise TypeError(f"{type(model).__name__} is not the transformer of a known backbone ({list(BACKBONES)})")


def for_parts(parts: Any) -> Backbone:
    """The backbone that loaded `parts` (by its transformer config's type)."""
    for backbone in BACKBONES.values():
        if isinstance(parts.transformer_config, backbone.config_class):
            return backbone
    raise TypeError(f"pipeline parts with a {type(parts.transformer_config).__name__} belong to no known backbone")


__all__ = ["AUTO", "BACKBONES", "Backbone", "FLUX", "SD3", "for_model", "for_parts", "from_folder", "get", "select"]
