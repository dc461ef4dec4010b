"""Declarative conversion between checkpoint tensors and Flax parameter leaves.

A `Rule` says: checkpoint tensor `ckpt` fills the Flax leaves `leaves`, split along the
checkpoint's first (output) axis into `sizes`, after `transform`. The same list of rules
drives import (checkpoint -> Flax, `weights.loader.load`) and export (Flax -> checkpoint,
`weights.loader.export`), so the two directions cannot disagree.

Leaves of scanned (stacked) block parameters carry the block index in `Leaf.layer`: the
leaf's leading axis is the layer axis and the rule fills row `layer` of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

TRANSFORMS = ("linear", "identity", "conv2d")


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    layer: int | None = None

    def __str__(self) -> str:
        return "/".join(self.path) + ("" if self.layer is None else f"[{self.layer}]")


@dataclasses.dataclass(frozen=True)
class Rule:
    ckpt: str
    leaves: tuple[Leaf, ...]
    transform: str = "identity"
    sizes: tuple[int, ...] | None = None  # split of the checkpoint's axis 0 among `leaves`
    swap_halves: bool = False  # the checkpoint stores the two halves of axis 0 swapped

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")
        if len(self.leaves) > 1 and (self.sizes is None or len(self.sizes) != len(self.leaves)):
            raise ValueError(f"rule for {self.ckpt!r} splits into {len(self.leaves)} leaves but sizes={self.sizes}")


def to_flax(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":  # torch Linear (out, in) -> Flax (in, out)
        return x.T
    if transform == "conv2d":  # torch (O, I, kh, kw) -> Flax (kh, kw, I, O)
        return x.transpose(2, 3, 1, 0)
    return x


def to_ckpt(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv2d":
        return x.transpose(3, 2, 0, 1)
    return x


def ckpt_shape(flax_shape: Sequence[int], transform: str) -> tuple[int, ...]:
    """Shape in checkpoint layout of a leaf (one layer's slice) of the given Flax shape."""
    return tuple(to_ckpt(np.empty(tuple(flax_shape), np.bool_), transform).shape)


def swap(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]], axis=0)


def linear(ckpt: str, leaf: Leaf, bias: bool = True) -> list[Rule]:
    """weight/bias of a torch Linear -> kernel/bias of a Flax Dense at `leaf.path`."""
    rules = [Rule(f"{ckpt}.weight", (Leaf(leaf.path + ("kernel",), leaf.layer),), "linear")]
    if bias:
        rules.append(Rule(f"{ckpt}.bias", (Leaf(leaf.path + ("bias",), leaf.layer),)))
    return rules


def fused_linear(ckpt: str, leaves: Sequence[Leaf], sizes: Sequence[int], bias: bool = True) -> list[Rule]:
    """A torch Linear whose output rows are several Flax Dense layers (e.g. BFL's fused qkv)."""
    rules = [Rule(f"{ckpt}.weight", tuple(Leaf(l.path + ("kernel",), l.layer) for l in leaves), "linear", tuple(sizes))]
    if bias:
        rules.append(Rule(f"{ckpt}.bias", tuple(Leaf(l.path + ("bias",), l.layer) for l in leaves), sizes=tuple(sizes)))
    return rules


def block_leaf(stack: str, i: int, path: Sequence[str], scanned: bool) -> Leaf:
    """Leaf of block `i` in a stack that is either scanned (stacked) or a Python loop."""
    if scanned:
        return Leaf((stack, *path), i)
    return Leaf((f"{stack}_{i}", *path))
