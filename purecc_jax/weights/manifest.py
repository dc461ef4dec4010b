"""`export_manifest.json`: what an export folder holds, so that a damaged copy is caught.

For every file: its size and sha256; for every safetensors file also each tensor's shape
and dtype. `write` reads each file back after it was written (header, length, every
tensor finite) before recording it; `verify` checks a folder against its manifest later,
e.g. after a copy to another machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from purecc_jax.weights.safetensors_io import SafetensorsFile

NAME = "export_manifest.json"
_CHUNK = 1 << 24


class ExportError(ValueError):
    """An export file does not match its manifest (or cannot be read back); names every problem."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tensors(path: Path, check_values: bool) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every tensor of a safetensors file; raises if the file is cut short or not finite."""
    st = SafetensorsFile(path)
    end = max((e["data_offsets"][1] for e in st.entries.values()), default=0)
    size = path.stat().st_size
    if size != st._data_start + end:
        raise ExportError(f"{path}: {size} bytes, but its header describes {st._data_start + end}")
    out = {}
    for name in st.keys():
        out[name] = {"shape": list(st.shape(name)), "dtype": np.dtype(st.dtype(name)).name}
        if check_values and not np.all(np.isfinite(np.asarray(st.get(name), np.float32))):
            raise ExportError(f"{path}: tensor {name!r} holds NaN or Inf")
    return out


def write(folder: str | Path, files: Sequence[Path]) -> Path:
    """Reads back every file of an export (`files`, inside `folder`) and writes `folder/export_manifest.json`."""
    folder = Path(folder)
    listed = sorted({Path(f).relative_to(folder).as_posix() for f in files})
    entries = {}
    for rel in listed:
        path = folder / rel
        entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        if path.suffix == ".safetensors":
            entry["tensors"] = _tensors(path, check_values=True)
        entries[rel] = entry
    out = folder / NAME
    out.write_text(json.dumps({"files": entries}, indent=1))
    return out


def verify(folder: str | Path) -> None:
    """Checks every file listed in `folder/export_manifest.json`; raises ExportError naming each mismatch."""
    folder = Path(folder)
    path = folder / NAME
    if not path.is_file():
        raise ExportError(f"{path} not found: was {folder} written by purecc_jax.export?")
    entries = json.loads(path.read_text())["files"]
    problems = []
    for rel, entry in entries.items():
        file = folder / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
            continue
        if file.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (the file is corrupted or was changed)")
        if "tensors" in entry:
            try:
                tensors = _tensors(file, check_values=False)
            except (ValueError, OSError) as e:
                problems.append(f"{rel}: unreadable ({e})")
                continue
            if tensors != entry["tensors"]:
                names = set(tensors) | set(entry["tensors"])
                differ = sorted(k for k in names if tensors.get(k) != entry["tensors"].get(k))
                problems.append(f"{rel}: tensors differ from the manifest: {differ[:5]}")
    if problems:
        raise ExportError(f"{folder} does not match {NAME}:\n  " + "\n  ".join(problems))
