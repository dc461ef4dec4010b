"""LoRA adapters in diffusers' FLUX format (`FluxPipeline.load_lora_weights`).

Keys are `transformer.<diffusers module>.lora_A.weight` (rank, in) and `.lora_B.weight`
(out, rank). The module names come from the same conversion table as the full weights
(`flux_rules.diffusers_rules`), so an adapter on any Dense the table knows can be exported.
alpha / rank is folded into lora_B: the file needs no alpha and loads with scale 1.
"""

from __future__ import annotations

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


def _is_scanned(adapter: Any) -> bool:
    return any(p[0] in ("double_blocks", "single_blocks") for p in traverse_util.flatten_dict(adapter))


def to_diffusers(adapter: Any, lora_cfg: LoRAConfig, cfg: FluxConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    scanned = _is_scanned(adapter)
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


def load(path: str | Path, cfg: FluxConfig, scanned: bool = True) -> tuple[Any, LoRAConfig]:
    """A diffusers FLUX LoRA file -> (adapter tree, LoRAConfig with scale 1). Strict on names and ranks."""
    st = SafetensorsFile(path)
    by_name = {v: k for k, v in module_names(cfg, scanned).items()}
    groups: dict[tuple[str, ...], dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    ranks = set()
    for key in st.keys():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{path}: unexpected tensor {key!r} (only lora_A / lora_B are understood)")
            continue
        module = key[len(PREFIX): -len(".lora_A.weight")] if key.startswith(PREFIX) else None
        if module not in by_name:
            raise ValueError(f"{path}: {key!r} names no linear layer of this FLUX config")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in st.entries:
            raise ValueError(f"{path}: {key!r} has no matching {b_key!r}")
        our_path, layer = by_name[module]
        a, b = np.asarray(st.get(key), np.float32).T, np.asarray(st.get(b_key), np.float32).T
        ranks.add(a.shape[1])
        groups.setdefault(our_path, {})[layer] = (a, b)
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks)}")
    flat = {}
    for our_path, per_layer in groups.items():
        if None in per_layer:
            flat[our_path + ("a",)], flat[our_path + ("b",)] = per_layer[None]
        else:
            n = max(per_layer) + 1
            if sorted(per_layer) != list(range(n)):
                raise ValueError(f"{path}: LoRA covers only some layers of {'/'.join(our_path)}")
            flat[our_path + ("a",)] = np.stack([per_layer[i][0] for i in range(n)])
            flat[our_path + ("b",)] = np.stack([per_layer[i][1] for i in range(n)])
    rank = ranks.pop()
    return traverse_util.unflatten_dict(flat), LoRAConfig(rank=rank, alpha=float(rank), targets=())
