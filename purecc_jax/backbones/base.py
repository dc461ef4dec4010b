"""The one interface between PureCC (trainer, sampler, export) and a diffusion backbone.

A backbone is a stateless object; what it loads (`parts`: configs, parameters, text encoders,
codec, scheduler) is handed back to it. The layers above call only:

    folder     folder_parts, is_folder(path), check_folder(path, config), load(path, mesh=, rules=, **runtime)
    config     check_config(config), lora_targets(targets), train_guidance(parts, config)
    training   denoiser(parts, config) -> `purecc.step.Denoiser`; prepare_identifier, build_cache, loss_weights,
               initial_embeddings, bake_embeddings, text_params (learned concept embeddings)
    sampling   generate(parts, prompts, settings, seeds=, trained=, lora=, ...) -> images in [0, 1]
    export     resolve_formats, write_weights, write_embeddings, export_files, read_export,
               read_lora / lora_collection, model_card, read_config, load_merge_base
    shapes     abstract_parts(folder or preset, mesh=, rules=, **runtime), cache_shapes, embedding_shapes,
               lower_sampler, device_params: a run's programs compiled without weights
               (`purecc_jax.preflight`)

FLUX.1 (`backbones.flux`) and SD3 / SD3.5 (`backbones.sd3`) implement it; `backbones.select`
picks one from the pretrained folder's model_index.json or `config.model.backbone`. A new
backbone is a new package here plus one entry in `backbones.BACKBONES`.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Trained:
    """What a trained concept adds to a loaded pipeline, for sampling."""

    identifier: str
    class_word: str
    concept_embedding: str  # none | token | layerwise
    lora: Any = None  # a `lora` collection (models.lora.variables), or None (full fine-tune, or nothing)
    embeddings: dict[str, Any] | None = None  # learned concept embeddings in the backbone's structure


class Backbone(abc.ABC):
    """What PureCC needs of a text-to-image flow-matching transformer and its pipeline folder."""

    name: str  # config.model.backbone value
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this backbone reads
    folder_parts: tuple[str, ...]  # the files and folders of a pipeline folder that its loader reads
    concept_embeddings: tuple[str, ...]  # config.concept_embedding values it supports
    weight_formats: tuple[str, ...]  # export formats it writes
    default_guidance: float  # the pipeline's guidance_scale default when sampling
    default_max_sequence_length: int  # T5 tokens when sampling, unless given

    # --- the pipeline folder

    def is_folder(self, path: str | Path) -> bool:
        """Whether `path` is a diffusers folder of this backbone (its model_index.json's class)."""
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return False
        try:
            return json.loads(index.read_text()).get("_class_name") in self.pipeline_classes
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e})") from None

    @abc.abstractmethod
    def check_folder(self, path: str | Path, config: Any) -> None:
        """Raises, naming what is missing or wrong, before anything heavy is read."""

    @abc.abstractmethod
    def load(self, path: str | Path, *, mesh: Any = None, rules: Any = None, **runtime: Any) -> Any:
        """The pipeline folder's parts (transformer, text encoders, codec, scheduler), placed on `mesh`."""

    # --- configuration

    def check_config(self, config: Any) -> None:
        """Refuses, naming the key, config values this backbone cannot run."""
        if config.concept_embedding not in self.concept_embeddings:
            raise ValueError(f"config.concept_embedding={config.concept_embedding!r} is not supported by the "
                             f"{self.name} backbone (supported: {', '.join(self.concept_embeddings)})")

    @abc.abstractmethod
    def lora_targets(self, targets: str | Sequence[str]) -> tuple[str, ...]:
        """LoRA target regexes over Dense module paths: a preset name of this backbone, or the regexes."""

    @abc.abstractmethod
    def train_guidance(self, parts: Any, config: Any) -> float | None:
        """The embedded guidance value of training forward passes, or None (no guidance embedding)."""

    # --- training

    @abc.abstractmethod
    def denoiser(self, parts: Any, config: Any) -> Any:
        """The `purecc.step.Denoiser` of `parts`' transformer under `config` (guidance, concept embedding)."""

    @abc.abstractmethod
    def prepare_identifier(self, parts: Any, identifier: str, kind: str) -> None:
        """Refuses an identifier the tokenizers cannot use under concept embedding `kind`; with learned
        token rows, makes it a concept token of `parts`' tokenizers (in place)."""

    @abc.abstractmethod
    def build_cache(self, concept: Any, images: np.ndarray, view_image: np.ndarray, parts: Any, codec: Any,
                    max_sequence_length: int, embeddings: Any = None) -> Any:
        """The concept cache (`data.cache.ConceptCache`): training latents of every view (through `codec`),
        the encodings of every text; `embeddings`: learned token rows to encode with."""

    def loss_weights(self, weights: np.ndarray, latent_channels: int) -> np.ndarray:
        """Per-pixel loss weights at latent resolution (M, h, w) as per-element weights in the layout of
        `build_cache`'s latents (a masked L_CC)."""
        raise ValueError(f"the {self.name} backbone has no masked loss")

    def initial_embeddings(self, parts: Any, kind: str, concept: Any, cache: Any, seed: int,
                           guidance: float | None) -> Any:
        """The learned concept embeddings' starting values for `kind`, or None (kind "none")."""
        if kind != "none":
            raise ValueError(f"concept embedding {kind!r} is not supported by the {self.name} backbone")
        return None

    def bake_embeddings(self, cache: Any, parts: Any, embeddings: Any, kind: str) -> Any:
        """`cache` with frozen learned embeddings applied to its encodings (token rows); unchanged otherwise."""
        return cache

    def text_params(self, parts: Any) -> Any:
        """The text encoders' parameters the step re-encodes with while token rows train."""
        raise ValueError(f"the {self.name} backbone has no learned token rows")

    # --- sampling

    @abc.abstractmethod
    def generate(self, parts: Any, prompts: Sequence[str], settings: Any, *, seeds: Sequence[int],
                 init_latents: Any = None, trained: Trained | None = None, lora: Any = None, codec: Any = None,
                 progress: bool = False) -> Any:
        """Images (len(prompts) * len(seeds), H, W, 3) in [0, 1], prompt-major (`settings`:
        pipeline.settings.SampleSettings); `trained` adds a trained concept, `lora` a `lora` collection."""

    # --- export

    @abc.abstractmethod
    def resolve_formats(self, formats: Sequence[str], has_lora: bool, merge_lora: bool) -> list[str]:
        """The weight formats to write ("default": the natural one), refused with a reason when impossible."""

    @abc.abstractmethod
    def write_weights(self, fmt: str, folder: Path, trainable: dict[str, Any], lora_cfg: Any,
                      transformer_config: Any, *, dtype: Any, merge_lora: bool = False,
                      base_params: Any = None) -> list[Path]:
        """Writes one format into `folder`, reads it back and checks it; returns its files."""

    def write_embeddings(self, folder: Path, kind: str, identifier: str, embeddings: Any) -> list[Path]:
        """Writes learned concept embeddings into an export folder; returns the files written."""
        if embeddings is not None and kind != "none":
            raise ValueError(f"the {self.name} backbone has no concept embeddings of kind {kind!r} to export")
        return []

    @abc.abstractmethod
    def export_files(self, fmt: str, kind: str) -> tuple[str, ...]:
        """The top-level files and folders of an export that reading format `fmt` (and embeddings `kind`) needs."""

    @abc.abstractmethod
    def read_export(self, folder: Path, formats: Sequence[str], kind: str, identifier: str, parts: Any,
                    lora_scale: float = 1.0) -> tuple[Any, Any, Any]:
        """(parts, `lora` collection or None, embeddings or None) of an export folder's first format of
        `formats`; full weights replace `parts`' transformer."""

    @abc.abstractmethod
    def read_lora(self, path: str | Path, transformer_config: Any, scanned: bool = True) -> tuple[Any, Any]:
        """A LoRA file of this backbone -> (adapter tree, LoRAConfig with scale 1)."""

    @abc.abstractmethod
    def lora_collection(self, path: str | Path, parts: Any, scale: float = 1.0) -> Any:
        """The `lora` collection of a LoRA file for `parts`' transformer at strength `scale`, checked to fit."""

    @abc.abstractmethod
    def model_card(self, meta: dict[str, Any], info: Any, lora_cfg: Any, folder: Path, grid: Path | None) -> str:
        """The export folder's README.md."""

    @abc.abstractmethod
    def read_config(self, pretrained: str | Path, **runtime: Any) -> Any:
        """The pretrained transformer's config (architecture from the folder, `runtime` fields set)."""

    @abc.abstractmethod
    def load_merge_base(self, pretrained: str | Path, scan_layers: bool) -> tuple[Any, Any]:
        """(config, params) of the pretrained transformer in its checkpoint dtype, to merge a LoRA into."""

    # --- shapes: a run's programs compiled without weights (`purecc_jax.preflight`)

    presets: tuple[str, ...] = ()  # model names `abstract_parts` takes instead of a pipeline folder

    @abc.abstractmethod
    def abstract_parts(self, source: str | Path, *, mesh: Any, rules: Any = None, **runtime: Any) -> Any:
        """`load`'s parts with every parameter a ShapeDtypeStruct in the sharding `load` streams it into, no
        weights read: the architecture from a pipeline folder's config.json files (local or in a bucket) or a
        name of `presets`. The parts have no tokenizers."""

    @abc.abstractmethod
    def cache_shapes(self, parts: Any, height: int, width: int, views: int, texts: int,
                     max_sequence_length: int) -> dict[str, Any]:
        """ShapeDtypeStructs of the arrays `build_cache` makes for `views` training views of height x width
        and `texts` distinct texts."""

    def embedding_shapes(self, parts: Any, kind: str) -> Any:
        """ShapeDtypeStructs of what `initial_embeddings` returns for `kind` (None for "none")."""
        if kind != "none":
            raise ValueError(f"concept embedding {kind!r} is not supported by the {self.name} backbone")
        return None

    @abc.abstractmethod
    def lower_sampler(self, parts: Any, settings: Any, images: int, trained: Trained | None = None) -> Any:
        """The denoising program `generate` compiles for `images` images of `settings` with `trained`
        (its LoRA and embeddings ShapeDtypeStructs), lowered on `parts.mesh` from abstract inputs."""

    @abc.abstractmethod
    def device_params(self, parts: Any) -> dict[str, Any]:
        """Every parameter tree `parts` keeps on the devices, by model (transformer, text encoders, VAE)."""
