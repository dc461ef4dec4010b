"""Strict, streaming import and export of parameter trees through a list of `Rule`s.

Import builds every parameter with `jax.make_array_from_callback`: each device's shard is
cut from one checkpoint tensor read through a memmap, so the host holds about one tensor
beyond the parameters, and a device receives only its own shard.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from purecc_jax import sharding
from purecc_jax.weights.rules import Leaf, Rule, ckpt_shape, swap, to_ckpt, to_flax
from purecc_jax.weights.safetensors_io import FLOAT_DTYPES, Checkpoint, write_sharded


class WeightsError(ValueError):
    """A checkpoint does not match the model: names every missing, unexpected or mis-shaped tensor."""


@dataclasses.dataclass(frozen=True)
class _Source:
    ckpt: str
    start: int
    stop: int
    transform: str
    swap_halves: bool


def _index_rules(rules: Sequence[Rule]) -> dict[tuple[str, ...], dict[int | None, _Source]]:
    sources: dict[tuple[str, ...], dict[int | None, _Source]] = {}
    for rule in rules:
        sizes = rule.sizes or (None,)
        start = 0
        for leaf, size in zip(rule.leaves, sizes):
            stop = None if size is None else start + size
            per_layer = sources.setdefault(leaf.path, {})
            if leaf.layer in per_layer:
                raise ValueError(f"two rules fill {leaf}")
            per_layer[leaf.layer] = _Source(rule.ckpt, start, stop, rule.transform, rule.swap_halves)
            start = stop or 0
    return sources


def check(
    ckpt: Checkpoint,
    rules: Sequence[Rule],
    abstract: Any,
    ignore: Sequence[str] = (),
) -> None:
    """Raises WeightsError naming every missing, unexpected and mis-shaped tensor."""
    flat = traverse_util.flatten_dict(abstract)
    sources = _index_rules(rules)
    problems: list[str] = []

    for path in flat:
        if path not in sources:
            problems.append(f"parameter {'/'.join(path)} has no conversion rule")
    for path, per_layer in sources.items():
        if path not in flat:
            problems.append(f"rule target {'/'.join(path)} is not a parameter of the model")
            continue
        shape = flat[path].shape
        layers = sorted(k for k in per_layer if k is not None)
        if layers and layers != list(range(shape[0])):
            problems.append(f"parameter {'/'.join(path)} has {shape[0]} layers, rules cover {len(layers)}")

    used = set()
    for rule in rules:
        used.add(rule.ckpt)
        if rule.ckpt not in ckpt:
            problems.append(f"missing tensor {rule.ckpt!r} (for {', '.join(map(str, rule.leaves))})")
            continue
        expected = None
        try:
            parts = []
            for leaf in rule.leaves:
                shape = flat[leaf.path].shape
                parts.append(ckpt_shape(shape[1:] if leaf.layer is not None else shape, rule.transform))
            expected = (sum(p[0] for p in parts), *parts[0][1:]) if len(parts) > 1 else parts[0]
        except KeyError:
            pass
        if expected is not None and tuple(ckpt.shape(rule.ckpt)) != tuple(expected):
            problems.append(f"tensor {rule.ckpt!r} has shape {ckpt.shape(rule.ckpt)}, the model needs {expected}")
        if ckpt.dtype(rule.ckpt) not in FLOAT_DTYPES:
            problems.append(f"tensor {rule.ckpt!r} has dtype {ckpt.dtype(rule.ckpt)}, the model needs floating point "
                            "weights (F32, F16, BF16 or F8)")

    patterns = [re.compile(p) for p in ignore]
    for name in ckpt.keys():
        if name not in used and not any(p.search(name) for p in patterns):
            problems.append(f"unexpected tensor {name!r} in {ckpt.file_of(name)}")

    if problems:
        head = (f"checkpoint {ckpt.path} does not match the model ({len(problems)} problems; is it the right model's "
                f"folder, completely downloaded?):\n  ")
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise WeightsError(head + "\n  ".join(shown))


def outside(prefix: str) -> list[str]:
    """`ignore` patterns for every tensor not under `prefix` (the model's part of an all-in-one file)."""
    return [f"^(?!{re.escape(prefix)})"] if prefix else []


def load_model(ckpt: Checkpoint | str | Path, rules: Sequence[Rule], init_fn: Callable[[], Any], mesh: Any = None,
               axis_rules: Sequence[tuple[str, Any]] | None = None, ignore: Sequence[str] = ()) -> Any:
    """A model's parameters from `ckpt`: the tree `init_fn` (its boxed initialiser) describes, each
    parameter placed by its logical axis names through `axis_rules` on `mesh` (the first device without one)."""
    abstract, shardings = sharding.abstract_and_shardings(init_fn, mesh, axis_rules or sharding.DEFAULT_RULES)
    return load(ckpt, rules, abstract, shardings, ignore)


def load(
    ckpt: Checkpoint | str | Path,
    rules: Sequence[Rule],
    abstract: Any,
    shardings: Any = None,
    ignore: Sequence[str] = (),
) -> Any:
    """Builds the parameter tree `abstract` (ShapeDtypeStructs) from `ckpt` through `rules`.

    `shardings`: a matching tree of jax.sharding.Sharding (default: first device). Leaves
    are cast to the abstract dtype. Raises WeightsError before reading any data if the
    checkpoint does not match.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    check(ckpt, rules, abstract, ignore)
    sources = _index_rules(rules)
    flat = traverse_util.flatten_dict(abstract)
    flat_shardings = (
        traverse_util.flatten_dict(shardings)
        if shardings is not None
        else {k: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for k in flat}
    )

    out = {}
    for path, spec in flat.items():
        per_layer = sources[path]
        read = _layer_reader(ckpt, per_layer, np.dtype(spec.dtype))
        stacked = None not in per_layer

        def callback(index, read=read, stacked=stacked, shape=spec.shape):
            if not stacked:
                return read(None)[index]
            layers = range(*index[0].indices(shape[0]))
            return np.stack([read(i)[index[1:]] for i in layers])

        out[path] = jax.make_array_from_callback(spec.shape, flat_shardings[path], callback)
    return traverse_util.unflatten_dict(out)


def _layer_reader(ckpt: Checkpoint, per_layer: dict, dtype: np.dtype) -> Callable[[int | None], np.ndarray]:
    """Reads one layer's slice in Flax layout, remembering the last one (devices ask in turn)."""
    cache: dict = {}

    def read(layer):
        if layer not in cache:
            src = per_layer[layer]
            x = ckpt.get(src.ckpt)
            if src.swap_halves:
                x = swap(x)
            if src.stop is not None:
                x = x[src.start: src.stop]
            cache.clear()
            cache[layer] = np.asarray(to_flax(x, src.transform), dtype=dtype)
        return cache[layer]

    return read


def export_specs(rules: Sequence[Rule], params: Any, dtype: Any = None) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    flat = traverse_util.flatten_dict(params)
    specs = []
    for rule in rules:
        shapes = []
        for leaf in rule.leaves:
            shape = flat[leaf.path].shape
            shapes.append(ckpt_shape(shape[1:] if leaf.layer is not None else shape, rule.transform))
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
        out_dtype = np.dtype(dtype if dtype is not None else flat[rule.leaves[0].path].dtype)
        specs.append((rule.ckpt, shape, out_dtype))
    return specs


def export_tensor(rule: Rule, flat: dict, dtype: Any) -> np.ndarray:
    """One checkpoint tensor from the Flax leaves of `rule` (the inverse of import)."""
    parts = []
    for leaf in rule.leaves:
        x = flat[leaf.path]
        x = x[leaf.layer] if leaf.layer is not None else x
        parts.append(to_ckpt(np.asarray(jax.device_get(x)), rule.transform))
    x = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if rule.swap_halves:
        x = swap(x)
    return np.asarray(x, dtype=dtype)


def export(
    params: Any, rules: Sequence[Rule], folder: str | Path, prefix: str, dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Writes `params` as (sharded) safetensors in the checkpoint layout `rules` describe."""
    flat = traverse_util.flatten_dict(params)
    by_name = {r.ckpt: r for r in rules}
    specs = export_specs(rules, params, dtype)
    dtypes = {name: dt for name, _, dt in specs}
    return write_sharded(folder, prefix, specs, lambda n: export_tensor(by_name[n], flat, dtypes[n]), max_shard_bytes)


def leaves_of(rules: Iterable[Rule]) -> set[Leaf]:
    return {leaf for rule in rules for leaf in rule.leaves}
