r"""The JAX train step against the PyTorch one (`benchmarks.torch_reference`), side by side, one command.

    python -m benchmarks.versus_torch                      # widths 256 (2+4 blocks) and 512 (4+8), cc and purecc
    python -m benchmarks.versus_torch --sizes=4x64:2+4 --steps=3 --warmup=1

Both steps use the same config as `python -m benchmarks.step_cost`'s default (FLUX structure,
T5 width 4096, CLIP 768, batch 2, 256 image + 64 text tokens, LoRA rank 4 on the attention
projections, float32). Per size, the four steps (JAX and PyTorch, DreamBooth-LoRA and PureCC
stage B) run interleaved, one call each per round in a rotating order, so load from other
processes hits them alike; ratios are medians of per-round ratios.

In the same run, `jnp.dot` and `torch.matmul` are timed at the model's matmul shapes (the
machine's own matmul peak), and the JAX step's counted FLOPs (XLA's cost analysis of the
unscanned step) over its median time give the fraction of the `jnp.dot` peak the step reaches.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

from benchmarks.report import fmt, fmt_ratio
from benchmarks.step_inputs import Shapes, Variant, compiled_step, pretrained, step_flops
from benchmarks.torch_reference import TorchSize, TorchStep
from purecc_jax import sharding
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig, preset

_SIZES = flags.DEFINE_list("sizes", ["4x64:2+4", "8x64:4+8"], "model sizes, HEADSxHEAD_DIM:DOUBLE+SINGLE")
_STAGES = flags.DEFINE_list("stages", ["cc", "purecc"], "steps: cc (DreamBooth-LoRA), purecc (stage B)")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step (B)")
_IMG = flags.DEFINE_integer("img_tokens", 256, "packed image tokens")
_TXT = flags.DEFINE_integer("txt_tokens", 64, "T5 tokens")
_REMAT = flags.DEFINE_string("remat", "none", "JAX remat policy (purecc_jax.models.runtime.REMAT_POLICIES)")
_STEPS = flags.DEFINE_integer("steps", 8, "timed rounds per size")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed rounds first")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 5, "timed calls per matmul shape (median)")


def parse_size(text: str) -> tuple[int, int, int, int]:
    """'HEADSxHEAD_DIM:DOUBLE+SINGLE' -> (heads, head_dim, depth, depth_single)."""
    try:
        width, blocks = text.split(":")
        heads, head_dim = (int(v) for v in width.split("x"))
        depth, single = (int(v) for v in blocks.split("+"))
    except ValueError:
        raise ValueError(f"--sizes entry {text!r} is not HEADSxHEAD_DIM:DOUBLE+SINGLE, e.g. 4x64:2+4") from None
    if head_dim % 32:
        raise ValueError(f"--sizes entry {text!r}: head_dim must be a multiple of 32 (RoPE axes d/8, 7d/16, 7d/16, "
                         "each even)")
    return heads, head_dim, depth, single


def jax_config(heads: int, d: int, depth: int, single: int) -> FluxConfig:
    return preset("flux-dev", num_heads=heads, head_dim=d, axes_dim=(d // 8, 7 * d // 16, 7 * d // 16), depth=depth,
                  depth_single=single, dtype="float32", param_dtype="float32", remat_policy=_REMAT.value)


def matmul_shapes(cfg: FluxConfig, shapes: Shapes) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's large matmuls at batch B: q/k/v/out, MLP in/out, single-block in/out, T5 in."""
    d, h = cfg.hidden_size, cfg.mlp_hidden
    tokens = shapes.batch * (shapes.img_tokens + shapes.txt_tokens)
    return [(tokens, d, d), (tokens, d, h), (tokens, h, d), (tokens, d, 3 * d + h), (tokens, d + h, d),
            (shapes.batch * shapes.txt_tokens, cfg.context_dim, d)]


