"""`python -m purecc_jax.compile_check`: a run's programs compiled by XLA:TPU for a TPU slice, no TPU.

The trainer and the check build a stage's step through the same functions (`train.stage_*`): on this
host's CPU devices both lower the same program, to the character. With libtpu, tiny FLUX and SD3
runs (splash attention, an fsdp mesh) are compiled for v5e, v6e and v5p slices and a multi-host
slice: stage A's and stage B's steps and the sampler; a run that cannot fit is reported as such,
with the settings that would; the command's exit status says which.
"""

from __future__ import annotations

import importlib.util
import re

import jax
import pytest

import config_files
import dreambench_standin
import pipeline_reference
from purecc_jax import compile_check, preflight, topology, train
from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.models import runtime as runtime_lib
from purecc_jax.purecc import loop

requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-test.txt): it is the TPU compiler these tests run")

# A tiny run on a 4-chip fsdp mesh: 64 px, 16 T5 tokens, batch 4 (one sequence per chip), splash attention.
TINY = {"concept.resolution": "64", "model.max_sequence_length": 16, "sample.height": 64, "sample.width": 64,
        "model.attention": "splash", "stage_a.batch_size": 4, "stage_b.batch_size": 4, "mesh.data": 1,
        "mesh.fsdp": -1}
CONFIGS = {"flux-tiny": "flux_concept", "sd3-tiny": "sd35_concept"}


def tiny_config(model: str, **overrides):
    return config_files.load(CONFIGS[model], {**TINY, **overrides})


def test_remat_order_names_every_policy():
    assert sorted(preflight.REMAT_ORDER) == sorted(runtime_lib.REMAT_POLICIES)
    assert preflight.REMAT_ORDER[0] == "none" and preflight.REMAT_ORDER[-1] == "full"


def test_trainer_and_check_lower_the_same_steps(tmp_path, monkeypatch):
    """The trainer on a tiny FLUX.1-dev folder (token embeddings: stage A re-encodes with the text
    encoders) and the check from the folder's config.json files alone, on the same 4 CPU devices: the
    stage A and stage B steps lower to the same StableHLO (shapes, dtypes, shardings, donation)."""
    folder = tmp_path / "flux"
    pipeline_reference.save_pipeline(folder, guidance_embeds=True, seed=0)
    config = config_files.load("flux_concept", {
        "pretrained": str(folder), "concept.path": "dog", "concept.dreambench_root": str(dreambench_standin.root()),
        "concept.resolution": "32", "model.max_sequence_length": 16, "model.dtype": "float32",
        "model.param_dtype": "float32", "model.attention": "xla", "stage_a.batch_size": 4,
        "stage_b.batch_size": 4, "stage_a.steps": 1, "stage_b.steps": 1, "sample.prompts": (), "progress": False,
        "mesh.data": 1, "mesh.fsdp": 4})
    devices = jax.devices()[:4]
    seen = {}

    def run_stage(name, workdir, lcfg, state, state_sh, step_fn, frozen, batch_fn, sample_fn):
        seen[name] = step_fn.lower(state, frozen, batch_fn(0)).as_text()
        return state

    monkeypatch.setattr(loop, "run_stage", run_stage)
    monkeypatch.setattr(train, "export", lambda *a: None)
    parts = load_pipeline(folder, mesh=train.make_mesh(config, devices), **train.model_runtime(config))
    train.Trainer(config, tmp_path / "run", parts).run()

    checked = {p.key: p.lowered.as_text() for p in preflight.Programs(config, devices)}
    assert set(checked) == set(seen) == {"stage_a", "stage_b"}
    for name in seen:
        assert checked[name] == seen[name], name
    assert "sharding" in checked["stage_b"] and "tf.aliasing_output" in checked["stage_b"]


@requires_libtpu
@pytest.mark.parametrize("model,topology_name,overrides", [
    ("flux-tiny", "v5e:2x2", {"model.base_quantization": "int8"}), ("sd3-tiny", "v6e:2x2", {})])
def test_tiny_runs_compile_for_a_tpu_slice(model, topology_name, overrides, caplog):
    """Stage A, stage B and the sampler of a tiny run, compiled by XLA:TPU with the splash kernel (Mosaic);
    FLUX with its frozen base in int8."""
    config = tiny_config(model, **overrides)
    with caplog.at_level("INFO", logger="purecc_jax.models.attention"):
        report = preflight.check(config, topology_name, model=model)
    assert [p.key for p in report.programs] == ["stage_a", "stage_b", "sampler"]
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.fits and all(p.figures.argument > 0 and p.figures.resident > 0 for p in report.programs)
    assert any("attention splash" in r.getMessage() for r in caplog.records)
    table = preflight.format_report(report, unit="MiB")
    assert "resident MiB" in table and table.count("fits:") == 3
    if overrides:  # the run's frozen weights, as the check built them, are int8
        parts = preflight.Programs(config, report.topology.devices, model=model).parts
        assert "int8" in {str(x.dtype) for x in jax.tree_util.tree_leaves(parts.transformer_params)}


@requires_libtpu
def test_full_finetuning_on_v5p_and_a_run_that_does_not_fit():
    """A tiny full fine-tune's stage B on v5p-8 (4 chips of 95 GiB) fits the chip; judged against 32 MiB a
    chip (more than its arguments, less than its peak) it is reported as not fitting."""
    config = tiny_config("flux-tiny", **{"stage_a.full_finetune": True, "stage_b.full_finetune": True,
                                         "concept_embedding": "none"})
    topo = topology.tpu_topology("v5p-8")
    small = preflight.check(config, topo, model="flux-tiny", hbm=32 << 20, programs=("stage_b",))
    (stage_b,) = small.programs
    assert not small.fits and small.failing() == ["stage_b"] and stage_b.verdict.hbm == 32 << 20
    assert not stage_b.figures.refused and stage_b.figures.argument < 32 << 20 < stage_b.figures.peak
    assert "DOES NOT FIT" in preflight.format_report(small)
    assert topology.verdict(stage_b.figures, topo.device_kind).fits and topo.hbm_bytes == 95 * topology.GiB


