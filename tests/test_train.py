"""The PureCC trainer end to end on a tiny diffusers FLUX folder.

The CLI (stage A, stage B, logs, samples, export), falling losses, resume after an
interruption (bit-identical to an uninterrupted run) and skipping of finished stages,
DreamBooth, the three kinds of concept embedding, diffusers loading the exports
(`load_lora_weights`, `load_textual_inversion`), `lora_export` round trips, and
`python -m purecc_jax.sample --workdir`.

Runs of one configuration compile the same programs, so the module keeps a persistent
compilation cache: the resumed and repeated runs reuse what the first run compiled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import config_files
import dreambench_standin
import flux_reference
import pipeline_reference
import tiny_runs
from tiny_runs import compilation_cache  # noqa: F401  (the module's autouse fixture)
from purecc_jax import backbones
from purecc_jax import main as main_lib
from purecc_jax import sample as sample_cli
from purecc_jax import sharding, train
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.backbones.flux.generate import generate
from purecc_jax.backbones.flux.weights import load_transformer
from purecc_jax.models import lora
from purecc_jax.models.flux import ConceptInjection, FluxConfig, FluxTransformer
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.purecc import loop
from purecc_jax.purecc.step import Frozen, StepConfig, make_loss_fn
from purecc_jax.weights import diffusers_lora as lora_export
from purecc_jax.weights.safetensors_io import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "flux_concept.py"
DREAMBENCH = dreambench_standin.root()
L = 16  # T5 tokens
PROMPT = "a photo of sks dog"

# configs/flux_concept.py shrunk to the tiny pipeline: the overrides every run here shares.
TINY = tiny_runs.tiny(**{
    "concept.path": "dog", "concept.dreambench_root": str(DREAMBENCH), "stage_a.steps": 4, "stage_b.steps": 4,
    "stage_a.learning_rate": 1e-3, "stage_b.learning_rate": 1e-3, "checkpoint_every": 2, "sample.steps": 2,
    "sample.height": 32, "sample.width": 32,
})



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny diffusers FLUX.1-dev-style pipeline folder (guidance embedding, dynamic shift)."""
    path = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(path, guidance_embeds=True, seed=0)
    return path


def make_config(folder, **overrides):
    """configs/flux_concept.py with TINY and `overrides` (dotted keys) applied."""
    return config_files.load("flux_concept", {"pretrained": str(folder), **TINY, **overrides})


def make_trainer(config, workdir) -> train.Trainer:
    """What `main.run` builds, on one device (faster to compile than the 8 CPU devices here)."""
    m = config.model
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    parts = load_pipeline(config.pretrained, mesh=mesh, dtype=m.dtype,
                          param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                          attention=m.attention)
    return train.Trainer(config, workdir, parts)


def tensors(path: Path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path)
    return {k: np.array(st.get(k)) for k in st.keys()}


def export_tensors(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {p.name: tensors(p) for p in sorted((workdir / "export").glob("*.safetensors"))}


def flux_config(folder: Path) -> FluxConfig:
    return FluxConfig.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))


def logged_steps(directory: Path) -> list[int]:
    """The steps of a stage's metrics, one per step (a resumed run's repeats replaced)."""
    return [r["step"] for r in loop.read_metrics(directory)]


