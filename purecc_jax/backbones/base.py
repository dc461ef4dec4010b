"""The one interface between PureCC (method, trainer, sampler loop, export) and a diffusion backbone.

A backbone is a stateless object; what it loads (`parts`: configs, parameters, text encoders,
codec, scheduler) is handed back to it. The trainer and the step only ever call:

    folder     is_folder(path), check_folder(path, config), load(path, mesh=, rules=, **runtime) -> parts
    config     check_config(config), train_guidance(parts, config), lora_targets(targets)
    model      model(parts.transformer_config) -> the Flax module, module_class
               velocity(model, variables, x_t, t, text, cache, guidance, injection) -> v (float32)
    data       build_cache(concept, images, view_image, parts, codec, max_len, extra) -> data.cache.ConceptCache
               (training latents through the codec, the texts' encodings), check_identifier(...)
    sampling   sample(parts, prompts, settings, seed=, lora=, ...) -> images (B, H, W, 3) in [0, 1]
    export     resolve_formats, write_weights (diffusers formats), read_lora, model_card,
               read_config / load_merge_base (the `purecc_jax.export` CLI)

FLUX.1 (`backbones.flux`) and SD3 / SD3.5 (`backbones.sd3`) implement it; `backbones.select`
picks one from the pretrained folder's model_index.json or `config.model.backbone`. A new
backbone is a new module here plus one line in `backbones.BACKBONES`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np


class Backbone(abc.ABC):
    """What PureCC needs of a text-to-image flow-matching transformer and its pipeline folder."""

    name: str  # config.model.backbone value
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this backbone reads
    module_class: type[nn.Module]  # the transformer module
    config_class: type  # its config dataclass
    concept_embeddings: tuple[str, ...]  # config.concept_embedding values it supports
    weight_formats: tuple[str, ...]  # export formats it writes

    # --- the pipeline folder

    def is_folder(self, path: str | Path) -> bool:
        """Whether `path` is a diffusers folder of this backbone (its model_index.json's class)."""
        import json

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
    def train_guidance(self, parts: Any, config: Any) -> float | None:
        """The embedded guidance value of training forward passes, or None (no guidance embedding)."""

    @abc.abstractmethod
    def lora_targets(self, targets: str | Sequence[str]) -> tuple[str, ...]:
        """LoRA target regexes over Dense module paths: a preset name of this backbone, or the regexes."""

    # --- the model

    def model(self, transformer_config: Any) -> nn.Module:
        return self.module_class(transformer_config)

    @abc.abstractmethod
    def velocity(self, model: nn.Module, variables: dict[str, Any], xt: jax.Array, t: jax.Array,
                 text: tuple[jax.Array, jax.Array], cache: dict[str, Any], guidance: float | None,
                 injection: Any) -> jax.Array:
        """v_θ(x_t | text): `variables` {"params"(, "lora")}, x_t the cached latents' layout, t (B,) in [0, 1],
        `text` (context tokens, pooled) rows of the cache, `cache` its on-device arrays."""

    # --- data

    @abc.abstractmethod
    def check_identifier(self, parts: Any, identifier: str, kind: str) -> None:
        """Refuses an identifier the tokenizers cannot use under concept embedding `kind`."""

    @abc.abstractmethod
    def build_cache(self, concept: Any, images: np.ndarray, view_image: np.ndarray, parts: Any, codec: Any,
                    max_sequence_length: int, extra: dict[str, Any] | None) -> Any:
        """The concept cache (`data.cache`): training latents of every view (through `codec`), encodings of
        every text; `extra`: learned token rows to encode with."""

    # --- sampling

    @abc.abstractmethod
    def sample(self, parts: Any, prompts: Sequence[str], settings: Any, *, seed: int, lora: Any = None,
               concept_embedding: str = "none", identifier: str = "", embeddings: Any = None,
               codec: Any = None) -> Any:
        """Images (B, H, W, 3) in [0, 1] of `prompts` (`settings`: pipeline.generate.SampleSettings)."""

    # --- export

    @abc.abstractmethod
    def resolve_formats(self, formats: Sequence[str], has_lora: bool, merge_lora: bool) -> list[str]:
        """The weight formats to write ("default": the natural one), refused with a reason when impossible."""

    @abc.abstractmethod
    def write_weights(self, fmt: str, folder: Path, trainable: dict[str, Any], lora_cfg: Any,
                      transformer_config: Any, *, dtype: Any, merge_lora: bool = False,
                      base_params: Any = None) -> list[Path]:
        """Writes one format into `folder`, reads it back and checks it; returns its files."""

    @abc.abstractmethod
    def read_lora(self, path: str | Path, transformer_config: Any, scanned: bool = True) -> tuple[Any, Any]:
        """A LoRA file of this backbone -> (adapter tree, LoRAConfig with scale 1)."""

    @abc.abstractmethod
    def model_card(self, meta: dict[str, Any], info: Any, lora_cfg: Any, folder: Path, grid: Path | None) -> str:
        """The export folder's README.md."""

    @abc.abstractmethod
    def read_config(self, pretrained: str | Path, **runtime: Any) -> Any:
        """The pretrained transformer's config (architecture from the folder, `runtime` fields set)."""

    @abc.abstractmethod
    def load_merge_base(self, pretrained: str | Path, scan_layers: bool) -> tuple[Any, Any]:
        """(config, params) of the pretrained transformer in its checkpoint dtype, to merge a LoRA into."""
