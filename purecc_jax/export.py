r"""Export any orbax checkpoint of a PureCC run to the PyTorch formats diffusers and ComfyUI read.

    python -m purecc_jax.export --workdir=runs/dog --output=runs/dog/comfy --format=kohya
    python -m purecc_jax.export --workdir=runs/dog --output=/tmp/a200 --stage=a --step=200 \
        --format=diffusers-full,bfl --merge_lora --dtype=bfloat16
    python -m purecc_jax.export --verify=runs/dog/comfy

FLUX formats (`backbones.flux.formats`): diffusers-lora (pytorch_lora_weights.safetensors), kohya
(lora_kohya.safetensors: ComfyUI, sd-scripts), diffusers-full (transformer/ folder: a full
fine-tune, or the LoRA merged into the pretrained weights with --merge_lora), bfl (one
flux1-dev.safetensors-layout file). Every export also holds the concept embeddings,
purecc.json, a model card README.md with the run's last sample grid, and
export_manifest.json (sha256 of every file; --verify checks a folder against it).
An SD3 run (`backbones.sd3`) writes diffusers-lora (or diffusers-full for a full fine-tune) only.

--stage defaults to the run's final stage (b, or a for method=dreambooth) and --step to
its latest checkpoint; --ema / --noema: the EMA weights of a run that kept them (default: the
run's config.export.ema). Only the weights' part of the checkpoint is read (with schedule-free
AdamW, its average: the trained y and the optimizer's z); weights are written tensor by tensor.
The library half is `purecc_jax.trained.export_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging

from purecc_jax import backbones
from purecc_jax import cli as cli_lib
from purecc_jax import trained as trained_lib
from purecc_jax.weights import manifest

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "the PureCC training workdir to export from", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "folder to write the export into", flag_values=FLAGS)
_FORMAT = flags.DEFINE_list("format", ["default"], f"one or more of {', '.join(backbones.WEIGHT_FORMATS)}; default: "
                            "diffusers-lora for a LoRA, diffusers-full for full weights", flag_values=FLAGS)
_STAGE = flags.DEFINE_enum("stage", None, ["a", "b"], "the stage whose checkpoint to export (default: the final one)",
                           flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the stage's latest)", flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, list(trained_lib.EXPORT_DTYPES),
                           "dtype of the written weights (default: the run's config.export.dtype)", flag_values=FLAGS)
_MERGE = flags.DEFINE_bool("merge_lora", False, "merge the LoRA into the pretrained weights (diffusers-full, bfl)",
                           flag_values=FLAGS)
_PRETRAINED = flags.DEFINE_string("pretrained", None, "the pretrained pipeline folder (default: the run's)",
                                  flag_values=FLAGS)
_EMA = flags.DEFINE_bool("ema", None, "export the EMA weights of a run that kept them (config.ema); default: "
                         "the run's config.export.ema", flag_values=FLAGS)
_VERIFY = flags.DEFINE_string("verify", None, "only check an export folder against its export_manifest.json",
                              flag_values=FLAGS)


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
    folder = trained_lib.export_checkpoint(_WORKDIR.value, _OUTPUT.value, formats=_FORMAT.value, stage=_STAGE.value,
                               step=_STEP.value, dtype=_DTYPE.value, merge_lora=_MERGE.value,
                               pretrained=_PRETRAINED.value, ema=_EMA.value)
    logging.info("exported to %s", folder)


def cli(argv: Sequence[str]) -> None:
    """The command line `argv` (program name first), in process."""
    cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))
