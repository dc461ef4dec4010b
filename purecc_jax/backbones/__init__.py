"""Diffusion backbones PureCC can drive, behind one interface (`base.Backbone`).

    flux   FLUX.1-dev / schnell          FluxPipeline folders             backbones/flux/
    sd3    SD3 / SD3.5 (Medium, Large)   StableDiffusion3Pipeline folders backbones/sd3/

`select(folder, name)` picks one: `config.model.backbone` when it names one, else the class in the
folder's model_index.json. Adding a backbone is a package here and one entry in BACKBONES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from purecc_jax import paths
from purecc_jax.backbones.base import Backbone, Trained
from purecc_jax.backbones.flux import FLUX
from purecc_jax.backbones.sd3 import SD3

BACKBONES: dict[str, Backbone] = {b.name: b for b in (FLUX, SD3)}
AUTO = "auto"
# What any backbone's pipeline folder holds that its loader reads (not the single-file checkpoints beside it).
PIPELINE_PARTS = tuple(dict.fromkeys(p for b in BACKBONES.values() for p in b.folder_parts))
WEIGHT_FORMATS = tuple(dict.fromkeys(f for b in BACKBONES.values() for f in b.weight_formats))


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


def for_parts(parts: Any) -> Backbone:
    """The backbone that loaded `parts` (by its transformer config's type)."""
    for backbone in BACKBONES.values():
        if isinstance(parts.transformer_config, backbone.config_class):
            return backbone
    raise TypeError(f"pipeline parts with a {type(parts.transformer_config).__name__} belong to no known backbone")


def local_pipeline(folder: str | Path) -> str:
    """A pipeline folder on this host: `folder` itself, or the checked per-host copy of a bucket folder
    (only what the loaders read)."""
    return str(paths.local_copy(folder, only=PIPELINE_PARTS)) if paths.is_remote(folder) else str(folder)


__all__ = ["AUTO", "BACKBONES", "PIPELINE_PARTS", "WEIGHT_FORMATS", "Backbone", "FLUX", "SD3", "Trained",
           "for_parts", "from_folder", "get", "local_pipeline", "select"]
