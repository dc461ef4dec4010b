"""Weights & Biases logging (LoopConfig.wandb, config.log.wandb_project) in wandb's offline mode: the
stage's W&B run holds the scalars of metrics.jsonl / TensorBoard and the sample grids, a resumed stage
continues the same run, and without wandb installed the loop refuses naming the package."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from purecc_jax.purecc import loop
from purecc_jax.purecc.step import init_state, make_optimizer


def records(path: Path):
    """The protobuf records of an offline run's .wandb file (LevelDB log blocks of 32 KiB after a 7-byte
    header; a record is whole (1) or split as first (2), middle (3) and last (4))."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_dirs(directory: Path) -> list[Path]:
    """The offline W&B run folders of a stage, oldest first, once written: `finish` may return before
    wandb's service has written a run's records; `teardown` waits for them."""
    import wandb

    wandb.teardown()
    return sorted((directory / "wandb").glob("offline-run-*"))


def history(run_dir: Path) -> tuple[dict, dict[int, dict]]:
    """(the run record's id, name, group, config; {step: logged values}) of an offline run folder."""
    (file,) = run_dir.glob("run-*.wandb")
    run, rows = {}, {}
    for r in records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = dict(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, project=r.run.project,
                       config={u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, rows


def run_stage(directory: Path, steps: int, wandb: loop.WandbConfig | None):
    """A toy stage: w += 1 per step, a 'loss' of 1 / step, sample grids every 2 steps."""
    tx = make_optimizer({"w": 1e-2})
    state = init_state({"w": jnp.ones(3)}, tx, seed=0)

    def step(state, frozen, batch):
        return state.replace(step=state.step + 1, trainable={"w": state.trainable["w"] + 1.0}), dict(
            loss=1.0 / (state.step + 1.0), grad_norm=state.trainable["w"][0])

    def sample(state):
        shade = float(state.trainable["w"][0]) / 10.0
        return np.full((2, 16, 16, 3), shade, np.float32), ["a", "b"]

    cfg = loop.LoopConfig(steps=steps, log_every=1, checkpoint_every=2, sample_every=2, async_checkpoints=False,
                          progress=False, wandb=wandb)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    return loop.run_stage("stage_a", directory, cfg, state, shardings, jax.jit(step), {}, jnp.asarray, sample)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_logs_the_scalars_and_grids_of_tensorboard(tmp_path, offline):
    wandb = loop.WandbConfig(project="purecc-test", run="dog", config={"seed": 0, "stage_a": {"steps": 4}})
    run_stage(tmp_path, 4, wandb)
    (run_dir,) = run_dirs(tmp_path)
    run, rows = history(run_dir)
    assert run == dict(id=(tmp_path / "wandb_run_id").read_text(), name="dog/stage_a", group="dog",
                       project="purecc-test", config={"seed": 0, "stage_a": {"steps": 4}})
    jsonl = {r.pop("step"): r for r in loop.read_metrics(tmp_path)}
    assert sorted(rows) == sorted(jsonl) == [1, 2, 3, 4]
    for step, want in jsonl.items():  # the same scalars as metrics.jsonl and TensorBoard
        assert {k: v for k, v in rows[step].items() if not k.startswith("stage_a/samples")} == want
    for step in (2, 4):  # the sample grids, pixel for pixel
        media = run_dir / "files" / rows[step]["stage_a/samples/path"]
        np.testing.assert_array_equal(np.asarray(Image.open(media).convert("RGB")),
                                      np.asarray(Image.open(tmp_path / "samples" / f"{step:06d}.png")))
    assert "stage_a/samples/path" not in rows[1] | rows[3]


def test_a_resumed_stage_continues_its_wandb_run(tmp_path, offline):
    wandb = loop.WandbConfig(project="purecc-test")
    run_stage(tmp_path, 2, wandb)
    run_id = (tmp_path / "wandb_run_id").read_text()
    time.sleep(1.1)  # wandb names an offline run's folder by its id and start time in seconds
    final = run_stage(tmp_path, 4, wandb)
    assert int(final.step) == 4 and (tmp_path / "wandb_run_id").read_text() == run_id
    first, second = run_dirs(tmp_path)
    assert [history(d)[0]["id"] for d in (first, second)] == [run_id, run_id]
    assert history(first)[0]["name"] == "stage_a" and sorted(history(second)[1]) == [3, 4]


def test_without_wandb_the_loop_refuses_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError meanwhile
    message = r"config.log.wandb_project='purecc-test' .* needs the wandb package: `pip install wandb`"
    with pytest.raises(ImportError, match=message):
        loop.require_wandb("purecc-test")
    with pytest.raises(ImportError, match=message):
        run_stage(tmp_path, 2, loop.WandbConfig(project="purecc-test"))
    assert not (tmp_path / "metrics.jsonl").exists()
    run_stage(tmp_path / "plain", 2, None)  # no W&B asked for: no wandb needed
    assert [r["step"] for r in loop.read_metrics(tmp_path / "plain")] == [1, 2]
