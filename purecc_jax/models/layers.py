"""Building blocks shared by the Flax models: Dense with a LoRA overlay, norms, RoPE,
timestep embeddings.

Precision policy: matmuls run in the module's compute `dtype`; normalisation statistics,
RoPE rotations and the timestep sinusoids always run in float32 and are cast back.

LoRA overlay: a `Dense` looks for variables `a` (in, r) and `b` (r, out) in the `lora`
collection. If they are present it adds `(x @ a) @ b` to its output. The base kernel is
never touched, so the frozen extractor and the trainable model can share one copy of the
pretrained weights and differ only in the `lora` collection they are applied with.
Its backward is `lora_delta`'s explicit one, or autodiff's where the model's config says
`lora_backward="autodiff"` (runtime.LORA_BACKWARDS).

Quantized base: if the `params` collection holds a `kernel_scale` next to the kernel (an int8 or
fp8 kernel from `models/quantize.py`), the output is scaled per output channel after the dot.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from purecc_jax import sharding

Dtype = Any
LORA = "lora"
# Logical axis names of the main activations (sharding.DEFAULT_RULES maps them to the mesh).
BTD = ("act_batch", "act_seq", "act_embed")
BTHD = ("act_batch", "act_seq", "act_heads", "act_head_dim")
BTM = ("act_batch", "act_seq", "act_mlp")
QUANT_SCALE = "kernel_scale"  # see models/quantize.py
# How a Dense differentiates its LoRA overlay (runtime.LORA_BACKWARDS), set for the Dense layers of a
# model call by `lora_backward_from_config`.
_LORA_BACKWARD: contextvars.ContextVar[str] = contextvars.ContextVar("lora_backward", default="explicit")


def lora_backward_from_config(method: Callable[..., Any]) -> Callable[..., Any]:
    """A model's `__call__` with every Dense under it differentiating LoRA as `self.config.lora_backward` says.

    Put it under `nn.compact`. The Dense layers read the setting when they are traced, which happens
    inside the call (nn.scan and nn.remat trace their bodies there too).
    """

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        token = _LORA_BACKWARD.set(self.config.lora_backward)
        try:
            return method(self, *args, **kwargs)
        finally:
            _LORA_BACKWARD.reset(token)

    return call


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh); see sharding.fit_spec."""
    return sharding.constrain(x, names)


class Dense(nn.Module):
    """y = x @ kernel + bias (+ LoRA), with logical axis names on both parameters.

    Kernels are (in, out), the transpose of torch.nn.Linear's (out, in).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.has_variable("params", QUANT_SCALE):
            # A weight-only quantized kernel (models/quantize.py): per-output-channel scale after the dot.
            y = y * self.get_variable("params", QUANT_SCALE).astype(self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        if self.has_variable(LORA, "a"):
            a = self.get_variable(LORA, "a").astype(self.dtype)
            b = self.get_variable(LORA, "b").astype(self.dtype)
            if _LORA_BACKWARD.get() == "explicit":
                y = y + lora_delta(x, a, b)
            else:
                y = y + jnp.dot(jnp.dot(x, a), b)
        return y


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b, whose backward keeps the large operands of its weight-gradient dots in place.

    Autodiff writes the factors' gradients as x^T (g b^T) and h^T g with the activation x and the
    output cotangent g as the transposed operand; on XLA:CPU a dot whose activation operand contracts
    over (batch, tokens) gets a transposing copy of it, and XLA fuses the elementwise chain that
    produced the activation into that copy. Here the small (tokens x rank) operand is the transposed
    one: db = h^T g, da = (gh^T x)^T. Same products and sums as autodiff's, rounded differently.
    """
    return jnp.dot(jnp.dot(x, a), b)


def _lora_delta_fwd(x, a, b):
    h = jnp.dot(x, a)
    return jnp.dot(h, b), (x, a, b, h)


def _lora_delta_bwd(residuals, g):
    x, a, b, h = residuals
    last = g.ndim - 1
    tokens = tuple(range(last))
    db = jax.lax.dot_general(h, g, ((tokens, tokens), ((), ())))  # (rank, out)
    gh = jax.lax.dot_general(g, b, (((last,), (1,)), ((), ())))  # (..., rank)
    da = jax.lax.dot_general(gh, x, ((tokens, tokens), ((), ()))).T  # (in, rank)
    dx = jax.lax.dot_general(gh, a, (((last,), (1,)), ((), ())))  # (..., in)
    return dx, da, db


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (torch.nn.RMSNorm), computed in float32."""

    eps: float = 1e-6
    axis_name: str = "head_dim"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, cos half first (diffusers `flip_sin_to_cos=True`, shift 0).

    `t` is used as given; FLUX callers pass `1000 * t` with t in [0, 1].
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_frequencies(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables of shape (S, sum(axes_dim)) for position ids (S, n_axes).

    Each axis contributes axes_dim[i] / 2 frequencies; every value is repeated for the
    two members of an adjacent pair (diffusers `repeat_interleave_real=True`).
    """
    ids = ids.astype(jnp.float32)
    angles = []
    for i, dim in enumerate(axes_dim):
        inv_freq = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
        angles.append(ids[:, i, None] * inv_freq[None, :])
    angle = jnp.repeat(jnp.concatenate(angles, axis=-1), 2, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (x[2i], x[2i+1]) of x (B, S, H, D) in float32."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    hidden: int
    in_axis: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.hidden, (self.in_axis, "mlp"), name="in_layer", **kw)(x)
        x = nn.silu(x)
        return Dense(self.hidden, ("mlp", "embed"), name="out_layer", **kw)(x)


class Modulation(nn.Module):
    """AdaLN modulation: Linear(SiLU(vec)) split into `chunks` (B, 1, D) arrays."""

    chunks: int
    hidden: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = Dense(self.chunks * self.hidden, ("embed", "modulation"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="lin")(nn.silu(vec))
        return jnp.split(out[:, None, :], self.chunks, axis=-1)


class MLP(nn.Module):
    """The transformer blocks' feed-forward: Linear, tanh-GELU, Linear (`config`: hidden_size, mlp_hidden, dtypes)."""

    config: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = Dense(c.mlp_hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = checkpoint_name(constrain(nn.gelu(h, approximate=True), BTM), "mlp_hidden")
        return Dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
