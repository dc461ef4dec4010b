"""Test session setup: 8 virtual CPU devices (for the sharding tests) before JAX starts."""

import os

# XLA's quick compile (no LLVM optimisation): the suite's tiny programs are compile-bound, and
# this cuts its CPU time by 40-60% per file (test_lora 83 -> 48 CPU s, the toy-world experiment
# 192 -> 114). Numerics are XLA's own either way (same HLO, same fusion); speed figures come from
# benchmarks/, never from tests. PURECC_TEST_FULL_COMPILE=1 keeps XLA's default.
FAST_COMPILE = "" if os.environ.get("PURECC_TEST_FULL_COMPILE") else (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _torch_seed():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
