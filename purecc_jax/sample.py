r"""Text-to-image sampling from a diffusers FLUX pipeline folder, as FluxPipeline does it.

    python -m purecc_jax.sample --pretrained=/models/FLUX.1-dev \
        --prompt="a photo of a dog" --prompt="a photo of a cat" \
        --height=1024 --width=1024 --steps=28 --guidance=3.5 --seed=0 --num_images=2 \
        --output=/tmp/dog.png

writes /tmp/dog_0.png .. dog_3.png (prompt-major: prompt p, image i is number p * num_images + i;
a single image is written to --output itself). An --output ending in .npy receives all images
as float32 (B, H, W, 3) in [0, 1]. Image i of a prompt starts from the noise of seed
--seed + i (see pipeline.sampler.initial_noise), or from --init_latents (packed (B, N, 64)
.npy as FluxPipeline's `latents=`, or (1, N, 64) for every image).

A PureCC training run is sampled with `--workdir=W`: the LoRA (or fine-tuned weights) and
the concept embeddings of `W/export/` on top of the pretrained pipeline it was trained
from (`--pretrained` defaults to `W/config.json`'s):

    python -m purecc_jax.sample --workdir=runs/dog --prompt="a photo of sks dog" --output=/tmp/sks.png
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from purecc_jax import cli as cli_lib
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import ConceptInjection
from purecc_jax.pipeline.codec import ImageCodec
from purecc_jax.pipeline.folder import FluxParts, load_pipeline
from purecc_jax.pipeline.sampler import SampleOutput, Transformer, initial_noise, sample
from purecc_jax.pipeline.schedule import flux_sigmas
from purecc_jax.pipeline.text import PromptCache, TextEmbeddings
from purecc_jax.purecc import embeddings as emb_lib

# Flags live in their own FlagValues (see purecc_jax.cli).
FLAGS = flags.FlagValues()
_PRETRAINED = flags.DEFINE_string("pretrained", None, "diffusers FLUX pipeline folder (FLUX.1-dev/schnell download); "
                                  "with --workdir, defaults to the one it was trained from", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "a PureCC training workdir: sample its export/ (LoRA or weights and "
                               "concept embeddings)", flag_values=FLAGS)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt (repeat the flag for several)", flag_values=FLAGS)
_HEIGHT = flags.DEFINE_integer("height", 1024, "image height in pixels (multiple of 16)", flag_values=FLAGS)
_WIDTH = flags.DEFINE_integer("width", 1024, "image width in pixels (multiple of 16)", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 28, "denoising steps", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance", 3.5, "embedded guidance scale (FLUX.1-dev; ignored by schnell)",
                               flag_values=FLAGS)
_MAX_SEQ = flags.DEFINE_integer("max_sequence_length", 512, "T5 tokens (512 for dev, 256 for schnell)",
                                flag_values=FLAGS)
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


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """FluxPipeline's sampling arguments."""

    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 3.5
    max_sequence_length: int = 512
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0


def _per_image(x: Any, prompts: int, per_prompt: int, what: str) -> Any:
    """`x` with one row per image (prompt-major) from one row per image, per prompt, or for all."""
    if x is None or x.shape[0] == prompts * per_prompt:
        return x
    if x.shape[0] == prompts:
        return jnp.repeat(x, per_prompt, axis=0)
    if x.shape[0] == 1:
        return jnp.repeat(x, prompts * per_prompt, axis=0)
    raise ValueError(f"{what} has {x.shape[0]} rows; expected 1, {prompts} (one per prompt) or "
                     f"{prompts * per_prompt} (one per image)")