def raw_steps(directory: Path) -> list[int]:
    """The step of every line of a stage's metrics.jsonl, repeats included."""
    return [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_run(folder, tmp_path_factory):
    """`python -m purecc_jax.main --config=configs/flux_concept.py ...`, in process: token embeddings, PureCC."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    argv = ["main", f"--config={CONFIG_FILE}", f"--workdir={workdir}", f"--config.pretrained={folder}"]
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
    argv.append("--nocompilation_cache")  # main's own cache would skip the small programs this module reuses
    cache_options = {n: getattr(jax.config, n) for n in tiny_runs.CACHE_OPTIONS}
    try:
        main_lib.cli(argv)
    finally:
        for name, value in cache_options.items():
            jax.config.update(name, value)
    return workdir


def test_cli_runs_stage_a_then_stage_b_and_exports(cli_run):
    w = cli_run
    assert json.loads((w / "config.json").read_text())["concept_embedding"] == "token"
    for stage in ("stage_a", "stage_b"):
        rows = loop.read_metrics(w / stage)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["l_cc"]) and r["grad_norm"] > 0 for r in rows)
        has_lambda = [any(k.startswith("lambda") for k in r) for r in rows]
        assert all(has_lambda) if stage == "stage_b" else not any(has_lambda)
        if stage == "stage_b":
            assert all(np.isfinite(r["l_pure"]) and r["lambda_min"] <= r["lambda_mean"] <= r["lambda_max"]
                       for r in rows)
        assert list((w / stage / "tensorboard").glob("events.out.tfevents.*"))
        grid = np.asarray(Image.open(w / stage / "samples" / "000004.png"))
        assert grid.shape[0] > 32 and grid.shape[1] >= 3 * 32 and grid.std() > 0  # the three default prompts
        assert sorted(p.name for p in (w / stage / "checkpoints").iterdir()) == ["2", "4"]

    export = w / "export"
    meta = json.loads((export / "purecc.json").read_text())
    assert {k: meta[k] for k in ("identifier", "class_word", "concept_embedding", "method", "stage", "files")} == dict(
        identifier="sks", class_word="dog", concept_embedding="token", method="purecc", stage="stage_b",
        files=["pytorch_lora_weights.safetensors", "concept_clip_l.safetensors", "concept_t5.safetensors"])
    assert all((export / f).is_file() for f in meta["files"])
    assert "load_textual_inversion" in (export / "README.md").read_text()
    rows = tensors(export / "concept_clip_l.safetensors")["sks"]
    assert rows.shape == (1, pipeline_reference.CLIP_WIDTH) and rows.dtype == np.float32
    assert tensors(export / "concept_t5.safetensors")["sks"].shape == (1, pipeline_reference.T5_WIDTH)


# ----------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def interrupting_batch_fn(stage_b_step: int):
    """Trainer.batch_fn whose stage-B batches raise at `stage_b_step`, as a kill would stop the run."""
    original = train.Trainer.batch_fn

    def batch_fn(self, batch_size, seed):
        get = original(self, batch_size, seed)

        def batch(step):
            if seed == self.config.seed + 1 and step == stage_b_step:
                raise Interrupted(step)
            return get(step)
        return batch
    return batch_fn


@dataclasses.dataclass
class Resumed:
    workdir: Path
    final: train.Stage
    interrupted_steps: list[int]
    interrupted_checkpoints: list[str]


@pytest.fixture(scope="module")
def resumed(folder, tmp_path_factory):
    """The CLI's configuration killed after 3 steps of stage B, then run again on the same workdir."""
    config = make_config(folder, **{"sample.prompts": ()})
    workdir = tmp_path_factory.mktemp("resume") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Trainer, "batch_fn", interrupting_batch_fn(3))
        with pytest.raises(Interrupted):
            main_lib.run(config, workdir)
    steps = logged_steps(workdir / "stage_b")
    checkpoints = sorted(p.name for p in (workdir / "stage_b" / "checkpoints").iterdir())
    final = main_lib.run(config, workdir)
    return Resumed(workdir, final, steps, checkpoints)


def test_resume_reaches_the_uninterrupted_state(folder, cli_run, resumed):
    assert resumed.interrupted_steps == [1, 2, 3] and resumed.interrupted_checkpoints == ["2"]
    # Every log line: stage A ran once; stage B went on from its step-2 checkpoint (step 3 again, then 4).
    assert raw_steps(resumed.workdir / "stage_a") == [1, 2, 3, 4]
    assert raw_steps(resumed.workdir / "stage_b") == [1, 2, 3, 3, 4]
    got, want = export_tensors(resumed.workdir), export_tensors(cli_run)
    assert list(got) == list(want) and all(list(got[f]) == list(want[f]) for f in want)
    for name in want:
        for key in want[name]:
            np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{name}: {key}")
    # The export is the final trainable state itself (float32, alpha / rank = 1).
    final_lora = lora_export.to_diffusers(resumed.final.trainable["lora"], resumed.final.lora,
                                        flux_io.lora_layout(flux_config(folder)))
    for key, value in final_lora.items():
        np.testing.assert_array_equal(value, want["pytorch_lora_weights.safetensors"][key])


