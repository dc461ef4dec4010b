"""LoRA adapters in diffusers' FLUX format (`FluxPipeline.load_lora_weights`).

Keys are `transformer.<diffusers module>.lora_A.weight` (rank, in) and `.lora_B.weight`
(out, rank). The module names come from the same conversion table as the full weights
(`flux_rules.diffusers_rules`), so an adapter on any Dense the table knows can be exported.
alpha / rank is folded into lora_B: the file needs no alpha and loads with scale 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from purecc_jax.models.flux import FluxConfig
from purecc_jax.models.lora import LoRAConfig
from purecc_jax.weights import flux_rules
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

PREFIX = "transformer."


def module_names(cfg: FluxConfig, scanned: bool) -> dict[tuple[tuple[str, ...], int | None], str]:
    """(our Dense module path, layer) -> diffusers module name, for every linear layer."""
    out = {}
    for rule in flux_rules.diffusers_rules(cfg, scanned):
        if rule.transform == "linear" and rule.ckpt.endswith(".weight"):
            (leaf,) = rule.leaves
            out[(leaf.path[:-1], leaf.layer)] = rule.ckpt[: -len(".weight")]
    return out


def is_scanned(adapter: Any) -> bool:
    """Whether an adapter tree holds stacked (scanned) blocks."""
    return any(p[0] in ("double_blocks", "single_blocks") for p in traverse_util.flatten_dict(adapter))


def to_diffusers(adapter: Any, lora_cfg: LoRAConfig, cfg: FluxConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """diffusers key -> tensor of an adapter (alpha / rank folded into lora_B)."""
    scanned = is_scanned(adapter)
    names = module_names(cfg, scanned)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(adapter).items()}
    out = {}
    for path in sorted({k[:-1] for k in flat}):
        a, b = flat[path + ("a",)], flat[path + ("b",)] * lora_cfg.scale
        layers = range(a.shape[0]) if scanned and path[0] in ("double_blocks", "single_blocks") else [None]
        for layer in layers:
            key = (path, layer)
            if key not in names:
                raise KeyError(f"LoRA on {'/'.join(path)} has no diffusers module name")
            a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
            out[f"{PREFIX}{names[key]}.lora_A.weight"] = np.asarray(a_l.T, dtype)
            out[f"{PREFIX}{names[key]}.lora_B.weight"] = np.asarray(b_l.T, dtype)
    return out


def save(adapter: Any, lora_cfg: LoRAConfig, cfg: FluxConfig, path: str | Path, dtype=np.float32) -> Path:
    """Writes `pytorch_lora_weights.safetensors`-style file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(adapter, lora_cfg, cfg, dtype), path, metadata={"format": "pt"})
    return path


