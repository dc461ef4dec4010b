r"""Export any orbax checkpoint of a PureCC run to the PyTorch formats diffusers and ComfyUI read.

    python -m purecc_jax.export --workdir=runs/dog --output=runs/dog/comfy --format=kohya
    python -m purecc_jax.export --workdir=runs/dog --output=/tmp/a200 --stage=a --step=200 \
        --format=diffusers-full,bfl --merge_lora --dtype=bfloat16
    python -m purecc_jax.export --verify=runs/dog/comfy

FLUX formats (`weights.formats`): diffusers-lora (pytorch_lora_weights.safetensors), kohya
(lora_kohya.safetensors: ComfyUI, sd-scripts), diffusers-full (transformer/ folder: a full
fine-tune, or the LoRA merged into the pretrained weights with --merge_lora), bfl (one
flux1-dev.safetensors-layout file). Every export also holds the concept embeddings,
purecc.json, a model card README.md with the run's last sample grid, and
export_manifest.json (sha256 of every file; --verify checks a folder against it).
An SD3 run (`backbones.sd3`) writes diffusers-lora (or diffusers-full for a full fine-tune) only.

--stage defaults to the run's final stage (b, or a for method=dreambooth) and --step to
its latest checkpoint. Only the trainable part of the checkpoint is read (not the
optimizer state); weights are written tensor by tensor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from purecc_jax import cli as cli_lib
from purecc_jax import trained as trained_lib
from purecc_jax.weights import formats as formats_lib
from purecc_jax.weights import manifest

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "the PureCC training workdir to export from", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "folder to write the export into", flag_values=FLAGS)
_FORMAT = flags.DEFINE_list("format", ["default"], f"one or more of {', '.join(formats_lib.FORMATS)}; default: "
                            "diffusers-lora for a LoRA, diffusers-full for full weights", flag_values=FLAGS)
_STAGE = flags.DEFINE_enum("stage", None, ["a", "b"], "the stage whose checkpoint to export (default: the final one)",
                           flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the stage's latest)", flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"],
                           "dtype of the written weights (default: the run's config.export.dtype)", flag_values=FLAGS)
_MERGE = flags.DEFINE_bool("merge_lora", False, "merge the LoRA into the pretrained weights (diffusers-full, bfl)",
                           flag_values=FLAGS)
_PRETRAINED = flags.DEFINE_string("pretrained", None, "the pretrained pipeline folder (default: the run's)",
                                  flag_values=FLAGS)
_VERIFY = flags.DEFINE_string("verify", None, "only check an export folder against its export_manifest.json",
                              flag_values=FLAGS)


def read_config(workdir: Path) -> dict[str, Any]:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a PureCC training workdir?")
    return json.loads(path.read_text())


def checkpoint_steps(directory: Path) -> list[int]:
    """The complete checkpoint steps of a stage (orbax writes a step folder atomically)."""
    checkpoints = directory / "checkpoints"
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def restore_trainable(directory: Path, step: int | None = None) -> tuple[dict[str, Any], int]:
    """The `trainable` subtree of a stage's checkpoint (host numpy arrays) and its step.

    Only the trainable part is read: the optimizer state of a full fine-tune would be
    twice the model again.
    """
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory / 'checkpoints'} holds no checkpoint: has this stage run?")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{directory / 'checkpoints'} has no step {step}; it has {steps}")
    path = directory / "checkpoints" / str(step) / "default"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    with ocp.PyTreeCheckpointer() as ckptr:
        item = {"trainable": tree["trainable"]}
        restore_args = {"trainable": _numpy_args(tree["trainable"])}
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                   partial_restore=True))
    return restored["trainable"], step


def _numpy_args(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def lora_config(config: dict[str, Any], stage: str):
    """The LoRAConfig a stage of the run trained with, or None for a full fine-tune."""
    from purecc_jax.models.lora import LoRAConfig

    st = config[stage]
    if st.get("full_finetune"):
        return None
    return LoRAConfig(rank=int(st["lora"]["rank"]), alpha=float(st["lora"]["alpha"]), targets=())


def concept_words(config: dict[str, Any]) -> tuple[str, str]:
    """(identifier, class word) of the run; the class word of a DreamBench subject is looked up."""
    c = config["concept"]
    if c.get("class_word"):
        return c["identifier"], c["class_word"]
    from purecc_jax.data import concept as concept_lib

    found = concept_lib.find(c["path"], identifier=c["identifier"], class_word="",
                             dreambench_root=c.get("dreambench_root") or None)
    return found.identifier, found.class_word


def last_grid(directory: Path, step: int) -> Path | None:
    """The stage's sample grid at `step`, or the last one before it."""
    grids = sorted(p for p in (directory / "samples").glob("*.png") if p.stem.isdigit() and int(p.stem) <= step)
    return grids[-1] if grids else None


def export_checkpoint(workdir: str | Path, output: str | Path, *, formats: Sequence[str] = ("default",),
                      stage: str | None = None, step: int | None = None, dtype: str | None = None,
                      merge_lora: bool = False, pretrained: str | None = None) -> Path:
    """Exports a checkpoint of a training workdir (see the module docstring); returns the folder."""
    from purecc_jax import backbones

    workdir = Path(workdir)
    config = read_config(workdir)
    method = config.get("method", "purecc")
    final = "a" if method == "dreambooth" else "b"
    stage = stage or final
    if stage == "b" and method == "dreambooth":
        raise ValueError(f"{workdir} is a dreambooth run: it has only stage a")
    name = f"stage_{stage}"
    trainable, step = restore_trainable(workdir / name, step)
    kind = config.get("concept_embedding", "none")
    if kind != "none" and "embeddings" not in trainable and stage == "b":
        # Stage B keeps stage A's learned embeddings frozen: they live in stage A's final checkpoint.
        trainable["embeddings"] = restore_trainable(workdir / "stage_a")[0].get("embeddings")
    pretrained = pretrained or trained_lib.workdir_pretrained(workdir)
    backbone = backbones.select(pretrained, config.get("model", {}).get("backbone", backbones.AUTO))
    scan = config.get("model", {}).get("scan_layers", True)
    cfg = backbone.read_config(pretrained, scan_layers=scan)
    base = None
    if merge_lora and "lora" in trainable:
        cfg, base = backbone.load_merge_base(pretrained, scan)
    identifier, class_word = concept_words(config)
    info = trained_lib.ConceptInfo(identifier, class_word, kind, method, name, step, str(pretrained), config)
    dtype = formats_lib.dtype_named(dtype or config.get("export", {}).get("dtype", "bfloat16"))
    return trained_lib.write_export(output, info, trainable, lora_config(config, name), cfg, formats=formats,
                                    dtype=dtype, merge_lora=merge_lora, base_params=base,
                                    sample_grid=last_grid(workdir / name, step), backbone=backbone)


def main(argv: Sequence[str]) -> None:
    """The CLI (flags in this module's FLAGS, parsed by `cli_lib.parse_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if _VERIFY.value:
        manifest.verify(_VERIFY.value)
        logging.info("%s matches its manifest", _VERIFY.value)
        return
    for flag in (_WORKDIR, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    folder = export_checkpoint(_WORKDIR.value, _OUTPUT.value, formats=_FORMAT.value, stage=_STAGE.value,
                               step=_STEP.value, dtype=_DTYPE.value, merge_lora=_MERGE.value,
                               pretrained=_PRETRAINED.value)
    logging.info("exported to %s", folder)


def cli(argv: Sequence[str]) -> None:
    """The command line `argv` (program name first), in process."""
    cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))