def test_finished_run_is_skipped(folder, resumed, monkeypatch):
    w = resumed.workdir
    logs = {s: (w / s / "metrics.jsonl").read_text() for s in ("stage_a", "stage_b")}

    def no_steps(*args, **kwargs):
        def step(*a):
            raise AssertionError("a finished stage took a training step")
        return step

    monkeypatch.setattr(train, "make_train_step", no_steps)
    final = main_lib.run(make_config(folder, **{"sample.prompts": ()}), w)
    assert logs == {s: (w / s / "metrics.jsonl").read_text() for s in logs}
    for a, b in zip(jax.tree_util.tree_leaves(final.trainable), jax.tree_util.tree_leaves(resumed.final.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- DreamBooth, falling losses


@pytest.fixture(scope="module")
def dreambooth(folder, tmp_path_factory):
    """DreamBooth-LoRA (L_CC only) on one photo: a LoRA on every linear layer, a high learning rate.

    The tiny transformer (width 32) needs a LoRA on every layer, of a rank near its width,
    to fit a single image well within 80 steps.
    """
    concept = tmp_path_factory.mktemp("one_dog")
    shutil.copy(DREAMBENCH / "dog" / "00.jpg", concept / "00.jpg")
    config = make_config(folder, **{
        "method": "dreambooth", "concept_embedding": "none", "concept.path": str(concept),
        "concept.class_word": "dog", "concept.flip": False, "stage_a.steps": 80, "stage_a.batch_size": 8,
        "stage_a.learning_rate": 1e-2, "stage_a.lora.rank": 16, "stage_a.lora.alpha": 32.0, "checkpoint_every": 80,
        "sample.prompts": ()})
    with config.stage_a.lora.ignore_type():
        config.stage_a.lora.targets = (".*",)
    workdir = tmp_path_factory.mktemp("dreambooth") / "run"
    trainer = make_trainer(config, workdir)
    return trainer, trainer.run(), workdir


def test_dreambooth_runs_one_stage_and_exports_it(dreambooth):
    _, final, w = dreambooth
    assert final.name == "stage_a" and set(final.trainable) == {"lora"}
    assert not (w / "stage_b").exists()
    assert logged_steps(w / "stage_a")[-1] == 80
    meta = json.loads((w / "export" / "purecc.json").read_text())
    assert meta["method"] == "dreambooth" and meta["stage"] == "stage_a" and meta["concept_embedding"] == "none"
    assert meta["files"] == ["pytorch_lora_weights.safetensors"]


def test_loss_falls(dreambooth):
    """L_CC of a fixed batch (16 noisings of the one view at a fixed rng) before vs after training."""
    trainer, final, w = dreambooth
    denoiser = trainer.backbone.denoiser(trainer.parts, trainer.config)
    loss_fn = make_loss_fn(denoiser, StepConfig(stage="cc", trainable_lora=final.lora))
    frozen = Frozen(params=trainer.parts.transformer_params, cache=trainer.cache_device)
    views = np.zeros(16, np.int32)
    batch = {k: jnp.asarray(v[views]) for k, v in trainer.cache.view_texts.items()} | {"image": jnp.asarray(views)}
    with sharding.activate(trainer.mesh, trainer.rules):
        evaluate = jax.jit(lambda tr: loss_fn(tr, frozen, batch, jax.random.key(123))[0])
        trained = float(evaluate({"lora": final.trainable["lora"]}))
        untrained = float(evaluate({"lora": jax.tree_util.tree_map(jnp.zeros_like, final.trainable["lora"])}))
    assert trained < 0.8 * untrained, (untrained, trained)
    logged = [r["loss"] for r in loop.read_metrics(w / "stage_a")]
    assert np.mean(logged[-20:]) < 0.9 * np.mean(logged[:20]), logged


# ----------------------------------------------------------------------------- diffusers


def test_lora_export_loads_in_diffusers(folder, dreambooth):
    from diffusers import FluxPipeline

    _, final, w = dreambooth
    pipe = FluxPipeline.from_pretrained(folder)
    inputs = flux_reference.random_inputs(flux_config(folder), batch=2, h=2, w=3, text_len=L, seed=1)
    base = flux_reference.run_torch(pipe.transformer, inputs)
    pipe.load_lora_weights(w / "export")
    want = flux_reference.run_torch(pipe.transformer, inputs)
    cfg, params = load_transformer(folder / "transformer")
    adapter = lora.variables(jax.device_get(final.trainable["lora"]), final.lora)
    got = FluxTransformer(cfg).apply({"params": params, "lora": adapter},
                                     **{k: None if v is None else jnp.asarray(v) for k, v in inputs.items()})
    scale = np.abs(want).max()
    assert np.abs(want - base).max() > 0.05 * scale  # the trained LoRA matters far beyond the tolerance
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * scale


def test_token_embeddings_load_as_textual_inversion(folder, resumed):
    """CLIP and T5 both: diffusers' loader resizes the T5 table to the tokenizer's length + 1,
    which drops T5's unused padding rows; the new token's id differs from ours, its row does not."""
    from diffusers import FluxPipeline

    export, emb = resumed.workdir / "export", jax.device_get(resumed.final.trainable["embeddings"])
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(export / "concept_clip_l.safetensors", token="sks", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(export / "concept_t5.safetensors", token="sks", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompts = [PROMPT, "sks on the grass, sks", "a photo of a dog"]
    parts = load_pipeline(folder)
    parts.tokenizers.add_concept_token("sks")
    clip_ids, t5_ids = parts.tokenizers.tokenize(prompts, L)
    ours = parts.text.encode(clip_ids, t5_ids, emb["clip"], emb["t5"])
    with torch.no_grad():
        t5_legacy, pooled_legacy, _ = pipe.encode_prompt(prompts, max_sequence_length=L)
        # FLUX's CLIP config (legacy eos_token_id=2) pools at the largest id, now the new token's;
        # ours pools at the end-of-text token, as diffusers does once told the real EOS id.
        pipe.text_encoder.eos_token_id = pipe.tokenizer.eos_token_id
        t5_hidden, pooled, _ = pipe.encode_prompt(prompts, max_sequence_length=L)
    for got, want in ((ours.t5, t5_hidden), (ours.pooled, pooled)):
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_array_equal(t5_legacy.numpy(), t5_hidden.numpy())
    assert np.abs(pooled_legacy[:2].numpy() - pooled[:2].numpy()).max() > 1e-2  # prompts naming the token
    np.testing.assert_array_equal(pooled_legacy[2].numpy(), pooled[2].numpy())
    # The trained rows moved from their class-word initialisation, so this checks the export.
    dog = parts.tokenizers.word_ids("dog", "t5")
    assert np.abs(np.asarray(emb["t5"][0]) - np.asarray(parts.text.t5_params["token_embedding"][dog[0]])).max() > 1e-3


def test_lora_export_round_trip(folder, dreambooth):
    _, final, w = dreambooth
    cfg = flux_config(folder)
    adapter, lcfg = lora_export.load(w / "export" / "pytorch_lora_weights.safetensors", flux_io.lora_layout(cfg))
    assert lcfg.rank == final.lora.rank and lcfg.scale == 1.0
    want = lora.variables(final.trainable["lora"], final.lora)  # alpha / rank = 2 is folded into B on export
    assert jax.tree_util.tree_structure(adapter) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(lora.variables(adapter, lcfg)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, np.asarray(b))
    again = lora_export.save(adapter, lcfg, flux_io.lora_layout(cfg), w / "again.safetensors")
    first = tensors(w / "export" / "pytorch_lora_weights.safetensors")
    assert tensors(again).keys() == first.keys()
    for key, value in tensors(again).items():
        np.testing.assert_array_equal(value, first[key])
    # Unscanned models get one adapter per block.
    per_block, _ = lora_export.load(again, flux_io.lora_layout(cfg), scanned=False)
    np.testing.assert_array_equal(per_block["single_blocks_0"]["out"]["b"],
                                  adapter["single_blocks"]["out"]["b"][0])


# ----------------------------------------------------------------------------- layer-wise embeddings


@pytest.fixture(scope="module")
def layerwise(folder, tmp_path_factory):
    """DreamBooth with layer-wise concept vectors: one stage keeps the module fast; stage B's use of
    frozen embeddings runs in the token run, the layer-wise injection in test_step."""
    config = make_config(folder, **{"method": "dreambooth", "concept_embedding": "layerwise", "sample.prompts": ()})
    workdir = tmp_path_factory.mktemp("layerwise") / "run"
    return make_trainer(config, workdir).run(), workdir


def test_layerwise_run_exports_its_vectors(folder, layerwise):
    final, w = layerwise
    assert set(final.trainable) == {"lora", "embeddings"}
    meta = json.loads((w / "export" / "purecc.json").read_text())
    assert meta["concept_embedding"] == "layerwise" and meta["stage"] == "stage_a"
    assert meta["files"] == ["pytorch_lora_weights.safetensors", "concept_layerwise.safetensors"]
    cfg = flux_config(folder)
    vectors = tensors(w / "export" / "concept_layerwise.safetensors")
    assert vectors["double"].shape == (cfg.depth, cfg.hidden_size)
    assert vectors["single"].shape == (cfg.depth_single, cfg.hidden_size)
    np.testing.assert_array_equal(vectors["double"], np.asarray(final.trainable["embeddings"]["double"]))
    assert "no diffusers loader" in (w / "export" / "README.md").read_text()


# ----------------------------------------------------------------------------- sample --workdir


def run_sample_cli(args: list[str]) -> None:
    sample_cli.cli(["sample", *args])


SAMPLE_ARGS = [f"--prompt={PROMPT}", "--height=32", "--width=32", "--steps=2", f"--max_sequence_length={L}",
               "--seed=3", "--noprogress"]


@pytest.mark.parametrize("kind", ["token", "layerwise"])
def test_sample_workdir_equals_generate_with_the_trained_model(kind, folder, resumed, layerwise, tmp_path):
    final, workdir = (resumed.final, resumed.workdir) if kind == "token" else layerwise
    run_sample_cli([f"--workdir={workdir}", *SAMPLE_ARGS, f"--output={tmp_path / 'trained.npy'}"])
    got = np.load(tmp_path / "trained.npy")

    # The same by hand: the trained LoRA and embeddings as the trainer left them.
    trainable = jax.device_get(final.trainable)
    parts = load_pipeline(folder)
    settings = SampleSettings(32, 32, 2, 3.5, L)
    base = np.asarray(generate(parts, [PROMPT], settings, seeds=(3,)).images)
    emb = trainable["embeddings"]
    if kind == "token":
        parts.tokenizers.add_concept_token("sks")
    clip_ids, t5_ids = parts.tokenizers.tokenize([PROMPT], L)
    concept = None
    if kind == "token":
        text = parts.text.encode(clip_ids, t5_ids, emb["clip"], emb["t5"])
    else:
        text = parts.text.encode(clip_ids, t5_ids)
        concept = ConceptInjection(parts.tokenizers.word_mask(t5_ids, "sks"), emb["double"], emb["single"])
    want = np.asarray(generate(parts, None, settings, seeds=(3,), text=text, concept=concept,
                               lora=lora.variables(trainable["lora"], final.lora)).images)
    assert got.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - base).max() > 1e-2


def test_sample_workdir_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"pretrained": ""}))
    with pytest.raises(ValueError, match="names no pretrained folder"):
        run_sample_cli([f"--workdir={tmp_path}", *SAMPLE_ARGS, f"--output={tmp_path / 'x.png'}"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_sample_cli([f"--workdir={tmp_path / 'nothing'}", *SAMPLE_ARGS, f"--output={tmp_path / 'x.png'}"])


def test_sample_workdir_reads_full_weights(folder, tmp_path):
    """An export of fully fine-tuned weights (export/transformer/) replaces the pretrained transformer."""
    from purecc_jax.backbones.flux.weights import export_diffusers

    cfg, params = load_transformer(folder / "transformer")
    tuned = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01, params)
    export_diffusers(tuned, cfg, tmp_path / "export" / "transformer")
    (tmp_path / "config.json").write_text(json.dumps({"pretrained": str(folder)}))
    (tmp_path / "export" / "purecc.json").write_text(json.dumps(dict(
        identifier="sks", class_word="dog", concept_embedding="none", method="dreambooth", stage="stage_a",
        files=["transformer/diffusion_pytorch_model.safetensors"])))
    parts, trained = trained_lib.load_trained(tmp_path, load_pipeline(trained_lib.workdir_pretrained(tmp_path)))
    assert trained.lora is None and trained.embeddings is None
    for got, want in zip(jax.tree_util.tree_leaves(parts.transformer_params), jax.tree_util.tree_leaves(tuned)):
        np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- stage-B wiring


@pytest.fixture(scope="module")
def wiring_trainer(folder, tmp_path_factory):
    """One trainer (token embeddings) whose stages are wired under several configs without training."""
    return make_trainer(make_config(folder, **{"sample.prompts": ()}), tmp_path_factory.mktemp("wiring") / "run")


def wire(trainer, folder, **overrides):
    """Stage A then stage B under `overrides`, each stage's run recorded instead of run; stage A
    "trains" by adding 0.1 to every leaf, so its result differs from any fresh tree."""
    trainer.config = make_config(folder, **{"sample.prompts": (), **overrides})
    calls = {}

    def run_stage(self, name, stage_cfg, step_cfg, trainable, frozen, sample_lora):
        calls[name] = dict(step_cfg=step_cfg, trainable=trainable, frozen=frozen)
        return jax.tree_util.tree_map(lambda x: x + 0.1, trainable) if name == "stage_a" else trainable

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Trainer, "run_stage", run_stage)
        a = trainer.stage_a()
        b = trainer.stage_b(a)
    return a, b, calls["stage_b"]