def time_matmuls(mnk: list[tuple[int, int, int]], reps: int) -> list[tuple[tuple[int, int, int], float, float]]:
    """GFLOP/s of jnp.dot and torch.matmul (float32) per shape, interleaved."""
    out = []
    for m, k, n in mnk:
        a, b = np.random.default_rng(0).standard_normal((2, max(m, k), max(k, n)), dtype=np.float32)
        ja, jb = jnp.asarray(a[:m, :k]), jnp.asarray(b[:k, :n])
        ta, tb = torch.from_numpy(np.ascontiguousarray(a[:m, :k])), torch.from_numpy(np.ascontiguousarray(b[:k, :n]))
        jdot = jax.jit(jnp.dot)
        jdot(ja, jb).block_until_ready()
        torch.matmul(ta, tb)
        tj, tt = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            jdot(ja, jb).block_until_ready()
            tj.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.matmul(ta, tb)
            tt.append(time.perf_counter() - t0)
        flops = 2.0 * m * k * n
        out.append(((m, k, n), flops / statistics.median(tj) / 1e9, flops / statistics.median(tt) / 1e9))
    return out


def main(argv):
    del argv
    torch.set_num_threads(os.cpu_count())
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} ({dev.platform}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} host cores, load average {os.getloadavg()[0]:.2f}")
    shapes = Shapes(_BATCH.value, _IMG.value, _TXT.value)
    lcfg = lora_lib.LoRAConfig(rank=4, alpha=4.0)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows, dots = [], []
    for size in _SIZES.value:
        heads, d, depth, single = parse_size(size)
        cfg = jax_config(heads, d, depth, single)
        label = f"width {cfg.hidden_size}, {depth}+{single} blocks"
        print(f"\n{label}: compiling ...", flush=True)
        params, jobs, flops = pretrained(cfg, mesh), {}, {}
        for stage in _STAGES.value:
            compiled, x = compiled_step(cfg, Variant(stage), lcfg, shapes, mesh, params)
            flops[stage] = step_flops(cfg, Variant(stage), lcfg, shapes, mesh)

            def run_jax(compiled=compiled, x=x):
                x.state, metrics = compiled(x.state, x.frozen, x.batch)
                return metrics["loss"]

            jobs[("jax", stage)] = run_jax
            jobs[("torch", stage)] = TorchStep(stage, TorchSize(heads, d, depth, single, shapes.batch,
                                                               shapes.img_tokens, shapes.txt_tokens, lcfg.rank))
        names, times = list(jobs), {k: [] for k in jobs}
        for r in range(_WARMUP.value + _STEPS.value):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                loss = float(jax.block_until_ready(jobs[name]()))
                if not np.isfinite(loss):
                    raise FloatingPointError(f"{name} at {label}: loss {loss}")
                if r >= _WARMUP.value:
                    times[name].append(time.perf_counter() - t0)
        for stage in _STAGES.value:
            tj, tt = times[("jax", stage)], times[("torch", stage)]
            ratio = statistics.median(a / b for a, b in zip(tj, tt))
            rows.append((stage, label, statistics.median(tt), statistics.median(tj), ratio, flops[stage]))
        dots += time_matmuls(matmul_shapes(cfg, shapes), _MATMUL_REPS.value)

    peak = max(j for _, j, _ in dots)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {_STEPS.value} timed rounds after {_WARMUP.value} warm-up\n")
    print("| step | size | PyTorch eager ms | JAX ms | JAX / PyTorch | JAX GFLOP | JAX GFLOP/s | of jnp.dot peak |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"cc": "DreamBooth-LoRA", "purecc": "PureCC stage B"}
    for stage, label, tt, tj, ratio, fl in rows:
        print(f"| {names[stage]} | {label} | {1e3 * tt:.0f} | {1e3 * tj:.0f} | **{fmt(ratio)}** | {fl / 1e9:.1f} | "
              f"{fmt_ratio(fl, tj * 1e9, '.0f')} | {fmt_ratio(100 * fl, tj * 1e9 * peak, '.0f')}% |")
    print("\n| matmul m x k x n (float32) | jnp.dot GFLOP/s | torch.matmul GFLOP/s |")
    print("|---|---|---|")
    for (m, k, n), j, t in dots:
        print(f"| {m} x {k} x {n} | {j:.0f} | {t:.0f} |")
    print(f"\njnp.dot peak in this run: {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    app.run(main)
