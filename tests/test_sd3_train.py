"""PureCC on SD3 through the backbone seam, end to end on a tiny StableDiffusion3Pipeline folder.

The step's SD3 velocity is the SD3 transformer's call and its L_CC the flow loss on NHWC latents;
`python -m purecc_jax.main --config=configs/sd35_concept.py` runs stage A and stage B and exports a
LoRA that `StableDiffusion3Pipeline.load_lora_weights` reads to the transformer output the JAX model
gives with the trained adapter; `purecc_jax.sample --workdir` samples the run as diffusers does
with the LoRA loaded; the backbone is chosen from model_index.json; what SD3 does not support is
refused naming the config key.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import config_files
import dreambench_standin
import tiny_runs
from purecc_jax import backbones
from purecc_jax import main as main_lib
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.sd3 import weights as sd3_io
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import sd3
from purecc_jax.pipeline import flow
from purecc_jax.purecc import loop
from purecc_jax.purecc import step as step_lib
from purecc_jax.purecc.objective import flow_loss
from purecc_jax.weights import diffusers_lora
from sd3_reference import build_pipeline, random_inputs, run_torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "sd35_concept.py"
L = 10  # T5 tokens
SIZE = 32  # pixels: 4x4 latents, 2x2 patches
PROMPT = "a photo of sks dog"

# configs/sd35_concept.py shrunk to the tiny pipeline.
TINY = tiny_runs.tiny(**{
    "concept.path": "dog", "concept.dreambench_root": str(dreambench_standin.root()), "concept.resolution": str(SIZE),
    "model.max_sequence_length": L, "stage_a.steps": 2, "stage_b.steps": 2,
    "stage_a.learning_rate": 1e-2,  # two steps must move the LoRA far beyond the parity tolerance
    "stage_b.learning_rate": 1e-2, "checkpoint_every": 2, "sample.steps": 2, "sample.height": SIZE,
    "sample.width": SIZE,
})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    build_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def load_config(**overrides):
    return config_files.load("sd35_concept", overrides)


# ----------------------------------------------------------------------------- the step


def test_step_velocity_is_the_sd3_transformer(folder):
    """SD3's denoiser (the seam) is SD3Transformer's call with the LoRA; L_CC is the flow loss of it."""
    cfg, params = sd3_io.load_transformer(folder / "transformer")
    model = sd3.SD3Transformer(cfg)
    lcfg = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=backbones.SD3.lora_targets("attention"))
    adapter = jax.tree_util.tree_map(lambda x: 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                                     lora_lib.init(jax.random.key(0), params, lcfg))
    x = random_inputs(cfg, 2, 4, 6, 7, seed=3)
    want = model.apply({"params": params, "lora": lora_lib.variables(adapter, lcfg)}, **x)
    config = load_config()
    parts = backbones.SD3.load(folder)
    denoiser = backbones.SD3.denoiser(parts, config)
    weights = step_lib.Weights(params=params, lora=lora_lib.variables(adapter, lcfg))
    got = denoiser.velocity(weights, {}, x["latents"], x["timesteps"], (x["txt"], x["pooled"]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert backbones.SD3.train_guidance(parts, config) is None

    # The loss function on NHWC latents: the same draws of x1 and t as the step makes.
    tcfg = flow.TimestepConfig(shift=3.0)
    cache = {"latents": jnp.asarray(x["latents"]), "t5": jnp.asarray(x["txt"]), "pooled": jnp.asarray(x["pooled"])}
    batch = {"image": jnp.array([1, 0]), "complete": jnp.array([0, 1])}
    scfg = step_lib.StepConfig(stage="cc", timesteps=tcfg, trainable_lora=lcfg, extractor_lora=None)
    rng = jax.random.key(7)
    frozen = step_lib.Frozen(params=params, cache=cache)
    loss, _ = step_lib.make_loss_fn(denoiser, scfg)({"lora": adapter}, frozen, batch, rng)
    noise_rng, t_rng = jax.random.split(rng)
    x0 = cache["latents"][batch["image"]]
    x1 = jax.random.normal(noise_rng, x0.shape)
    t = flow.sample_timesteps(t_rng, 2, tcfg)
    v = model.apply({"params": params, "lora": lora_lib.variables(adapter, lcfg)}, flow.noisy(x0, x1, t),
                    cache["t5"][batch["complete"]], cache["pooled"][batch["complete"]], t)
    np.testing.assert_allclose(float(loss), float(flow_loss(v, x0, x1)), rtol=1e-5)


def test_backbone_is_chosen_by_model_index(folder):
    assert backbones.from_folder(folder) is backbones.SD3
    assert backbones.select(folder, "sd3") is backbones.SD3
    with pytest.raises(ValueError, match="model_index.json names another pipeline"):
        backbones.select(folder, "flux")
    with pytest.raises(ValueError, match="config.model.backbone='sdxl'"):
        backbones.select(folder, "sdxl")


@pytest.mark.parametrize("key, value, match", [
    ("concept_embedding", "token", "concept_embedding='token'"),
    ("concept_embedding", "layerwise", "concept_embedding='layerwise'"),
    ("train_guidance", 3.5, "no guidance embedding"),
    ("model.base_quantization", "int8", "base_quantization"),
])
def test_unsupported_options_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        backbones.SD3.check_config(load_config(**{key: value}))


def test_sd35_recipe():
    c = load_config()
    lcfg = backbones.SD3.lora_targets(c.stage_a.lora.targets)
    cfg = sd3.preset("tiny")
    params = jax.eval_shape(lambda: sd3.init_fn(cfg, jax.random.key(0))())
    from purecc_jax import sharding

    paths = ["/".join(p) for p in lora_lib.target_paths(sharding.unbox(params), lcfg)]
    assert "last_block/ctx_attn/q" in paths and "joint_blocks/ctx_attn_out" in paths
    assert "dual_blocks/x_attn2/v" in paths and not any("mlp" in p or "mod" in p for p in paths)
    assert (c.stage_a.lora.rank, c.stage_b.steps, c.stage_b.batch_size, c.stage_b.learning_rate) == (4, 400, 2, 1e-4)
    assert (c.timesteps.sampler, c.timesteps.shift, c.train_guidance, c.concept.resolution) == (
        "logit_normal", 3.0, 0.0, "512")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_run(folder, tmp_path_factory):
    """`python -m purecc_jax.main --config=configs/sd35_concept.py ...`, in process: PureCC, both stages."""
    workdir = tmp_path_factory.mktemp("sd3_cli") / "run"
    argv = ["main", f"--config={CONFIG_FILE}", f"--workdir={workdir}", f"--config.pretrained={folder}"]
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
    argv.append("--nocompilation_cache")
    main_lib.cli(argv)
    return workdir


def test_cli_runs_stage_a_then_stage_b_and_exports(cli_run):
    w = cli_run
    assert json.loads((w / "config.json").read_text())["model"]["backbone"] == "sd3"
    for stage in ("stage_a", "stage_b"):
        rows = loop.read_metrics(w / stage)
        assert [r["step"] for r in rows] == [1, 2]
        assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
        assert all(("lambda_mean" in r) == (stage == "stage_b") for r in rows)
        assert (w / stage / "samples" / "000002.png").is_file()
    meta = json.loads((w / "export" / "purecc.json").read_text())
    assert {k: meta[k] for k in ("identifier", "class_word", "concept_embedding", "method", "stage", "files")} == dict(
        identifier="sks", class_word="dog", concept_embedding="none", method="purecc", stage="stage_b",
        files=["pytorch_lora_weights.safetensors"])
    assert "StableDiffusion3Pipeline" in (w / "export" / "README.md").read_text()


def trained_lora(workdir: Path):
    """Stage B's final LoRA as the checkpoint holds it (not read from the export) and its config."""
    config = json.loads((workdir / "config.json").read_text())
    trainable, _ = loop.restore_trainable(workdir / "stage_b")
    return trainable["lora"], trained_lib.stage_lora_config(config, "stage_b")


