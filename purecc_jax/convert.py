"""Convert a FLUX.1 transformer checkpoint (diffusers or BFL) into an orbax checkpoint.

Usage:
    python -m purecc_jax.convert --input /ckpt/FLUX.1-dev --output /ckpt/flux-dev-orbax
    python -m purecc_jax.convert --input flux1-dev.safetensors --output /ckpt/flux-dev-orbax \\
        --param_dtype bfloat16 --verify_with_torch --verify_size 32x32 --verify_size 64x48

--input is a diffusers pipeline folder, its transformer/ folder, or a Black Forest Labs
single file (tensor names with or without `model.diffusion_model.`). The output folder
gets `params/` (orbax) and `config.json` (the FluxConfig), which `flux_io.restore_orbax`
reads. --param_dtype auto keeps the checkpoint's dtype (bfloat16 for the released files).

--verify_with_torch restores the written checkpoint and compares it with diffusers'
FluxTransformer2DModel built from the same input (a BFL file goes through diffusers' own
converter, so the check does not rely on this package's conversion tables): both run in
float32 on the same random inputs (batch 1, each --verify_size in pixels, i.e. a grid of
H/16 x W/16 packed patches, --verify_text_len text tokens) and the maximum absolute and
relative (to max |reference|) differences are printed. The exit status is 1 if a relative
difference exceeds --tolerance. This needs torch and diffusers, and for FLUX.1-dev about
48 GB of host memory for the float32 PyTorch model; converting alone needs neither.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from purecc_jax import cli as cli_lib
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.models.flux import FluxConfig, FluxTransformer

FLAGS = flags.FlagValues()  # this entry point's own registry (see purecc_jax.cli)
_INPUT = flags.DEFINE_string("input", None, "diffusers folder (pipeline or transformer/) or BFL .safetensors file",
                             flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "folder for the orbax checkpoint and config.json", flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "auto", "dtype of the stored parameters; auto: the checkpoint's",
                                   flag_values=FLAGS)
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "store blocks stacked for nn.scan (the training layout)",
                                 flag_values=FLAGS)
_AXES_DIM = flags.DEFINE_list("axes_dim", None, "RoPE axes split, e.g. 16,56,56 (BFL files only; default inferred)",
                              flag_values=FLAGS)
_VERIFY = flags.DEFINE_bool("verify_with_torch", False, "compare against diffusers' FluxTransformer2DModel",
                            flag_values=FLAGS)
_VERIFY_SIZE = flags.DEFINE_multi_string("verify_size", ["32x32"], "HxW image size in pixels to verify at",
                                         flag_values=FLAGS)
_VERIFY_TEXT_LEN = flags.DEFINE_integer("verify_text_len", 8, "text tokens in the verification inputs",
                                        flag_values=FLAGS)
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-3, "largest accepted max|diff| / max|reference|", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the verification inputs", flag_values=FLAGS)


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' in pixels -> (H/16, W/16) patches; both must be positive multiples of 16."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--verify_size {text!r} is not HxW, e.g. 32x32") from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"--verify_size {text!r}: H and W must be positive multiples of 16 (2x2 patches of 8x latents)")
    return h // 16, w // 16


def verification_inputs(cfg: FluxConfig, grid: tuple[int, int], text_len: int, seed: int) -> dict[str, np.ndarray]:
    """Random float32 inputs of batch 1 on a (rows, cols) patch grid, as FluxPipeline passes them."""
    rng = np.random.default_rng(seed)
    h, w = grid
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    return dict(
        img=rng.standard_normal((1, h * w, cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((1, text_len, cfg.context_dim)).astype(np.float32),
        pooled=rng.standard_normal((1, cfg.pooled_dim)).astype(np.float32),
        timesteps=np.array([0.7], np.float32),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=np.zeros((text_len, 3), np.float32),
        guidance=np.array([3.5], np.float32) if cfg.guidance_embed else None,
    )


def torch_reference(path: str | Path, cfg: FluxConfig):
    """diffusers' FluxTransformer2DModel (float32, eval) holding the weights at `path`."""
    import torch
    from diffusers import FluxTransformer2DModel

    src = flux_io.resolve(path)
    if src.format == "diffusers":
        return FluxTransformer2DModel.from_pretrained(src.tensors, torch_dtype=torch.float32).eval()
    state = _bfl_to_diffusers(src, cfg)
    diffusers_cfg = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**diffusers_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def _bfl_to_diffusers(src: flux_io.Source, cfg: FluxConfig) -> dict[str, Any]:
    """A BFL state dict renamed by diffusers' `convert_flux_transformer_checkpoint_to_diffusers`."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(src.tensors).items() if k.startswith(src.prefix)}
    # The converter hard-codes FLUX.1's width when splitting single-block linear1 into
    # q, k, v, mlp; give it the real sizes so it also handles other widths.
    flux1_split = (3072, 3072, 3072, 12288)
    d, m = cfg.hidden_size, cfg.mlp_hidden
    real_split = torch.split

    def split(x, sizes, dim=0):
        if isinstance(sizes, (tuple, list)) and tuple(sizes) == flux1_split and x.shape[dim] != sum(flux1_split):
            sizes = (d, d, d, m)
        return real_split(x, sizes, dim)

    with mock.patch.object(torch, "split", split):
        return convert_flux_transformer_checkpoint_to_diffusers(state)


def verify(output: str | Path, input_path: str | Path, sizes: list[str], text_len: int, seed: int) -> list[float]:
    """Runs the written checkpoint and the PyTorch reference; prints and returns relative diffs."""
    import torch

    cfg, params = flux_io.restore_orbax(output, dtype="float32")
    reference = torch_reference(input_path, cfg)
    model = FluxTransformer(cfg)
    apply = jax.jit(lambda p, inputs: model.apply({"params": p}, **inputs))
    rels = []
    for size in sizes:
        inputs = verification_inputs(cfg, parse_size(size), text_len, seed)
        with torch.no_grad():
            t = lambda x: None if x is None else torch.from_numpy(x)
            ref = reference(
                hidden_states=t(inputs["img"]), encoder_hidden_states=t(inputs["txt"]),
                pooled_projections=t(inputs["pooled"]), timestep=t(inputs["timesteps"]),
                img_ids=t(inputs["img_ids"]), txt_ids=t(inputs["txt_ids"]), guidance=t(inputs["guidance"]),
                return_dict=False)[0].numpy()
        with jax.default_matmul_precision("highest"):
            ours = np.asarray(apply(params, jax.tree_util.tree_map(jnp.asarray, inputs)))
        diff = float(np.abs(ours - ref).max())
        scale = float(np.abs(ref).max())
        rel = diff / max(scale, 1e-30)
        print(f"verify {size}: max abs diff {diff:.3e}, relative diff {rel:.3e} (max |reference| {scale:.3e})")
        rels.append(rel)
    return rels


def convert(input_path: str | Path, output: str | Path, param_dtype: str = "auto", scan_layers: bool = True,
            axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """Loads `input_path` (any format `backbones.flux.weights` reads) and writes it as an orbax checkpoint."""
    if param_dtype == "auto":
        param_dtype = flux_io.checkpoint_dtype(input_path).name
    runtime: dict[str, Any] = dict(param_dtype=param_dtype, scan_layers=scan_layers)
    if axes_dim is not None:
        runtime["axes_dim"] = tuple(axes_dim)
    cfg, params = flux_io.load_transformer(input_path, **runtime)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logging.info("loaded %s (%s, %.3fB parameters, %s)", input_path, flux_io.detect_format(input_path), n / 1e9,
                 param_dtype)
    flux_io.save_orbax(output, cfg, params)
    print(f"wrote {output}: {n} parameters in {param_dtype}, depth {cfg.depth}+{cfg.depth_single}, "
          f"hidden {cfg.hidden_size}, guidance_embed {cfg.guidance_embed}")
    return cfg


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError("--input and --output are required")
    for size in _VERIFY_SIZE.value:
        parse_size(size)  # fail on a bad size before the (long) conversion
    axes_dim = tuple(int(v) for v in _AXES_DIM.value) if _AXES_DIM.value else None
    convert(_INPUT.value, _OUTPUT.value, _PARAM_DTYPE.value, _SCAN_LAYERS.value, axes_dim)
    if not _VERIFY.value:
        return 0
    rels = verify(_OUTPUT.value, _INPUT.value, _VERIFY_SIZE.value, _VERIFY_TEXT_LEN.value, _SEED.value)
    worst = max(rels)
    if worst > _TOLERANCE.value:
        print(f"FAILED: relative difference {worst:.3e} exceeds --tolerance {_TOLERANCE.value:.1e}", file=sys.stderr)
        return 1
    print(f"OK: relative difference {worst:.3e} <= --tolerance {_TOLERANCE.value:.1e}")
    return 0


def cli(argv: list[str]) -> int:
    """The command line `argv` (program name first), in process; returns the exit status."""
    return cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))
