"""The toy world end to end at a tiny size: base pretraining -> concept runs per seed -> evaluation -> report."""

import config_files
import json

import numpy as np
import pytest

from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.toyworld import experiment



def tiny_config():
    c = config_files.load("toy_concept")
    c.progress = False
    t = c.toy
    t.transformer.depth = t.transformer.depth_single = 1
    t.base.steps, t.base.batch_size, t.base.warmup_steps = 12, 8, 2
    t.sampling.steps = 3
    t.evaluation.samples, t.evaluation.chunk = 3, 8
    t.methods = ("lcc", "purecc")
    t.seeds = (0, 1)
    t.pretrain_base = True  # a tiny base of its own, not the shipped one
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
        for seed in (0, 1):
            assert (workdir / "runs" / name / f"seed{seed}" / "export" / "pytorch_lora_weights.safetensors").exists()
            assert (workdir / "samples" / f"{name}_seed{seed}.png").exists()
    assert (workdir / "runs" / "purecc" / "seed1" / "stage_b" / "metrics.jsonl").exists()
    stage_a = workdir / "runs" / "purecc" / "seed1" / "stage_a"
    assert stage_a.is_symlink() and stage_a.resolve() == (workdir / "runs" / "lcc" / "seed1" / "stage_a").resolve()
    for ext in ("md", "json", "png"):
        assert (workdir / f"report.{ext}").stat().st_size > 0
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["results"]) == {"base", "lcc", "purecc"}
    runs = report["results"]["purecc"]["runs"]
    assert set(runs) == {"0", "1"}
    scores = runs["1"]["scores"]
    assert scores["fidelity_ref"]["n"] == config.toy.evaluation.samples
    assert np.isfinite(scores["drift_world"])
    assert any("lambda_mean" in row for row in runs["1"]["curves"])
    # seeds train differently: the LoRA weights of the two L_CC runs differ
    lora = [(workdir / "runs" / "lcc" / f"seed{s}" / "export" / "pytorch_lora_weights.safetensors").read_bytes()
            for s in (0, 1)]
    assert lora[0] != lora[1]
    md = (workdir / "report.md").read_text()
    assert "| PureCC, adaptive λ* |" in md and "Welch's" in md and "pretrained in this workdir (sha256" in md
    assert report["machine"]["jax"] and report["machine"]["cpu"]
    assert any(key.startswith("purecc vs lcc: ") for key in report["tests"])


def test_rerun_reuses_everything(run):
    workdir, config, first = run
    again = experiment.run(config, workdir)
    assert again["timings"]["base"] < 5  # the cached base folder is reused
    assert again["results"]["purecc"]["runs"] == first["results"]["purecc"]["runs"]


def test_unknown_method_is_refused():
    c = tiny_config()
    c.toy.methods = ("lcc", "magic")
    with pytest.raises(ValueError, match="unknown methods"):
        experiment.methods(c)


def test_method_sets():
    c = tiny_config()
    c.toy.methods = ()
    assert [m.name for m in experiment.methods(c)] == ["lcc", "purecc"]
    c.toy.ablations = True
    names = [m.name for m in experiment.methods(c)]
    assert {"purecc_sg", "purecc_fixed1", "purecc_fixed3", "purecc_fixed5", "lcc_layerwise", "purecc_layerwise",
            "purecc_eta20", "purecc_eta20_sg", "purecc_eta100", "purecc_eta100_sg"} <= set(names)
    c.toy.ablations = False
    c.toy.methods = ("purecc_eta100_sg", "lcc")  # any method by name, in the canonical order
    chosen = experiment.methods(c)
    assert [m.name for m in chosen] == ["lcc", "purecc_eta100_sg"]
    assert chosen[1].overrides == {"objective.eta": 100.0, "objective.stop_grad_original": True}


def test_one_seed_is_refused(tmp_path):
    c = tiny_config()
    c.toy.seeds = (0,)
    with pytest.raises(ValueError, match="need >= 2 training seeds"):
        experiment.run(c, tmp_path)


def test_the_shipped_base_is_refused_on_another_split(tmp_path):
    c = tiny_config()
    c.toy.pretrain_base = False
    c.toy.split_min_shapes = 2
    with pytest.raises(ValueError, match="split_min_shapes=2: the shipped base was trained on the split of 1"):
        experiment.run(c, tmp_path)
