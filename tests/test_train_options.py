"""The training options together, end to end on tiny FLUX and SD3 pipelines (one device).

FLUX, PureCC with token embeddings: aspect-ratio buckets (photos of three shapes: three training sizes,
a batch from one at a time), a masked loss (a mask file), caption dropout, timesteps.shift="auto", an EMA,
samples of two sizes and at step 0. Interrupted in stage B and resumed, it ends bit-identical to an
uninterrupted run; its export is the EMA, as `python -m purecc_jax.export` writes it (and the trained
weights with --noema). SD3: DreamBooth with buckets, a masked loss (alpha channel) and the auto shift (its
scheduler's static 3.0). FLUX with schedule-free AdamW: the export is the optimizer's average.

Runs of one configuration compile the same programs: the module keeps a persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import config_files
import pipeline_reference
import tiny_runs
from purecc_jax import backbones, sharding, train
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib
from purecc_jax.purecc import loop
from purecc_jax.weights import diffusers_lora
from purecc_jax.weights.safetensors_io import SafetensorsFile
from tiny_runs import compilation_cache  # noqa: F401  (the module's autouse fixture)

PROMPTS = ("a photo of {identifier} {class_word}", "a {identifier} {class_word} on the beach")
OPTIONS = {
    "concept.path": "", "concept.class_word": "dog", "concept.resolution": "64", "concept.buckets": True,
    "concept.bucket_step": 16, "concept.masked_loss": True, "concept.caption_dropout": 0.3,
    "timesteps.shift": "auto", "ema.decay": 0.5, "stage_a.steps": 2, "stage_b.steps": 4,
    "stage_a.learning_rate": 1e-3, "stage_b.learning_rate": 1e-3, "checkpoint_every": 2,
    "sample.prompts": PROMPTS, "sample.height": (32, 48), "sample.width": (32, 32), "sample.steps": 2,
}


def photo(path: Path, w: int, h: int, seed: int, alpha: bool = False) -> None:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        small[..., 3] = 255
        small[2:, :, 3] = 0  # the bottom half transparent: masked out
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three shapes (landscape, square, portrait); the landscape one with a mask of its left half."""
    folder = tmp_path_factory.mktemp("photos") / "dog"
    folder.mkdir()
    photo(folder / "a.png", 96, 60, 0)
    mask = np.zeros((60, 96), np.uint8)
    mask[:, :48] = 255
    Image.fromarray(mask).save(folder / f"a{concept_lib.MASK_SUFFIX}")
    photo(folder / "b.png", 64, 64, 1)
    photo(folder / "c.png", 60, 96, 2)
    return folder


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(path, guidance_embeds=True, seed=0)
    return path


def trainer_of(config, workdir) -> train.Trainer:
    """The trainer `train.run` builds, on one device."""
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    backbone = backbones.select(config.pretrained, config.model.backbone)
    parts = backbone.load(config.pretrained, mesh=mesh, **train.model_runtime(config))
    return train.Trainer(config, workdir, parts, backbone=backbone)


class Interrupted(Exception):
    pass


def run(config, workdir, interrupt_stage_b_at: int | None = None) -> train.Stage:
    trainer = trainer_of(config, workdir)
    if interrupt_stage_b_at is None:
        return trainer.run()
    original = trainer.batch_fn

    def batch_fn(batch_size, seed):
        get = original(batch_size, seed)

        def batch(step):
            if seed == config.seed + 1 and step == interrupt_stage_b_at:
                raise Interrupted(step)
            return get(step)
        return batch

    trainer.batch_fn = batch_fn
    with pytest.raises(Interrupted):
        trainer.run()


def export_tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    files = {p.name: SafetensorsFile(p) for p in sorted(folder.glob("*.safetensors"))}
    return {name: {k: np.array(f.get(k)) for k in f.keys()} for name, f in files.items()}


