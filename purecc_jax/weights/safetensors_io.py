"""Streaming safetensors: read one tensor (or rows of one) at a time, write tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then raw little-endian bytes. Reading through np.memmap
means a slice touches only the pages it needs, so converting a 24 GB checkpoint keeps
about one tensor on the host. bfloat16 and float8 come from ml_dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from purecc_jax import faults

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset(DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


class SafetensorsFile:
    """One .safetensors file, opened lazily; `get(name)` returns a read-only memmap view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > self.path.stat().st_size:
                raise ValueError(f"{self.path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                 f"the file has {self.path.stat().st_size}; download it again")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not a safetensors file (bad header: {e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._data_start = 8 + n
        self._map: np.memmap | None = None
        self._check_sizes()

    def _check_sizes(self) -> None:
        """A file cut short (an interrupted download) or a header whose byte ranges do not match
        its shapes fails here, naming the file, before any tensor is read."""
        size, end = self.path.stat().st_size, 0
        for name, entry in self.entries.items():
            start, stop = entry["data_offsets"]
            want = int(np.prod(entry["shape"], dtype=np.int64)) * (self.dtype(name).itemsize)
            if stop - start != want:
                raise ValueError(f"{self.path}: tensor {name!r} ({entry['dtype']} {entry['shape']}) spans "
                                 f"{stop - start} bytes, its shape needs {want}: the file is damaged; download it again")
            end = max(end, stop)
        if size < self._data_start + end:
            raise ValueError(f"{self.path} is truncated: {size} bytes, its header needs {self._data_start + end}. "
                             "The download or copy was cut short; download it again")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = self.entries[name]["data_offsets"]
        raw = self._map[self._data_start + start: self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


class Checkpoint:
    """A set of safetensors files seen as one name -> tensor mapping.

    Accepts a single file, a folder holding `*.safetensors` (with or without an
    `*.safetensors.index.json`), or an index json itself.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            files = [indexes[0]] if len(indexes) == 1 else sorted(path.glob("*.safetensors"))
            if len(indexes) > 1:
                raise ValueError(f"{path} holds several index files: {[p.name for p in indexes]}")
            if not files:
                raise FileNotFoundError(f"{path} holds no .safetensors files")
        else:
            files = [path]
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if files[0].name.endswith(".index.json"):
            index = json.loads(files[0].read_text())
            for name, fname in index["weight_map"].items():
                fpath = files[0].parent / fname
                if not fpath.exists():
                    raise FileNotFoundError(f"{files[0]} lists {fname} for {name!r}, which does not exist")
                self.where[name] = str(fpath)
            for fpath in set(self.where.values()):
                self.files[fpath] = SafetensorsFile(fpath)
                missing = [n for n, f in self.where.items() if f == fpath and n not in self.files[fpath].entries]
                if missing:
                    raise KeyError(f"{fpath} lacks tensors its index lists: {missing[:5]}")
        else:
            for fpath in files:
                st = SafetensorsFile(fpath)
                self.files[str(fpath)] = st
                for name in st.keys():
                    if name in self.where:
                        raise ValueError(f"tensor {name!r} appears in both {self.where[name]} and {fpath}")
                    self.where[name] = str(fpath)
        self.path = path

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[self.where[name]].dtype(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self.files[self.where[name]].get(name)

    def file_of(self, name: str) -> str:
        return self.where[name]


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Writes a dict of numpy arrays (held in memory) as one safetensors file."""
    write_streaming(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], lambda k: tensors[k], metadata)


def write_streaming(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors one at a time: `produce(name)` is called once per name, in order."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"cannot write {name!r}: dtype {dtype} has no safetensors code")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, dtype) in enumerate(specs):
            if i == len(specs) // 2:
                faults.point(f"write:{Path(path).name}")
            arr = np.asarray(produce(name), dtype=np.dtype(dtype))  # ascontiguousarray makes 0-d 1-d
            if arr.shape != tuple(shape):
                raise ValueError(f"{name!r}: produced shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


def write_sharded(
    folder: str | os.PathLike,
    prefix: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """diffusers/transformers sharded layout: `{prefix}-0000i-of-0000n.safetensors` + index json.

    A single shard is written as `{prefix}.safetensors` with no index.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list] = [[]]
    size = 0
    total = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
        total += nbytes
    if len(groups) == 1:
        out = folder / f"{prefix}.safetensors"
        write_streaming(out, groups[0], produce)
        return [out]
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        out = folder / f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_streaming(out, group, produce)
        paths.append(out)
        weight_map.update({name: out.name for name, _, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, np.ndarray]]:
    for name in ckpt.keys():
        yield name, ckpt.get(name)
