"""The toy world end to end at a tiny size: base pretraining -> concept runs -> evaluation -> report."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from purecc_jax.pipeline.folder import load_pipeline
from purecc_jax.toyworld import experiment

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy_concept.py"


def tiny_config():
    spec = importlib.util.spec_from_file_location("toy_concept", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.progress = False
    t = c.toy
    t.transformer.depth = t.transformer.depth_single = 1
    t.base.steps, t.base.batch_size, t.base.warmup_steps = 12, 8, 2
    t.sampling.steps = 3
    t.evaluation.samples, t.evaluation.chunk = 3, 8
    t.methods = ("lcc", "purecc")
    for st in (c.stage_a, c.stage_b):
        st.steps = 3
    c.checkpoint_every = 3
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    config = tiny_config()
    return workdir, config, experiment.run(config, workdir)


def test_every_stage_runs_and_the_report_is_written(run):
    workdir, config, summary = run
    assert (workdir / "base" / "model_index.json").exists()
    parts = load_pipeline(workdir / "base")  # the base is an ordinary pipeline folder
    assert parts.codec.downsample_factor == config.toy.patch // 2
    assert sorted((workdir / "concept").glob("*.png")) and sorted((workdir / "concept").glob("*.txt"))
    for name in ("lcc", "purecc"):
        assert (workdir / "runs" / name / "export" / "pytorch_lora_weights.safetensors").exists()
        assert (workdir / "samples" / f"{name}.png").exists()
    assert (workdir / "runs" / "purecc" / "stage_b" / "metrics.jsonl").exists()
    assert (workdir / "runs" / "purecc" / "stage_a").is_symlink()  # PureCC reuses the L_CC run's stage A
    for ext in ("md", "json", "png"):
        assert (workdir / f"report.{ext}").stat().st_size > 0
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["results"]) == {"base", "lcc", "purecc"}
    scores = report["results"]["purecc"]["scores"]
    assert scores["fidelity_ref"]["n"] == config.toy.evaluation.samples
    assert np.isfinite(scores["drift_world"])
    assert any("lambda_mean" in row for row in report["results"]["purecc"]["curves"])
    assert "| PureCC, adaptive λ* |" in (workdir / "report.md").read_text()


def test_rerun_reuses_everything(run):
    workdir, config, first = run
    again = experiment.run(config, workdir)
    assert again["timings"]["base"] < 5  # the cached base folder is reused
    assert again["results"]["purecc"]["scores"] == first["results"]["purecc"]["scores"]


def test_unknown_method_is_refused():
    c = tiny_config()
    c.toy.methods = ("lcc", "magic")
    with pytest.raises(ValueError, match="unknown methods"):
        experiment.methods(c)
