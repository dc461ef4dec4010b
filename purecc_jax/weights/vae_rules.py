"""FLUX VAE conversion table (diffusers `AutoencoderKL`, `vae/` folder) and `load_vae`.

diffusers stores convs as (O, I, kh, kw) and, since 0.14, the mid-block attention
projections as Linear (out, in) named `to_q`/`to_k`/`to_v`/`to_out.0`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from purecc_jax import sharding
from purecc_jax.models.vae import VAEConfig, init_fn
from purecc_jax.weights import loader
from purecc_jax.weights.rules import Leaf, Rule, linear


def _conv(ckpt: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", (Leaf(path + ("kernel",)),), "conv2d"), Rule(f"{ckpt}.bias", (Leaf(path + ("bias",)),))]


def _norm(ckpt: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", (Leaf(path + ("scale",)),)), Rule(f"{ckpt}.bias", (Leaf(path + ("bias",)),))]


def _resnet(ckpt: str, path: tuple[str, ...], in_ch: int, out_ch: int) -> list[Rule]:
    r = _norm(f"{ckpt}.norm1", path + ("norm1",)) + _conv(f"{ckpt}.conv1", path + ("conv1",))
    r += _norm(f"{ckpt}.norm2", path + ("norm2",)) + _conv(f"{ckpt}.conv2", path + ("conv2",))
    if in_ch != out_ch:
        r += _conv(f"{ckpt}.conv_shortcut", path + ("conv_shortcut",))
    return r


def _mid(ckpt: str, path: tuple[str, ...], cfg: VAEConfig) -> list[Rule]:
    ch = cfg.block_out_channels[-1]
    r = _resnet(f"{ckpt}.resnets.0", path + ("resnets_0",), ch, ch)
    if cfg.mid_block_attention:
        a, p = f"{ckpt}.attentions.0", path + ("attention",)
        r += _norm(f"{a}.group_norm", p + ("group_norm",))
        for name in ("to_q", "to_k", "to_v"):
            r += linear(f"{a}.{name}", Leaf(p + (name,)))
        r += linear(f"{a}.to_out.0", Leaf(p + ("to_out",)))
    return r + _resnet(f"{ckpt}.resnets.1", path + ("resnets_1",), ch, ch)


def diffusers_rules(cfg: VAEConfig) -> list[Rule]:
    """Every tensor of a diffusers AutoencoderKL state dict for `cfg`, mapped to our parameter leaves."""
    chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
    r = _conv("encoder.conv_in", ("encoder", "conv_in"))
    for i, out_ch in enumerate(chans):
        ckpt, path = f"encoder.down_blocks.{i}", ("encoder", f"down_blocks_{i}")
        for j in range(cfg.layers_per_block):
            in_ch = chans[max(i - 1, 0)] if j == 0 else out_ch
            r += _resnet(f"{ckpt}.resnets.{j}", path + (f"resnets_{j}",), in_ch, out_ch)
        if i < n - 1:
            r += _conv(f"{ckpt}.downsamplers.0.conv", path + ("downsample",))
    r += _mid("encoder.mid_block", ("encoder", "mid_block"), cfg)
    r += _norm("encoder.conv_norm_out", ("encoder", "norm_out"))
    r += _conv("encoder.conv_out", ("encoder", "conv_out"))

    rev = tuple(reversed(chans))
    r += _conv("decoder.conv_in", ("decoder", "conv_in"))
    r += _mid("decoder.mid_block", ("decoder", "mid_block"), cfg)
    for i, out_ch in enumerate(rev):
        ckpt, path = f"decoder.up_blocks.{i}", ("decoder", f"up_blocks_{i}")
        for j in range(cfg.layers_per_block + 1):
            in_ch = rev[max(i - 1, 0)] if j == 0 else out_ch
            r += _resnet(f"{ckpt}.resnets.{j}", path + (f"resnets_{j}",), in_ch, out_ch)
        if i < n - 1:
            r += _conv(f"{ckpt}.upsamplers.0.conv", path + ("upsample",))
    r += _norm("decoder.conv_norm_out", ("decoder", "norm_out"))
    r += _conv("decoder.conv_out", ("decoder", "conv_out"))

    if cfg.use_quant_conv:
        r += _conv("quant_conv", ("quant_conv",))
    if cfg.use_post_quant_conv:
        r += _conv("post_quant_conv", ("post_quant_conv",))
    return r


def _fit_to_shapes(abstract: Any, shardings: Any, mesh: Mesh) -> Any:
    """Drops the mesh axes of any dimension they do not divide (e.g. the 3 RGB channels of the last conv)."""

    def fit(spec: jax.ShapeDtypeStruct, named: NamedSharding) -> NamedSharding:
        parts = list(named.spec) + [None] * (len(spec.shape) - len(named.spec))
        for d, axes in enumerate(parts):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if spec.shape[d] % math.prod(mesh.shape[a] for a in names):
                parts[d] = None
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree_util.tree_map(fit, abstract, shardings)


def _vae_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"VAE folder {path} does not exist")
    if (path / "vae" / "config.json").exists():  # a whole diffusers pipeline folder
        return path / "vae"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json (expected a diffusers `vae/` folder)")
    return path


def _weights_in(folder: Path) -> Path:
    """diffusers' own file names first, so that variants (`*.fp16.safetensors`) beside them are not mixed in."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"):
        if (folder / name).exists():
            return folder / name
    return folder


def load_vae(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    axis_rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime,
) -> tuple[VAEConfig, Any]:
    """(config, params) from a diffusers `vae/` folder (or a pipeline folder holding one).

    `runtime` sets VAEConfig's runtime fields (dtype, param_dtype, remat, attention).
    With a `mesh`, parameters are placed by their logical axis names through `axis_rules`
    (axes that do not divide a dimension are dropped); without, on the first device.
    Strict: a missing, unexpected or mis-shaped tensor raises `loader.WeightsError`.
    """
    folder = _vae_folder(Path(path))
    config = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()), **runtime)
    abstract, shardings = placement(config, mesh, axis_rules)
    return config, loader.load(_weights_in(folder), diffusers_rules(config), abstract, shardings)


def placement(config: VAEConfig, mesh: Mesh | None,
              axis_rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> tuple[Any, Any]:
    """(ShapeDtypeStructs, shardings or None) of the VAE's parameters as `load_vae` places them."""
    boxed = jax.eval_shape(init_fn(config, jax.random.key(0)))
    abstract = sharding.unbox(boxed)
    if mesh is None:
        return abstract, None
    return abstract, _fit_to_shapes(abstract, sharding.logical_shardings(boxed, mesh, axis_rules), mesh)
