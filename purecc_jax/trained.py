"""One home for a trained concept: what a PureCC run adds to the pretrained pipeline.

An export folder (a run's `W/export/`, or what `python -m purecc_jax.export` writes) holds

    purecc.json                 identifier, class word, method, stage and step, formats, files
    weights in the backbone's formats   e.g. pytorch_lora_weights.safetensors (diffusers-lora),
                                lora_kohya.safetensors, transformer/, flux1-purecc.safetensors (FLUX)
    the learned concept embeddings       (FLUX: concept_clip_l / concept_t5 / concept_layerwise.safetensors)
    README.md, samples.png, export_manifest.json   model card, last sample grid, hashes

`write_export` writes one (`export_checkpoint` from a run's checkpoint; the trainer's final export);
`load_export` / `load_trained` read one back onto a loaded pipeline for sampling and evaluation.
What the files are is the backbone's (`backbones.Backbone`: write_weights, write_embeddings,
read_export); this module owns purecc.json, the model card's place, the manifest, and buckets: a
folder or workdir in a bucket (gs://...) is read through `purecc_jax.paths` (the files it needs are
copied once to the per-host cache).
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

from purecc_jax import backbones, paths
from purecc_jax.backbones.base import Backbone, Trained
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.lora import LoRAConfig
from purecc_jax.purecc import loop
from purecc_jax.weights import manifest

META = "purecc.json"
EXPORT_DTYPES = ("bfloat16", "float16", "float32")


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


def dtype_named(name: str) -> np.dtype:
    """numpy dtype of an export dtype name (--dtype, config.export.dtype)."""
    import ml_dtypes

    if name not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {name!r} is not one of {', '.join(EXPORT_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


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


def read_config(workdir: str | Path) -> dict[str, Any]:
    """A training workdir's config.json (local or in a bucket)."""
    return _read_json(paths.path(workdir) / "config.json", f"is {workdir} a PureCC training workdir?")


def workdir_pretrained(workdir: str | Path) -> str:
    """The pretrained pipeline folder a training workdir (local or in a bucket) was started with (`config.json`)."""
    pretrained = read_config(workdir).get("pretrained")
    if not pretrained:
        raise ValueError(f"{paths.path(workdir) / 'config.json'} names no pretrained folder; pass --pretrained")
    return pretrained if paths.is_remote(pretrained) else str(Path(pretrained).expanduser())


# ----------------------------------------------------------------------------- writing


def write_export(
    folder: str | Path,
    info: ConceptInfo,
    trainable: dict[str, Any],
    lora_cfg: LoRAConfig | None,
    transformer_config: Any,
    backbone: Backbone,
    *,
    formats: Sequence[str] = ("default",),
    dtype: Any = np.float32,
    merge_lora: bool = False,
    base_params: Any = None,
    sample_grid: str | Path | None = None,
) -> Path:
    """Writes a trained concept (`trainable`: {"lora"} or {"params"}, + {"embeddings"}) to `folder`.

    `formats`: the backbone's (`Backbone.weight_formats`; "default": diffusers-lora for a LoRA,
    diffusers-full for full weights). `merge_lora` writes the LoRA merged into `base_params` (the
    pretrained transformer), tensor by tensor. Every file is reloaded and checked after writing;
    `export_manifest.json` records its sha256 and tensors (`weights.manifest.verify` checks them
    again later).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    formats = backbone.resolve_formats(formats, "lora" in trainable, merge_lora)
    files: list[Path] = []
    for fmt in formats:
        files += backbone.write_weights(fmt, folder, trainable, lora_cfg, transformer_config, dtype=dtype,
                                        merge_lora=merge_lora, base_params=base_params)
    files += backbone.write_embeddings(folder, info.concept_embedding, info.identifier, trainable.get("embeddings"))
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


def stage_lora_config(config: dict[str, Any], stage: str) -> LoRAConfig | None:
    """The LoRAConfig a stage of a run (its config.json) trained with, or None for a full fine-tune."""
    st = config[stage]
    if st.get("full_finetune"):
        return None
    return LoRAConfig(rank=int(st["lora"]["rank"]), alpha=float(st["lora"]["alpha"]), targets=())


def concept_words(config: dict[str, Any]) -> tuple[str, str]:
    """(identifier, class word) of a run (its config.json); the class word of a DreamBench subject is looked up."""
    c = config["concept"]
    if c.get("class_word"):
        return c["identifier"], c["class_word"]
    from purecc_jax.data import concept as concept_lib

    found = concept_lib.find(c["path"], identifier=c["identifier"], class_word="",
                             dreambench_root=c.get("dreambench_root") or None)
    return found.identifier, found.class_word


def last_grid(directory: Path, step: int) -> Path | None:
    """A stage's sample grid at `step`, or the last one before it."""
    grids = sorted(p for p in (directory / "samples").glob("*.png") if p.stem.isdigit() and int(p.stem) <= step)
    return grids[-1] if grids else None


