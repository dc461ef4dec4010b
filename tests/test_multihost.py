"""Two processes, one global mesh: `python -m purecc_jax.main --distributed` as on a TPU pod slice.

Two CPU processes (4 virtual devices each) join through `jax.distributed` on localhost and run
the tiny stage A + stage B over one (data=2, fsdp=4) mesh: the batch is split across the
processes, the weights are sharded within each; each batch comes from one of two training sizes. The run is interrupted in stage B and run
again; a one-process run on an 8-device mesh of the same shape is the reference. Checked: the
losses of every step equal the reference's, every log line, TensorBoard file, sample grid and
checkpoint exists once, both processes resume from the shared checkpoint, and the export is
written by process 0 alone and equals the reference's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dreambench_standin
import pipeline_reference
import tiny_runs
from purecc_jax.purecc import loop
from purecc_jax.weights.safetensors_io import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
INTERRUPT = 3  # stage B stops when it asks for its 4th batch: checkpoint 2 is the latest
# Stage A: 2 steps and one checkpoint; stage B: 4 steps, checkpoints 2 and 4. Each run compiles both
# stages' steps, the data cache's encoders and the sampler (most of the cost); steps take milliseconds.
TINY = tiny_runs.tiny(**{
    "concept.class_word": "dog", "stage_a.steps": 2, "stage_b.steps": 4, "stage_a.batch_size": 8,
    "stage_b.batch_size": 8, "checkpoint_every": 2, "sample.steps": 2, "sample.height": 32, "sample.width": 32,
    "sample.prompts": "('a photo of {identifier} {class_word}',)", "mesh.data": 2, "mesh.fsdp": 4,
    # Two training sizes: each step's batch comes from one, which every process must draw alike.
    "concept.resolution": "32,48",
})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(devices: int, interrupt: int, workdir: Path, folder: Path, log: Path, distributed: tuple[str, ...] = (),
          overrides: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Starts one worker process; its output goes to the file LOG (a pipe read after another
    process's could fill, and block the writer inside a collective: every process would wait)."""
    options = {**TINY, **(overrides or {})}
    args = [sys.executable, str(WORKER), str(devices), str(interrupt), "--",
            f"--config={ROOT / 'configs' / 'flux_concept.py'}", f"--workdir={workdir}", f"--config.pretrained={folder}",
            f"--config.concept.path={folder.parent / 'dog'}", *(f"--config.{k}={v}" for k, v in options.items()),
            *distributed, *(() if distributed else ("--nocompilation_cache",))]  # the reference never reruns
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), log


def finish(processes: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str]]:
    """Waits for the processes; returns each one's exit status and output."""
    for p, _ in processes:
        try:
            p.wait(timeout=1200)
        except subprocess.TimeoutExpired:
            for q, _ in processes:
                q.kill()
            raise
    return [(p.returncode, log.read_text()) for p, log in processes]


def tails(outputs: list[tuple[int, str]]) -> str:
    """The end of every process's output: the one that failed first is not always the first."""
    return "\n".join(f"--- process {i} (exit {code}) ---\n{text[-4000:]}" for i, (code, text) in enumerate(outputs))


def two_processes(interrupt: int, workdir: Path, folder: Path, logs: str, overrides: dict | None = None):
    port = free_port()
    return [start(4, interrupt, workdir, folder, workdir.parent / f"{logs}-{i}.log",
                  ("--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
                  overrides) for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs") / "tiny_flux"
    pipeline_reference.save_pipeline(folder, guidance_embeds=True, seed=0)
    (folder.parent / "dog").mkdir()  # two photos: 4 views, one encoder batch to compile
    for name in ("00.jpg", "01.jpg"):
        shutil.copy(dreambench_standin.root() / "dog" / name, folder.parent / "dog" / name)
    base = tmp_path_factory.mktemp("multihost")
    # The reference draws no samples (a third of its time): they touch neither the losses nor the export.
    reference = start(8, 0, base / "one", folder, base / "reference.log", overrides={"sample.prompts": "()"})
    interrupted = finish(two_processes(INTERRUPT, base / "two", folder, "interrupted"))
    for code, _ in interrupted:
        assert code == 3, tails(interrupted)
    stopped = {"steps": raw_steps(base / "two" / "stage_b"),
               "checkpoints": sorted(p.name for p in (base / "two" / "stage_b" / "checkpoints").iterdir())}
    # The rerun draws no samples either: stage A's grid (drawn by both processes, written by one) is the
    # check of sampling on the shared mesh; a second grid would cost the rerun a sixth of its time.
    resumed = finish(two_processes(0, base / "two", folder, "resumed", {"sample.prompts": "()"}))
    (ref_code, ref_log), = finish([reference])
    assert ref_code == 0, ref_log[-3000:]
    return dict(one=base / "one", two=base / "two", interrupted=interrupted, stopped=stopped, resumed=resumed)


def steps_of(stage: str) -> int:
    return TINY[f"{stage}.steps"]


def raw_steps(directory: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_then_resumed_in_both_processes(runs):
    for _, text in runs["interrupted"]:
        assert f"stage B interrupted at step {INTERRUPT}" in text, text[-3000:]
    assert runs["stopped"] == {"steps": [1, 2, 3], "checkpoints": ["2"]}
    for code, text in runs["resumed"]:
        assert code == 0, tails(runs["resumed"])
        assert "stage_b: resumed from step 2" in text  # each process restored the one checkpoint
        assert "stage_a: resumed from step 2" in text


def test_written_once(runs):
    w = runs["two"]
    assert raw_steps(w / "stage_a") == [1, 2]  # one line per step, not one per process
    assert raw_steps(w / "stage_b") == [1, 2, 3, 3, 4]  # step 3 again after the resume
    for stage, checkpoints in (("stage_a", ["2"]), ("stage_b", ["2", "4"])):
        assert sorted(p.name for p in (w / stage / "checkpoints").iterdir()) == checkpoints
        assert len(list((w / stage / "tensorboard").iterdir())) == (1 if stage == "stage_a" else 2)  # one per run
    assert sorted(p.name for p in (w / "stage_a" / "samples").iterdir()) == ["000000.png", "000002.png"]
    assert not (w / "stage_b" / "samples").exists()  # the rerun drew none, and the stopped run stopped before
    assert (w / "export_writers").read_text().split() == ["0"]


def test_losses_equal_one_process(runs):
    for stage in ("stage_a", "stage_b"):
        got = {r["step"]: r for r in loop.read_metrics(runs["two"] / stage)}
        want = {r["step"]: r for r in loop.read_metrics(runs["one"] / stage)}
        assert sorted(got) == sorted(want) == list(range(1, steps_of(stage) + 1))
        for step, row in want.items():
            for key in ("loss", "l_cc", "grad_norm") + (("l_pure", "lambda_mean") if stage == "stage_b" else ()):
                np.testing.assert_allclose(got[step][key], row[key], rtol=1e-5, atol=1e-7, err_msg=f"{stage} {key}")


def test_export_equals_one_process(runs):
    def tensors(w):
        files = {p.name: SafetensorsFile(p) for p in sorted((w / "export").glob("*.safetensors"))}
        return {name: {k: np.array(f.get(k)) for k in f.keys()} for name, f in files.items()}

    got, want = tensors(runs["two"]), tensors(runs["one"])
    assert list(got) == list(want) == ["concept_clip_l.safetensors", "concept_t5.safetensors",
                                       "pytorch_lora_weights.safetensors"]
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
