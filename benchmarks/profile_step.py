r"""Where the JAX train step's time goes on the CPU backend, by kind of operation.

    python -m benchmarks.profile_step                                   # PureCC stage B, width 256 (2+4 blocks)
    python -m benchmarks.profile_step --size=8x64:4+8 --stage=cc --attention=xla_recompute

Builds the step as `benchmarks.versus_torch` does, with its flags (`--size` HEADSxHEAD_DIM:DOUBLE+SINGLE,
default 4x64:2+4; `--batch`, `--img_tokens`, `--remat`, `--attention`, ...), traces
`--traced_steps` steps with `jax.profiler` (XLA:CPU's per-operation trace events switched on), reads the
optimised HLO that XLA dumps beside it, and sums the time of every operation into one of:

  dense dots       matmuls of the projections and MLPs (2-D operands)
  attention dots   the batched (batch, heads, seq, ...) matmuls of attention, with what XLA fused into them
  LoRA-only dots   matmuls with a rank-sized dimension and nothing else in their fusion
  zero-fill        broadcasts of a constant (the stacked residual buffers of a scan, zeroed every call)
  scan slicing     dynamic-slice / dynamic-update-slice fusions (reading and writing those buffers)
  copies           copy and transpose fusions (layout changes)
  other            every other fusion (elementwise, reductions)

Shares are of the summed operation time (both cores' operations added, so it exceeds wall time);
tracing slows the step, so the untraced step time is printed beside it. Per kind, the FLOPs of its dots
(from the HLO's dot shapes, times the calls the trace saw; a remat policy's recomputed dots included) and
the speed they imply if the kind takes its traced share of the untraced step time (an estimate: it says
whether a kind's dots run near the speed `jnp.dot` reaches alone, not an exact figure). `--top` lists the most
expensive operations with their shapes. The categories come from the operations' names and the dot
shapes in the HLO, so they are a reading aid for XLA:CPU (jaxlib 0.10), not an exact accounting.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import app, flags

from benchmarks import versus_torch  # its flags size the step: --batch, --img_tokens, --remat, --attention, ...
from benchmarks.hlo_text import (computations, dot_flops, dot_shapes, instruction, instruction_shapes,
                                 instructions)
from benchmarks.report import median_seconds

_STAGE = flags.DEFINE_enum("stage", "purecc", ["cc", "purecc"], "cc (DreamBooth-LoRA) or purecc (stage B)")
_STEPS = flags.DEFINE_integer("traced_steps", 3, "traced steps (after 2 untimed and 3 timed untraced ones)")
_TOP = flags.DEFINE_integer("top", 12, "most expensive operations to list")
_DIR = flags.DEFINE_string("dir", None, "where the trace and the HLO dump go (default: a temporary folder)")

CATEGORIES = ("dense dots", "attention dots", "LoRA-only dots", "zero-fill", "scan slicing", "copies", "other")
_SKIP = ("$", "Thunk", "Slinky", "while", "PjitFunction")  # Python frames, executor spans, loops' own spans


def categorise(name: str, found: tuple[str, str, str] | None, rank: int) -> tuple[str, str]:
    """(category, description) of one operation of the module, from its HLO instruction (`instruction`)."""
    if found is None:
        return "other", "?"
    shape, opcode, body = found
    dots = dot_shapes(body) or ([[int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",") if d]]
                                if opcode == "dot" and "[" in shape else [])
    ops = collections.Counter(o for o in re.findall(r"= \S+ ([\w\-]+)\(", body) if o not in ("parameter", "bitcast"))
    desc = f"{shape.split('{')[0]} " + ", ".join(f"{k} x{v}" for k, v in ops.most_common(6))
    if dots:
        if all(len(s) >= 4 for s in dots):
            return "attention dots", desc
        if len(dots) == 1 and rank in dots[0] and set(ops) <= {"dot"}:
            return "LoRA-only dots", desc
        return "dense dots", desc
    if "broadcast" in name and set(ops) <= {"broadcast", "constant"}:
        return "zero-fill", desc
    if "dynamic-slice" in name or "dynamic-update-slice" in name:
        return "scan slicing", desc
    if name.startswith("copy") or name.startswith("transpose"):
        return "copies", desc
    return "other", desc


def profile(size: str, stage: str, steps: int, workdir: str) -> dict:
    """Builds and traces the step in this process; XLA_FLAGS must already ask for the trace and dump."""
    import jax

    jobs = versus_torch.JaxSteps(size, [stage])
    run = jobs.jobs[stage]
    untraced = median_seconds(run, 3, warmup=2)
    trace_dir = os.path.join(workdir, "trace")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True))
    if not found:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    events = json.load(gzip.open(found[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_SKIP):
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # ms per step
            calls[e["name"]] += 1 / steps
    dumps = sorted(glob.glob(os.path.join(workdir, "hlo", "*jit_step*cpu_after_optimizations.txt")))
    if not dumps:
        raise SystemExit(f"no optimised HLO of jit_step under {workdir}/hlo")
    return {"untraced_ms": 1e3 * untraced, "gflop": jobs.flops[stage] / 1e9,
            "per_op": dict(per_op), "calls": dict(calls), "hlo": open(dumps[-1]).read()}


def main(argv):
    del argv
    workdir = _DIR.value or tempfile.mkdtemp(prefix="profile_step_")
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true",
                                        f"--xla_dump_to={workdir}/hlo", "--xla_dump_hlo_as_text",
                                        "--xla_dump_hlo_module_re=.*jit_step.*"]).strip()
    size = flags.FLAGS.size or "4x64:2+4"
    result = profile(size, _STAGE.value, _STEPS.value, workdir)
    hlo = result["hlo"]
    comps = computations(hlo)
    shapes, index = instruction_shapes(hlo), instructions(hlo)
    totals, gflop, rows = collections.Counter(), collections.Counter(), []
    for name, ms in result["per_op"].items():
        found = instruction(name, index, comps)
        category, desc = categorise(name, found, versus_torch.LORA_RANK)
        totals[category] += ms
        if found is not None:
            gflop[category] += dot_flops(found[2], shapes) * result["calls"][name] / 1e9
        rows.append((ms, name, category, desc))
    total = sum(totals.values())
    print(f"{_STAGE.value} step, size {size}, attention {flags.FLAGS.attention}, remat {flags.FLAGS.remat}: "
          f"{result['untraced_ms']:.0f} ms untraced (trace annotations compiled in), {result['gflop']:.1f} GFLOP; "
          f"traced operations sum to {total:.0f} ms per step (trace and HLO in {workdir})")
    print()
    # A kind's speed: its dots' FLOPs (from the HLO, times the calls the trace saw) over its share of the
    # untraced step time. An estimate: shares come from the traced step and both cores' time is summed.
    print("| operations | ms per step (summed over threads) | share | dot GFLOP per step | GFLOP/s at that share of "
          "the untraced step |")
    print("|---|---|---|---|---|")
    for category in CATEGORIES:
        share = totals[category] / max(total, 1e-9)
        speed = f"{gflop[category] / (share * result['untraced_ms'] / 1e3):.0f}" if share else ""
        dots = f"{gflop[category]:.1f} | {speed}" if gflop[category] else "|"  # a kind without dots: both empty
        print(f"| {category} | {totals[category]:.0f} | {100 * share:.1f}% | {dots} |")
    print()
    print("| operation | ms per step | kind | shape, fused operations |")
    print("|---|---|---|---|")
    for ms, name, category, desc in sorted(rows, reverse=True)[:_TOP.value]:
        print(f"| {name} | {ms:.1f} | {category} | {desc} |")


if __name__ == "__main__":
    app.run(main)
