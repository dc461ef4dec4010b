"""The toy world end to end at a tiny size: base pretraining -> concept runs per seed -> evaluation -> report."""

import config_files
import json

import numpy as np
import pytest

from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.purecc import loop
from purecc_jax.toyworld import experiment



def tiny_config():
    c = config_files.load("toy_concept")
    c.progress = False
    t = c.toy
    t.transformer.depth = t.transformer.depth_single = 1
    t.base.steps, t.base.batch_size, t.base.warmup_steps = 12, 8, 2
    t.sampling.steps = 3
    t.evaluation.samples, t.evaluation.chunk = 3, 8
    t.arms = ("lcc", "prior", "purecc")
    c.objective.gradient_share_every = 3  # the last step's, the one logged
    c.prior.class_images = 4
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
    for name in ("lcc", "prior", "purecc"):
        for seed in (0, 1):
            assert (workdir / "runs" / name / f"seed{seed}" / "export" / "pytorch_lora_weights.safetensors").exists()
            assert (workdir / "samples" / f"{name}_seed{seed}.png").exists()
    assert (workdir / "runs" / "purecc" / "seed1" / "stage_b" / "metrics.jsonl").exists()
    stage_a = workdir / "runs" / "purecc" / "seed1" / "stage_a"
    assert stage_a.is_symlink() and stage_a.resolve() == (workdir / "runs" / "lcc" / "seed1" / "stage_a").resolve()
    for ext in ("md", "json", "png"):
        assert (workdir / f"report.{ext}").stat().st_size > 0
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["results"]) == {"base", "lcc", "prior", "purecc"}
    captions = {p.read_text() for p in (workdir / "concept").glob("*.txt")}
    assert captions == {"a sks square\ntarget: a sks square\n"}  # the paper's captions: no background named
    assert len(list((workdir / "class_images").glob("*.png"))) == 4  # drawn once, shared by both seeds
    prior_rows = loop.read_metrics(workdir / "runs" / "prior" / "seed0" / "stage_a")
    assert prior_rows and all("l_prior" in row for row in prior_rows)
    runs = report["results"]["purecc"]["runs"]
    assert set(runs) == {"0", "1"}
    scores = runs["1"]["scores"]
    assert scores["fidelity_ref"]["n"] == config.toy.evaluation.samples
    assert np.isfinite(scores["drift_world"])
    assert any("lambda_mean" in row for row in runs["1"]["curves"])
    assert any(np.isfinite(row.get("grad_share", np.nan)) for row in runs["1"]["curves"])
    assert all(k in scores for k in ("plain_gray", "purity_other", "segcons_iou", "segcons_background",
                                     "fidelity_plain", "fidelity_and_background_other"))
    # seeds train differently: the LoRA weights of the two L_CC runs differ
    lora = [(workdir / "runs" / "lcc" / f"seed{s}" / "export" / "pytorch_lora_weights.safetensors").read_bytes()
            for s in (0, 1)]
    assert lora[0] != lora[1]
    md = (workdir / "report.md").read_text()
    assert "| PureCC, adaptive λ* (the paper) |" in md and "pretrained in this workdir (sha256" in md
    assert "## Positive control" in md and "## What this many seeds can show" in md
    assert report["machine"]["jax"] and report["machine"]["cpu"]
    assert any(" | purecc vs lcc: " in key for key in report["tests"])
    assert report["results"]["purecc"]["paired_with"] == "lcc" and report["results"]["prior"]["paired_with"] is None


def test_rerun_reuses_everything(run, monkeypatch):
    workdir, config, first = run

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished run was scored again")

    monkeypatch.setattr(experiment.Evaluation, "score", no_scoring)  # scores.json of each run reused
    again = experiment.run(config, workdir)
    assert again["timings"]["base"] < 5  # the cached base folder is reused
    assert again["results"]["purecc"]["runs"] == first["results"]["purecc"]["runs"]


def test_scores_are_reused_only_for_the_same_run_and_evaluation():
    c = tiny_config()
    key = experiment._score_key(c)
    c.toy.seeds, c.toy.arms, c.toy.study_seeds = (5, 6), ("lcc",), (1, 2)  # which runs, not how
    assert experiment._score_key(c) == key
    for change in ({"toy.evaluation.samples": 4}, {"toy.sampling.steps": 4}, {"stage_a.steps": 4},
                   {"toy.checkpoints": (0.5, 1.0)}):
        assert experiment._score_key(experiment.defaults.override(c, change)) != key, change


def test_unknown_arm_is_refused():
    c = tiny_config()
    c.toy.arms = ("lcc", "magic")
    with pytest.raises(ValueError, match="unknown arms"):
        experiment.arms(c)


def test_arm_sets():
    c = tiny_config()
    c.toy.arms = ("purecc",)  # its stage-A arm comes first
    assert [a.name for a in experiment.arms(c)] == ["lcc", "purecc"]
    c.toy.study = True
    study = experiment.arms(c)
    assert [a.name for a in study] == list(experiment.STUDY_ARMS)
    authors = next(a for a in study if a.name == "authors")
    assert authors.overrides == {"objective.lambda_mode": "fixed", "objective.fixed_lambda": 1.0,
                                 "objective.eta": 2.0, "objective.extractor_uses_stage_a_lora": False}
    assert next(a for a in study if a.name == "prior").stage_a_from is None
    c.toy.study, c.toy.ablations = False, True
    names = [a.name for a in experiment.arms(c)]
    assert {"purecc_sg", "purecc_fixed1", "purecc_fixed3", "purecc_fixed5", "lcc_layerwise", "purecc_layerwise",
            "purecc_eta20", "purecc_eta20_sg", "purecc_eta100", "purecc_eta100_sg"} <= set(names)


def test_stage_checkpoints_for_the_equal_fidelity_comparison(run):
    """A run's last stage at fractions of its steps: the nearest checkpoints, the final tree last, stage A's
    embeddings where stage B keeps them frozen."""
    workdir, _, _ = run
    run_dir = workdir / "runs" / "purecc" / "seed0"
    final = {"lora": "final", "embeddings": "stage A's"}
    trees = experiment._stage_trainables(run_dir, "stage_b", (0.25, 1.0), final)
    steps = loop.checkpoint_steps(run_dir / "stage_b")
    assert sorted(trees) == sorted({min(steps, key=lambda s: abs(s - f * steps[-1])) for f in (0.25, 1.0)})
    assert trees[steps[-1]] is final
    assert all(t["embeddings"] == "stage A's" for t in trees.values())


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


def test_runs_load_the_transformer_as_config_model_says(tmp_path):
    # The runs train the parts the experiment loads: config.model's runtime fields must reach them
    # (they once did not: every toy run trained with the models' defaults whatever the config said).
    config = config_files.load("toy_concept")
    config.model.update(dict(remat_policy="full", attention="xla_recompute", scan_layers=False))
    folder, _ = experiment._base_folder(config, tmp_path)
    c = experiment.load_parts(folder, config).transformer_config
    assert (c.remat_policy, c.attention, c.scan_layers) == ("full", "xla_recompute", False)
