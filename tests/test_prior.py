"""DreamBooth's prior preservation as a trainer option: the class images drawn once by the pretrained model
and cached, their views in the concept cache, the loss L_CC + w · L_CC(class), and a rerun that reads the
cached images back (FLUX and SD3 tiny pipelines)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_files
import dreambench_standin
import pipeline_reference
import tiny_runs
from purecc_jax import backbones, sharding, train
from purecc_jax.data.cache import ConceptCache
from purecc_jax.models import lora
from purecc_jax.pipeline import flow
from purecc_jax.purecc import loop
from purecc_jax.purecc.objective import flow_loss
from purecc_jax.purecc.step import Extractor, Frozen, StepConfig, Weights, make_loss_fn
from sd3_reference import build_pipeline
from step_fixtures import batch, denoiser_of, random_cache, random_lora, tiny_flux

LCFG = lora.LoRAConfig(rank=2, alpha=4.0)
PRIOR = {"prior.weight": 0.5, "prior.class_images": 3, "prior.steps": 2, "prior.prompt": "a {class_word}"}


def test_class_batches_are_deterministic_and_leave_the_concept_draws_alone():
    texts = {k: np.arange(10, dtype=np.int32) + i for i, k in enumerate(("complete", "base", "target"))}
    plain = ConceptCache({}, ["", "a"], texts, np.arange(10) % 3)
    prior = ConceptCache({}, ["", "a"], texts, np.arange(10) % 3, class_views=np.arange(6, 10, dtype=np.int32))
    a, b = plain.batch(5, 4, seed=1), prior.batch(5, 4, seed=1)
    assert "class_image" not in a and set(b) == set(a) | {"class_image", "class_text"}
    assert all(b["image"] < 6) and set(b["class_image"]) <= set(range(6, 10))
    assert np.array_equal(b["class_text"], texts["complete"][b["class_image"]])
    assert all(np.array_equal(b[k], prior.batch(5, 4, seed=1)[k]) for k in b)  # a resumed run draws the same
    # without class views, the concept's draws are today's: a run without prior preservation is unchanged
    assert np.array_equal(a["image"], np.random.default_rng([1, 5]).choice(10, 4, replace=False))


@pytest.mark.parametrize("stage", ["cc", "purecc"])
def test_loss_adds_the_weighted_class_term(stage):
    """The fused step's loss with class examples = its loss without them + w · L_CC of the class examples,
    the class examples drawn from the step's rng folded with 1 and conditioned on their text."""
    cfg, params = tiny_flux()
    cache = random_cache(cfg)
    denoiser = denoiser_of(cfg)
    trainable = {"lora": random_lora(params, LCFG, seed=2)}
    frozen = Frozen(params=params, cache=cache, extractor=Extractor(lora=random_lora(params, LCFG, seed=1)))
    b, rng = batch(), jax.random.key(3)
    prior_batch = dict(b, class_image=jnp.array([2, 1], jnp.int32), class_text=jnp.array([4, 4], jnp.int32))
    scfg = StepConfig(stage=stage, trainable_lora=LCFG, extractor_lora=LCFG)
    base_loss, base_m = make_loss_fn(denoiser, scfg)(trainable, frozen, b, rng)
    loss, m = make_loss_fn(denoiser, StepConfig(stage=stage, trainable_lora=LCFG, extractor_lora=LCFG,
                                                prior_weight=0.5))(trainable, frozen, prior_batch, rng)

    x0 = cache["latents"][prior_batch["class_image"]]
    noise, t_rng = jax.random.split(jax.random.fold_in(rng, 1))
    x1 = jax.random.normal(noise, x0.shape)
    t = flow.sample_timesteps(t_rng, 2, scfg.timesteps)
    model = Weights(params=params, lora=lora.variables(trainable["lora"], LCFG))
    v = denoiser.velocity(model, cache, flow.noisy(x0, x1, t), t,
                          denoiser.condition(model, cache, "base", prior_batch["class_text"]))
    want = flow_loss(v, x0, x1)
    np.testing.assert_allclose(float(m["l_prior"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base_loss) + 0.5 * float(want), rtol=1e-5)
    np.testing.assert_allclose(float(m["l_cc"]), float(base_m["l_cc"]), rtol=1e-5)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(path, guidance_embeds=True, seed=0)
    return path


def _trainer(config, workdir):
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    parts = backbones.select(config.pretrained, config.model.backbone).load(
        config.pretrained, mesh=mesh, **train.model_runtime(config))
    return train.Trainer(config, workdir, parts)


def test_flux_run_draws_caches_and_reuses_its_class_images(flux_folder, tmp_path, monkeypatch):
    config = config_files.load("flux_concept", {
        "pretrained": str(flux_folder), **tiny_runs.tiny(**{
            "concept.path": "dog", "concept.dreambench_root": str(dreambench_standin.root()),
            "method": "dreambooth", "concept_embedding": "none", "stage_a.steps": 2, "checkpoint_every": 2,
            "sample.prompts": (), **PRIOR})})
    trainer = _trainer(config, tmp_path / "run")
    files = sorted((tmp_path / "run" / "class_images").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    cache = trainer.cache
    assert len(cache.class_views) == 3 and cache.n_views + 3 == len(cache.view_image)
    assert {cache.texts[i] for i in cache.view_texts["complete"][cache.class_views]} == {"a dog"}
    trainer.run()
    assert all("l_prior" in row for row in loop.read_metrics(tmp_path / "run" / "stage_a"))

    # Again: the images are read back (nothing drawn), and the cache is the same to the bit.
    monkeypatch.setattr(type(trainer.backbone), "generate", lambda *a, **k: pytest.fail("drew the class again"))
    again = _trainer(config, tmp_path / "run")
    for k, v in cache.arrays.items():
        np.testing.assert_array_equal(v, again.cache.arrays[k])


def test_sd3_run_with_prior_preservation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    build_pipeline().save_pretrained(folder, safe_serialization=True)
    config = config_files.load("sd35_concept", {
        "pretrained": str(folder), **tiny_runs.tiny(**{
            "concept.path": "dog", "concept.dreambench_root": str(dreambench_standin.root()),
            "method": "dreambooth", "model.max_sequence_length": 10, "stage_a.steps": 2, "checkpoint_every": 2,
            "sample.prompts": (), **PRIOR, "prior.guidance": 2.0})})
    workdir = tmp_path_factory.mktemp("sd3_prior") / "run"
    trainer = _trainer(config, workdir)
    assert len(trainer.cache.class_views) == 3 and len(list((workdir / "class_images").glob("*.png"))) == 3
    trainer.run()
    rows = loop.read_metrics(workdir / "stage_a")
    assert rows and all(np.isfinite(r["l_prior"]) and r["l_prior"] > 0 for r in rows)


def test_prior_settings_are_checked():
    config = config_files.load("flux_concept", {"concept.path": "x", "prior.weight": -1.0})
    with pytest.raises(ValueError, match="prior.weight=-1.0"):
        train.validate(config)
    config = config_files.load("flux_concept", {"concept.path": "x", "prior.weight": 1.0,
                                                "prior.prompt": "a {identifier} dog"})
    with pytest.raises(ValueError, match="names the identifier"):
        train.validate(config)
