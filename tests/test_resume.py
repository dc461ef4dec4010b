"""Kill the trainer at chosen points, run the same command again: it ends bit-identical.

Real processes (`python -m purecc_jax.main`) on a tiny diffusers FLUX folder, signalled
through `purecc_jax.faults` (PURECC_TEST_KILL_AT). One workdir is killed four times in a
row, each rerun resuming from what the previous kill left:

    1. SIGKILL in stage A while checkpoint 2 is being written (async, not yet finalized)
    2. SIGKILL in stage B after step 3 (its checkpoint 2 may still be in flight: then it is lost too)
    3. SIGTERM in stage B after step 3: checkpoint 3 saved, exit status 143
    4. SIGKILL during the export, half-way through writing the LoRA file
    5. the rerun that finishes

and its checkpoints and exports are compared byte for byte with one uninterrupted run.
All processes share one persistent compilation cache, so only the first compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import config_files
import dreambench_standin
import pipeline_reference
from fast_compile import FAST_COMPILE
import tiny_runs
from purecc_jax import train
from purecc_jax.purecc import loop

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "flux_concept.py"
OVERRIDES = tiny_runs.tiny(**{
    "concept.path": "dog", "stage_a.steps": 4, "stage_b.steps": 4, "stage_a.learning_rate": 1e-3,
    "stage_b.learning_rate": 1e-3, "checkpoint_every": 2, "sample.prompts": "()",
})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    folder = base / "tiny_flux"
    pipeline_reference.save_pipeline(folder, guidance_embeds=True, seed=0)
    return base, folder


def command(folder: Path, workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "purecc_jax.main", f"--config={CONFIG_FILE}", f"--workdir={workdir}",
            f"--config.pretrained={folder}", f"--config.concept.dreambench_root={dreambench_standin.root()}",
            "--nocompilation_cache"]
    return args + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def launch(base: Path, folder: Path, workdir: Path, kill_at: str | None = None, sig: str = "KILL") -> int:
    """Runs the CLI in a fresh process (one CPU device, the shared compilation cache); its exit status."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TOKENIZERS_PARALLELISM="false")
    env.pop("PURECC_TEST_KILL_AT", None)
    if kill_at:
        env.update(PURECC_TEST_KILL_AT=kill_at, PURECC_TEST_KILL_SIGNAL=sig)
    log = base / f"{workdir.name}.log"
    with open(log, "a") as out:
        out.write(f"\n=== kill_at={kill_at} signal={sig}\n")
        out.flush()
        rc = subprocess.run(command(folder, workdir), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            timeout=600).returncode
    if kill_at is None and rc != 0:
        raise AssertionError(f"run failed ({rc}):\n{log.read_text()[-4000:]}")
    return rc


def checkpoints(workdir: Path, stage: str) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, other entries: unfinished writes) of a stage."""
    entries = sorted(p.name for p in (workdir / stage / "checkpoints").iterdir())
    return sorted(int(e) for e in entries if e.isdigit()), [e for e in entries if not e.isdigit()]


def restored(workdir: Path, stage: str, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpointed TrainState (parameters, Adam moments, step, rng), by path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(workdir / stage / "checkpoints" / str(step) / "default")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def reference(setup):
    base, folder = setup
    workdir = base / "reference"
    launch(base, folder, workdir)
    return workdir


def test_killed_run_resumes_bit_identical(setup, reference):
    base, folder = setup
    w = base / "killed"

    assert launch(base, folder, w, "stage_a:checkpoint:2") == -signal.SIGKILL
    complete, partial = checkpoints(w, "stage_a")
    assert complete == [] and partial, "the kill should have caught checkpoint 2 unfinished"

    assert launch(base, folder, w, "stage_b:step:3") == -signal.SIGKILL
    assert checkpoints(w, "stage_a") == ([2, 4], [])  # the leftover was removed, stage A redone from step 0
    assert checkpoints(w, "stage_b")[0] in ([], [2])

    assert launch(base, folder, w, "stage_b:step:3", sig="TERM") == 128 + signal.SIGTERM
    assert checkpoints(w, "stage_b") == ([2, 3], [])  # the SIGTERM checkpoint is off the every-2 grid
    assert "stopped by a signal after step 3" in (base / "killed.log").read_text()

    assert launch(base, folder, w, "write:pytorch_lora_weights.safetensors") == -signal.SIGKILL
    assert not (w / "export" / "pytorch_lora_weights.safetensors").exists()

    launch(base, folder, w)
    assert checkpoints(w, "stage_b") == ([3, 4], [])

    for stage in ("stage_a", "stage_b"):
        got, want = restored(w, stage, 4), restored(reference, stage, 4)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{stage}: {key}")
        assert [r["step"] for r in loop.read_metrics(w / stage)] == [1, 2, 3, 4]
    exported = sorted(p.name for p in (reference / "export").glob("*.safetensors"))
    assert "pytorch_lora_weights.safetensors" in exported
    assert exported == sorted(p.name for p in (w / "export").glob("*.safetensors"))
    for name in exported:
        assert (w / "export" / name).read_bytes() == (reference / "export" / name).read_bytes(), name


def test_a_different_config_is_refused(setup, reference):
    base, folder = setup
    config = train_config(folder)
    train.check_resume(config, reference)  # the same run: accepted
    config.progress, config.log_every = True, 7  # reporting only: accepted
    config.model.remat_policy = "full"  # what the backward recomputes: accepted
    train.check_resume(config, reference)
    config.stage_b.learning_rate = 5e-4
    config.seed = 3
    with pytest.raises(ValueError, match=r"(?s)different config.*seed: 0 there, 3 now.*"
                                         r"stage_b.learning_rate: 0.001 there, 0.0005 now.*force_resume"):
        train.check_resume(config, reference)
    config.force_resume = True
    train.check_resume(config, reference)


def train_config(folder: Path):
    """The config the CLI above runs, built in process."""
    return config_files.load("flux_concept", {**OVERRIDES, "pretrained": str(folder), "sample.prompts": (),
                                              "concept.dreambench_root": str(dreambench_standin.root())})


def test_reference_config_is_what_the_cli_saved(setup, reference):
    """The in-process config above is the CLI's (else the refusal test would test nothing)."""
    _, folder = setup
    saved = json.loads((reference / "config.json").read_text())
    assert saved == json.loads(train_config(folder).to_json_best_effort())