def _has_ema(config: dict[str, Any]) -> bool:
    return bool(config.get("ema", {}).get("decay", 0))


def checkpoint_weights(directory: str | Path, config: dict[str, Any], step: int | None = None,
                       ema: bool = False) -> tuple[dict[str, Any], int]:
    """The weights a stage's checkpoint stands for (host numpy arrays) and its step (default: the latest):
    with `ema` its EMA (config.ema), else with schedule-free AdamW (the run's `config`) its average
    x = (y - (1 - b1) z) / b1 per trainable group (`purecc.step.eval_params`), else its trainable tree.
    Only those parts of the checkpoint are read."""
    if ema:
        restored, step = loop.restore_leaves(directory, lambda p: p[:2] == ("ema", "params"), step)
        if not restored:
            raise ValueError(f"{directory}: checkpoint {step} holds no EMA (the run had ema.decay=0): export "
                             "its trained weights instead (--noema)")
        return restored["ema"]["params"], step
    if config.get("optimizer", {}).get("name") != "schedule_free_adamw":
        return loop.restore_trainable(directory, step)
    restored, step = loop.restore_leaves(directory, _trainable_or_average_state, step)
    return _schedule_free_average(restored["trainable"], restored.get("opt_state")), step


def _trainable_or_average_state(path: tuple[str, ...]) -> bool:
    """The trainable tree, and per group g the b1 and z[g] of schedule-free's state (inner_states/g/inner_state)."""
    if path[0] == "trainable":
        return True
    for i in range(2, len(path) - 1):
        if path[i] == "inner_state" and path[i - 2] == "inner_states":
            group, rest = path[i - 1], path[i + 1:]
            return rest == ("b1",) or rest[:2] == ("z", group)
    return False


def _schedule_free_average(trainable: dict[str, Any], opt_state: Any) -> dict[str, Any]:
    out = dict(trainable)
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for group, state in (node.get("inner_states") or {}).items():
                inner = state.get("inner_state", {}) if isinstance(state, dict) else {}
                if group in out and "b1" in inner and group in inner.get("z", {}):
                    # as optax.contrib.schedule_free_eval_params computes it in the trainer (float32 b1)
                    b1 = jnp.asarray(inner["b1"])
                    out[group] = jax.tree_util.tree_map(lambda y, z: np.asarray((y - (1.0 - b1) * z) / b1),
                                                        trainable[group], inner["z"][group])
                    found.append(group)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(opt_state)
    if set(found) != set(trainable):
        missing = sorted(set(trainable) - set(found))
        raise ValueError(f"a schedule_free_adamw checkpoint without the optimizer state of {missing}")
    return out


