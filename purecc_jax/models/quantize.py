"""Weight-only quantization of the frozen FLUX weights (QLoRA-style): int8 or fp8 with per-output-channel scales.

`quantize(params, mode)` replaces every Dense `kernel` inside the transformer blocks by its
quantized values (int8, or float8_e4m3fn) and adds a float32 `kernel_scale` of one value per output
channel (and per layer, for scanned blocks). `layers.Dense` sees the scale and computes
`(x @ q) * scale`, which equals `x @ (q * scale)` because the scale is per output column: the
weights are dequantised inside the matmul and never stored in full precision. LoRA adapters stay
float32 and are added on top, so the trainable model and the frozen extractor share one quantized
copy of the pretrained weights.

Scales: int8 `max|w| / 127` (symmetric, round to nearest), fp8 `max|w| / 448` (e4m3's largest
finite value) over each kernel's input axis. Kernels outside the blocks (img_in, txt_in, the
timestep/guidance/pooled embedders, final_mod, final_out; 0.6% of FLUX.1-dev's parameters) stay in
their dtype, as do biases and norm scales.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

MODES = ("none", "int8", "fp8")
SCALE = "kernel_scale"
_QMAX = {"int8": 127.0, "fp8": 448.0}
_DTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
BLOCKS = re.compile(r"^(double|single)_blocks(_\d+)?/")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.base_quantization={mode!r} is not one of {MODES}")
    return mode


def quantize_kernel(kernel: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """(q, scale) with kernel ≈ q * scale; kernel (..., in, out), scale (..., out) float32."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / _QMAX[mode], 1.0)
    scaled = w / scale[..., None, :]
    if mode == "int8":
        return jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8), scale
    return scaled.astype(_DTYPE[mode]), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


def is_quantized(params: Any) -> bool:
    return any(path[-1] == SCALE for path in traverse_util.flatten_dict(params))


def _targets(flat: dict) -> list[tuple[str, ...]]:
    return [p for p, v in flat.items() if p[-1] == "kernel" and BLOCKS.search("/".join(p)) and v.ndim >= 2]


def _scale_sharding(kernel_sharding: Any, ndim: int) -> Any:
    if not isinstance(kernel_sharding, NamedSharding):
        return kernel_sharding
    spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))
    return NamedSharding(kernel_sharding.mesh, PartitionSpec(*spec[:-2], spec[-1]))


def quantize(params: Any, mode: str) -> Any:
    """`params` with the block kernels quantized (see module doc); `mode` "none" returns them as they are.

    Works on arrays (each kernel quantized under jit, keeping its sharding; the scale follows the
    kernel's output axis) and on ShapeDtypeStructs (abstract, for AOT memory analysis).
    """
    if check_mode(mode) == "none":
        return params
    if is_quantized(params):
        raise ValueError("quantize: these parameters are already quantized")
    flat = dict(traverse_util.flatten_dict(params))
    for path in _targets(flat):
        kernel = flat[path]
        if isinstance(kernel, jax.ShapeDtypeStruct):
            q, s = jax.eval_shape(lambda k: quantize_kernel(k, mode), kernel)
            sh = getattr(kernel, "sharding", None)
            q = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=sh)
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=None if sh is None else _scale_sharding(sh, kernel.ndim))
        else:
            sh = kernel.sharding
            q, s = jax.jit(lambda k: quantize_kernel(k, mode),
                           out_shardings=(sh, _scale_sharding(sh, kernel.ndim)))(kernel)
        flat[path], flat[path[:-1] + (SCALE,)] = q, s
    return traverse_util.unflatten_dict(flat)