def same(x, y) -> bool:
    leaves_x, leaves_y = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
    return (jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
            and all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(leaves_x, leaves_y)))


def test_stage_b_trains_a_fresh_lora_against_stage_a_extractor(folder, wiring_trainer):
    a, b, got = wire(wiring_trainer, folder)
    cfg = wiring_trainer.config
    fresh = lora.init(jax.random.key(cfg.seed + 1), wiring_trainer.parts.transformer_params,
                      train.lora_config(cfg.stage_b, backbones.FLUX))
    assert same(got["trainable"]["lora"], fresh) and not same(got["trainable"]["lora"], a.trainable["lora"])
    ext = got["frozen"].extractor
    assert same(ext.lora, a.trainable["lora"]) and got["step_cfg"].extractor_lora == a.lora
    assert ext.params is None and ext.embeddings is None
    # Stage A's concept embedding is frozen in stage B and handed on to the export.
    assert set(got["trainable"]) == {"lora"} and same(got["frozen"].embeddings, a.trainable["embeddings"])
    assert same(b.trainable["embeddings"], a.trainable["embeddings"])


def test_extractor_without_stage_a_lora_is_the_pretrained_model(folder, wiring_trainer):
    _, _, got = wire(wiring_trainer, folder, **{"objective.extractor_uses_stage_a_lora": False})
    ext = got["frozen"].extractor
    assert ext.lora is None and ext.params is None
    assert got["step_cfg"].extractor_lora is None


