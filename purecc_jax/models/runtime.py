"""How a model runs, in one place: the runtime fields every model config shares, the remat policies,
and the one block stacker (scanned or looped, rematerialised or not).

    dtype, param_dtype    compute and storage dtypes ("float32", "bfloat16", ...)
    scan_layers           True: a block stack is one `nn.scan` with parameters stacked on a leading
                          "layers" axis; False: block i is the submodule `{name}_{i}` (a Python loop)
    remat_policy          what the backward pass may keep of a block (`REMAT_POLICIES`)
    attention             the attention kernel (`models.attention.IMPLEMENTATIONS`)
    lora_backward         how a Dense differentiates its LoRA overlay (`LORA_BACKWARDS`)

The architecture fields come first in each model's config; `Runtime` is their common base, so a
config is `FluxConfig(depth=..., dtype="bfloat16")` as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from purecc_jax.models import attention

# Remat policies by name. Names inside the blocks that a policy may save (FLUX, SD3):
# "qkv" (projected, normed, rotated q/k/v), "attn_out" (attention output), "mlp_hidden".
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # ... and attention="xla_recompute"'s forward output and log-sum-exp, so that the backward
    # does not rerun the attention's forward (its batched dots) to rebuild them.
    "dots_no_batch_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(attention.RESIDUALS),
    ),
    "attn": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "qkv_attn_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}
# How a Dense differentiates its LoRA overlay (models/layers.py lora_delta): "explicit" writes the two
# factors' weight-gradient dots so that their large operand (the activation, the output cotangent) is
# read in place, where autodiff's form makes XLA:CPU copy it transposed, with the elementwise chain that
# produced it fused into the copy (benchmarks/README.md); "autodiff" is jax's own. Same products and
# sums, different rounding.
LORA_BACKWARDS = ("explicit", "autodiff")
FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention", "lora_backward")
SCANNED = 0  # `layer_stack` in_axes: the argument has one row per block
BROADCAST = nn.broadcast  # `layer_stack` in_axes: every block sees the whole argument


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """The runtime fields of a model config (keyword-only, after the architecture's fields)."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "xla"
    lora_backward: str = "explicit"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {attention.IMPLEMENTATIONS}")
        if self.lora_backward not in LORA_BACKWARDS:
            raise ValueError(f"lora_backward {self.lora_backward!r} is not one of {LORA_BACKWARDS}")

    def runtime(self) -> dict[str, Any]:
        """This config's runtime fields, e.g. to load another checkpoint the same way."""
        return {k: getattr(self, k) for k in FIELDS}


def select(config_cls: type, runtime: dict[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The entries of `runtime` that `config_cls` has as fields (of `keys` only, when given)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in runtime.items() if k in fields and (keys is None or k in keys)}


def remat(block_cls: type[nn.Module], policy: str, scanned: bool = False) -> type[nn.Module]:
    """`block_cls` rematerialised under `policy` (unchanged for "none")."""
    if policy == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


def layer_stack(block_cls: type[nn.Module], config: Runtime, length: int, name: str,
                in_axes: Sequence[Any] = ()) -> Callable[..., Any]:
    """`length` blocks `block(carry, *args) -> (carry, _)` as one nn.scan or a Python loop.

    `in_axes` gives, per argument after the carry, SCANNED (one row per block: e.g. FLUX's per-block
    concept vectors; None passes None to every block) or BROADCAST (the same for every block).
    `config.remat_policy` picks what the backward pass may keep.
    """
    block_cls = remat(block_cls, config.remat_policy, config.scan_layers)
    if config.scan_layers:
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0, "lora": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=tuple(in_axes),
            length=length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config, name=name)
        return lambda carry, *args: scanned(carry, *args)[0]

    blocks = [block_cls(config, name=f"{name}_{i}") for i in range(length)]

    def run(carry, *args):
        for i, block in enumerate(blocks):
            row = [a if axis is BROADCAST or a is None else a[i] for a, axis in zip(args, in_axes)]
            carry, _ = block(carry, *row)
        return carry

    return run
