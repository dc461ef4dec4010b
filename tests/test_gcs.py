"""Every path in a bucket, against a real GCS API offline (gcp-storage-emulator on localhost).

The pretrained folder, the concept photos and the workdir are `gs://` URLs. The tiny stage A +
stage B run is stopped in stage B and run again: it resumes from the checkpoint in the bucket,
logs and exports there, and the pretrained folder and photos were read through checked per-host
copies. The Python clients (gcsfs under etils.epath, google-cloud-storage under tensorboardX)
find the emulator through STORAGE_EMULATOR_HOST, tensorstore (orbax checkpoints) through
TENSORSTORE_GCS_HTTP_URL. Checkpoints are written without OCDBT here: the emulator mishandles the
conditional rewrites of an OCDBT manifest (see tests/multihost_worker.py); real GCS does not.
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

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
BUCKET = "gs://purecc-test"
INTERRUPT = 3
TINY = {
    "concept.path": f"{BUCKET}/concepts/dog", "concept.class_word": "dog", "concept.resolution": "32",
    "model.dtype": "float32", "model.param_dtype": "float32", "model.remat_policy": "none", "model.attention": "xla",
    "model.max_sequence_length": 16, "stage_a.steps": 4, "stage_b.steps": 4, "checkpoint_every": 2, "log_every": 1,
    "progress": False, "sample.every": 0, "sample.steps": 2, "sample.height": 32, "sample.width": 32,
    "sample.prompts": "('a photo of {identifier} {class_word}',)", "export.dtype": "float32",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator on a free port, its bucket created; the clients of this process pointed at it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=localhost",
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
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "WORKER_ORBAX_OCDBT": "0",
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
    return dict(stopped=stopped, at_stop=at_stop, resumed=resumed, workdir=w, cwd=cwd, cache=Path(emulator["PURECC_CACHE"]))


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
    assert "stage_a: resumed from step 4" in log and "stage_b: resumed from step 2" in log
    w = bucket_run["workdir"]
    assert raw_steps(w / "stage_a") == [1, 2, 3, 4] and raw_steps(w / "stage_b") == [1, 2, 3, 3, 4]
    for stage in ("stage_a", "stage_b"):
        assert names(w / stage / "checkpoints") == ["2", "4"]
        assert names(w / stage / "samples") == ["000004.png"]
        assert any(n.startswith("events.out.tfevents") for n in names(w / stage / "tensorboard"))
    assert json.loads((w / "config.json").read_text())["pretrained"] == f"{BUCKET}/FLUX.1-tiny"
    assert names(w / "jax_cache")
    assert list(bucket_run["cwd"].iterdir()) == []


def test_export_in_the_bucket_loads(bucket_run):
    from purecc_jax.weights.safetensors_io import SafetensorsFile
    from purecc_jax import paths

    export = bucket_run["workdir"] / "export"
    meta = json.loads((export / "purecc.json").read_text())
    assert meta["stage"] == "stage_b" and "pytorch_lora_weights.safetensors" in meta["files"]
    with paths.local_file(export / "pytorch_lora_weights.safetensors") as local:
        lora = SafetensorsFile(local)
        values = [np.array(lora.get(k)) for k in lora.keys()]
    assert values and all(np.isfinite(v).all() for v in values)
    assert any(np.abs(v).max() > 0 for v in values)


def test_bucket_folders_were_copied_once_and_checked(bucket_run):
    copies = {p.name: p for p in bucket_run["cache"].glob("*/*") if p.is_dir()}
    assert sorted(copies) == ["FLUX.1-tiny", "dog"]  # folder names kept: the concept is still "dog"
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
