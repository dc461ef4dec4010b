"""FLUX transformer checkpoints in and out: diffusers folders, BFL single files, orbax.

Accepted inputs (`read_config`, `load_transformer`):
  - a diffusers `transformer/` folder: `config.json` + `diffusion_pytorch_model.safetensors`,
    or shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` + their index json;
  - a diffusers pipeline folder (its `transformer/` is used);
  - a Black Forest Labs single file (`flux1-dev.safetensors`), tensor names with or without
    the `model.diffusion_model.` prefix. Its architecture is read off tensor names and
    shapes; only the RoPE split `axes_dim` cannot be, so it defaults to FLUX's
    (16, 56, 56) scaled to the head width and can be passed explicitly.

Parameters are built directly in their final shardings, one checkpoint tensor at a time
(see `weights.loader`). Outputs: an orbax checkpoint with the config as JSON beside it
(`save_orbax` / `restore_orbax`), a diffusers folder (`export_diffusers`) and a BFL file
(`export_bfl`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.backbones.flux.rules import BFL_PREFIXES, bfl_rules, diffusers_rules
from purecc_jax.models import flux
from purecc_jax.models.flux import FluxConfig
from purecc_jax.weights import diffusers_lora, loader
from purecc_jax.weights.rules import Rule
from purecc_jax.weights.safetensors_io import Checkpoint

Format = Literal["diffusers", "bfl"]
DIFFUSERS_PREFIX = "diffusion_pytorch_model"
_ORBAX_CONFIG = "config.json"
_ORBAX_PARAMS = "params"


class Source(NamedTuple):
    """Where a FLUX transformer checkpoint's tensors are and how they are named."""

    format: Format
    tensors: Path  # a safetensors file, or a folder of them (with or without an index json)
    prefix: str  # BFL name prefix ("" or "model.diffusion_model.")
    config: Path | None  # diffusers config.json


