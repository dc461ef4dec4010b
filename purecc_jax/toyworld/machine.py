"""Which machine and software a toy run used: results differ between CPUs, so the report says."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The CPU features that change which kernels XLA:CPU emits (and so how floats are rounded).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "asimd", "sve")


def load() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpuinfo() -> tuple[str, list[str]]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return platform.processor() or platform.machine(), []
    model, flags = platform.processor() or platform.machine(), set()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def describe() -> dict[str, Any]:
    """CPU model, its ISA flags, core count, jax/jaxlib versions, XLA_FLAGS and the load now."""
    import jax
    import jaxlib

    model, isa = _cpuinfo()
    return {
        "cpu": model,
        "isa": isa,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_start": load(),
    }


def summary(info: dict[str, Any]) -> str:
    """One line for the report."""
    flags = info.get("xla_flags") or "(none)"
    load_text = lambda v: "?" if not v else ", ".join(f"{x:.1f}" for x in v)
    isa = " ".join(info.get("isa") or [])
    return (f"{info.get('cpu')} ({info.get('cpus_usable')} usable cores; ISA flags: {isa}), "
            f"{info.get('os')}, Python {info.get('python')}, jax {info.get('jax')} / jaxlib {info.get('jaxlib')} on "
            f"{info.get('backend')}, XLA_FLAGS {flags}; load average (1/5/15 min) {load_text(info.get('load_start'))} "
            f"at the start, {load_text(info.get('load_end'))} at the end")
