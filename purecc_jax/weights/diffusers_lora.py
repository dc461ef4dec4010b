"""LoRA adapters in diffusers' format, for every backbone (`FluxPipeline` / `StableDiffusion3Pipeline
.load_lora_weights`), written (`save`), read (`load`) and checked after writing (`check_written`).

Keys are `transformer.<diffusers module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank).
A backbone describes its modules by a `Layout`: the module names come from the same conversion
table as its full weights (its diffusers rules), so an adapter on any Dense the table knows can be
exported. alpha / rank is folded into lora_B: the file needs no alpha and loads with scale 1.
Reading honours a module's `.alpha` or PEFT's `lora_alpha` (and rsLoRA) from the metadata diffusers
writes (`read_modules`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from purecc_jax.models import lora as lora_lib
from purecc_jax.models.lora import LoRAConfig
from purecc_jax.weights.rules import Rule
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

PREFIX = "transformer."


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one transformer's linear layers are named in diffusers' checkpoints."""

    model: str  # "FLUX", "SD3": for messages
    rules: Callable[[bool], Sequence[Rule]]  # scanned -> the backbone's diffusers weight rules
    depths: Mapping[str, int]  # layers of each scanned block stack, by its name

    def names(self, scanned: bool) -> dict[tuple[tuple[str, ...], int | None], str]:
        """(our Dense module path, layer) -> diffusers module name, for every linear layer."""
        out = {}
        for rule in self.rules(scanned):
            if rule.transform == "linear" and rule.ckpt.endswith(".weight"):
                (leaf,) = rule.leaves
                out[(leaf.path[:-1], leaf.layer)] = rule.ckpt[: -len(".weight")]
        return out

    def is_scanned(self, adapter: Any) -> bool:
        """Whether an adapter (or parameter) tree holds stacked blocks."""
        return any(p[0] in self.depths for p in traverse_util.flatten_dict(adapter))


def to_diffusers(adapter: Any, lora_cfg: LoRAConfig, layout: Layout, dtype=np.float32) -> dict[str, np.ndarray]:
    """diffusers key -> tensor of an adapter tree (scanned or not; alpha / rank folded into lora_B)."""
    scanned = layout.is_scanned(adapter)
    names = layout.names(scanned)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(adapter).items()}
    out = {}
    for path in sorted({k[:-1] for k in flat}):
        a, b = flat[path + ("a",)], flat[path + ("b",)] * lora_cfg.scale
        layers = range(a.shape[0]) if scanned and path[0] in layout.depths else [None]
        for layer in layers:
            key = (path, layer)
            if key not in names:
                raise KeyError(f"LoRA on {'/'.join(path)} has no diffusers module name")
            a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
            out[f"{PREFIX}{names[key]}.lora_A.weight"] = np.asarray(a_l.T, dtype)
            out[f"{PREFIX}{names[key]}.lora_B.weight"] = np.asarray(b_l.T, dtype)
    return out


def save(adapter: Any, lora_cfg: LoRAConfig, layout: Layout, path: str | Path, dtype=np.float32) -> Path:
    """Writes a `pytorch_lora_weights.safetensors`-style file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(adapter, lora_cfg, layout, dtype), path, metadata={"format": "pt"})
    return path


def load(path: str | Path, layout: Layout, scanned: bool = True) -> tuple[Any, LoRAConfig]:
    """A diffusers/PEFT LoRA file (`read_modules`) -> (adapter tree, LoRAConfig with scale 1)."""
    by_name = {v: k for k, v in layout.names(scanned).items()}
    pieces = {by_name[m]: ab for m, ab in read_modules(path, by_name, layout.model).items()}
    return assemble(pieces, layout.depths, path)


def check_written(path: Path, read: Callable[[Path], tuple[Any, LoRAConfig]], adapter: Any,
                  lora_cfg: LoRAConfig, dtype: Any) -> None:
    """Reads a just-written LoRA file back (`read`: its format's reader): every module's update A @ B
    equals the adapter's, to `dtype`'s precision. A module the reader leaves out counts as a zero update."""
    tree, read_cfg = read(path)
    want = traverse_util.flatten_dict(lora_lib.variables(jax.device_get(adapter), lora_cfg))
    got = traverse_util.flatten_dict(lora_lib.variables(tree, read_cfg))
    tol = 1e-6 if np.dtype(dtype) == np.float32 else 2e-2

    def update(flat, m):
        if m + ("a",) not in flat:
            return 0.0
        return np.matmul(np.asarray(flat[m + ("a",)], np.float32), np.asarray(flat[m + ("b",)], np.float32))

    for m in {k[:-1] for k in want} | {k[:-1] for k in got}:
        w, g = update(want, m), update(got, m)
        if np.abs(w - g).max() > tol * max(np.abs(w).max(), 1e-12):
            raise ValueError(f"{path}: the LoRA of {'/'.join(m)} reads back different from what was written")


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


def assemble(pieces: dict[tuple[tuple[str, ...], int | None], tuple[np.ndarray, np.ndarray]],
             depth: dict[str, int], where: Any) -> tuple[Any, LoRAConfig]:
    """An adapter tree (scale 1) from per-module (A (in, r), B (r, out)) pieces, keyed as `Layout.names`;
    `depth`: the layers of each scanned stack, by its name.

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
