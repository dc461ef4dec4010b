"""One attention interface, several kernels.

`attention(q, k, v, implementation=...)` takes (batch, seq, heads, head_dim) arrays
and returns the same layout. Implementations:

  xla     plain XLA attention in (batch, heads, seq, head_dim) layout, logits and softmax in
          float32 (materialised); runs anywhere.
  xla_recompute
          the same forward, with FlashAttention's backward (untiled): it keeps q, k, v, the output
          and the softmax's log-sum-exp, and recomputes the probabilities from them, instead of
          keeping the (batch, heads, seq, seq) probabilities for the backward pass. Under remat
          the output and log-sum-exp are named RESIDUALS (remat policy dots_no_batch_attn keeps them).
  cudnn   cuDNN fused attention on NVIDIA GPUs (bf16/fp16 inputs).
  splash  TPU splash attention (Pallas), at any sequence length: q, k and v are padded to a
          multiple of the kernel's block and the padded keys masked out with segment ids, so
          SD3's 77 + 256 + 1024 = 1357 tokens run the kernel too. `interpret=True` runs the
          kernel on CPU.
  auto    splash on TPU, cudnn on GPU for half-precision inputs, xla_recompute otherwise (on
          the CPU backend it makes a LoRA training step 2-18% faster than xla and keeps no
          (seq, seq) residual: benchmarks/README.md).
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from purecc_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "xla_recompute", "cudnn", "splash")
# Remat name of xla_recompute's forward output and log-sum-exp: what its backward needs besides q, k, v.
RESIDUALS = "attn_residuals"
_SPLASH_BLOCKS = (512, 256, 128)

log = logging.getLogger(__name__)
_logged: set[tuple] = set()


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla", *, interpret: bool = False
) -> jax.Array:
    """Full (unmasked) multi-head attention, softmax(q k^T / sqrt(d)) v."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = _auto(q.dtype)
    if implementation == "splash":
        block = splash_block(q.shape[1], k.shape[1])
        _log_once(implementation, q, k, block)
        return _splash(q, k, v, block, interpret)
    _log_once(implementation, q, k)
    if implementation == "xla":
        return _xla(q, k, v)
    if implementation == "xla_recompute":
        return _xla_recompute(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def splash_block(q_len: int, kv_len: int) -> int:
    """The splash block size for these lengths: the one that pads them least, the larger on ties.

    Lengths that a block divides get that block unpadded (the largest such block); others are
    padded to the next multiple, e.g. 1357 -> 1408 with block 128 rather than 1536 with 512.
    """
    return min(_SPLASH_BLOCKS, key=lambda b: (_round_up(q_len, b) + _round_up(kv_len, b), -b))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _log_once(implementation: str, q, k, block: int | None = None) -> None:
    """Says, once per shape, which attention a traced program uses and whether splash pads."""
    key = (implementation, q.shape, k.shape, str(q.dtype), block)
    if key in _logged:
        return
    _logged.add(key)
    shapes = f"q {tuple(q.shape)} kv length {k.shape[1]} {q.dtype}"
    if block is None:
        log.info("attention %s: %s", implementation, shapes)
        return
    q_pad, kv_pad = _round_up(q.shape[1], block), _round_up(k.shape[1], block)
    padding = ("unpadded" if (q_pad, kv_pad) == (q.shape[1], k.shape[1])
               else f"padded to q {q_pad} kv {kv_pad}, padded keys masked")
    log.info("attention splash (block %d, %s): %s", block, padding, shapes)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # Heads-major einsums with the scale folded into q: jax.nn.dot_product_attention's XLA path
    # works on a 5-D grouped-query layout whose backward needs extra transposes and broadcasts; on
    # the CPU backend this form makes the model's forward + backward about 10% cheaper.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


def _xla_forward(q, k, v):
    """`_xla`'s forward with its log-sum-exp: (out (B, H, S, D), lse (B, H, S, 1) float32).

    The same operations as `_xla` (jax.nn.softmax's max-shifted exp over its sum), so the output has
    the same rounding; q, k, v are heads-major here.
    """
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                        preferred_element_type=jnp.float32)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", (unnormalized / total).astype(v.dtype), v)
    return out, peak + jnp.log(total)


