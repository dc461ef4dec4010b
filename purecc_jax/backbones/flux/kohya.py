"""FLUX LoRAs in the kohya / sd-scripts layout, which ComfyUI and diffusers also read.

Module names are Black Forest Labs' (`weights.flux_rules.bfl_rules`) with dots turned into
underscores behind `lora_unet_`: `lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_3_linear1`, ... Each module has `.lora_down.weight` (R, in),
`.lora_up.weight` (out, R) and a scalar `.alpha`; the update is up @ down * alpha / R.

BFL fuses q/k/v (and the single blocks' MLP input, `linear1`) into one Linear. Separate
LoRAs (A_i, B_i) of the fused parts are one LoRA of the fused layer exactly: down stacks
the A_i (rank sum r_i) and up is block-diagonal, B_i in the rows of part i and the columns
of its own A_i. We write alpha = R and fold our alpha / rank into up, so every reader
applies the same scale. Reading splits up by rows again and keeps, per part, only the
columns that are not all zero, so our own files come back at their original rank (a
module whose up is all zero, as before training, is kept whole).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from purecc_jax.backbones.flux.rules import bfl_rules
from purecc_jax.models.flux import FluxConfig
from purecc_jax.models.lora import LoRAConfig
from purecc_jax.weights import diffusers_lora
from purecc_jax.weights.rules import Rule, swap
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

PREFIX = "lora_unet_"
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
STACKS = ("double_blocks", "single_blocks")


def modules(cfg: FluxConfig, scanned: bool) -> dict[str, Rule]:
    """kohya module name -> the BFL weight rule of every linear layer."""
    out = {}
    for rule in bfl_rules(cfg, scanned):
        if rule.transform == "linear" and rule.ckpt.endswith(".weight"):
            out[PREFIX + rule.ckpt[: -len(".weight")].replace(".", "_")] = rule
    return out


def to_kohya(adapter: Any, lora_cfg: LoRAConfig, cfg: FluxConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """kohya key -> tensor of an adapter tree (see the module docstring)."""
    scanned = any(p[0] in STACKS for p in traverse_util.flatten_dict(adapter))
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in traverse_util.flatten_dict(adapter).items()}
    pending = set()
    for path, value in flat.items():
        if path[-1] == "a":
            stacked = scanned and path[0] in STACKS
            pending |= {(path[:-1], i) for i in range(value.shape[0])} if stacked else {(path[:-1], None)}

    def piece(module, layer):
        a, b = flat[module + ("a",)], flat[module + ("b",)] * lora_cfg.scale
        return (a, b) if layer is None else (a[layer], b[layer])

    out = {}
    for name, rule in modules(cfg, scanned).items():
        keys = [(leaf.path[:-1], leaf.layer) for leaf in rule.leaves]
        if not any(k in pending for k in keys):
            continue
        parts = [piece(*k) if k in pending else None for k in keys]
        pending -= set(keys)
        sizes = rule.sizes or (parts[0][1].shape[1],)
        present = [p for p in parts if p is not None]
        rank = sum(a.shape[1] for a, _ in present)
        down = np.concatenate([a.T for a, _ in present], axis=0)
        up = np.zeros((sum(sizes), rank), np.float32)
        row = col = 0
        for p, size in zip(parts, sizes):
            if p is not None:
                up[row: row + size, col: col + p[0].shape[1]] = p[1].T
                col += p[0].shape[1]
            row += size
        if rule.swap_halves:
            up = swap(up)
        out[f"{name}.lora_down.weight"] = np.asarray(down, dtype)
        out[f"{name}.lora_up.weight"] = np.asarray(up, dtype)
        out[f"{name}.alpha"] = np.asarray(rank, np.float32)
    if pending:
        module, layer = sorted(pending, key=str)[0]
        raise KeyError(f"LoRA on {'/'.join(module)} (layer {layer}) has no BFL module name")
    return out


def save(adapter: Any, lora_cfg: LoRAConfig, cfg: FluxConfig, path: str | Path, dtype=np.float32) -> Path:
    """Writes a kohya-layout LoRA file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_kohya(adapter, lora_cfg, cfg, dtype), path, metadata={"format": "pt", "ss_network_module": "networks.lora_flux"})
    return path


def is_kohya(keys: list[str]) -> bool:
    """Whether a LoRA file's keys are kohya's (rather than diffusers/PEFT's)."""
    return any(k.startswith(PREFIX) or k.endswith(".lora_down.weight") for k in keys)


def load(path: str | Path, cfg: FluxConfig, scanned: bool = True) -> tuple[Any, LoRAConfig]:
    """A kohya FLUX LoRA file -> (adapter tree, LoRAConfig with scale 1). Unknown keys are errors naming them."""
    st = SafetensorsFile(path)
    known = modules(cfg, scanned)
    found: dict[str, dict[str, str]] = {}
    for key in st.keys():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (a kohya LoRA holds only "
                             f"<module>{', <module>'.join(SUFFIXES)})")
        name = key[: -len(suffix)]
        if name not in known:
            raise ValueError(f"{path}: {key!r} names no linear layer of this FLUX transformer "
                             "(text-encoder LoRAs are not supported)")
        found.setdefault(name, {})[suffix] = key
    pieces = {}
    for name, keys in found.items():
        if SUFFIXES[0] not in keys or SUFFIXES[1] not in keys:
            raise ValueError(f"{path}: module {name!r} lacks its lora_down or lora_up weight")
        rule = known[name]
        down = np.asarray(st.get(keys[SUFFIXES[0]]), np.float32)
        up = np.asarray(st.get(keys[SUFFIXES[1]]), np.float32)
        rank = down.shape[0]
        alpha = float(np.asarray(st.get(keys[SUFFIXES[2]]), np.float32)) if SUFFIXES[2] in keys else float(rank)
        if up.shape[1] != rank:
            raise ValueError(f"{path}: {name!r} has lora_down of rank {rank} but lora_up {up.shape}")
        if rule.swap_halves:
            up = swap(up)
        up = up * (alpha / rank)
        sizes = rule.sizes or (up.shape[0],)
        if sum(sizes) != up.shape[0]:
            raise ValueError(f"{path}: {name!r} has {up.shape[0]} output rows; this FLUX config needs {sum(sizes)}")
        row, untrained = 0, not np.any(up)
        for leaf, size in zip(rule.leaves, sizes):
            block = up[row: row + size]
            row += size
            used = np.any(block != 0, axis=0) | untrained  # an all-zero module (B not trained yet) stays
            if not used.any():
                continue
            pieces[(leaf.path[:-1], leaf.layer)] = (down[used].T, block[:, used].T)
    return diffusers_lora.assemble(pieces, {"double_blocks": cfg.depth, "single_blocks": cfg.depth_single}, path)