def read_modules(path: str | Path, names: Any, model: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A diffusers/PEFT LoRA file -> {diffusers module name: (A (in, r), B (r, out))}, scale folded into B.

    Keys are `transformer.<module>.lora_A.weight` / `.lora_B.weight` (PEFT's `base_model.model.`
    prefix or no prefix are accepted too). The scale is the module's `<module>.alpha` / rank where
    the file has one, else PEFT's `lora_alpha` / rank (or / sqrt(rank) with rsLoRA) from the config
    diffusers keeps in the file's metadata, else 1. Any other key, or a module not in `names` (the
    `model`'s linear layers), is an error naming it.
    """
    st = SafetensorsFile(path)
    modules: dict[str, dict[str, str]] = {}
    for key in st.keys():
        part = next((p for p in ("lora_A.weight", "lora_B.weight", "alpha") if key.endswith("." + p)), None)
        if part is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (a diffusers LoRA holds only "
                             "<module>.lora_A.weight, .lora_B.weight and .alpha)")
        module = key[: -len(part) - 1]
        for prefix in (PREFIX, "base_model.model.", ""):
            if module.startswith(prefix) and module[len(prefix):] in names:
                module = module[len(prefix):]
                break
        else:
            raise ValueError(f"{path}: {key!r} names no linear layer of this {model} transformer "
                             "(text-encoder LoRAs are not supported)")
        modules.setdefault(module, {})[part] = key
    if not modules:
        raise ValueError(f"{path}: holds no LoRA tensors")
    peft_scale = _peft_scale(st, path)
    out = {}
    for module, keys in modules.items():
        if "lora_A.weight" not in keys or "lora_B.weight" not in keys:
            raise ValueError(f"{path}: module {module!r} lacks its lora_A or lora_B weight (has {sorted(keys.values())})")
        a = np.asarray(st.get(keys["lora_A.weight"]), np.float32).T
        b = np.asarray(st.get(keys["lora_B.weight"]), np.float32).T
        if "alpha" in keys:
            b = b * float(np.asarray(st.get(keys["alpha"]), np.float32)) / a.shape[1]
        elif peft_scale is not None:
            b = b * peft_scale(a.shape[1])
        out[module] = (a, b)
    return out


def load(path: str | Path, cfg: FluxConfig, scanned: bool = True) -> tuple[Any, LoRAConfig]:
    """A diffusers/PEFT FLUX LoRA file (`read_modules`) -> (adapter tree, LoRAConfig with scale 1)."""
    by_name = {v: k for k, v in module_names(cfg, scanned).items()}
    pieces = {by_name[m]: ab for m, ab in read_modules(path, by_name, "FLUX").items()}
    return assemble(pieces, stack_depths(cfg), path)


def _peft_scale(st: SafetensorsFile, path: Any):
    """rank -> scale from the PEFT LoraConfig diffusers stores in the file's metadata, or None if absent."""
    raw = st.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    meta = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    for key in ("alpha_pattern", "rank_pattern"):
        if meta.get(key):
            raise ValueError(f"{path}: its PEFT config has a per-module {key}, which this reader does not apply")
    if "lora_alpha" not in meta:
        return None
    alpha = float(meta["lora_alpha"])
    return (lambda r: alpha / np.sqrt(r)) if meta.get("use_rslora") else (lambda r: alpha / r)


def stack_depths(cfg: FluxConfig) -> dict[str, int]:
    """Layers of each scanned block stack of a FLUX transformer (`assemble`'s `depth`)."""
    return {"double_blocks": cfg.depth, "single_blocks": cfg.depth_single}


def assemble(pieces: dict[tuple[tuple[str, ...], int | None], tuple[np.ndarray, np.ndarray]],
             depth: dict[str, int], where: Any) -> tuple[Any, LoRAConfig]:
    """An adapter tree (scale 1) from per-module (A (in, r), B (r, out)) pieces, keyed as `module_names`
    (FLUX's or SD3's); `depth`: the layers of each scanned stack, by its name.

    Layers of a scanned stack without a LoRA get zero adapters, and ranks that differ
    between layers are padded with zeros: both leave the product A @ B exact.
    """
    if not pieces:
        raise ValueError(f"{where}: holds no LoRA tensors")
    groups: dict[tuple[str, ...], dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    for (our_path, layer), ab in pieces.items():
        groups.setdefault(our_path, {})[layer] = ab
    flat = {}
    for our_path, per_layer in groups.items():
        rank = max(a.shape[1] for a, _ in per_layer.values())
        pad = lambda a, b: (np.pad(a, ((0, 0), (0, rank - a.shape[1]))), np.pad(b, ((0, rank - b.shape[0]), (0, 0))))
        if None in per_layer:
            flat[our_path + ("a",)], flat[our_path + ("b",)] = per_layer[None]
            continue
        a0, b0 = next(iter(per_layer.values()))
        zeros = (np.zeros((a0.shape[0], rank), np.float32), np.zeros((rank, b0.shape[1]), np.float32))
        layers = [pad(*per_layer[i]) if i in per_layer else zeros for i in range(depth[our_path[0]])]
        flat[our_path + ("a",)] = np.stack([a for a, _ in layers])
        flat[our_path + ("b",)] = np.stack([b for _, b in layers])
    rank = max(v.shape[-1] for k, v in flat.items() if k[-1] == "a")
    return traverse_util.unflatten_dict(flat), LoRAConfig(rank=rank, alpha=float(rank), targets=())
