r"""Two settings of the JAX train step against each other, in one process, interleaved.

    python -m benchmarks.jax_ab --sizes=8x64:4+8 --attention=xla_recompute --remat=dots_no_batch_attn \
        --host_devices=2 --allocator=tcmalloc --a=lora_backward=autodiff --b=lora_backward=explicit

Builds the JAX steps of `benchmarks.versus_torch` (its flags size and configure both: `--sizes`,
`--stages`, `--batch`, `--remat`, `--attention`, `--lora_backward`, `--host_devices`, ...) twice in
this process: setting A with the flags changed by `--a` (`FLAG=VALUE`, comma-separated), setting B
with `--b`. After a warm-up it times `--rounds` rounds; each round runs `--steps` steps of A and of B
(the fastest step of each kept), alternating which goes first. Printed per stage and size: A's and
B's median ms and the per-round ratio B / A (median, min, max).

Separate harness runs drift apart by 5-15% on a shared VM (benchmarks/README.md); rounds that
alternate in one process see the same machine, so a change of a few percent shows as a ratio
whose every round is on one side of 1. `--allocator=tcmalloc` reruns this process under tcmalloc.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

from benchmarks import versus_torch
from benchmarks.report import call_seconds

_A = flags.DEFINE_list("a", [], "setting A: FLAG=VALUE changes to the versus_torch flags, e.g. remat=dots_no_batch")
_B = flags.DEFINE_list("b", [], "setting B, the same way")
FLAGS = flags.FLAGS
_RAN_UNDER = "PURECC_JAX_AB_ALLOCATOR"


def setting(changes: list[str]) -> dict[str, str]:
    """`FLAG=VALUE` items as a dict, each FLAG one of versus_torch's JAX flags."""
    allowed = ("remat", "attention", "lora_backward", "scan_layers")
    out = {}
    for item in changes:
        name, sep, value = item.partition("=")
        if not sep or name not in allowed:
            raise app.UsageError(f"--a/--b item {item!r}: expected FLAG=VALUE with FLAG one of {allowed}")
        out[name] = value
    return out


def build(size: str, changes: dict[str, str]) -> versus_torch.JaxSteps:
    saved = {name: FLAGS[name].value for name in changes}
    try:
        for name, value in changes.items():
            FLAGS[name].parse(value)
        return versus_torch.JaxSteps(size, list(FLAGS.stages))
    finally:
        for name, value in saved.items():
            FLAGS[name].value = value


def describe(changes: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "the flags as given"


def main(argv):
    del argv
    if FLAGS.allocator == "tcmalloc" and os.environ.get(_RAN_UNDER) != "tcmalloc":
        env = versus_torch.allocator_env(dict(os.environ, **{_RAN_UNDER: "tcmalloc"}))
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.jax_ab", *sys.argv[1:]], env)
    a, b = setting(_A.value), setting(_B.value)
    print(f"{versus_torch.machine()}; JAX steps of benchmarks.versus_torch, remat {FLAGS.remat}, attention "
          f"{FLAGS.attention}, LoRA backward {FLAGS.lora_backward}, {FLAGS.host_devices} CPU device(s), allocator "
          f"{versus_torch.allocator_name()}; A: {describe(a)}; "
          f"B: {describe(b)}; {FLAGS.rounds} alternating rounds, the fastest of {FLAGS.steps} steps each")
    print("\n| step | size | A ms | B ms | B / A per round: median [min, max] |")
    print("|---|---|---|---|---|")
    for size in FLAGS.sizes:
        steps = [build(size, a), build(size, b)]
        for job in steps:
            for stage in FLAGS.stages:
                call_seconds(job.jobs[stage], 0, warmup=FLAGS.warmup)
        times = {(i, stage): [] for i in range(2) for stage in FLAGS.stages}
        for r in range(FLAGS.rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                for stage in FLAGS.stages:
                    times[i, stage].append(min(call_seconds(steps[i].jobs[stage], FLAGS.steps)))
        for stage in FLAGS.stages:
            ta, tb = times[0, stage], times[1, stage]
            ratios = [y / x for x, y in zip(ta, tb)]
            print(f"| {versus_torch.STAGE_NAMES[stage]} | {versus_torch.size_label(size)} | "
                  f"{statistics.median(ta) * 1e3:.0f} | {statistics.median(tb) * 1e3:.0f} | "
                  f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |", flush=True)


if __name__ == "__main__":
    app.run(main)