def test_export_loads_in_diffusers(folder, cli_run):
    """StableDiffusion3Pipeline.load_lora_weights(workdir/export): its transformer's output equals the JAX
    model's with the trained adapter."""
    from diffusers import StableDiffusion3Pipeline

    cfg, params = sd3_io.load_transformer(folder / "transformer")
    adapter, lcfg = trained_lora(cli_run)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    inputs = random_inputs(cfg, 2, 4, 6, 77 + L, seed=5)
    base = run_torch(pipe.transformer, inputs)
    pipe.load_lora_weights(cli_run / "export")
    want = run_torch(pipe.transformer, inputs)
    got = sd3.SD3Transformer(cfg).apply({"params": params, "lora": lora_lib.variables(adapter, lcfg)}, **inputs)
    scale = np.abs(want).max()
    assert np.abs(want - base).max() > 1e-2 * scale  # the trained LoRA matters far beyond the tolerance
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * scale


def test_sample_workdir_equals_diffusers_with_the_lora(folder, cli_run, tmp_path):
    """`purecc_jax.sample --workdir=RUN` on an SD3 run: the image diffusers makes after load_lora_weights."""
    from diffusers import StableDiffusion3Pipeline

    from purecc_jax import sample

    latents = np.random.default_rng(8).standard_normal((1, 16, SIZE // 8, SIZE // 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    sample.cli(["sample", f"--workdir={cli_run}", f"--prompt={PROMPT}", f"--height={SIZE}", f"--width={SIZE}",
                "--steps=3", "--guidance=4.5", f"--max_sequence_length={L}", f"--init_latents={tmp_path / 'latents.npy'}",
                f"--output={tmp_path / 'out.npy'}", "--noprogress"])
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(cli_run / "export")
    with torch.no_grad():
        want = pipe(prompt=[PROMPT], height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=4.5,
                    latents=torch.from_numpy(latents), output_type="np", max_sequence_length=L).images
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - want).max() < 1e-3


