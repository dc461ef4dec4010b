"""Every path in a bucket, against a real GCS API offline (gcp-storage-emulator on localhost).

The pretrained folder, the concept photos and the workdir are `gs://` URLs. The tiny stage A +
stage B run is stopped in stage B and run again: it resumes from the checkpoint in the bucket,
logs and exports there, and the pretrained folder and photos were read through checked per-host
copies. That run is then sampled (`purecc_jax.sample --workdir=gs://... --output=gs://...`, and
`--export=gs://...`) and evaluated (`purecc_jax.evaluation.sweep` with workdir, DreamBench folder
and output in the bucket), in this process. The Python clients (gcsfs under etils.epath,
google-cloud-storage under tensorboardX) find the emulator through STORAGE_EMULATOR_HOST,
tensorstore (orbax checkpoints) through TENSORSTORE_GCS_HTTP_URL.

Checkpoints are written with orbax's defaults (OCDBT), as on real GCS. The emulator is started
through tests/gcs_emulator.py, which adds what it lacks and OCDBT needs: the `x-goog-generation`
header on object reads and the ifGenerationMatch / ifGenerationNotMatch preconditions (see that
file: without them, a save that commits its OCDBT manifest more than once fails with "Malformed
StorageGeneration"). Real GCS has both; the product code is the same against either.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dreambench_standin
import pipeline_reference
import tiny_runs

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
BUCKET = "gs://purecc-test"
INTERRUPT = 3  # stage B stops when it asks for its 4th batch: checkpoint 2 is the latest
L = 16  # T5 tokens
TINY = tiny_runs.tiny(**{  # stage A: 2 steps, one checkpoint; stage B: 4 steps, checkpoints 2 and 4 (stopped at 3)
    "concept.path": f"{BUCKET}/concepts/dog", "concept.class_word": "dog", "stage_a.steps": 2, "stage_b.steps": 4,
    "checkpoint_every": 2, "sample.steps": 2, "sample.height": 32, "sample.width": 32,
    "sample.prompts": "('a photo of {identifier} {class_word}',)",
})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator (with GCS's generation semantics: tests/gcs_emulator.py) on a free port, its bucket
    created; the clients of this process pointed at it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "gcs_emulator.py"), "start", "--host=localhost",
                               f"--port={port}", "--in-memory", f"--default-bucket={BUCKET[5:]}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.2)
    url = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "PURECC_CACHE": str(tmp_path_factory.mktemp("host_cache"))}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    server.kill()
    server.wait()


def run_main(env: dict[str, str], interrupt: int, cwd: Path) -> tuple[int, str]:
    args = [sys.executable, str(WORKER), "1", str(interrupt), "--", f"--config={ROOT / 'configs' / 'flux_concept.py'}",
            f"--workdir={BUCKET}/runs/dog", f"--config.pretrained={BUCKET}/FLUX.1-tiny",
            *(f"--config.{k}={v}" for k, v in TINY.items())]
    full_env = dict(os.environ, **env, PYTHONPATH=str(ROOT))
    full_env.pop("XLA_FLAGS", None)
    out = subprocess.run(args, env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=900)
    return out.returncode, out.stdout


@pytest.fixture(scope="module")
def bucket_run(emulator, tmp_path_factory):
    from purecc_jax import paths

    folder = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(folder, guidance_embeds=True, seed=0)
    paths.upload(folder, f"{BUCKET}/FLUX.1-tiny")
    photos = tmp_path_factory.mktemp("dog")
    for name in ("00.jpg", "01.jpg"):
        shutil.copy(dreambench_standin.root() / "dog" / name, photos / name)
    paths.upload(photos, f"{BUCKET}/concepts/dog")
    cwd = tmp_path_factory.mktemp("cwd")  # relative paths would land here; nothing may
    stopped = run_main(emulator, INTERRUPT, cwd)
    assert stopped[0] == 3, stopped[1][-5000:]
    w = paths.path(f"{BUCKET}/runs/dog")
    at_stop = {"steps": raw_steps(w / "stage_b"), "checkpoints": names(w / "stage_b" / "checkpoints")}
    resumed = run_main(emulator, 0, cwd)
    return dict(stopped=stopped, at_stop=at_stop, resumed=resumed, workdir=w, cwd=cwd,
                cache=Path(emulator["PURECC_CACHE"]), pretrained=folder)


def names(directory) -> list[str]:
    """The entries of a bucket folder, listed afresh (gcsfs caches listings per instance, and the
    runs wrote from other processes)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(str(directory)))


