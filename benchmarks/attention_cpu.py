r"""The attention alone on the CPU: JAX's implementations against PyTorch's `scaled_dot_product_attention`.

    python -m benchmarks.attention_cpu                       # batch 2, 320 tokens, 4 and 8 heads of 64
    python -m benchmarks.attention_cpu --heads=8 --rounds=4

The train step's attention in isolation, to tell how much of the step's gap to PyTorch is the
attention's: forward and forward + backward of `purecc_jax.models.attention.attention`
(`xla`, `xla_recompute`) and of PyTorch's SDPA (its fused CPU kernel, float32), and the two
batched dots alone (q·kᵀ and P·v as `jnp.einsum` against `torch.bmm`) beside one 2-D dot of the
same FLOPs (`jnp.dot` against `torch.matmul`), so the batched dots' speed reads against the
machine's dense one. Each framework runs in its own process (as `benchmarks.versus_torch`), the
processes alternate for `--rounds` turns, and each figure is the median of the turns' medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
from absl import app, flags

from benchmarks.report import fmt_ratio, median_seconds

_HEADS = flags.DEFINE_list("heads", ["4", "8"], "attention heads (FLUX: 24; the benchmarks' widths 256 and 512: 4 and 8)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head dimension")
_SEQ = flags.DEFINE_integer("seq", 320, "tokens (image + text; the benchmarks' 256 + 64)")
_BATCH = flags.DEFINE_integer("batch", 2, "batch")
_REPS = flags.DEFINE_integer("reps", 20, "timed calls per item and turn (median)")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "alternating turns per framework")
_WORKER = flags.DEFINE_enum("worker", None, ["jax", "torch"], "internal: time one framework, print JSON")

ITEMS = ("attention forward", "attention forward + backward", "q·kᵀ batched dot", "P·v batched dot",
         "2-D dot, same FLOPs")


def _median_ms(fn, reps: int) -> float:
    return 1e3 * median_seconds(fn, reps, warmup=3)


def _inputs(heads: int):
    rng = np.random.default_rng(0)
    b, s, d = _BATCH.value, _SEQ.value, _HEAD_DIM.value
    q, k, v, g = (rng.standard_normal((b, s, heads, d), np.float32) for _ in range(4))
    probs = rng.random((b, heads, s, s), np.float32)
    return q, k, v, g, probs, rng.standard_normal((b * heads * s, d), np.float32), rng.standard_normal((d, s), np.float32)


def time_jax(heads: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from purecc_jax.models import attention as attention_lib

    q, k, v, g, probs, a2, b2 = (jnp.asarray(x) for x in _inputs(heads))
    out = {}
    for impl in ("xla", "xla_recompute"):
        fwd = jax.jit(lambda q, k, v, impl=impl: attention_lib.attention(q, k, v, impl))
        grad = jax.jit(jax.grad(lambda q, k, v, g, impl=impl: jnp.sum(attention_lib.attention(q, k, v, impl) * g),
                                argnums=(0, 1, 2)))
        out[f"{impl}|attention forward"] = _median_ms(lambda: fwd(q, k, v).block_until_ready(), reps)
        out[f"{impl}|attention forward + backward"] = _median_ms(lambda: jax.block_until_ready(grad(q, k, v, g)), reps)
    qh, kh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # (batch, heads, seq, dim), as the kernels use them
    qk = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
    pv = jax.jit(lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v))
    dot = jax.jit(jnp.dot)
    out["dots|q·kᵀ batched dot"] = _median_ms(lambda: qk(qh, kh).block_until_ready(), reps)
    out["dots|P·v batched dot"] = _median_ms(lambda: pv(probs, kh).block_until_ready(), reps)
    out["dots|2-D dot, same FLOPs"] = _median_ms(lambda: dot(a2, b2).block_until_ready(), reps)
    return out


def time_torch(heads: int, reps: int) -> dict[str, float]:
    import torch

    q, k, v, g, probs, a2, b2 = (torch.from_numpy(x) for x in _inputs(heads))
    qh, kh, vh, gh = (x.transpose(1, 2).contiguous() for x in (q, k, v, g))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    leaves = [x.clone().requires_grad_() for x in (qh, kh, vh)]

    def forward():
        with torch.no_grad():
            sdpa(qh, kh, vh)

    def backward():
        sdpa(*leaves).backward(gh)
        for x in leaves:
            x.grad = None

    b, h, s, d = qh.shape
    q3, k3, p3 = qh.reshape(b * h, s, d), kh.reshape(b * h, s, d), probs.reshape(b * h, s, s)
    return {"sdpa|attention forward": _median_ms(forward, reps),
            "sdpa|attention forward + backward": _median_ms(backward, reps),
            "dots|q·kᵀ batched dot": _median_ms(lambda: torch.bmm(q3, k3.transpose(1, 2)), reps),
            "dots|P·v batched dot": _median_ms(lambda: torch.bmm(p3, k3), reps),
            "dots|2-D dot, same FLOPs": _median_ms(lambda: torch.matmul(a2, b2), reps)}


def flops(item: str, heads: int) -> float:
    """Each item's dot FLOPs: one (batch, heads, seq, seq, dim) dot, two for the forward, six for forward +
    backward (the backward's four dots; a recomputed q·kᵀ is not counted, so every column counts the same)."""
    one = 2.0 * _BATCH.value * heads * _SEQ.value * _SEQ.value * _HEAD_DIM.value
    return {"attention forward": 2 * one, "attention forward + backward": 6 * one}.get(item, one)


def main(argv):
    del argv
    heads = [int(h) for h in _HEADS.value]
    if _WORKER.value:
        timer = time_jax if _WORKER.value == "jax" else time_torch
        print(json.dumps({h: timer(h, _REPS.value) for h in heads}))
        return
    runs = {"jax": [], "torch": []}
    for r in range(_ROUNDS.value):
        for fw in (["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.attention_cpu", f"--worker={fw}",
                                   f"--heads={','.join(_HEADS.value)}", f"--head_dim={_HEAD_DIM.value}",
                                   f"--seq={_SEQ.value}", f"--batch={_BATCH.value}", f"--reps={_REPS.value}"],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"the {fw} worker failed:\n{proc.stderr[-3000:]}")
            runs[fw].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def ms(fw: str, heads_: int, name: str) -> float:
        return statistics.median(run[str(heads_)][name] for run in runs[fw])

    print(f"batch {_BATCH.value}, {_SEQ.value} tokens, head dim {_HEAD_DIM.value}, float32; median ms of "
          f"{_ROUNDS.value} alternating turns per framework (GFLOP/s of the dots in brackets)\n")
    print("| heads | item | JAX `xla` | JAX `xla_recompute` | PyTorch SDPA | best JAX / PyTorch |")
    print("|---|---|---|---|---|---|")
    for h in heads:
        for item in ITEMS[:2]:
            cell = lambda t, item=item, h=h: f"{t:.2f} ({fmt_ratio(flops(item, h), t * 1e6, '.0f')})"
            xla, rec = ms("jax", h, f"xla|{item}"), ms("jax", h, f"xla_recompute|{item}")
            sd = ms("torch", h, f"sdpa|{item}")
            print(f"| {h} | {item} | {cell(xla)} | {cell(rec)} | {cell(sd)} | **{fmt_ratio(min(xla, rec), sd)}** |")
    print("\n| heads | dot | jnp | torch | jnp / torch time |")
    print("|---|---|---|---|---|")
    for h in heads:
        for item in ITEMS[2:]:
            cell = lambda t, item=item, h=h: f"{t:.3f} ms ({fmt_ratio(flops(item, h), t * 1e6, '.0f')} GFLOP/s)"
            j, t = ms("jax", h, f"dots|{item}"), ms("torch", h, f"dots|{item}")
            print(f"| {h} | {item} | {cell(j)} | {cell(t)} | {fmt_ratio(j, t)} |")


if __name__ == "__main__":
    app.run(main)