def resolve(path: str | Path) -> Source:
    """Finds the transformer checkpoint at `path` and tells its format; errors name the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FLUX checkpoint {path} does not exist")
    if path.is_dir():
        if (path / "transformer").is_dir():
            return resolve(path / "transformer")
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")):
                raise FileNotFoundError(f"diffusers folder {path} has config.json but no .safetensors files")
            return Source("diffusers", path, "", path / "config.json")
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return resolve(files[0])
        raise FileNotFoundError(
            f"{path} is neither a diffusers transformer folder (no config.json), a pipeline folder "
            f"(no transformer/) nor a folder with one BFL .safetensors file ({len(files)} found)")
    if path.name.endswith(".index.json") or path.name == "config.json":
        return resolve(path.parent)
    keys = Checkpoint(path).keys()
    for prefix in ("",) + BFL_PREFIXES:
        if f"{prefix}img_in.weight" in keys and f"{prefix}final_layer.linear.weight" in keys:
            return Source("bfl", path, prefix, None)
    if "x_embedder.weight" in keys:
        raise ValueError(f"{path} holds diffusers tensor names: pass its folder, which needs a config.json")
    raise ValueError(f"{path} is not a FLUX transformer checkpoint (no img_in/final_layer or x_embedder tensors)")


def detect_format(path: str | Path) -> Format:
    """"diffusers" or "bfl" for a folder or file as accepted by `load_transformer`."""
    return resolve(path).format


def read_config(path: str | Path, **overrides: Any) -> FluxConfig:
    """The architecture of the checkpoint at `path`; `overrides` replace FluxConfig fields."""
    src = resolve(path)
    if src.format == "diffusers":
        try:
            raw = json.loads(src.config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{src.config}: not valid JSON ({e})") from None
        if raw.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
            raise ValueError(f"{src.config} describes a {raw['_class_name']}, not a FluxTransformer2DModel")
        try:
            cfg = FluxConfig.from_diffusers(raw)
        except ValueError as e:
            raise ValueError(f"{src.config}: {e}") from None
        return cfg.replace(**overrides)
    axes_dim = overrides.pop("axes_dim", None)
    return _infer_bfl(Checkpoint(src.tensors), src.prefix, axes_dim).replace(**overrides)


def _infer_bfl(ckpt: Checkpoint, prefix: str, axes_dim: Sequence[int] | None) -> FluxConfig:
    names = {k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)}
    shape = lambda name: ckpt.shape(prefix + name)
    where = ckpt.path

    def count(stack: str) -> int:
        found = {int(m.group(1)) for n in names if (m := re.match(rf"{stack}\.(\d+)\.", n))}
        if found and found != set(range(max(found) + 1)):
            raise ValueError(f"{where}: {stack} indices are not contiguous: {sorted(found)}")
        return len(found)

    for required in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"):
        if required not in names:
            raise ValueError(f"{where}: BFL FLUX checkpoint lacks {prefix + required!r}")
    hidden, in_channels = shape("img_in.weight")
    depth, depth_single = count("double_blocks"), count("single_blocks")
    head_dim = 128
    for norm in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"):
        if norm in names:
            head_dim = shape(norm)[0]
            break
    if hidden % head_dim:
        raise ValueError(f"{where}: hidden size {hidden} is not a multiple of the q/k norm width {head_dim}")
    if "double_blocks.0.img_mlp.0.weight" in names:
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
    elif "single_blocks.0.linear1.weight" in names:
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    else:
        mlp_hidden = 4 * hidden
    out_channels = shape("final_layer.linear.weight")[0]
    if axes_dim is None:
        axes_dim = default_axes_dim(head_dim)
        if axes_dim is None:
            raise ValueError(f"{where}: cannot infer the RoPE axes_dim for head_dim={head_dim}; pass axes_dim")
    return FluxConfig(
        in_channels=in_channels,
        out_channels=None if out_channels == in_channels else out_channels,
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        mlp_ratio=mlp_hidden / hidden,
        depth=depth,
        depth_single=depth_single,
        context_dim=shape("txt_in.weight")[1],
        pooled_dim=shape("vector_in.in_layer.weight")[1],
        axes_dim=tuple(axes_dim),
        guidance_embed="guidance_in.in_layer.weight" in names,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in names or depth == 0,
    )


def default_axes_dim(head_dim: int) -> tuple[int, int, int] | None:
    """FLUX's RoPE split (16, 56, 56) of 128 scaled to `head_dim`, if it gives even sizes."""
    if head_dim % 32:
        return None
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def checkpoint_dtype(path: str | Path) -> np.dtype:
    """The dtype of the transformer's weights at `path` (of its input projection)."""
    src = resolve(path)
    ckpt = Checkpoint(src.tensors)
    name = "x_embedder.weight" if src.format == "diffusers" else src.prefix + "img_in.weight"
    if name not in ckpt:
        raise ValueError(f"{src.tensors}: no tensor {name!r}")
    return ckpt.get(name).dtype


def weight_rules(cfg: FluxConfig, src: Source) -> list[Rule]:
    """The conversion table for `src`'s format, for `cfg`'s parameter layout (scanned or not)."""
    if src.format == "diffusers":
        return diffusers_rules(cfg, cfg.scan_layers)
    return bfl_rules(cfg, cfg.scan_layers, src.prefix)


