"""LoRA adapters on the SD3 transformer in diffusers' format (`StableDiffusion3Pipeline.load_lora_weights`),
written (`save`) and read (`load`).

Keys are `transformer.<diffusers module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank),
with the module names of the same conversion table as the full weights (`sd3_rules.diffusers_rules`).
alpha / rank is folded into lora_B, so the file needs no alpha and loads with scale 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from purecc_jax.models.lora import LoRAConfig
from purecc_jax.models.sd3 import SD3Config
from purecc_jax.weights import lora_export, sd3_rules

PREFIX = "transformer."
_STACKS = ("dual_blocks", "joint_blocks")


def module_names(cfg: SD3Config, scanned: bool) -> dict[tuple[tuple[str, ...], int | None], str]:
    """(our Dense module path, layer) -> diffusers module name, for every linear layer."""
    out = {}
    for rule in sd3_rules.diffusers_rules(cfg, scanned):
        if rule.transform == "linear" and rule.ckpt.endswith(".weight"):
            (leaf,) = rule.leaves
            out[(leaf.path[:-1], leaf.layer)] = rule.ckpt[: -len(".weight")]
    return out


def to_diffusers(adapter: Any, lora_cfg: LoRAConfig, cfg: SD3Config, dtype=np.float32) -> dict[str, np.ndarray]:
    """diffusers key -> tensor of an adapter tree (scanned or not; alpha / rank folded into lora_B)."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(adapter).items()}
    scanned = any(p[0] in _STACKS for p in flat)
    names = module_names(cfg, scanned)
    out = {}
    for path in sorted({k[:-1] for k in flat}):
        a, b = flat[path + ("a",)], flat[path + ("b",)] * lora_cfg.scale
        layers = range(a.shape[0]) if scanned and path[0] in _STACKS else [None]
        for layer in layers:
            if (path, layer) not in names:
                raise KeyError(f"LoRA on {'/'.join(path)} has no diffusers module name")
            a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
            name = names[(path, layer)]
            out[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(a_l.T, dtype)
            out[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(b_l.T, dtype)
    return out


def save(adapter: Any, lora_cfg: LoRAConfig, cfg: SD3Config, path: str | Path, dtype=np.float32) -> Path:
    """Writes a `pytorch_lora_weights.safetensors`-style file at `path`."""
    from purecc_jax.weights.safetensors_io import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(adapter, lora_cfg, cfg, dtype), path, metadata={"format": "pt"})
    return path


def load(path: str | Path, cfg: SD3Config, scanned: bool = True) -> tuple[Any, LoRAConfig]:
    """A diffusers/PEFT SD3 transformer LoRA file -> (adapter tree, LoRAConfig with scale 1).

    Read and assembled as FLUX's are (`lora_export.read_modules`: prefixes, `<module>.alpha` or
    PEFT's metadata scale folded into B, unknown keys and modules refused by name;
    `lora_export.assemble`: layers of a stack without a LoRA get zero adapters, differing ranks are
    zero-padded, both leaving A @ B exact).
    """
    by_name = {v: k for k, v in module_names(cfg, scanned).items()}
    pieces = {by_name[m]: ab for m, ab in lora_export.read_modules(path, by_name, "SD3").items()}
    return lora_export.assemble(pieces, {"dual_blocks": cfg.num_dual, "joint_blocks": cfg.num_joint}, path)


def collection(path: str | Path, cfg: SD3Config, scale: float = 1.0) -> Any:
    """The `lora` collection to apply an SD3 LoRA file with, at strength `scale`."""
    from purecc_jax.models import lora as lora_lib

    adapter, lcfg = load(path, cfg, cfg.scan_layers)
    return lora_lib.variables(adapter, LoRAConfig(rank=lcfg.rank, alpha=lcfg.rank * scale, targets=()))