def assert_same_files(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{name}: {key}")


@dataclasses.dataclass
class FluxRuns:
    config: object
    straight: Path
    resumed: Path
    final: train.Stage


@pytest.fixture(scope="module")
def flux_runs(flux_folder, photos, tmp_path_factory):
    config = config_files.load("flux_concept", {**tiny_runs.tiny(), **OPTIONS, "pretrained": str(flux_folder),
                                                "concept.path": str(photos)})
    base = tmp_path_factory.mktemp("options")
    final = run(config, base / "straight")
    run(config, base / "resumed", interrupt_stage_b_at=3)
    run(config, base / "resumed")
    return FluxRuns(config, base / "straight", base / "resumed", final)


@pytest.fixture(scope="module")
def options_trainer(flux_runs, tmp_path_factory):
    return trainer_of(flux_runs.config, tmp_path_factory.mktemp("cache") / "run")


def test_buckets_masks_and_shift_in_the_cache(options_trainer):
    trainer = options_trainer
    assert trainer.sizes == [(48, 80), (80, 48), (64, 64)]
    shifts = [float(c["timestep_shift"]) for c in trainer.cache_devices]
    want = [train.schedule_lib.training_shift(trainer.parts.scheduler, (h // 16) * (w // 16))
            for h, w in trainer.sizes]
    np.testing.assert_allclose(shifts, want, rtol=1e-6)
    assert shifts[0] < shifts[2]  # more image tokens, a larger shift
    for cache, (h, w) in zip(trainer.caches, trainer.sizes):
        latents, weight = cache.arrays["latents"], cache.arrays["loss_weight"]
        assert latents.shape == (cache.n_views, (h // 16) * (w // 16), 64) and weight.shape == latents.shape
    # The landscape photo's mask (left half) at latent resolution: 10 latent columns of 2x2 patches, 5 kept.
    tokens = trainer.caches[0].arrays["loss_weight"][0].reshape(3, 5, 64)
    np.testing.assert_allclose(tokens[:, :2], 1.0)
    np.testing.assert_allclose(tokens[:, 3:], 0.0)
    np.testing.assert_allclose(trainer.caches[2].arrays["loss_weight"], 1.0)  # no mask: every element counts
    # Batches from every size; a size's batch holds only its views; dropped captions read the null text.
    batch_fn = trainer.batch_fn(2, seed=0)
    batches = [batch_fn(step) for step in range(40)]
    assert {b.bucket for b in batches} == {0, 1, 2}
    for b in batches:
        assert int(np.max(b.indices["image"])) < trainer.caches[b.bucket].n_views
    assert any((np.asarray(b.indices["complete"]) == cache_lib.NULL).any() for b in batches)
    assert trainer.cache.texts[cache_lib.NULL] == ""


def test_samples_during_training_are_drawn_from_the_ema(options_trainer, monkeypatch):
    """The stage's sample_fn gives the sampler the EMA's LoRA and embeddings, and calls it once per prompt size."""
    from purecc_jax.models import lora as lora_lib

    trainer = options_trainer
    inputs = train.stage_a_inputs(trainer.config, trainer.backbone, trainer.parts, trainer.cache_device, trainer.mesh,
                                  trainer.initial_embeddings())
    program = train.stage_program(trainer.config, trainer.backbone, trainer.parts, "stage_a", inputs.step_cfg,
                                  inputs.trainable)
    state = program.init(inputs.trainable)
    average = jax.tree_util.tree_map(lambda x: x + 0.5, state.ema.params)  # an EMA away from the weights
    state = state.replace(ema=state.ema.replace(params=average))
    calls = []

    def generate(parts, prompts, settings, *, seeds, trained=None, codec=None, **kw):
        calls.append((list(prompts), settings.height, trained))
        return np.zeros((len(prompts), settings.height, settings.width, 3), np.float32)

    monkeypatch.setattr(trainer.backbone, "generate", generate)
    images, captions = trainer._sample_fn(inputs.lora, inputs.frozen)(state)
    assert [(len(p), h) for p, h, _ in calls] == [(1, 32), (1, 48)]
    assert [image.shape for image in images] == [(32, 32, 3), (48, 32, 3)] and len(captions) == 2
    for _, _, trained in calls:
        want = lora_lib.variables(average["lora"], inputs.lora)
        for a, b in zip(jax.tree_util.tree_leaves(trained.lora), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        leaves = jax.tree_util.tree_leaves
        for a, b in zip(leaves(trained.embeddings), leaves(average["embeddings"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resumed_run_is_bit_identical(flux_runs):
    assert [r["step"] for r in loop.read_metrics(flux_runs.resumed / "stage_b")] == [1, 2, 3, 4]
    assert_same_files(export_tensors(flux_runs.resumed / "export"), export_tensors(flux_runs.straight / "export"))
    for stage in ("stage_a", "stage_b"):
        got, want = loop.read_metrics(flux_runs.resumed / stage), loop.read_metrics(flux_runs.straight / stage)
        assert [r["loss"] for r in got] == [r["loss"] for r in want]
        assert all(np.isfinite(r["loss"]) for r in got)


def test_the_export_is_the_ema(flux_runs, tmp_path):
    w, final = flux_runs.straight, flux_runs.final
    ema, step = trained_lib.checkpoint_weights(w / "stage_b", json.loads((w / "config.json").read_text()), ema=True)
    assert step == 4
    for a, b in zip(jax.tree_util.tree_leaves(ema["lora"]), jax.tree_util.tree_leaves(final.trainable["lora"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    # `python -m purecc_jax.export` writes the same EMA by default, the trained weights with --noema.
    trained_lib.export_checkpoint(w, tmp_path / "default", dtype="float32")
    assert_same_files(export_tensors(tmp_path / "default"), export_tensors(w / "export"))
    trained_lib.export_checkpoint(w, tmp_path / "trained", dtype="float32", ema=False)
    trained, _ = loop.restore_trainable(w / "stage_b")
    layout = flux_io.lora_layout(flux_io.read_config(flux_runs.config.pretrained))
    want = diffusers_lora.to_diffusers(trained["lora"], final.lora, layout)
    got = export_tensors(tmp_path / "trained")["pytorch_lora_weights.safetensors"]
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
    assert max(np.abs(got[k] - export_tensors(w / "export")["pytorch_lora_weights.safetensors"][k]).max()
               for k in got) > 1e-6


def test_samples_at_step_0_and_of_two_sizes(flux_runs):
    w = flux_runs.straight
    assert sorted(p.name for p in (w / "stage_a" / "samples").iterdir()) == ["000000.png", "000002.png"]
    assert sorted(p.name for p in (w / "stage_b" / "samples").iterdir()) == ["000004.png"]  # first stage only
    grid = np.asarray(Image.open(w / "stage_b" / "samples" / "000004.png"))
    assert grid.shape == (48 + 14, 2 * 96, 3)  # a 32x32 and a 48x32 image, each in a cell of the larger
    before = np.asarray(Image.open(w / "stage_a" / "samples" / "000000.png"))
    after = np.asarray(Image.open(w / "stage_a" / "samples" / "000002.png"))
    assert before.shape == after.shape and np.abs(before.astype(int) - after.astype(int)).max() > 0


def test_trainer_and_check_lower_the_same_step_of_the_largest_size(flux_folder, photos, tmp_path, monkeypatch):
    """With two training sizes, a masked loss, caption dropout, the auto shift and an EMA, the compile check
    (`preflight.Programs`, from the folder's config.json files alone) lowers the trainer's step program of
    its largest training size, for both stages, to the same StableHLO. (With buckets the check sizes that
    cache for all the concept's views, an upper bound: which photo takes which bucket is data.)"""
    from purecc_jax import preflight

    config = config_files.load("flux_concept", {**tiny_runs.tiny(), **OPTIONS, "pretrained": str(flux_folder),
                                                "concept.path": str(photos), "sample.prompts": (),
                                                "concept.buckets": False, "concept.resolution": "32,48",
                                                "stage_a.steps": 1, "stage_b.steps": 1})
    devices = jax.devices()[:1]
    sizes = train.training_sizes(config)
    largest = max(sizes, key=lambda x: (x[0] * x[1], x))
    seen = {}

    def run_stage(name, workdir, lcfg, state, state_sh, step_fn, frozen, batch_fn, sample_fn):
        batch = train.Batch(batch_fn(0).indices, trainer.sizes.index(largest))
        seen[name] = step_fn.lower(state, frozen, batch).as_text()
        return state

    monkeypatch.setattr(loop, "run_stage", run_stage)
    monkeypatch.setattr(train, "export", lambda *a: None)
    parts = flux_io_pipeline(config, devices)
    trainer = train.Trainer(config, tmp_path / "run", parts)
    assert largest in trainer.sizes
    trainer.run()
    checked = {p.key: p.lowered.as_text() for p in preflight.Programs(config, devices)}
    assert set(checked) == set(seen) == {"stage_a", "stage_b"}
    for name in seen:
        assert checked[name] == seen[name], name


def flux_io_pipeline(config, devices):
    from purecc_jax.backbones.flux.folder import load_pipeline

    return load_pipeline(config.pretrained, mesh=train.make_mesh(config, devices), **train.model_runtime(config))


# ----------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module")
def sd3_run(photos, tmp_path_factory):
    from sd3_reference import build_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    build_pipeline().save_pretrained(folder, safe_serialization=True)
    concept = tmp_path_factory.mktemp("sd3_photos") / "dog"
    concept.mkdir()
    photo(concept / "a.png", 96, 60, 0, alpha=True)  # masked by its alpha channel
    photo(concept / "b.png", 64, 64, 1)
    config = config_files.load("sd35_concept", {
        **tiny_runs.tiny(), **OPTIONS, "pretrained": str(folder), "concept.path": str(concept), "method": "dreambooth",
        "model.max_sequence_length": 10, "ema.decay": 0.0, "concept.caption_dropout": 0.0, "sample.at_start": False})
    trainer = trainer_of(config, tmp_path_factory.mktemp("sd3") / "run")
    return trainer, trainer.run()


def test_sd3_trains_on_buckets_with_a_masked_loss(sd3_run):
    trainer, _ = sd3_run
    assert trainer.sizes == [(48, 80), (64, 64)]
    assert [c.arrays["latents"].shape[1:3] for c in trainer.caches] == [(6, 10), (8, 8)]  # NHWC latents
    weight = trainer.caches[0].arrays["loss_weight"]
    assert weight.shape == trainer.caches[0].arrays["latents"].shape
    np.testing.assert_allclose(weight[0, :2], 1.0)  # the alpha channel: the top rows count, the bottom do not
    np.testing.assert_allclose(weight[0, -2:], 0.0)
    assert [float(c["timestep_shift"]) for c in trainer.cache_devices] == [3.0, 3.0]  # SD3.5's static shift
    w = trainer.workdir
    assert [r["step"] for r in loop.read_metrics(w / "stage_a")] == [1, 2]
    assert (w / "export" / "pytorch_lora_weights.safetensors").is_file()
    grid = np.asarray(Image.open(w / "stage_a" / "samples" / "000002.png"))
    assert grid.shape == (48 + 14, 2 * 96, 3) and grid.std() > 0


# ----------------------------------------------------------------------------- schedule-free AdamW


def test_schedule_free_exports_its_average(flux_folder, photos, tmp_path):
    config = config_files.load("flux_concept", {
        **tiny_runs.tiny(), "pretrained": str(flux_folder), "concept.path": str(photos), "concept.class_word": "dog",
        "method": "dreambooth", "concept_embedding": "none", "stage_a.steps": 2, "stage_a.learning_rate": 1e-2,
        "optimizer.name": "schedule_free_adamw", "sample.prompts": (), "checkpoint_every": 2})
    final = run(config, tmp_path / "run")
    w = tmp_path / "run"
    saved = json.loads((w / "config.json").read_text())
    y, _ = loop.restore_trainable(w / "stage_a")
    average, _ = trained_lib.checkpoint_weights(w / "stage_a", saved)
    for a, b in zip(jax.tree_util.tree_leaves(average), jax.tree_util.tree_leaves(final.trainable)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(average), jax.tree_util.tree_leaves(y))
               ) > 1e-6  # the average is not the gradient point y
    trained_lib.export_checkpoint(w, tmp_path / "again", dtype="float32")
    assert_same_files(export_tensors(tmp_path / "again"), export_tensors(w / "export"))
