"""What the tests that run the trainer share: a config shrunk to the tiny test pipelines, and a
persistent compilation cache per test module."""

from __future__ import annotations

import jax
import pytest

L = 16  # T5 tokens of the tiny runs
CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def tiny(**overrides) -> dict:
    """configs/*_concept.py's dotted overrides for the tiny pipelines (32 px, float32, XLA attention, no
    remat, a log line every step, no progress bar or sampling during training), then `overrides`."""
    return {"concept.resolution": "32", "model.dtype": "float32", "model.param_dtype": "float32",
            "model.remat_policy": "none", "model.attention": "xla", "model.max_sequence_length": L,
            "log_every": 1, "progress": False, "sample.every": 0, "export.dtype": "float32", **overrides}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the importing test module (every program cached), reset
    afterwards: a module's second run of the trainer reuses the first's programs."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {n: getattr(jax.config, n) for n in CACHE_OPTIONS}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()
