"""A diffusers FLUX pipeline folder (the FLUX.1-dev / FLUX.1-schnell download) into JAX parts.

Layout read:
    model_index.json
    scheduler/scheduler_config.json
    transformer/   config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors (+ index)
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors                      (CLIP-L)
    text_encoder_2/config.json + model[-0000i-of-0000n].safetensors (+ index)  (T5-XXL)
    tokenizer/     vocab.json + merges.txt, or tokenizer.json          (CLIPTokenizer)
    tokenizer_2/   tokenizer.json or spiece.model                      (T5TokenizerFast)
Every missing file is reported in one error before anything heavy is read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.text import TextEncoders
from purecc_jax.models import runtime as runtime_lib
from purecc_jax.models.clip_text import CLIPTextConfig
from purecc_jax.models.flux import FluxConfig
from purecc_jax.models.t5 import T5Config
from purecc_jax.models.vae import VAEConfig
from purecc_jax.pipeline.codec import PIXEL_CODEC, PixelCodec, VAECodec
from purecc_jax.pipeline.tokenizers import Tokenizers, load_tokenizers
from purecc_jax.weights.clip_rules import load_clip
from purecc_jax.weights.t5_rules import load_t5
from purecc_jax.weights.vae_rules import load_vae

DOWNLOAD_HINT = (
    "Download the whole diffusers repository, e.g. `huggingface-cli download black-forest-labs/FLUX.1-dev "
    "--local-dir DIR` (or FLUX.1-schnell); the single files flux1-dev.safetensors and ae.safetensors are not needed.")
# Runtime choices that also apply to the text encoders and the VAE (the rest are the transformer's).
_SHARED_RUNTIME = ("dtype", "param_dtype")


@dataclasses.dataclass
class FluxParts:
    """Everything FluxPipeline holds, as configs and (possibly sharded) parameters."""

    transformer_config: FluxConfig
    transformer_params: Any
    text: TextEncoders
    vae_config: VAEConfig | None
    vae_params: Any
    scheduler: dict[str, Any]
    mesh: Mesh | None = None
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES

    @property
    def tokenizers(self) -> Tokenizers:
        return self.text.tokenizers

    pixel_codec: PixelCodec | None = None  # set instead of the VAE for pixel-space pipelines

    @property
    def codec(self) -> VAECodec | PixelCodec:
        return self.pixel_codec or VAECodec(self.vae_config, self.vae_params)


def _weights(folder: Path, stem: str) -> list[str]:
    """Missing weight files of `folder` (relative names): the single file, or the index and its shards."""
    if (folder / f"{stem}.safetensors").is_file():
        return []
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return [f"{folder.name}/{stem}.safetensors (or {stem}.safetensors.index.json with its shards)"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index} is not a safetensors index (needs a weight_map): {e}") from None
    return [f"{folder.name}/{s} (listed in {index.name})" for s in shards if not (folder / s).is_file()]


def _pixel_codec(path: Path) -> PixelCodec | None:
    """The weightless pixel-space codec when `vae/config.json` asks for it."""
    config = path / "vae" / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    if raw.get("_class_name") != PIXEL_CODEC:
        return None
    return PixelCodec(factor=int(raw.get("factor", 2)), channels=int(raw.get("channels", 3)))


def missing_files(path: str | Path) -> list[str]:
    """What a FLUX pipeline folder lacks, relative to `path` (empty when complete)."""
    path = Path(path)
    missing = [] if (path / "model_index.json").is_file() else ["model_index.json"]
    for name in ("scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json"):
        if not (path / name).is_file():
            missing.append(name)
    missing += _weights(path / "transformer", "diffusion_pytorch_model")
    if not _pixel_codec(path):
        missing += _weights(path / "vae", "diffusion_pytorch_model")
    missing += _weights(path / "text_encoder", "model")
    missing += _weights(path / "text_encoder_2", "model")
    clip_tok = path / "tokenizer"
    if not (clip_tok / "tokenizer.json").is_file():
        missing += [f"tokenizer/{n}" for n in ("vocab.json", "merges.txt") if not (clip_tok / n).is_file()]
    t5_tok = path / "tokenizer_2"
    if not (t5_tok / "tokenizer.json").is_file() and not (t5_tok / "spiece.model").is_file():
        missing.append("tokenizer_2/tokenizer.json (or spiece.model)")
    return missing


def check_folder(path: str | Path) -> None:
    """Raises FileNotFoundError listing every missing component file of a FLUX pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"FLUX pipeline folder {path} does not exist. {DOWNLOAD_HINT}")
    missing = missing_files(path)
    if missing:
        listing = "\n  ".join(missing)
        raise FileNotFoundError(f"FLUX pipeline folder {path} is incomplete; missing:\n  {listing}\n{DOWNLOAD_HINT}")


def check_guidance(path: str | Path, train_guidance: float) -> None:
    """Refuses training with FLUX.1-dev's embedded guidance on a transformer without a guidance
    embedder (FLUX.1-schnell), read from `transformer/config.json` before any weight is loaded."""
    config_file = Path(path) / "transformer" / "config.json"
    try:
        embeds = bool(json.loads(config_file.read_text()).get("guidance_embeds", False))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e}); download it again") from None
    if not embeds and train_guidance > 0:
        raise ValueError(
            f"{config_file} has guidance_embeds=false: this is a FLUX.1-schnell-like model without FLUX.1-dev's "
            f"guidance embedder, but config.train_guidance={train_guidance} trains with embedded guidance. Point "
            "config.pretrained at a FLUX.1-dev folder, or pass --config.train_guidance=0 to train this model "
            "without embedded guidance.")


def load_pipeline(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime: Any,
) -> FluxParts:
    """Loads a diffusers FLUX pipeline folder (see module doc) into `FluxParts`.

    `runtime`: FluxConfig runtime fields (dtype, param_dtype, scan_layers, remat_policy,
    attention) for the transformer; dtype and param_dtype also set the text encoders'
    and the VAE's. With a `mesh`, every model's parameters are sharded by their logical
    axis names through the same `rules`.
    """
    path = Path(path)
    check_folder(path)
    unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(FluxConfig)})
    if unknown:
        raise TypeError(f"load_pipeline: unknown runtime options {unknown}")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(scheduler_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{scheduler_file}: not valid JSON ({e})") from None

    transformer_config, transformer_params = flux_io.load_transformer(
        path / "transformer", mesh=mesh, rules=rules, **runtime_lib.select(FluxConfig, runtime))
    clip_config, clip_params = load_clip(path / "text_encoder", mesh=mesh, rules=rules,
                                         **runtime_lib.select(CLIPTextConfig, runtime, _SHARED_RUNTIME))
    t5_config, t5_params = load_t5(path / "text_encoder_2", mesh=mesh, rules=rules,
                                   **runtime_lib.select(T5Config, runtime, _SHARED_RUNTIME))
    pixel_codec = _pixel_codec(path)
    vae_config = vae_params = None
    if pixel_codec is None:
        vae_config, vae_params = load_vae(path / "vae", mesh=mesh, axis_rules=rules,
                                          **runtime_lib.select(VAEConfig, runtime, _SHARED_RUNTIME))
    tokenizers = load_tokenizers(path, clip_config.vocab_size, t5_config.vocab_size)
    text = TextEncoders(clip_config, clip_params, t5_config, t5_params, tokenizers, mesh, rules)
    return FluxParts(transformer_config, transformer_params, text, vae_config, vae_params, scheduler, mesh, rules,
                     pixel_codec)