def raw_steps(directory) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_stopped_run_resumes_from_the_bucket(bucket_run):
    code, log = bucket_run["stopped"]
    assert code == 3 and f"stage B interrupted at step {INTERRUPT}" in log, log[-5000:]
    assert bucket_run["at_stop"] == {"steps": [1, 2, 3], "checkpoints": ["2"]}
    code, log = bucket_run["resumed"]
    assert code == 0, log[-5000:]
    assert "stage_a: resumed from step 2" in log and "stage_b: resumed from step 2" in log
    w = bucket_run["workdir"]
    assert raw_steps(w / "stage_a") == [1, 2] and raw_steps(w / "stage_b") == [1, 2, 3, 3, 4]
    for stage, steps in (("stage_a", 2), ("stage_b", 4)):
        checkpoints = names(w / stage / "checkpoints")
        assert checkpoints == (["2"] if stage == "stage_a" else ["2", "4"])
        for step in checkpoints:  # orbax's default format: one OCDBT database per process
            assert "ocdbt.process_0" in names(w / stage / "checkpoints" / step / "default")
        # sample.at_start: the first stage also samples before its first step
        want = (["000000.png"] if stage == "stage_a" else []) + [f"{steps:06d}.png"]
        assert names(w / stage / "samples") == want
        assert any(n.startswith("events.out.tfevents") for n in names(w / stage / "tensorboard"))
    assert json.loads((w / "config.json").read_text())["pretrained"] == f"{BUCKET}/FLUX.1-tiny"
    assert names(w / "jax_cache")
    assert list(bucket_run["cwd"].iterdir()) == []


def test_export_in_the_bucket_loads(bucket_run):
    from purecc_jax import paths
    from purecc_jax.weights.safetensors_io import SafetensorsFile

    export = bucket_run["workdir"] / "export"
    meta = json.loads((export / "purecc.json").read_text())
    assert meta["stage"] == "stage_b" and "pytorch_lora_weights.safetensors" in meta["files"]
    with paths.local_file(export / "pytorch_lora_weights.safetensors") as local:
        lora = SafetensorsFile(local)
        values = [np.array(lora.get(k)) for k in lora.keys()]
    assert values and all(np.isfinite(v).all() for v in values)
    assert any(np.abs(v).max() > 0 for v in values)


def test_bucket_folders_were_copied_once_and_checked(bucket_run):
    found = [p for p in bucket_run["cache"].glob("*/*") if (p / ".purecc_manifest.json").is_file()]
    copies = {p.name: p for p in found}
    assert len(found) == len(copies) and {"FLUX.1-tiny", "dog"} <= set(copies)  # names kept: the concept is "dog"
    manifest = json.loads((copies["FLUX.1-tiny"] / ".purecc_manifest.json").read_text())
    assert "transformer/config.json" in manifest and all(e["crc32c"] for e in manifest.values())


def test_local_copy_follows_the_bucket_and_checks_crc32c(emulator, tmp_path, monkeypatch):
    from purecc_jax import paths

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("one")
    (tmp_path / "src" / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "src" / "skipped.safetensors").write_bytes(b"big")
    url = f"{BUCKET}/copy-test/src"
    paths.upload(tmp_path / "src", url)
    local = paths.local_copy(url, only=("a.txt", "sub"))
    assert local.name == "src" and (local / "a.txt").read_text() == "one"
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01" and not (local / "skipped.safetensors").exists()
    assert paths.local_copy(url, only=("a.txt", "sub")) == local  # found, not copied again
    paths.path(f"{url}/a.txt").write_text("changed")
    assert (paths.local_copy(url, only=("a.txt", "sub")) / "a.txt").read_text() == "changed"
    paths.path(f"{url}/a.txt").write_text("changed again")
    monkeypatch.setattr(paths, "_crc32c", lambda f: "AAAAAA==")  # what a corrupted download would give
    with pytest.raises(OSError, match="is corrupt"):
        paths.local_copy(url, only=("a.txt", "sub"))
    assert not (local / ".purecc_manifest.json").exists()  # an unchecked copy never counts as complete


