"""The repository's config files (configs/*.py), loaded as `--config=FILE` loads them, with
dotted overrides set as `--config.a.b=value` sets them (`defaults.override`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from purecc_jax import defaults

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, overrides: dict | None = None):
    """configs/`name`.py's get_config(), with `overrides` ({"stage_b.steps": 2, ...}) applied."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return defaults.override(module.get_config(), overrides or {})
