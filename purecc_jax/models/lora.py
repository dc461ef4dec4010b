"""LoRA as a functional overlay on a Flax parameter tree.

A LoRA tree mirrors the parameter tree at every targeted Dense: `{..., "q": {"a": (in, r),
"b": (r, out)}}` (with a leading layer axis for scanned blocks). It is applied by passing
`{"params": base, "lora": lora_variables(lora, cfg)}` to the module, where `Dense` adds
`(x @ a) @ (b * alpha / rank)`. Base weights are never modified or copied, so several
adapters (PureCC's extractor and trainable model) share one copy of the pretrained model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

# Attention q/k/v/out of both streams of the double blocks, and q/k/v of the single blocks
# (whose attention has no separate output projection).
FLUX_ATTENTION = (
    r"^double_blocks(_\d+)?/(img|txt)_attn/(q|k|v)$",
    r"^double_blocks(_\d+)?/(img|txt)_attn_out$",
    r"^single_blocks(_\d+)?/attn/(q|k|v)$",
)
# The authors' SD3.5 pattern (to_q, to_k, to_v, to_out.0) carried over literally: image stream only.
FLUX_IMAGE_ATTENTION = (
    r"^double_blocks(_\d+)?/img_attn/(q|k|v)$",
    r"^double_blocks(_\d+)?/img_attn_out$",
    r"^single_blocks(_\d+)?/attn/(q|k|v)$",
)
# Everything linear inside the blocks (q/k/v/out, MLPs, modulations).
FLUX_ALL_BLOCKS = (r"^(double|single)_blocks(_\d+)?/.*",)
TARGET_PRESETS = {"attention": FLUX_ATTENTION, "image_attention": FLUX_IMAGE_ATTENTION, "all_blocks": FLUX_ALL_BLOCKS}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = FLUX_ATTENTION  # regexes over "/"-joined Dense module paths
    init_scale: float | None = None  # std of A; None = 1/rank (PEFT's "gaussian" init)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name or a list of regexes."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise KeyError(f"unknown LoRA target preset {targets!r}; known: {sorted(TARGET_PRESETS)}")
        return TARGET_PRESETS[targets]
    return tuple(targets)


def target_paths(params: Any, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Module paths (tuples) of the Dense kernels matched by `targets`."""
    patterns = [re.compile(t) for t in targets]
    flat = traverse_util.flatten_dict(params)
    found = [p[:-1] for p in flat if p[-1] == "kernel" and any(r.search("/".join(p[:-1])) for r in patterns)]
    if not found:
        raise ValueError(f"LoRA targets {list(targets)} match no Dense kernel of the model")
    return sorted(found)


def _shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    *lead, d_in, d_out = kernel_shape
    return (*lead, d_in, rank), (*lead, rank, d_out)


def init(rng: jax.Array, params: Any, cfg: LoRAConfig, dtype=jnp.float32) -> Any:
    """A ~ N(0, init_scale^2), B = 0, for every targeted kernel. Works on arrays or ShapeDtypeStructs."""
    flat = traverse_util.flatten_dict(params)
    std = cfg.init_scale if cfg.init_scale is not None else 1.0 / cfg.rank
    out = {}
    paths = target_paths(params, cfg.targets)
    for key, path in zip(jax.random.split(rng, len(paths)), paths):
        a_shape, b_shape = _shapes(flat[path + ("kernel",)].shape, cfg.rank)
        out[path + ("a",)] = std * jax.random.normal(key, a_shape, dtype)
        out[path + ("b",)] = jnp.zeros(b_shape, dtype)
    return traverse_util.unflatten_dict(out)


def shardings(lora_abstract: Any, param_shardings: Any) -> Any:
    """LoRA shardings that follow the base kernel: A's input dim and B's output dim as the kernel's."""
    flat_p = traverse_util.flatten_dict(param_shardings)
    out = {}
    for path, leaf in traverse_util.flatten_dict(lora_abstract).items():
        kernel = flat_p[path[:-1] + ("kernel",)]
        if not isinstance(kernel, NamedSharding):  # e.g. a single device: same placement as the kernel
            out[path] = kernel
            continue
        spec = tuple(kernel.spec) + (None,) * (len(leaf.shape) - len(kernel.spec))
        spec = (*spec[:-1], None) if path[-1] == "a" else (*spec[:-2], None, spec[-1])
        out[path] = NamedSharding(kernel.mesh, PartitionSpec(*spec))
    return traverse_util.unflatten_dict(out)


def variables(lora: Any, cfg: LoRAConfig) -> Any:
    """The `lora` collection to apply the model with: B pre-multiplied by alpha / rank."""
    flat = traverse_util.flatten_dict(lora)
    return traverse_util.unflatten_dict(
        {k: v * cfg.scale if k[-1] == "b" else v for k, v in flat.items()}
    )


def compose(weighted: Sequence[tuple[Any, float]]) -> Any:
    """One `lora` collection applying the sum of several (`variables`' output) at their weights.

    Ranks are concatenated, A = [A1 A2 ...] and B = [w1 B1; w2 B2; ...], so x A B = Σ wi (x Ai) Bi: the sum
    of each adapter's scaled update, as diffusers' `set_adapters(names, weights)` composes LoRAs. A module
    some adapters leave alone gets the others' ranks only. None entries are skipped; None if none is left.
    """
    flats = [(traverse_util.flatten_dict(c), float(w)) for c, w in weighted if c is not None]
    if not flats:
        return None
    out = {}
    for module in sorted({k[:-1] for flat, _ in flats for k in flat}):
        parts = [(flat[module + ("a",)], flat[module + ("b",)] * w) for flat, w in flats if module + ("a",) in flat]
        out[module + ("a",)] = jnp.concatenate([a for a, _ in parts], axis=-1)
        out[module + ("b",)] = jnp.concatenate([b for _, b in parts], axis=-2)
    return traverse_util.unflatten_dict(out)


def merge(params: Any, lora: Any, cfg: LoRAConfig) -> Any:
    """params with every targeted kernel replaced by kernel + A @ B * alpha / rank."""
    flat = dict(traverse_util.flatten_dict(params))
    flat_l = traverse_util.flatten_dict(lora)
    for path in {k[:-1] for k in flat_l}:
        kernel = flat[path + ("kernel",)]
        delta = jnp.matmul(flat_l[path + ("a",)], flat_l[path + ("b",)]) * cfg.scale
        flat[path + ("kernel",)] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def count(lora: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(lora))


def check_fits(adapter: Any, params: Any, where: Any) -> None:
    """Raises ValueError naming the module if an adapter does not fit the transformer's kernels
    (`where`: the file or folder it came from, for the message)."""
    flat = traverse_util.flatten_dict(params)
    for key, value in traverse_util.flatten_dict(adapter).items():
        if key[:-1] + ("kernel",) not in flat:
            raise ValueError(f"{where}: a LoRA on {'/'.join(key[:-1])}, which this transformer does not have")
        kernel = flat[key[:-1] + ("kernel",)].shape
        want, got = (kernel[:-1], value.shape[:-1]) if key[-1] == "a" else (kernel[-1:], value.shape[-1:])
        if got != want:
            raise ValueError(f"{where}: the LoRA of {'/'.join(key[:-1])} has {key[-1]} of shape {value.shape}, "
                             f"which does not fit its kernel {kernel}: a LoRA for another model size?")