def test_full_finetuning_extractor_is_stage_a_weights(folder, wiring_trainer):
    a, _, got = wire(wiring_trainer, folder, **{"stage_a.full_finetune": True, "stage_b.full_finetune": True})
    pretrained = wiring_trainer.parts.transformer_params
    ext = got["frozen"].extractor
    assert same(ext.params, a.trainable["params"]) and not same(a.trainable["params"], pretrained)
    assert same(got["trainable"]["params"], pretrained)  # stage B starts from the pretrained weights again
    assert ext.lora is None and got["step_cfg"].extractor_lora is None


def test_embeddings_trained_in_stage_b_leave_the_extractor_on_stage_a(folder, wiring_trainer):
    a, _, got = wire(wiring_trainer, folder, train_embeddings_in_stage_b=True)
    learned = a.trainable["embeddings"]
    assert same(got["trainable"]["embeddings"], learned)  # stage B's copy starts from stage A's
    assert same(got["frozen"].extractor.embeddings, learned) and got["frozen"].embeddings is None
    # Separate buffers: the step donates the trainable ones, which would delete the extractor's.
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(tree)}  # noqa: E731
    assert not pointers(got["frozen"].extractor.embeddings) & pointers(got["trainable"]["embeddings"])
    # Token rows reach the extractor through the cached encodings: stage A's rows baked in.
    trainer = wiring_trainer
    want = trainer.parts.text.encode(trainer.cache.arrays["clip_ids"], trainer.cache.arrays["t5_ids"],
                                     learned["clip"], learned["t5"])
    np.testing.assert_allclose(trainer.cache.arrays["t5"], np.asarray(want.t5), rtol=1e-6, atol=1e-6)


def test_batches_follow_the_runs_axis_rules(folder, wiring_trainer):
    """config.axis_rules reaches the batch: with act_batch on "data" only, a (data 2, fsdp 4) mesh splits
    the batch in two, not in eight as the default rules (fsdp, data) would."""
    trainer = wiring_trainer
    mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    saved = trainer.mesh, trainer.rules
    try:
        trainer.mesh = mesh
        for rules, spec in ((sharding.rules_from_config([("act_batch", "data")]), "data"),
                            (sharding.DEFAULT_RULES, ("fsdp", "data"))):
            trainer.rules = rules
            batch = trainer.batch_fn(8, seed=0)(0)
            assert {x.sharding.spec[0] for x in jax.tree_util.tree_leaves(batch)} == {spec}
    finally:
        trainer.mesh, trainer.rules = saved