def generate(
    parts: FluxParts,
    prompts: Sequence[str] | None,
    settings: SampleSettings = SampleSettings(),
    *,
    seeds: Sequence[int] = (0,),
    init_latents: np.ndarray | jax.Array | None = None,
    text: TextEmbeddings | None = None,
    negative_text: TextEmbeddings | None = None,
    lora: Any = None,
    concept: ConceptInjection | None = None,
    cache: PromptCache | None = None,
    codec: ImageCodec | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Images (P * S, H, W, 3) in [0, 1] for P prompts x S seeds (prompt-major) and the final latents.

    `text` / `negative_text`: precomputed embeddings instead of encoding `prompts` /
    `settings.negative_prompt` (through `cache`, a fresh one by default); like the concept
    mask and `init_latents` (packed (.., N, 4C), replacing the seeds' noise) they have one
    row for all images, one per prompt, or one per image. Without prompts, each row of
    `text` counts as a prompt. `lora`: a `lora` collection for the transformer; `concept`:
    layer-wise concept vectors. `codec`: decodes the latents (default: the pipeline's VAE).
    """
    s = settings
    codec = codec or parts.codec
    f = codec.downsample_factor
    for name, value in (("height", s.height), ("width", s.width)):
        if value <= 0 or value % (2 * f):
            raise ValueError(f"{name}={value} must be a positive multiple of {2 * f}")
    cache = cache or PromptCache(parts.text)
    if text is None:
        if not prompts:
            raise ValueError("generate needs prompts or precomputed text embeddings")
        text = cache(prompts, s.max_sequence_length)
    n_prompts, n_seeds = len(prompts) if prompts else text.t5.shape[0], len(seeds)
    if negative_text is None and s.negative_prompt is not None and s.true_cfg_scale > 1:
        negative_text = cache([s.negative_prompt], s.max_sequence_length)
    text = TextEmbeddings(*(_per_image(x, n_prompts, n_seeds, "text embeddings") for x in text))
    if negative_text is not None:
        negative_text = TextEmbeddings(*(_per_image(x, n_prompts, n_seeds, "negative embeddings")
                                         for x in negative_text))
    if concept is not None:
        concept = concept._replace(mask=_per_image(jnp.asarray(concept.mask), n_prompts, n_seeds, "concept mask"))

    if init_latents is None:
        noise = initial_noise(seeds, s.height, s.width, codec.latent_channels, f)
        latents = jnp.tile(noise, (n_prompts, 1, 1))
    else:
        latents = _per_image(jnp.asarray(init_latents, jnp.float32), n_prompts, n_seeds, "init_latents")
    image_seq_len = (s.height // (2 * f)) * (s.width // (2 * f))
    sigmas = flux_sigmas(s.steps, image_seq_len, parts.scheduler)
    model = Transformer(parts.transformer_config, parts.transformer_params, lora)
    return sample(model, codec, text, latents, sigmas, height=s.height, width=s.width, guidance=s.guidance,
                  negative=negative_text, true_cfg_scale=s.true_cfg_scale, concept=concept, mesh=parts.mesh,
                  rules=parts.rules, progress=progress)


@dataclasses.dataclass(frozen=True)
class Trained:
    """What a PureCC export (`workdir/export/`) adds to the pretrained pipeline."""

    identifier: str
    class_word: str
    concept_embedding: str  # none | token | layerwise
    lora: Any  # a `lora` collection (models.lora.variables), or None (full fine-tune or none)
    embeddings: dict[str, Any] | None  # token rows {"clip", "t5"} or layer-wise {"double", "single"}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def workdir_pretrained(workdir: str | Path) -> str:
    """The pretrained pipeline folder a training workdir was started with (`config.json`)."""
    path = Path(workdir) / "config.json"
    pretrained = _read_json(path, "is --workdir a PureCC training workdir?").get("pretrained")
    if not pretrained:
        raise ValueError(f"{path} names no pretrained folder; pass --pretrained")
    return str(Path(pretrained).expanduser())


def _tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """The named float32 tensors of a safetensors file, each checked against its expected shape."""
    from purecc_jax.weights.safetensors_io import SafetensorsFile

    st = SafetensorsFile(path)
    out = {}
    for key, shape in expected.items():
        if key not in st.entries:
            raise ValueError(f"{path}: no tensor {key!r} (has {sorted(st.keys())})")
        out[key] = jnp.asarray(np.asarray(st.get(key), np.float32))
        if out[key].shape != shape:
            raise ValueError(f"{path}: {key!r} has shape {out[key].shape}; this pipeline needs {shape}")
    return out


def load_trained(workdir: str | Path, parts: FluxParts) -> tuple[FluxParts, Trained]:
    """Reads `workdir/export/` (purecc.json, the LoRA or transformer weights, concept embeddings).

    Returns `parts` (with the fine-tuned transformer if the export holds full weights) and
    the `Trained` additions. With token embeddings the identifier is added to `parts`'
    tokenizers (in place), as in training.
    """
    export = Path(workdir) / "export"
    meta = _read_json(export / "purecc.json", "has the training run finished and exported?")
    ident, kind = meta["identifier"], meta["concept_embedding"]
    cfg = parts.transformer_config
    adapter = None
    if (export / "pytorch_lora_weights.safetensors").is_file():
        from purecc_jax.weights import lora_export

        tree, lcfg = lora_export.load(export / "pytorch_lora_weights.safetensors", cfg, scanned=cfg.scan_layers)
        adapter = lora_lib.variables(jax.tree_util.tree_map(jnp.asarray, tree), lcfg)
    elif (export / "transformer").is_dir():
        from purecc_jax.weights import flux_io

        runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention")}
        cfg, params = flux_io.load_transformer(export / "transformer", mesh=parts.mesh, rules=parts.rules, **runtime)
        parts = dataclasses.replace(parts, transformer_config=cfg, transformer_params=params)
    embeddings = None
    if kind == "token":
        text = parts.text
        embeddings = {
            "clip": _tensors(export / "concept_clip_l.safetensors", {ident: (1, text.clip_config.hidden_size)})[ident],
            "t5": _tensors(export / "concept_t5.safetensors", {ident: (1, text.t5_config.d_model)})[ident],
        }
        if ident not in parts.tokenizers.concept_words:
            parts.tokenizers.add_concept_token(ident)
    elif kind == "layerwise":
        embeddings = _tensors(export / "concept_layerwise.safetensors",
                              {"double": (cfg.depth, cfg.hidden_size), "single": (cfg.depth_single, cfg.hidden_size)})
    elif kind != "none":
        raise ValueError(f"{export / 'purecc.json'}: unknown concept_embedding {kind!r}")
    return parts, Trained(ident, meta["class_word"], kind, adapter, embeddings)


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


def output_paths(output: str | Path, count: int) -> list[Path]:
    """PNG paths for `count` images: `output` itself for one, else stem_i with output's suffix."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def write_images(images: np.ndarray, output: str | Path) -> list[Path]:
    """Writes (B, H, W, 3) images in [0, 1]: one .npy (float32) or PNGs (see `output_paths`)."""
    from PIL import Image

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, np.float32)
    if output.suffix == ".npy":
        np.save(output, images)
        return [output]
    paths = output_paths(output, images.shape[0])
    for image, path in zip(images, paths):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    return paths


def main(argv: Sequence[str]) -> None:
    """The CLI (flags in this module's FLAGS, parsed by `cli_lib.parse_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    for flag in (_PROMPT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not _PRETRAINED.value and not _WORKDIR.value:
        raise app.UsageError("--pretrained (or --workdir of a training run) is required")
    settings = SampleSettings(_HEIGHT.value, _WIDTH.value, _STEPS.value, _GUIDANCE.value, _MAX_SEQ.value,
                              _NEGATIVE.value, _TRUE_CFG.value)
    for name, value in (("height", settings.height), ("width", settings.width)):
        if value <= 0 or value % 16:
            raise app.UsageError(f"--{name}={value} is not a positive multiple of 16")
    if _NUM_IMAGES.value < 1:
        raise app.UsageError(f"--num_images={_NUM_IMAGES.value} must be at least 1")
    init_latents = None if _INIT_LATENTS.value is None else np.load(_INIT_LATENTS.value)

    pretrained = _PRETRAINED.value or workdir_pretrained(_WORKDIR.value)
    parts = load_pipeline(pretrained, mesh=cli_lib.mesh_from_flag(_MESH.value), dtype=_DTYPE.value,
                          param_dtype=_PARAM_DTYPE.value)
    trained = None
    if _WORKDIR.value:
        parts, trained = load_trained(_WORKDIR.value, parts)
    prompts = list(_PROMPT.value)
    out = generate(parts, prompts, settings, seeds=[_SEED.value + i for i in range(_NUM_IMAGES.value)],
                   init_latents=init_latents, progress=_PROGRESS.value,
                   **trained_overrides(parts, prompts, settings, trained))
    for path in write_images(np.asarray(jax.device_get(out.images)), _OUTPUT.value):
        logging.info("wrote %s", path)


def cli(argv: Sequence[str]) -> None:
    """The command line `argv` (program name first), in process."""
    cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))