def _xla_recompute(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # The forward runs outside the custom_vjp (no gradient flows through it), so that its output
    # and log-sum-exp are ordinary values a remat policy can save by name (RESIDUALS): a custom_vjp's
    # own residuals are invisible to jax.checkpoint, which would rerun the whole forward instead.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    out, lse = jax.lax.stop_gradient(_xla_forward(q, k, v))
    out, lse = checkpoint_name(out, RESIDUALS), checkpoint_name(lse, RESIDUALS)
    return jnp.swapaxes(_attended(q, k, v, out, lse), 1, 2)


@jax.custom_vjp
def _attended(q, k, v, out, lse):
    """`out`, given the heads-major q, k, v it was computed from; its backward is attention's."""
    del q, k, v, lse
    return out


def _attended_fwd(q, k, v, out, lse):
    return out, (q, k, v, out, lse)


def _attended_bwd(residuals, g):
    # FlashAttention's backward in one block: P = exp(s - lse), dV = P^T g, dP = g V^T,
    # dS = P (dP - rowsum(g * out)), dQ = dS K scale, dK = dS^T (Q scale).
    q, k, v, out, lse = residuals
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    qs = q * scale
    probs = jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", qs, k, preferred_element_type=jnp.float32) - lse)
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), g)
    dprobs = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
    rowdot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dlogits = (probs * (dprobs - rowdot)).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", dlogits, k) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", dlogits, qs)
    return dq, dk, dv, jnp.zeros_like(out), jnp.zeros_like(lse)


_attended.defvjp(_attended_fwd, _attended_bwd)


def _auto(dtype) -> str:
    platform = jax.devices()[0].platform
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla_recompute"


# Not cached: the kernel holds its mask's arrays as made in the trace that builds it (jnp arrays, so
# tracers under jit), which a later trace must not meet. The mask processing itself is cached by Pallas.
def _splash_kernel(heads: int, q_len: int, kv_len: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, block: int, interpret: bool) -> jax.Array:
    def local(q, k, v):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        q_len, kv_len = q.shape[1], k.shape[1]
        q_pad, kv_pad = _round_up(q_len, block), _round_up(kv_len, block)
        pad = lambda x, n: x if n == x.shape[1] else jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
        q, k, v = pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad)
        segments = None
        if kv_pad != kv_len:
            # Keys past kv_len get segment 0, every query segment 1: no query attends to padding,
            # and every query row (padded ones too, sliced away below) keeps real keys to attend to.
            segments = SegmentIds(q=np.ones((q_pad,), np.int32), kv=(np.arange(kv_pad) < kv_len).astype(np.int32))
        kernel = _splash_kernel(q.shape[2], q_pad, kv_pad, block, interpret)
        run = lambda q, k, v: jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
        if jnp.dtype(q.dtype).itemsize == 2:
            run = _default_precision(run)
        scale = 1.0 / math.sqrt(q.shape[-1])
        to_hsd = lambda x: jnp.swapaxes(x, 1, 2)  # (B, S, H, D) -> (B, H, S, D)
        out = run(to_hsd(q * jnp.asarray(scale, q.dtype)), to_hsd(k), to_hsd(v))
        return jnp.swapaxes(out, 1, 2)[:, :q_len].astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v)
    # Batch and heads split as the activations around it are (the logical rules, only the mesh axes that
    # divide them: a batch of 2 on 4 chips is not refused); every device runs the kernel on its block.
    rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
    spec = sharding.fit_spec(q.shape, ("act_batch", None, "act_heads", None), rules, dict(mesh.shape))
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _default_precision(f):
    """`f` traced at the default matmul precision, its backward pass included.

    Mosaic refuses a float32 contract precision on 16-bit operands (whose products float32 holds
    exactly anyway), so a global jax_default_matmul_precision="highest" (the tests set it) must not
    reach the kernel; the backward kernels are traced when the gradient is, hence the custom_vjp.
    """
    default = functools.partial(jax.default_matmul_precision, "default")

    @jax.custom_vjp
    def g(*args):
        with default():
            return f(*args)

    def forward(*args):
        with default():
            return jax.vjp(f, *args)

    def backward(vjp, cotangent):
        with default():
            return vjp(cotangent)

    g.defvjp(forward, backward)
    return g


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 numpy attention, for tests."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)
