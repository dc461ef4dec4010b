"""SD3 / SD3.5 transformer checkpoints in and out: diffusers folders and Stability AI single files.

Accepted inputs (`resolve`, `read_config`, `load_transformer`):
  - a diffusers `transformer/` folder (config.json + safetensors, sharded or not) or a pipeline
    folder holding one;
  - a single file (`sd3.5_medium.safetensors`), names with or without `model.diffusion_model.`;
    tensors outside that prefix (an all-in-one file's VAE and text encoders) are ignored. The
    architecture is read off tensor names and shapes, `sample_size` off the position table.

The position table stored in either layout is not a parameter (the model computes it); the
loader checks the centre of the stored one against the computed one, so a config whose
`sample_size` / `pos_embed_max_size` disagree with the weights fails loudly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.backbones.sd3.rules import POSITION_TABLE, SINGLE_FILE_PREFIX, diffusers_rules, single_file_rules
from purecc_jax.models import sd3
from purecc_jax.models.sd3 import SD3Config
from purecc_jax.weights import diffusers_lora, loader
from purecc_jax.weights.rules import Rule
from purecc_jax.weights.safetensors_io import Checkpoint, write_sharded

Format = Literal["diffusers", "single_file"]


class Source(NamedTuple):
    format: Format
    tensors: Path
    prefix: str
    config: Path | None


def resolve(path: str | Path) -> Source:
    """Finds the SD3 transformer checkpoint at `path` and tells its layout; errors name the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SD3 checkpoint {path} does not exist")
    if path.is_dir():
        if (path / "transformer").is_dir():
            return resolve(path / "transformer")
        if (path / "config.json").is_file():
            return Source("diffusers", path, "", path / "config.json")
        raise FileNotFoundError(f"{path} is neither a diffusers transformer folder (no config.json) nor a "
                                "pipeline folder (no transformer/)")
    keys = Checkpoint(path).keys()
    for prefix in ("", SINGLE_FILE_PREFIX):
        if f"{prefix}x_embedder.proj.weight" in keys and f"{prefix}final_layer.linear.weight" in keys:
            return Source("single_file", path, prefix, None)
    raise ValueError(f"{path} is not an SD3 single-file checkpoint (no x_embedder.proj / final_layer tensors, "
                     f"with or without the {SINGLE_FILE_PREFIX!r} prefix)")


def read_config(path: str | Path, **runtime: Any) -> SD3Config:
    """The architecture of the checkpoint at `path`, with runtime fields (dtype, scan_layers, ...) set.

    A single file without q/k norms does not tell its head width: pass `head_dim` if it is not 64.
    """
    src = resolve(path)
    if src.format == "diffusers":
        if "head_dim" in runtime:
            raise ValueError(f"{src.config} sets the head width; head_dim is only for single files")
        raw = json.loads(src.config.read_text())
        if raw.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            raise ValueError(f"{src.config} describes a {raw['_class_name']}, not an SD3Transformer2DModel")
        try:
            return SD3Config.from_diffusers(raw, **runtime)
        except ValueError as e:
            raise ValueError(f"{src.config}: {e}") from None
    return _infer_single_file(Checkpoint(src.tensors), src.prefix, **runtime)


