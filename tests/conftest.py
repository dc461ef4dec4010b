"""Test session setup: 8 virtual CPU devices (for the sharding tests) before JAX starts."""

import os

from fast_compile import FAST_COMPILE  # XLA:CPU quick-compile flags (empty with PURECC_TEST_FULL_COMPILE=1)

os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE) if f)
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
