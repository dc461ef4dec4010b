r"""Text-to-image sampling from a diffusers FLUX pipeline folder, as FluxPipeline does it.

    python -m purecc_jax.sample --pretrained=/models/FLUX.1-dev \
        --prompt="a photo of a dog" --prompt="a photo of a cat" \
        --height=1024 --width=1024 --steps=28 --guidance=3.5 --seed=0 --num_images=2 \
        --output=/tmp/dog.png

writes /tmp/dog_0.png .. dog_3.png (prompt-major: prompt p, image i is number p * num_images + i;
a single image is written to --output itself). An --output ending in .npy receives all images
as float32 (B, H, W, 3) in [0, 1]. Image i of a prompt starts from the noise of seed
--seed + i (see backbones.flux.sampler.initial_noise), or from --init_latents (packed (B, N, 64)
.npy as FluxPipeline's `latents=`, or (1, N, 64) for every image).

A PureCC training run is sampled with `--workdir=W`: the LoRA (or fine-tuned weights) and
the concept embeddings of `W/export/` on top of the pretrained pipeline it was trained
from (`--pretrained` defaults to `W/config.json`'s); `--export=DIR` samples any export
folder (`purecc_jax.export`). `--lora=FILE` adds an existing FLUX LoRA (diffusers/PEFT or
kohya file); repeated, several LoRAs are applied at once, the run's own LoRA (if any) first, as
diffusers' `set_adapters(names, scales)` composes them (the sum of each LoRA's update at its scale).
`--lora_scale` gives one scale for every LoRA or one per LoRA in that order:

    python -m purecc_jax.sample --workdir=runs/dog --prompt="a photo of sks dog" --output=/tmp/sks.png
    python -m purecc_jax.sample --pretrained=/models/FLUX.1-dev --lora=style.safetensors --lora_scale=0.8 ...
    python -m purecc_jax.sample --workdir=runs/dog --lora=style.safetensors --lora_scale=1.0,0.6 ...

The library half is the backbone's `generate` (`purecc_jax.backbones`; FLUX's is
`backbones.flux.generate`) and `purecc_jax.trained` (reading what a run adds).

Every path may be a bucket URL (gs://...; `purecc_jax.paths`): --workdir, --export and
--pretrained are read from checked copies on this host (made once, in PURECC_CACHE), --lora and
--init_latents are read from the bucket, and --output is written there:

    python -m purecc_jax.sample --workdir=gs://BUCKET/runs/dog --prompt="a photo of sks dog" \
        --output=gs://BUCKET/samples/sks.png

A `--pretrained` folder whose model_index.json names StableDiffusion3Pipeline (SD3 / SD3.5) is
sampled as that pipeline does (`purecc_jax.backbones.sd3`): --guidance is its guidance_scale
(default 7.0, CFG with --negative_prompt), --max_sequence_length defaults to 256, and
--init_latents takes its NCHW `latents=` array (B, 16, H/8, W/8), one row per image; --lora takes a
diffusers SD3 LoRA, and --workdir / --export sample an SD3 PureCC run's LoRA (configs/sd35_concept.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from purecc_jax import backbones
from purecc_jax import cli as cli_lib
from purecc_jax import paths
from purecc_jax import trained as trained_lib
from purecc_jax.pipeline.images import write_images
from purecc_jax.pipeline.settings import SampleSettings

# Flags live in their own FlagValues (see purecc_jax.cli).
FLAGS = flags.FlagValues()
_PRETRAINED = flags.DEFINE_string("pretrained", None, "diffusers FLUX pipeline folder (FLUX.1-dev/schnell download); "
                                  "with --workdir, defaults to the one it was trained from", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "a PureCC training workdir: sample its export/ (LoRA or weights and "
                               "concept embeddings)", flag_values=FLAGS)
_EXPORT = flags.DEFINE_string("export", None, "an export folder (purecc_jax.export) to sample on top of --pretrained",
                              flag_values=FLAGS)
_LORA = flags.DEFINE_multi_string("lora", None, "a LoRA file of the pipeline's model (FLUX: diffusers/PEFT or "
                                  "kohya layout) to sample with; repeat the flag for several", flag_values=FLAGS)
_LORA_SCALE = flags.DEFINE_list("lora_scale", ["1.0"], "strength of every LoRA (the workdir's or export's, then "
                                "each --lora), or one per LoRA in that order: 0.8,0.6", flag_values=FLAGS)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt (repeat the flag for several)", flag_values=FLAGS)
_HEIGHT = flags.DEFINE_integer("height", 1024, "image height in pixels (multiple of 16)", flag_values=FLAGS)
_WIDTH = flags.DEFINE_integer("width", 1024, "image width in pixels (multiple of 16)", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 28, "denoising steps", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance", None, "FLUX.1-dev's embedded guidance (default 3.5; ignored by schnell); "
                               "SD3's classifier-free guidance_scale (default 7.0)", flag_values=FLAGS)
_MAX_SEQ = flags.DEFINE_integer("max_sequence_length", None, "T5 tokens (default: FLUX 512, for schnell give 256; "
                                "SD3 256)", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the first image of each prompt", flag_values=FLAGS)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "images per prompt", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (several images: stem_i.png) or .npy", flag_values=FLAGS)
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "negative prompt for true CFG", flag_values=FLAGS)
_TRUE_CFG = flags.DEFINE_float("true_cfg_scale", 1.0, "true CFG scale (> 1 with a negative prompt enables it)",
                               flag_values=FLAGS)
_INIT_LATENTS = flags.DEFINE_string("init_latents", None, ".npy packed initial latents (B or 1, N, 64)",
                                    flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype (bfloat16 for the full-size models)",
                             flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "dtype the weights are held in", flag_values=FLAGS)
_MESH = flags.DEFINE_list("mesh", None, "DATA,FSDP,TENSOR mesh sizes (one may be -1); default: one device",
                          flag_values=FLAGS)
_PROGRESS = flags.DEFINE_bool("progress", True, "show a per-step progress bar", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    """The CLI (flags in this module's FLAGS, parsed by `cli_lib.parse_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    for flag in (_PROMPT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not (_PRETRAINED.value or _WORKDIR.value or _EXPORT.value):
        raise app.UsageError("--pretrained (or --workdir of a training run, or --export) is required")
    if _WORKDIR.value and _EXPORT.value:
        raise app.UsageError("--workdir samples the run's export/; give --export only without it")
    for flag in (_HEIGHT, _WIDTH):
        if flag.value <= 0 or flag.value % 16:
            raise app.UsageError(f"--{flag.name}={flag.value} is not a positive multiple of 16")
    if _NUM_IMAGES.value < 1:
        raise app.UsageError(f"--num_images={_NUM_IMAGES.value} must be at least 1")
    try:
        lora_scales = [float(x) for x in _LORA_SCALE.value]
    except ValueError:
        raise app.UsageError(f"--lora_scale={','.join(_LORA_SCALE.value)} is not numbers separated by commas") from None
    files = len(_LORA.value or [])
    if len(lora_scales) > 1 and len(lora_scales) not in (files, files + 1):  # + 1: the run's own LoRA
        raise app.UsageError(f"--lora_scale gives {len(lora_scales)} scales for {files} --lora files: give one "
                             "scale for all, or one per LoRA (the workdir's or export's first, then each --lora)")
    init_latents = None if _INIT_LATENTS.value is None else _load_npy(_INIT_LATENTS.value)
    pretrained = _PRETRAINED.value
    if not pretrained and _EXPORT.value:
        pretrained = trained_lib.read_meta(_EXPORT.value).get("pretrained")
        if not pretrained:
            raise app.UsageError(f"{_EXPORT.value}/purecc.json names no pretrained folder: pass --pretrained")
    pretrained = backbones.local_pipeline(pretrained or trained_lib.workdir_pretrained(_WORKDIR.value))
    backbone = backbones.from_folder(pretrained)
    settings = SampleSettings(
        _HEIGHT.value, _WIDTH.value, _STEPS.value,
        backbone.default_guidance if _GUIDANCE.value is None else _GUIDANCE.value,
        backbone.default_max_sequence_length if _MAX_SEQ.value is None else _MAX_SEQ.value,
        _NEGATIVE.value, _TRUE_CFG.value)
    parts = backbone.load(pretrained, mesh=cli_lib.mesh_from_flag(_MESH.value), dtype=_DTYPE.value,
                          param_dtype=_PARAM_DTYPE.value)
    trained = None
    if _WORKDIR.value:
        parts, trained = trained_lib.load_trained(_WORKDIR.value, parts, backbone=backbone)
    elif _EXPORT.value:
        parts, trained = trained_lib.load_export(_EXPORT.value, parts, backbone=backbone)
    with _local_loras(_LORA.value or []) as files:
        trained, lora = trained_lib.compose_loras(parts, trained, files, lora_scales, backbone)
    images = backbone.generate(parts, list(_PROMPT.value), settings,
                               seeds=[_SEED.value + i for i in range(_NUM_IMAGES.value)], init_latents=init_latents,
                               trained=trained, lora=lora, progress=_PROGRESS.value)
    for path in _write_images(np.asarray(jax.device_get(images)), _OUTPUT.value):
        logging.info("wrote %s", path)


def _load_npy(file: str) -> np.ndarray:
    """An .npy array from a local file or a bucket object."""
    if not paths.is_remote(file):
        return np.load(file)
    with paths.path(file).open("rb") as f:
        return np.load(f)


@contextlib.contextmanager
def _local_loras(files: Sequence[str]) -> Iterator[list[str]]:
    """--lora files as local files (a bucket object is downloaded to a temporary file for the block)."""
    with contextlib.ExitStack() as stack:
        local = []
        for name in files:
            if not paths.is_remote(name):
                local.append(name)
                continue
            file = stack.enter_context(paths.local_file(name))
            if file is None:
                raise FileNotFoundError(f"LoRA file {name} does not exist")
            local.append(str(file))
        yield local


def _write_images(images: np.ndarray, output: str) -> list:
    """`write_images` to a local path, or through a temporary folder to a bucket (the paths written)."""
    if not paths.is_remote(output):
        return write_images(images, output)
    out = paths.path(output)
    with paths.local_folder(out.parent) as local:
        written = write_images(images, local / out.name)
    return [out.parent / p.name for p in written]


def cli(argv: Sequence[str]) -> None:
    """The command line `argv` (program name first), in process."""
    cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))