def _fake_check(fits):
    """preflight.check judging each candidate config by `fits(config)`, without compiling."""
    def check(config, topo, *, programs=None, **kwargs):
        verdict = topology.Verdict(fits(config), 1, 1)
        figures = topology.CompileFigures(1, 0, 0, 0, 0, 1)
        return preflight.Report(topo, "fake", {}, [], [preflight.Program("stage_b", "stage B step", figures, verdict)])
    return check


def test_search_bisects_remat_then_tries_meshes_and_int8(monkeypatch):
    """Remat first (full, then a bisection to the policy that recomputes least and fits); when even full
    does not fit: all chips on fsdp, half on tensor, then the int8 base; never more than max_tries."""
    config = tiny_config("flux-tiny", **{"model.remat_policy": "none", "mesh.data": -1, "mesh.fsdp": 1})
    failing = preflight.Report(topology.Topology("v5e-8", "v5e", (2, 4), tuple(range(8))), "fake",
                               {"data": 4, "fsdp": 1, "tensor": 1}, [], [preflight.Program(
                                   "stage_b", "stage B step", topology.CompileFigures(1, 0, 0, 0, 0, 1),
                                   topology.Verdict(False, 1, 1))])
    order = preflight.REMAT_ORDER
    monkeypatch.setattr(preflight, "check", _fake_check(
        lambda c: order.index(c.model.remat_policy) >= order.index("qkv_attn")))
    tried = preflight.search(config, failing, max_tries=6)
    policies = [o["model.remat_policy"] for o, _ in tried]
    assert policies[0] == "full" and policies[-1] == "qkv_attn" and tried[-1][1].fits and len(tried) <= 4
    assert all(r.fits == (order.index(p) >= order.index("qkv_attn")) for p, (_, r) in zip(policies, tried))

    monkeypatch.setattr(preflight, "check", _fake_check(lambda c: c.model.base_quantization == "int8"))
    tried = preflight.search(config, failing, max_tries=6)
    assert [o for o, _ in tried] == [
        {"model.remat_policy": "full"},
        {"model.remat_policy": "full", "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
        {"model.remat_policy": "full", "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
        {"model.remat_policy": "full", "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1,
         "model.base_quantization": "int8"}]
    assert [r.fits for _, r in tried] == [False, False, False, True]
    assert len(preflight.search(config, failing, max_tries=2)) == 2


@requires_libtpu
@pytest.mark.parametrize("topology_name,data,hosts", [("v5e:4x4", 4, 4), ("v5p:2x2x2", 2, 2)])
def test_multihost_slice_compiles_with_the_distributed_mesh(topology_name, data, hosts):
    """v5e:4x4 is 16 chips on 4 hosts, v5p:2x2x2 8 chips on 2: the run's mesh (fsdp 4, data -1: the rest
    that divides the batch of 4) spans every host, as `--distributed` builds it from all the processes'
    devices, and stage B's step compiles with collectives."""
    config = tiny_config("flux-tiny", **{"mesh.data": -1, "mesh.fsdp": 4, "sample.prompts": ()})
    topo = topology.tpu_topology(topology_name)
    built = preflight.Programs(config, topo.devices, model="flux-tiny", only=("stage_b",))
    assert dict(built.mesh.shape) == {"data": data, "fsdp": 4, "tensor": 1}
    assert {d.process_index for d in built.mesh.devices.flat} == set(range(hosts))
    assert built.mesh.devices.tolist() == train.make_mesh(config, topo.devices).devices.tolist()
    (stage_b,) = list(built)
    compiled, figures = topology.compile_and_measure(stage_b.lowered)
    assert not figures.refused and re.search(r"all-gather|reduce-scatter|all-reduce", compiled.as_text())


@requires_libtpu
def test_cli_exit_status(capsys):
    """0 when every program fits; 1 when one does not, naming what was tried; 2 for a bad topology."""
    base = ["compile_check", "--config=configs/flux_concept.py", "--model=flux-tiny", "--topology=v5e:2x2",
            *(f"--config.{k}={v}" for k, v in TINY.items()), "--config.sample.prompts=()",
            "--config.stage_b.steps=0", "--config.method=dreambooth"]
    assert compile_check.cli(base) == 0
    assert "fits:" in capsys.readouterr().out
    assert compile_check.cli([*base, "--hbm_gib=0.00001", "--max_tries=1"]) == 1  # 10 KiB: less than its arguments
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "its arguments alone: not compiled" in out
    assert "--config.model.remat_policy=full" in out and "none of the settings tried fits" in out
    assert compile_check.cli([*base, "--topology=v7x-8"]) == 2
    assert "unknown generation" in capsys.readouterr().err
    assert compile_check.cli([*base, "--programs=stage_c"]) == 2
    assert "['stage_c'] are not among" in capsys.readouterr().err


def test_presets_name_their_backbone():
    assert preflight.PRESETS["flux-dev"].name == "flux" and preflight.PRESETS["sd3.5-medium"].name == "sd3"
    config = tiny_config("flux-tiny")
    with pytest.raises(ValueError, match="is a flux model"):
        preflight.model_source(config_files.load("sd35_concept"), "flux-dev")
    assert preflight.model_source(config, None)[1] == "flux-dev"  # no pretrained folder: the default preset