def export_checkpoint(workdir: str | Path, output: str | Path, *, formats: Sequence[str] = ("default",),
                      stage: str | None = None, step: int | None = None, dtype: str | None = None,
                      merge_lora: bool = False, pretrained: str | None = None, ema: bool | None = None) -> Path:
    """Exports a checkpoint of a training workdir: `stage` "a" or "b" (default: the run's final one),
    `step` (default: its latest checkpoint), `ema`: its EMA weights (default: when the run kept one and its
    config.export.ema). Only the weights' part of the checkpoint is read (`checkpoint_weights`)."""
    workdir = Path(workdir)
    config = read_config(workdir)
    method = config.get("method", "purecc")
    stage = stage or ("a" if method == "dreambooth" else "b")
    if stage == "b" and method == "dreambooth":
        raise ValueError(f"{workdir} is a dreambooth run: it has only stage a")
    name = f"stage_{stage}"
    if ema is None:
        ema = _has_ema(config) and config.get("export", {}).get("ema", True)
    trainable, step = checkpoint_weights(workdir / name, config, step, ema)
    kind = config.get("concept_embedding", "none")
    if kind != "none" and "embeddings" not in trainable and stage == "b":
        # Stage B keeps stage A's learned embeddings frozen: those stage A handed on (its EMA when it kept one),
        # from its final checkpoint.
        trainable["embeddings"] = checkpoint_weights(workdir / "stage_a", config, None, _has_ema(config))[0].get(
            "embeddings")
    pretrained = pretrained or workdir_pretrained(workdir)
    model = config.get("model", {})
    backbone = backbones.select(pretrained, model.get("backbone", backbones.AUTO))
    scan = model.get("scan_layers", True)
    cfg = backbone.read_config(pretrained, scan_layers=scan)
    base = None
    if merge_lora and "lora" in trainable:
        cfg, base = backbone.load_merge_base(pretrained, scan)
    identifier, class_word = concept_words(config)
    info = ConceptInfo(identifier, class_word, kind, method, name, step, str(pretrained), config)
    return write_export(output, info, trainable, stage_lora_config(config, name), cfg, backbone, formats=formats,
                        dtype=dtype_named(dtype or config.get("export", {}).get("dtype", "bfloat16")),
                        merge_lora=merge_lora, base_params=base, sample_grid=last_grid(workdir / name, step))


# ----------------------------------------------------------------------------- reading


def load_export(folder: str | Path, parts: Any, lora_scale: float = 1.0,
                backbone: Backbone | None = None) -> tuple[Any, Trained]:
    """Reads an export folder onto a loaded pipeline (`backbone`: the one that loaded `parts`).

    Returns `parts` (with the exported transformer when the export holds full weights) and the
    `Trained` additions. Of several weight formats in one folder the first that purecc.json lists
    is read; `lora_scale` multiplies the LoRA. A folder in a bucket is read from a checked copy on
    this host (`paths.local_copy`) of purecc.json, that format's files and the embeddings.
    """
    backbone = backbone or backbones.for_parts(parts)
    meta = read_meta(folder)
    listed = meta.get("formats")
    ident, kind = meta["identifier"], meta["concept_embedding"]
    if paths.is_remote(folder):
        only = tuple(sorted({META, *backbone.export_files(listed[0], kind)})) if listed else None
        folder = paths.local_copy(folder, only=only)
    folder = Path(folder).expanduser()
    parts, lora, embeddings = backbone.read_export(folder, listed, kind, ident, parts, lora_scale)
    return parts, Trained(ident, meta["class_word"], kind, lora, embeddings)


def load_trained(workdir: str | Path, parts: Any, lora_scale: float = 1.0,
                 backbone: Backbone | None = None) -> tuple[Any, Trained]:
    """`load_export` of a training workdir's final export (`workdir/export/`), local or in a bucket."""
    return load_export(str(paths.path(workdir) / "export"), parts, lora_scale, backbone)


def compose_loras(parts: Any, trained: Trained | None, files: Sequence[str | Path], scales: Sequence[float],
                  backbone: Backbone | None = None) -> tuple[Trained | None, Any]:
    """Several LoRAs at once, as diffusers' `set_adapters(names, scales)` composes them: the sum of each
    adapter's update at its scale (`models.lora.compose`).

    The LoRAs are the trained concept's (when it brings one; as loaded, so load it at lora_scale 1), then
    each of `files` (local LoRA files of the backbone's formats); `scales` holds one value for all of them
    or one per LoRA in that order. Returns (trained, lora) for `Backbone.generate`: with a trained concept the
    composed collection replaces its LoRA and `lora` is None; without one `lora` is the composition.
    """
    backbone = backbone or backbones.for_parts(parts)
    own = trained.lora if trained is not None else None
    names = (["the trained concept's LoRA"] if own is not None else []) + [str(f) for f in files]
    if len(scales) not in (1, len(names)):
        raise ValueError(f"{len(scales)} LoRA scales ({', '.join(map(str, scales))}) for {len(names)} LoRAs "
                         f"({'; '.join(names)}): give one scale for all, or one per LoRA in this order")
    scales = list(scales) * len(names) if len(scales) == 1 else list(scales)
    collections = ([own] if own is not None else []) + [backbone.lora_collection(f, parts) for f in files]
    lora = lora_lib.compose(list(zip(collections, scales)))
    if trained is not None:
        return dataclasses.replace(trained, lora=lora), None
    return None, lora
