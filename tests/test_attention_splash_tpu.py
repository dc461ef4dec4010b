"""Splash attention compiled by the real TPU compiler (XLA:TPU and Mosaic), no TPU needed.

FLUX.1 at 512² attends over 512 text + 1024 image tokens (24 heads of 128); SD3.5-Medium over
77 + 256 + 1024 = 1357 (24 heads of 64), which no splash block divides: the kernel runs padded to
1408. Forward and backward, batch 4 on an fsdp mesh of 4 chips, as training runs them.
"""

import importlib.util
import logging
import re

import pytest

from benchmarks.attention_tpu import lower
from purecc_jax import topology
from purecc_jax.models import attention as attention_module

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-test.txt): it is the TPU compiler these tests run")

BATCH = 4
SHAPES = {"flux": (1536, 24, 128), "sd3": (1357, 24, 64)}  # sequence, heads, head_dim


def _compile(topology_name: str, model: str, implementation: str):
    topo = topology.tpu_topology(topology_name)
    return topo, lower(topo, *SHAPES[model], BATCH, implementation)


def _logits_bytes(model: str, chips: int) -> int:
    seq, heads, _ = SHAPES[model]
    return BATCH // chips * heads * seq * seq * 4  # one float32 logits tensor per chip


@pytest.mark.parametrize("topology_name", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_splash_compiles_to_the_mosaic_kernel(topology_name, model, caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger=attention_module.__name__):
        topo, lowered = _compile(topology_name, model, "splash")
    padded = "padded to q 1408 kv 1408" if model == "sd3" else "unpadded"
    assert any(padded in r.getMessage() and "attention splash" in r.getMessage() for r in caplog.records)

    compiled, figures = topology.compile_and_measure(lowered)
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernel, lowered by Mosaic
    seq = SHAPES[model][0]
    assert not re.search(rf"\[[\d,]*\b{seq},{seq}\b|\[[\d,]*\b1408,1408\b", hlo), "logits materialised"
    assert figures.temporary < _logits_bytes(model, topo.chips) // 10
    assert topology.verdict(figures, topo.device_kind).fits


def test_xla_attention_materialises_the_logits_splash_avoids():
    """The XLA path at SD3's length keeps (batch, heads, seq, seq) logits per chip: what padding
    the splash kernel saves."""
    topo, lowered = _compile("v5e:2x2", "sd3", "xla")
    _, figures = topology.compile_and_measure(lowered)
    assert figures.temporary >= _logits_bytes("sd3", topo.chips)