def test_export_cli_writes_the_sd3_lora(cli_run, tmp_path):
    """`python -m purecc_jax.export` of the stage-A checkpoint: the SD3 format, stage A's adapter."""
    out = trained_lib.export_checkpoint(cli_run, tmp_path / "a", stage="a")
    meta = json.loads((out / "purecc.json").read_text())
    assert meta["stage"] == "stage_a" and meta["files"] == ["pytorch_lora_weights.safetensors"]
    cfg = sd3_io.read_config(json.loads((cli_run / "config.json").read_text())["pretrained"])
    adapter, lcfg = diffusers_lora.load(out / "pytorch_lora_weights.safetensors", sd3_io.lora_layout(cfg))
    trainable, _ = loop.restore_trainable(cli_run / "stage_a")
    run_config = json.loads((cli_run / "config.json").read_text())
    want = lora_lib.variables(trainable["lora"], trained_lib.stage_lora_config(run_config, "stage_a"))
    for a, b in zip(jax.tree_util.tree_leaves(lora_lib.variables(adapter, lcfg)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not available for SD3"):
        trained_lib.export_checkpoint(cli_run, tmp_path / "k", formats=("kohya",))


def test_full_weights_export_round_trip(folder, tmp_path):
    """A full fine-tune's SD3 export is a diffusers transformer/ folder; load_export puts it in place."""
    from purecc_jax.backbones.sd3.pipeline import load_sd3_pipeline

    cfg, params = sd3_io.load_transformer(folder / "transformer")
    tuned = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01, params)
    info = trained_lib.ConceptInfo("sks", "dog", "none", "dreambooth", "stage_a", 2, str(folder))
    out = trained_lib.write_export(tmp_path / "full", info, {"params": tuned}, None, cfg, backbones.SD3)
    meta = json.loads((out / "purecc.json").read_text())
    assert meta["formats"] == ["diffusers-full"] and "transformer/config.json" in meta["files"]
    parts, trained = trained_lib.load_export(out, load_sd3_pipeline(folder))
    assert trained.lora is None
    for got, want in zip(jax.tree_util.tree_leaves(parts.transformer_params), jax.tree_util.tree_leaves(tuned)):
        np.testing.assert_array_equal(np.asarray(got), want)
    for fmt in ("bfl", "kohya"):
        with pytest.raises(ValueError, match="not available for SD3"):
            trained_lib.write_export(tmp_path / fmt, info, {"params": tuned}, None, cfg, backbones.SD3, formats=(fmt,))
