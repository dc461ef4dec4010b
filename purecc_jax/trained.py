"""One home for a trained concept: what a PureCC run adds to the pretrained FLUX pipeline.

An export folder (a run's `W/export/`, or what `python -m purecc_jax.export` writes) holds

    purecc.json                           identifier, class word, method, stage and step, formats, files
    pytorch_lora_weights.safetensors      LoRA, diffusers/PEFT names          (format diffusers-lora)
    lora_kohya.safetensors                LoRA, kohya / ComfyUI names          (kohya)
    transformer/                          diffusers transformer folder         (diffusers-full)
    flux1-dev-purecc.safetensors          Black Forest Labs single file        (bfl)
    concept_clip_l.safetensors, concept_t5.safetensors   the learned token rows (concept_embedding=token)
    concept_layerwise.safetensors                        layer-wise concept vectors (layerwise)
    README.md, samples.png, export_manifest.json          model card, last sample grid, hashes

`write_export` writes one (`purecc_jax.export` and the trainer's final export call it);
`load_export` / `load_trained` read one back onto a loaded pipeline for sampling and
evaluation; a folder or workdir in a bucket (gs://...) is read through `purecc_jax.paths` (the
files it needs are copied once to the per-host cache). `write_embeddings` / `read_embeddings`
are the only code that knows how the concept embeddings are stored.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax import paths
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig
from purecc_jax.pipeline.folder import FluxParts
from purecc_jax.pipeline.generate import SampleSettings
from purecc_jax.purecc import embeddings as emb_lib

META = "purecc.json"
EMBEDDING_FILES = {"token": ("concept_clip_l.safetensors", "concept_t5.safetensors"),
                   "layerwise": ("concept_layerwise.safetensors",)}


@dataclasses.dataclass(frozen=True)
class ConceptInfo:
    """What purecc.json says about a trained concept (besides its files)."""

    identifier: str
    class_word: str
    concept_embedding: str  # none | token | layerwise
    method: str  # purecc | dreambooth
    stage: str  # stage_a | stage_b
    step: int | None = None  # the checkpoint step exported (None: the stage's final state)
    pretrained: str = ""  # the pipeline folder the run started from
    config: dict[str, Any] | None = None  # the run's config (config.json)


@dataclasses.dataclass(frozen=True)
class Trained:
    """What an export adds to the pretrained pipeline, ready for `trained_overrides`."""

    identifier: str
    class_word: str
    concept_embedding: str  # none | token | layerwise
    lora: Any  # a `lora` collection (models.lora.variables), or None (full fine-tune or none)
    embeddings: dict[str, Any] | None  # token rows {"clip", "t5"} or layer-wise {"double", "single"}


# ----------------------------------------------------------------------------- concept embeddings


def write_embeddings(folder: str | Path, kind: str, identifier: str, embeddings: dict[str, Any] | None
                     ) -> list[Path]:
    """Writes the learned concept embeddings of `kind` into `folder`; returns the files written.

    token: `concept_clip_l.safetensors` / `concept_t5.safetensors`, each one (1, D) float32
    tensor named by the identifier (what diffusers' `load_textual_inversion` reads);
    layerwise: `concept_layerwise.safetensors` with "double" (depth, D) and "single" rows.
    """
    from purecc_jax.weights.safetensors_io import save_file

    folder = Path(folder)
    if embeddings is None or kind == "none":
        return []
    if kind == "token":
        files = []
        for key, name in zip(("clip", "t5"), EMBEDDING_FILES["token"]):
            save_file({identifier: np.asarray(jax.device_get(embeddings[key]), np.float32)}, folder / name)
            files.append(folder / name)
        return files
    if kind == "layerwise":
        (name,) = EMBEDDING_FILES["layerwise"]
        save_file({k: np.asarray(jax.device_get(v), np.float32) for k, v in embeddings.items()}, folder / name)
        return [folder / name]
    raise ValueError(f"unknown concept_embedding {kind!r}: expected none, token or layerwise")


def _tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """The named float32 tensors of a safetensors file, each checked against its expected shape."""
    from purecc_jax.weights.safetensors_io import SafetensorsFile

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export's concept embeddings are missing")
    st = SafetensorsFile(path)
    out = {}
    for key, shape in expected.items():
        if key not in st.entries:
            raise ValueError(f"{path}: no tensor {key!r} (has {sorted(st.keys())})")
        out[key] = jnp.asarray(np.asarray(st.get(key), np.float32))
        if out[key].shape != shape:
            raise ValueError(f"{path}: {key!r} has shape {out[key].shape}; this pipeline needs {shape}")
    return out


def read_embeddings(folder: str | Path, kind: str, identifier: str, parts: FluxParts) -> dict[str, Any] | None:
    """Inverse of `write_embeddings`, checked against `parts`' encoders and transformer.

    With token embeddings the identifier is added to `parts`' tokenizers (in place) as a
    concept token, as in training, so that prompts naming it read the learned rows.
    """
    folder = Path(folder)
    if kind == "none":
        return None
    if kind == "token":
        text = parts.text
        clip_file, t5_file = (folder / n for n in EMBEDDING_FILES["token"])
        rows = {"clip": _tensors(clip_file, {identifier: (1, text.clip_config.hidden_size)})[identifier],
                "t5": _tensors(t5_file, {identifier: (1, text.t5_config.d_model)})[identifier]}
        if identifier not in parts.tokenizers.concept_words:
            parts.tokenizers.add_concept_token(identifier)
        return rows
    if kind == "layerwise":
        cfg = parts.transformer_config
        (name,) = EMBEDDING_FILES["layerwise"]
        return _tensors(folder / name, {"double": (cfg.depth, cfg.hidden_size),
                                        "single": (cfg.depth_single, cfg.hidden_size)})
    raise ValueError(f"{folder / META}: unknown concept_embedding {kind!r}")


# ----------------------------------------------------------------------------- purecc.json


def _read_json(path: Path | paths.epath.Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_meta(folder: str | Path) -> dict[str, Any]:
    """purecc.json of an export folder (local or in a bucket)."""
    path = paths.path(folder) / META
    meta = _read_json(path, "is this a PureCC export (has the run finished and exported)?")
    missing = [k for k in ("identifier", "class_word", "concept_embedding", "files") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return meta


def workdir_pretrained(workdir: str | Path) -> str:
    """The pretrained pipeline folder a training workdir (local or in a bucket) was started with (`config.json`)."""
    path = paths.path(workdir) / "config.json"
    pretrained = _read_json(path, "is --workdir a PureCC training workdir?").get("pretrained")
    if not pretrained:
        raise ValueError(f"{path} names no pretrained folder; pass --pretrained")
    return pretrained if paths.is_remote(pretrained) else str(Path(pretrained).expanduser())


# ----------------------------------------------------------------------------- writing


def write_export(
    folder: str | Path,
    info: ConceptInfo,
    trainable: dict[str, Any],
    lora_cfg: lora_lib.LoRAConfig | None,
    flux_cfg: FluxConfig,
    *,
    formats: Sequence[str] = ("default",),
    dtype: Any = np.float32,
    merge_lora: bool = False,
    base_params: Any = None,
    sample_grid: str | Path | None = None,
    backbone: Any = None,
) -> Path:
    """Writes a trained concept (`trainable`: {"lora"} or {"params"}, + {"embeddings"}) to `folder`.

    `formats`: see `weights.formats.FORMATS` ("default": diffusers-lora for a LoRA,
    diffusers-full for full weights). `merge_lora` writes the LoRA merged into
    `base_params` (the pretrained transformer), tensor by tensor. Every file is reloaded
    and checked after writing; `export_manifest.json` records its sha256 and tensors
    (`weights.manifest.verify` checks them again later). `backbone` (`purecc_jax.backbones`, default
    FLUX) writes the weight formats and the model card; `flux_cfg` is its transformer's config.
    """
    from purecc_jax import backbones
    from purecc_jax.weights import manifest

    backbone = backbone or backbones.FLUX
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    formats = backbone.resolve_formats(formats, "lora" in trainable, merge_lora)
    files: list[Path] = []
    for fmt in formats:
        files += backbone.write_weights(fmt, folder, trainable, lora_cfg, flux_cfg, dtype=dtype,
                                        merge_lora=merge_lora, base_params=base_params)
    files += write_embeddings(folder, info.concept_embedding, info.identifier, trainable.get("embeddings"))
    meta = dict(identifier=info.identifier, class_word=info.class_word, concept_embedding=info.concept_embedding,
                method=info.method, stage=info.stage, step=info.step, pretrained=info.pretrained,
                formats=list(formats), merged_lora=bool(merge_lora and "lora" in trainable),
                dtype=np.dtype(dtype).name, files=[f.relative_to(folder).as_posix() for f in files])
    (folder / META).write_text(json.dumps(meta, indent=2))
    grid = None
    if sample_grid is not None and Path(sample_grid).is_file():
        grid = folder / "samples.png"
        shutil.copyfile(sample_grid, grid)
    (folder / "README.md").write_text(backbone.model_card(meta, info, lora_cfg, folder, grid))
    manifest.write(folder, [*files, folder / META, folder / "README.md", *([grid] if grid else [])])
    return folder


# ----------------------------------------------------------------------------- reading


def load_export(folder: str | Path, parts: FluxParts, lora_scale: float = 1.0) -> tuple[FluxParts, Trained]:
    """Reads an export folder onto a loaded pipeline.

    Returns `parts` (with the exported transformer when the export holds full weights)
    and the `Trained` additions. Of several weight formats in one folder the first that
    purecc.json lists is read; `lora_scale` multiplies the LoRA. A folder in a bucket is read from a
    checked copy on this host (`paths.local_copy`) of purecc.json, that format's files and the embeddings.
    """
    from purecc_jax.weights import formats as formats_lib

    meta = read_meta(folder)
    if paths.is_remote(folder):
        listed = meta.get("formats") or formats_lib.present(paths.path(folder))
        needed = {META, *EMBEDDING_FILES.get(meta["concept_embedding"], ())}
        needed |= {formats_lib.FILES[listed[0]].split("/")[0]} if listed else set()
        folder = paths.local_copy(folder, only=tuple(sorted(needed)))
    folder = Path(folder).expanduser()
    ident, kind = meta["identifier"], meta["concept_embedding"]
    parts, adapter = formats_lib.read(folder, parts, lora_scale, meta.get("formats"))
    embeddings = read_embeddings(folder, kind, ident, parts)
    return parts, Trained(ident, meta["class_word"], kind, adapter, embeddings)


def load_trained(workdir: str | Path, parts: FluxParts, lora_scale: float = 1.0) -> tuple[FluxParts, Trained]:
    """`load_export` of a training workdir's final export (`workdir/export/`), local or in a bucket."""
    return load_export(str(paths.path(workdir) / "export"), parts, lora_scale)


def trained_overrides(parts: FluxParts, prompts: Sequence[str], settings: SampleSettings,
                      trained: Trained | None = None) -> dict[str, Any]:
    """Extra `generate` keyword arguments for a trained PureCC model (`load_trained`).

    The `lora` collection, the layer-wise `concept` injection, and `text` (and
    `negative_text`) embeddings computed with the learned concept tokens. Sampling the
    pretrained model (`trained=None`) adds nothing.
    """
    if trained is None:
        return {}

    def embed(texts):
        return emb_lib.embed_prompts(parts.text, texts, settings.max_sequence_length, trained.concept_embedding,
                                     trained.identifier, trained.embeddings)

    text, concept = embed(prompts)
    out = dict(text=text, lora=trained.lora, concept=concept)
    if settings.negative_prompt is not None and settings.true_cfg_scale > 1:
        negative, negative_concept = embed([settings.negative_prompt])
        if negative_concept is not None and bool(jnp.any(negative_concept.mask)):
            raise ValueError(f"the negative prompt {settings.negative_prompt!r} names the concept "
                             f"{trained.identifier!r}; layer-wise concept vectors apply to the positive prompts only")
        out["negative_text"] = negative
    return out
