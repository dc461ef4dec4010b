"""Bad inputs fail early and say what is wrong: damaged checkpoints, FLUX.1-schnell where dev is
configured, unknown config keys and impossible config values; the loop stops on NaN streaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_files
from flux_reference import build_torch, tiny_config
from purecc_jax import defaults, sharding, train
from purecc_jax import main as main_lib
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.folder import check_guidance
from purecc_jax.purecc import loop
from purecc_jax.purecc.step import init_state, make_optimizer
from purecc_jax.weights.loader import WeightsError
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

TINY = tiny_config()


@pytest.fixture(scope="module")
def state_dict():
    model = build_torch(TINY)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def transformer_folder(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


# ----------------------------------------------------------------------------- checkpoints


def test_truncated_safetensors_names_the_file(state_dict, tmp_path):
    folder = transformer_folder(tmp_path / "transformer", state_dict)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # an interrupted download
    with pytest.raises(ValueError, match=rf"{path} is truncated: {len(data) - 100} bytes.*download it again"):
        flux_io.load_transformer(folder)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(ValueError, match=rf"{path} is truncated or not a safetensors file"):
        SafetensorsFile(path)


def test_header_inconsistent_with_shapes_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.zeros((2, 3), np.float32)}, path)
    data = bytearray(path.read_bytes())
    header = data[8:8 + int.from_bytes(data[:8], "little")]
    fixed = header.replace(b'"shape":[2,3]', b'"shape":[3,3]')
    path.write_bytes(bytes(data[:8] + fixed + data[8 + len(header):]))
    with pytest.raises(ValueError, match=r"x\.safetensors: tensor 'w' .*spans 24 bytes, its shape needs 36"):
        SafetensorsFile(path)


def test_wrong_dtype_and_shape_are_named(state_dict, tmp_path):
    sd = dict(state_dict)
    sd["proj_out.bias"] = sd["proj_out.bias"].astype(np.int32)
    sd["x_embedder.weight"] = np.zeros((3, 3), np.float32)
    folder = transformer_folder(tmp_path / "transformer", sd)
    with pytest.raises(WeightsError, match=r"(?s)right model's folder.*'x_embedder.weight' has shape \(3, 3\)"
                                           r".*'proj_out.bias' has dtype int32.*floating point"):
        flux_io.load_transformer(folder)


def test_schnell_where_dev_is_configured(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(tiny_config(guidance_embeds=False)))
    with pytest.raises(ValueError, match=r"guidance_embeds=false.*FLUX.1-schnell.*train_guidance=1.0.*"
                                         r"--config.train_guidance=0"):
        check_guidance(tmp_path, 1.0)
    check_guidance(tmp_path, 0.0)  # a model without guidance, trained without it: accepted
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(tiny_config(guidance_embeds=True)))
    check_guidance(tmp_path, 1.0)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("flag,message", [("--config.stage_a.stepz=3", 'Did you mean "steps"'),
                                          ("--config.stage_a.steps=many", "many"), ("--config.nonsense=1", "nonsense")])
def test_unknown_and_mistyped_override_keys_are_refused(tmp_path, capsys, flag, message):
    """ml_collections refuses them while the command line is parsed, before any work."""
    with pytest.raises((SystemExit, AttributeError, KeyError, ValueError, TypeError)) as e:
        main_lib.cli(["main", f"--workdir={tmp_path}", flag])
    assert message in str(e.value) + capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


def valid_config():
    config = defaults.concept_config()
    config.concept.path = "dog"
    config.concept.class_word = "dog"
    return config


@pytest.mark.parametrize("key,value,message", [
    ("stage_a.steps", 0, r"config.stage_a: steps=0 .* must be >= 1"),
    ("stage_b.steps", -1, r"config.stage_b: steps=-1"),
    ("stage_b.grad_accum", 3, r"config.stage_b.grad_accum=3 must be >= 1 and divide steps=400"),
    ("stage_a.warmup_steps", 500, r"config.stage_a.warmup_steps=500 must be in \[0, steps=400\]"),
    ("concept.resolution", "500", r"config.concept.resolution='500': resolution '500'.*multiples of 16"),
    ("sample.height", 100, r"config.sample.height=100 .*multiple of 16"),
    ("checkpoint_every", 0, r"config.checkpoint_every=0 must be >= 1"),
    ("max_nonfinite_steps", -1, r"config.max_nonfinite_steps=-1"),
])
def test_impossible_values_are_refused(key, value, message):
    train.validate(valid_config())
    config = valid_config()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        train.validate(config)


def test_dreambooth_may_leave_stage_b_at_zero_steps():
    config = valid_config()
    config.method, config.stage_b.steps = "dreambooth", 0
    train.validate(config)


def test_mesh_that_does_not_fit_the_devices():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"{n} devices cannot be split into mesh \[-1, 3, 1\]"):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match=rf"needs {2 * n} devices, {n} are available"):
        sharding.make_mesh(data=2, fsdp=n)


@pytest.mark.parametrize("mesh,batches,expected", [
    ((-1, 1, 1), (2, 2), (2, 4, 1)),   # the default on 8 devices: 2 data replicas, the rest shard weights
    ((-1, 1, 1), (8, 4), (4, 2, 1)),
    ((-1, 2, 2), (1,), (1, 4, 2)),
    ((-1, 1, 1), (), (8, 1, 1)),       # no batch given: all devices on data
    ((2, -1, 1), (2, 4), (2, 4, 1)),
    ((1, 1, -1), (3,), (1, 1, 8)),
])
def test_mesh_sizes_follow_the_batch(mesh, batches, expected):
    assert sharding.mesh_sizes(*mesh, 8, batches) == expected


@pytest.mark.parametrize("mesh,batches,message", [
    ((8, 1, 1), (2,), r"a batch of 2 cannot be split over config.mesh.data=8"),
    ((2, -1, 1), (3,), r"a batch of 3 cannot be split over config.mesh.data=2"),
    ((-1, 3, 1), (2,), r"8 devices cannot be split into mesh \[-1, 3, 1\]"),
    ((2, 2, 1), (2,), r"config.mesh data=2 fsdp=2 tensor=1 needs 4 devices, 8 are available"),
    ((0, 1, 1), (2,), r"config.mesh sizes must be >= 1 or -1"),
])
def test_impossible_meshes_are_refused(mesh, batches, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_sizes(*mesh, 8, batches)


def test_cli_refuses_a_batch_the_data_axis_cannot_split_before_reading_anything(tmp_path):
    """Before the pretrained folder is read (here it does not exist) or anything compiles."""
    n = jax.device_count()
    assert n == 8, "tests run on 8 virtual CPU devices (tests/conftest.py)"
    with pytest.raises(ValueError, match=r"a batch of 2 cannot be split over config.mesh.data=8"):
        main_lib.cli(["main", f"--workdir={tmp_path / 'w'}", "--config=configs/flux_concept.py",
                      f"--config.pretrained={tmp_path / 'missing'}", "--config.concept.path=dog",
                      "--config.concept.class_word=dog", "--config.mesh.data=8", "--config.stage_a.batch_size=2"])
    assert not (tmp_path / "w" / "config.json").exists()


# ----------------------------------------------------------------------------- non-finite streaks


def test_loop_stops_after_a_streak_of_skipped_steps(tmp_path):
    """A step that always skips (as the train step does on NaN): the loop stops after N, naming the
    limit; the checkpoint it left holds the finite parameters."""
    tx = make_optimizer({"w": 1e-2})
    state = init_state({"w": jnp.ones(3)}, tx, seed=0)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)

    def step(state, frozen, batch):
        bad = batch >= 3  # steps 3, 4, ... are poisoned
        skipped = bad.astype(jnp.int32)
        w = jnp.where(bad, state.trainable["w"], state.trainable["w"] + 1.0)
        state = state.replace(step=state.step + 1, trainable={"w": w},
                              nonfinite_skipped=state.nonfinite_skipped + skipped,
                              nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
        loss = jnp.where(bad, jnp.nan, 1.0)
        return state, dict(loss=loss, nonfinite_skipped=state.nonfinite_skipped,
                           nonfinite_streak=state.nonfinite_streak)

    cfg = loop.LoopConfig(steps=20, log_every=1, checkpoint_every=2, async_checkpoints=False, progress=False,
                          max_nonfinite_steps=4)
    with pytest.raises(loop.NonFiniteError, match=r"stage_x: 4 steps in a row \(up to step 7\).*NaN or Inf.*"
                                                  r"latest checkpoint: step 6.*max_nonfinite_steps=4"):
        loop.run_stage("stage_x", tmp_path, cfg, state, shardings, jax.jit(step), {}, jnp.asarray)
    rows = loop.read_metrics(tmp_path)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 0, 1, 2, 3]  # step 7's row is not logged
    import orbax.checkpoint as ocp

    saved = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "6" / "default")
    np.testing.assert_array_equal(saved["trainable"]["w"], np.full(3, 4.0))  # 1 + three finite steps


def test_metrics_file_cut_mid_line_is_repaired(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    writer = loop.MetricWriter(tmp_path)
    writer.scalars(2, {"loss": 0.5})
    writer.close()
    assert loop.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_toy_experiment_keys_do_not_block_a_method_runs_resume(tmp_path):
    """More methods or seeds in the toy world resume the finished runs (the experiment's keys are its own
    `RESUME_IGNORES`, not the trainer's); a training key still refuses."""
    from purecc_jax.toyworld.experiment import RESUME_IGNORES

    config = config_files.load("toy_concept", {"concept.path": str(tmp_path / "concept")})
    train.save_config(config, tmp_path)
    config.toy.seeds, config.toy.ablations, config.toy.etas = (0, 1), True, (100.0,)
    config.toy.evaluation.samples = 20
    with pytest.raises(ValueError, match="toy.seeds"):
        train.check_resume(config, tmp_path)  # the trainer alone knows no toy keys
    train.check_resume(config, tmp_path, RESUME_IGNORES)
    config.toy.transformer.depth = 3  # the base model's shape: a different run
    config.stage_b.lora.rank = 2
    with pytest.raises(ValueError, match=r"(?s)stage_b.lora.rank: 8 there, 2 now.*toy.transformer.depth: 2 there, "
                                         r"3 now"):
        train.check_resume(config, tmp_path, RESUME_IGNORES)


def test_config_is_rewritten_in_one_piece(tmp_path, monkeypatch):
    """Process 0 writes config.json again on a resume while the other processes read it (check_resume):
    a reader must find the old file or the new one. Written in place, it found an empty file
    (JSONDecodeError), died, and left process 0 waiting at a barrier."""
    config = config_files.load("toy_concept", {"concept.path": str(tmp_path / "concept")})
    train.save_config(config, tmp_path)
    before = (tmp_path / "config.json").read_bytes()
    seen = []
    replace = os.replace

    def replace_checked(src, dst):
        seen.append((tmp_path / "config.json").read_bytes())  # what a reader finds while the new one is written
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_checked)
    config.stage_b.steps += 1
    train.save_config(config, tmp_path)
    assert seen == [before]
    assert json.loads((tmp_path / "config.json").read_text())["stage_b"]["steps"] == config.stage_b.steps
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left beside it
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the run writes


def test_metric_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch (1-2 s) where it is installed, as it is here; the writer does without it,
    writes its event file, and torch still imports afterwards."""
    code = ("import sys; import numpy as np; from pathlib import Path; from purecc_jax.purecc import loop\n"
            f"w = loop.MetricWriter(Path({str(tmp_path)!r}))\n"
            "w.scalars(1, {'loss': 0.5}); w.image(1, 'grid', np.zeros((4, 4, 3), np.uint8)); w.close()\n"
            "print('torch' in sys.modules); import torch; print(torch.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "torch"]
    assert loop.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