def _infer_single_file(ckpt: Checkpoint, prefix: str, head_dim: int | None = None, **runtime: Any) -> SD3Config:
    names = {k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)}
    shape = lambda n: ckpt.shape(prefix + n)
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"joint_blocks\.(\d+)\.", n))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise ValueError(f"{ckpt.path}: joint_blocks indices are missing or not contiguous: {sorted(blocks)}")
    for required in ("pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight"):
        if required not in names:
            raise ValueError(f"{ckpt.path}: SD3 single file lacks {prefix + required!r}")
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    qk_norm = "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in names else None
    if qk_norm:
        head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0]
    elif head_dim is None:
        head_dim = 64  # every released SD3 model; without q/k norms no tensor tells the head width
    max_size = math.isqrt(shape("pos_embed")[1])
    # Column 1 of row 0 encodes position base_size / max_size at frequency 1 (sin, then cos a quarter on).
    row = np.asarray(ckpt.get(prefix + "pos_embed")[0, 1], np.float64)
    base_size = round(math.atan2(row[0], row[hidden // 4]) * max_size)
    return SD3Config(
        sample_size=base_size * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0] // (patch * patch),
        num_layers=len(blocks),
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        context_dim=shape("context_embedder.weight")[1],
        pooled_dim=shape("y_embedder.mlp.0.weight")[1],
        pos_embed_max_size=max_size,
        dual_attention_layers=tuple(i for i in sorted(blocks) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in names),
        qk_norm=qk_norm,
        **runtime,
    )


def weight_rules(cfg: SD3Config, src: Source, scanned: bool | None = None) -> list[Rule]:
    if src.format == "diffusers":
        return diffusers_rules(cfg, scanned)
    return single_file_rules(cfg, scanned, src.prefix)


def check_position_table(ckpt: Checkpoint, name: str, cfg: SD3Config) -> None:
    """Raises WeightsError if the stored table's centre differs from the one `cfg` computes."""
    m, d = cfg.pos_embed_max_size, cfg.hidden_size
    if tuple(ckpt.shape(name)) != (1, m * m, d):
        raise loader.WeightsError(f"{ckpt.file_of(name)}: {name!r} has shape {ckpt.shape(name)}, the config "
                                  f"(pos_embed_max_size={m}, hidden {d}) needs {(1, m * m, d)}")
    k = min(m, 8)
    start = (m - k) // 2
    stored = np.asarray(ckpt.get(name)[0].reshape(m, m, d)[start:start + k, start:start + k], np.float32)
    error = np.abs(stored.reshape(k * k, d) - sd3.position_table(cfg, k, k)).max()
    if error > 1e-2:  # bf16 tables round at 4e-3
        raise loader.WeightsError(
            f"{ckpt.file_of(name)}: the stored position table {name!r} differs from the one computed for "
            f"sample_size={cfg.sample_size}, patch_size={cfg.patch_size}, pos_embed_max_size={m} (max error "
            f"{error:.3g}); fix the config")


def load_transformer(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime: Any,
) -> tuple[SD3Config, Any]:
    """(config, params) of the SD3 transformer at `path`, each parameter streamed into its sharding.

    `runtime` sets SD3Config's runtime fields. Strict: raises `loader.WeightsError` naming every
    missing, unexpected or mis-shaped tensor, and on a position table the config does not reproduce.
    """
    src = resolve(path)
    cfg = read_config(path, **runtime)
    ckpt = Checkpoint(src.tensors)
    table = src.prefix + POSITION_TABLE[src.format]
    if table not in ckpt:
        raise loader.WeightsError(f"{src.tensors}: no position table {table!r}")
    check_position_table(ckpt, table, cfg)
    ignore = [f"^{re.escape(table)}$", *loader.outside(src.prefix)]
    init = sd3.init_fn(cfg, jax.random.key(0))
    return cfg, loader.load_model(ckpt, weight_rules(cfg, src), init, mesh, rules, ignore)


def _scanned(params: Any) -> bool:
    return not any(k.startswith(("dual_blocks_", "joint_blocks_")) for k in params)


def _write(params: Any, rules: list[Rule], table: str, cfg: SD3Config, folder: Path, stem: str, dtype: Any,
           max_shard_bytes: int) -> list[Path]:
    """Streams the rule tensors and the position table (cast like the parameters) into safetensors."""
    flat = traverse_util.flatten_dict(params)
    specs = loader.export_specs(rules, params, dtype)
    m = cfg.pos_embed_max_size
    table_dtype = specs[0][2]
    specs.insert(0, (table, (1, m * m, cfg.hidden_size), table_dtype))
    by_name = {r.ckpt: r for r in rules}
    dtypes = {name: dt for name, _, dt in specs}

    def produce(name: str) -> np.ndarray:
        if name == table:
            return sd3.position_table(cfg, m, m)[None].astype(table_dtype)
        return loader.export_tensor(by_name[name], flat, dtypes[name])

    return write_sharded(folder, stem, specs, produce, max_shard_bytes)


def export_diffusers(params: Any, cfg: SD3Config, folder: str | Path, *, dtype: Any = None,
                     max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Writes a diffusers `transformer/` folder (config.json + safetensors, sharded past max_shard_bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers(), indent=2))
    return _write(params, diffusers_rules(cfg, _scanned(params)), POSITION_TABLE["diffusers"], cfg, folder,
                  "diffusion_pytorch_model", dtype, max_shard_bytes)


def export_single_file(params: Any, cfg: SD3Config, path: str | Path, *, prefix: str = SINGLE_FILE_PREFIX,
                       dtype: Any = None) -> Path:
    """Writes one Stability-AI-layout safetensors file (position table included) at `path`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file export path {path} must end in .safetensors")
    rules = single_file_rules(cfg, _scanned(params), prefix)
    (out,) = _write(params, rules, prefix + POSITION_TABLE["single_file"], cfg, path.parent, path.stem, dtype,
                    max_shard_bytes=2**62)
    return out


def lora_layout(cfg: SD3Config) -> diffusers_lora.Layout:
    """SD3's linear layers as diffusers names them (`rules.diffusers_rules`), for LoRA files."""
    return diffusers_lora.Layout("SD3", lambda scanned: diffusers_rules(cfg, scanned),
                                 {"dual_blocks": cfg.num_dual, "joint_blocks": cfg.num_joint})