def abstract_params(cfg: FluxConfig, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree, Sharding tree) of the parameters; one device when `mesh` is None."""
    return sharding.abstract_and_shardings(flux.init_fn(cfg, jax.random.key(0)), mesh, rules)


def load_transformer(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime: Any,
) -> tuple[FluxConfig, Any]:
    """Reads a FLUX transformer checkpoint into parameters placed in their shardings.

    With a `mesh`, each parameter is sharded by its logical axis names through `rules`
    (the logical-to-mesh table) and every device receives only its shard; without one,
    parameters go to the default device.

    `runtime` (dtype, param_dtype, scan_layers, remat_policy, attention, or for BFL files
    axes_dim) overrides config fields. Raises `loader.WeightsError` naming every missing,
    unexpected or mis-shaped tensor. In a BFL file with the `model.diffusion_model.`
    prefix, tensors outside it (VAE, text encoders of an all-in-one file) are ignored.
    """
    src = resolve(path)
    cfg = read_config(path, **runtime)
    init = flux.init_fn(cfg, jax.random.key(0))
    return cfg, loader.load_model(src.tensors, weight_rules(cfg, src), init, mesh, rules, loader.outside(src.prefix))


def _config_json(cfg: FluxConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)


def config_from_json(text: str, where: str | Path = "<config>") -> FluxConfig:
    """Inverse of the config JSON `save_orbax` writes."""
    raw = json.loads(text)
    fields = {f.name for f in dataclasses.fields(FluxConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown FluxConfig fields {unknown}")
    if "axes_dim" in raw:
        raw["axes_dim"] = tuple(raw["axes_dim"])
    return FluxConfig(**raw)


def save_orbax(directory: str | Path, cfg: FluxConfig, params: Any) -> Path:
    """Writes `params` as an orbax checkpoint in `directory/params`, `cfg` in `directory/config.json`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / _ORBAX_PARAMS, params, force=True)
        ckptr.wait_until_finished()
    (directory / _ORBAX_CONFIG).write_text(_config_json(cfg))
    return directory


def restore_orbax(
    directory: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime: Any,
) -> tuple[FluxConfig, Any]:
    """Reads what `save_orbax` wrote, each parameter directly into its sharding.

    `runtime` overrides config fields (param_dtype casts on restore); scan_layers must
    match the saved layout.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    config_path = directory / _ORBAX_CONFIG
    if not config_path.is_file() or not (directory / _ORBAX_PARAMS).is_dir():
        raise FileNotFoundError(f"{directory} is not a FLUX orbax checkpoint (needs config.json and params/)")
    saved = config_from_json(config_path.read_text(), config_path)
    if runtime.get("scan_layers", saved.scan_layers) != saved.scan_layers:
        raise ValueError(f"{directory} was saved with scan_layers={saved.scan_layers}; restore it the same way")
    cfg = saved.replace(**runtime)
    abstract, shardings = abstract_params(cfg, mesh, rules)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / _ORBAX_PARAMS, target)
    return cfg, params


def _scanned(params: Any, cfg: FluxConfig) -> bool:
    """Whether `params` holds stacked blocks (the tree decides, whatever cfg.scan_layers says)."""
    if "double_blocks" in params or "single_blocks" in params:
        return True
    if "double_blocks_0" in params or "single_blocks_0" in params:
        return False
    return cfg.scan_layers


def export_diffusers(
    params: Any, cfg: FluxConfig, folder: str | Path, *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Writes a diffusers `transformer/` folder (config.json + sharded safetensors + index).

    `dtype`: of the written tensors (default: the parameters'). Returns the tensor files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers(), indent=2))
    return loader.export(params, diffusers_rules(cfg, _scanned(params, cfg)), folder, DIFFUSERS_PREFIX, dtype,
                         max_shard_bytes)


def export_bfl(params: Any, cfg: FluxConfig, path: str | Path, *, prefix: str = "", dtype: Any = None) -> Path:
    """Writes one BFL-layout safetensors file (`flux1-dev.safetensors` style) at `path`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"BFL export path {path} must end in .safetensors")
    (out,) = loader.export(params, bfl_rules(cfg, _scanned(params, cfg), prefix), path.parent, path.stem, dtype,
                           max_shard_bytes=2**62)
    return out


def lora_layout(cfg: FluxConfig) -> diffusers_lora.Layout:
    """FLUX's linear layers as diffusers names them (`rules.diffusers_rules`), for LoRA files."""
    return diffusers_lora.Layout("FLUX", lambda scanned: diffusers_rules(cfg, scanned),
                                 {"double_blocks": cfg.depth, "single_blocks": cfg.depth_single})
