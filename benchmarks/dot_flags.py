r"""`jnp.dot` under XLA:CPU's dot libraries against `torch.matmul`, at the model's matmul shapes.

    python -m benchmarks.dot_flags                     # widths 256 and 512, every variant below
    python -m benchmarks.dot_flags --widths=256 --variants=default,eigen

XLA:CPU hands a dot to one of several libraries, chosen by XLA_FLAGS, which a process reads once:
so every variant runs in its own subprocess, one after the other, and PyTorch in this one. Each
shape is timed as `x @ W` ("nn"), as `g @ W^T` with `W` stored (in, out) ("nt", the input
gradient's transposed kernel) and as `x^T @ g` with `x` stored (tokens, features) ("tn", the
LoRA/weight gradient's transposed operand). Prints GFLOP/s per shape and variant (median of
`--reps` calls), and each variant's median over the shapes relative to PyTorch's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
from absl import app, flags

from benchmarks.report import fmt, fmt_ratio, median_seconds

LAYOUTS = ("nn", "nt", "tn")
VARIANTS = {
    "default": "",  # YNNPACK dots (jaxlib 0.10)
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK off: Eigen's dot kernels
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusion": "--xla_cpu_experimental_onednn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=",
    "xnnpack": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot "
               "--xla_cpu_experimental_ynn_fusion_type=",
}

_WIDTHS = flags.DEFINE_list("widths", ["256", "512"], "model widths (MLP 4x, T5 4096, batch 2 x 320 tokens)")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"XLA dot variants: {', '.join(VARIANTS)}")
_TOKENS = flags.DEFINE_integer("tokens", 640, "rows of the activations (batch x (image + text tokens))")
_REPS = flags.DEFINE_integer("reps", 15, "timed calls per shape (median)")
_WORKER = flags.DEFINE_string("worker", "", "internal: time jnp.dot at these JSON shapes and print JSON")


def shapes(widths: list[int], tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n): q/k/v/out, MLP in and out, fused single-block in and out, per width."""
    out = []
    for d in widths:
        out += [(tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d), (tokens, d, 7 * d), (tokens, 5 * d, d)]
    return out


def _median_gflops(fn, flop: float, reps: int) -> float:
    return flop / median_seconds(fn, reps, warmup=1) / 1e9  # rounded only when printed (report.fmt)


def _operands(m: int, k: int, n: int):
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)


def time_jax(mkn: list[tuple[int, int, int]], reps: int) -> list[dict[str, float]]:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    nn, nt, tn = jax.jit(lambda a, b: a @ b), jax.jit(lambda a, bt: a @ bt.T), jax.jit(lambda at, b: at.T @ b)
    out = []
    for m, k, n in mkn:
        a, b = _operands(m, k, n)
        ja, jat, jb = jnp.asarray(a), jnp.asarray(np.ascontiguousarray(a.T)), jnp.asarray(b)
        jbt = jnp.asarray(np.ascontiguousarray(b.T))
        out.append({"nn": _median_gflops(lambda: nn(ja, jb).block_until_ready(), 2.0 * m * k * n, reps),
                    "nt": _median_gflops(lambda: nt(ja, jbt).block_until_ready(), 2.0 * m * k * n, reps),
                    "tn": _median_gflops(lambda: tn(jat, jb).block_until_ready(), 2.0 * m * k * n, reps)})
    return out


def time_torch(mkn: list[tuple[int, int, int]], reps: int) -> list[dict[str, float]]:
    import torch

    torch.set_num_threads(os.cpu_count())
    out = []
    for m, k, n in mkn:
        a, b = (torch.from_numpy(x) for x in _operands(m, k, n))
        at, bt = a.T.contiguous(), b.T.contiguous()
        out.append({"nn": _median_gflops(lambda: a @ b, 2.0 * m * k * n, reps),
                    "nt": _median_gflops(lambda: a @ bt.T, 2.0 * m * k * n, reps),
                    "tn": _median_gflops(lambda: at.T @ b, 2.0 * m * k * n, reps)})
    return out


def main(argv):
    del argv
    if _WORKER.value:
        print(json.dumps(time_jax([tuple(s) for s in json.loads(_WORKER.value)], _REPS.value)))
        return
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    mkn = shapes([int(w) for w in _WIDTHS.value], _TOKENS.value)
    results = {"torch.matmul": time_torch(mkn, _REPS.value)}
    for name in _VARIANTS.value:
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip())
        proc = subprocess.run([sys.executable, "-m", "benchmarks.dot_flags", f"--worker={json.dumps(mkn)}",
                               f"--reps={_REPS.value}"], capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise SystemExit(f"variant {name} ({VARIANTS[name]!r}) failed:\n{proc.stderr[-3000:]}")
        results[f"jnp.dot {name}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    names = list(results)
    print(f"CPU: {os.cpu_count()} cores; variants' XLA_FLAGS: " +
          "; ".join(f"{n}: `{VARIANTS[n] or '(none)'}`" for n in _VARIANTS.value))
    print()
    print("| m x k x n | operands | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, (m, k, n) in enumerate(mkn):
        for layout in LAYOUTS:
            print(f"| {m} x {k} x {n} | {layout} | " + " | ".join(fmt(results[x][i][layout], ".0f") for x in names) + " |")
    print()
    print("\n".join(summary_table(results)))


def summary_table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Each variant's median GFLOP/s over the shapes and its ratio to torch.matmul's (n/a if that is 0)."""
    lines = ["| variant | median GFLOP/s over shapes | / torch.matmul |", "|---|---|---|"]
    ref = statistics.median(r[layout] for r in results["torch.matmul"] for layout in LAYOUTS)
    for x, rows in results.items():
        med = statistics.median(r[layout] for r in rows for layout in LAYOUTS)
        lines.append(f"| {x} | {fmt(med, '.0f')} | {fmt_ratio(med, ref)} |")
    return lines


if __name__ == "__main__":
    app.run(main)