SAMPLING = ["--steps=2", "--height=32", "--width=32", f"--max_sequence_length={L}", "--seed=0", "--noprogress"]


def bucket_image(url: str) -> np.ndarray:
    from PIL import Image

    from purecc_jax import paths

    with paths.path(url).open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def sampled(bucket_run):
    """`purecc_jax.sample` of the bucket run: --workdir and --output (PNG) in the bucket, and --export in the
    bucket on the local pretrained folder with a .npy --output in the bucket; the same prompt and seed."""
    from purecc_jax import paths
    from purecc_jax import sample as sample_cli

    identifier = json.loads((bucket_run["workdir"] / "export" / "purecc.json").read_text())["identifier"]
    prompt = f"a {identifier} dog on the beach"
    sample_cli.cli(["sample", f"--workdir={BUCKET}/runs/dog", f"--prompt={prompt}", *SAMPLING,
                    f"--output={BUCKET}/samples/workdir.png"])
    sample_cli.cli(["sample", f"--export={BUCKET}/runs/dog/export", f"--pretrained={bucket_run['pretrained']}",
                    f"--prompt={prompt}", *SAMPLING, f"--output={BUCKET}/samples/export.npy"])
    with paths.path(f"{BUCKET}/samples/export.npy").open("rb") as f:
        from_export = np.load(f)
    return dict(prompt=prompt, png=bucket_image(f"{BUCKET}/samples/workdir.png"), npy=from_export)


def test_sample_a_run_in_the_bucket(sampled, bucket_run):
    assert names(f"{BUCKET}/samples") == ["export.npy", "workdir.png"]
    assert sampled["npy"].shape == (1, 32, 32, 3)
    want = np.round(sampled["npy"][0] * 255).astype(np.int16)
    assert np.abs(sampled["png"] - want).max() <= 1  # the workdir's export on the pretrained folder it names
    assert sampled["png"].std() > 0
    assert list(bucket_run["cwd"].iterdir()) == []


def test_evaluation_writes_to_the_bucket(sampled, bucket_run):
    """The sweep of the bucket run: its DreamBench folder (the concept's parent) and its output in the bucket."""
    from purecc_jax import paths
    from purecc_jax.evaluation import sweep

    paths.path(f"{BUCKET}/concepts/prompts_and_classes.txt").write_text(dreambench_standin.PROMPTS)
    output = f"{BUCKET}/eval"
    sweep.cli(["sweep", f"--workdirs={BUCKET}/runs/dog", f"--output={output}", "--seeds=1", "--batch_size=1",
               "--reference_resolution=32", *(a for a in SAMPLING if a not in ("--seed=0", "--noprogress"))])
    assert names(output) == ["dog", "results.json", "results.md"]
    assert names(f"{output}/dog") == ["base", "customized", "grid.png"]
    assert names(f"{output}/dog/customized") == names(f"{output}/dog/base") == ["p00_s0.png"]
    results = json.loads(paths.path(f"{output}/results.json").read_text())
    (run,) = results["runs"]
    assert run["workdir"] == f"{BUCKET}/runs/dog" and run["images"] == f"{output}/dog"
    assert run["pretrained"] == f"{BUCKET}/FLUX.1-tiny" and run["subject"] == "dog"
    assert [p["complete"] for p in run["prompts"]] == [sampled["prompt"]]
    assert "| dog | dog |" in paths.path(f"{output}/results.md").read_text()
    # the customized image is the sample CLI's of the same prompt and seed
    assert np.abs(bucket_image(f"{output}/dog/customized/p00_s0.png") - sampled["png"]).max() <= 1
    assert (paths.cache_root() / "dreambench_tfds").is_dir()  # the TFDS files are read locally (ArrayRecord)
