"""Exports of a tiny trained run to every PyTorch format, read back by diffusers' own loaders.

One short PureCC run (token embeddings; stage B's LoRA on every linear layer of the
blocks, so the kohya file has fused qkv, linear1, linear2 and modulations) is exported
by `python -m purecc_jax.export` (in process) from chosen checkpoints. diffusers loads
each format (`load_lora_weights`, `FluxTransformer2DModel.from_pretrained`) and its
transformer output is compared with this package's for the same weights. diffusers'
kohya converter and `from_single_file` hard-code FLUX.1's width (3072) when splitting
fused layers, so they are run at that width: the kohya converter on a LoRA of real size,
the single-file converter on tensors of the meta device (names and shapes). Also: the
manifest catches a corrupted file, LoRA import (diffusers/PEFT and kohya) for sampling
and as the stage-A extractor, and strict errors on unknown keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import config_files
import flux_reference
import pipeline_reference
import tiny_runs
from purecc_jax import backbones
from purecc_jax import export as export_cli
from purecc_jax import main as main_lib
from purecc_jax import sample as sample_cli
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.flux import formats
from purecc_jax.backbones.flux import kohya
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.backbones.flux.weights import load_transformer
from purecc_jax.models import lora
from purecc_jax.models.flux import FluxConfig, FluxTransformer
from purecc_jax.purecc import loop
from purecc_jax.weights import diffusers_lora as lora_export
from purecc_jax.weights import manifest
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

L = 16
TINY = tiny_runs.tiny(**{
    "concept.path": "dog", "stage_a.steps": 2, "stage_b.steps": 2, "stage_a.learning_rate": 1e-2,
    "stage_b.learning_rate": 1e-2, "stage_b.lora.targets": "all_blocks", "checkpoint_every": 1, "sample.steps": 1,
    "sample.height": 32, "sample.width": 32,
    "sample.prompts": (),  # no sampler to compile: the card's grid is tested with write_export
})


def make_config(folder: Path, **overrides):
    import dreambench_standin

    config = config_files.load("flux_concept", {"pretrained": str(folder),
                                                "concept.dreambench_root": str(dreambench_standin.root()),
                                                **TINY, **overrides})
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(path, guidance_embeds=True, seed=0)
    return path


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """(workdir, final stage) of a 2 + 2 step PureCC run with checkpoints at both steps."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    final = main_lib.run(make_config(folder), workdir)
    return workdir, final


def flux_config(folder: Path) -> FluxConfig:
    return FluxConfig.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))


def tensors(path: Path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path)
    return {k: np.array(st.get(k)) for k in st.keys()}


def export(workdir: Path, output: Path, *flags: str) -> Path:
    export_cli.cli(["export", f"--workdir={workdir}", f"--output={output}", *flags])
    return output


def jax_output(folder: Path, inputs: dict, adapter=None) -> np.ndarray:
    cfg, params = load_transformer(folder / "transformer")
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    return np.asarray(FluxTransformer(cfg).apply(variables, **{k: None if v is None else jnp.asarray(v)
                                                               for k, v in inputs.items()}))


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


def final_adapter(final) -> dict:
    return lora.variables(jax.device_get(final.trainable["lora"]), final.lora)


@pytest.fixture(scope="module")
def inputs(folder):
    return flux_reference.random_inputs(flux_config(folder), batch=2, h=2, w=3, text_len=L, seed=1)


# ----------------------------------------------------------------------------- the CLI


def test_final_export_and_cli_default_are_the_same_files(folder, run, tmp_path):
    workdir, final = run
    out = export(workdir, tmp_path / "cli")
    meta = json.loads((out / "purecc.json").read_text())
    assert meta["stage"] == "stage_b" and meta["step"] == 2 and meta["formats"] == ["diffusers-lora"]
    assert meta["files"] == ["pytorch_lora_weights.safetensors", "concept_clip_l.safetensors",
                             "concept_t5.safetensors"]
    for name in meta["files"]:
        assert tensors(out / name).keys() == tensors(workdir / "export" / name).keys()
        for key, value in tensors(out / name).items():
            np.testing.assert_array_equal(value, tensors(workdir / "export" / name)[key], err_msg=f"{name}: {key}")
    # ... and they hold the run's final state (alpha / rank = 1 here).
    want = lora_export.to_diffusers(final.trainable["lora"], final.lora, flux_io.lora_layout(flux_config(folder)))
    got = tensors(out / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "load_textual_inversion" in card and "stage_b: 2 steps" in card
    manifest.verify(out)


def test_cli_exports_the_chosen_stage_and_step(run, tmp_path):
    workdir, final = run
    a1 = export(workdir, tmp_path / "a1", "--stage=a", "--step=1")
    a2 = export(workdir, tmp_path / "a2", "--stage=a")
    b = workdir / "export"
    for out, stage, step in ((a1, "stage_a", 1), (a2, "stage_a", 2)):
        meta = json.loads((out / "purecc.json").read_text())
        assert (meta["stage"], meta["step"]) == (stage, step)
    lora_1, lora_2 = (tensors(o / "pytorch_lora_weights.safetensors") for o in (a1, a2))
    assert lora_1.keys() == lora_2.keys()
    assert max(np.abs(lora_1[k] - lora_2[k]).max() for k in lora_1) > 0  # two steps, two states
    # Stage B's embeddings are stage A's final ones, frozen: its export reads them from stage A.
    for name in ("concept_clip_l.safetensors", "concept_t5.safetensors"):
        np.testing.assert_array_equal(tensors(a2 / name)["sks"], tensors(b / name)["sks"])
        assert np.abs(tensors(a1 / name)["sks"] - tensors(a2 / name)["sks"]).max() > 0
    with pytest.raises(ValueError, match=r"has no step 7; it has \[1, 2\]"):
        export(workdir, tmp_path / "x", "--stage=a", "--step=7")
    with pytest.raises(ValueError, match="this run trained a LoRA: pass --merge_lora"):
        export(workdir, tmp_path / "x", "--format=bfl")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(workdir, tmp_path / "x", "--format=onnx")


# ----------------------------------------------------------------------------- diffusers loads every format


def test_diffusers_lora_loads_in_diffusers(folder, run, inputs):
    from diffusers import FluxPipeline

    _, final = run
    pipe = FluxPipeline.from_pretrained(folder)
    base = flux_reference.run_torch(pipe.transformer, inputs)
    pipe.load_lora_weights(run[0] / "export")
    want = flux_reference.run_torch(pipe.transformer, inputs)
    close(jax_output(folder, inputs, final_adapter(final)), want)
    assert np.abs(want - base).max() > 1e-2 * np.abs(want).max()  # the trained LoRA matters far beyond the tolerance


def test_kohya_and_diffusers_lora_give_the_same_merged_weights(folder, run, tmp_path):
    """diffusers fuses its LoRA file into its model; the kohya file's up @ down * alpha / rank is added to
    the same base in BFL layout (renamed by test_weights' own table): the same merged weights."""
    from diffusers import FluxPipeline
    from test_weights import to_bfl

    out = export(run[0], tmp_path / "both", "--format=diffusers-lora,kohya")
    pipe = FluxPipeline.from_pretrained(folder)
    sd = lambda: {k: v.detach().numpy().copy() for k, v in pipe.transformer.state_dict().items()}
    base = to_bfl(sd())
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    want = to_bfl({k.replace(".base_layer", ""): v for k, v in sd().items() if "lora_" not in k})
    k = tensors(out / "lora_kohya.safetensors")
    modules = {key.rsplit(".", 2)[0] for key in k if key.endswith(".lora_down.weight")}
    assert any(m.endswith("single_blocks_0_linear1") for m in modules)  # fused q, k, v (and zero MLP rows)
    assert any(m.endswith("double_blocks_0_img_attn_qkv") for m in modules)
    changed = 0
    for name, weight in base.items():
        module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        if name.endswith(".weight") and module in modules:
            down, up = k[f"{module}.lora_down.weight"], k[f"{module}.lora_up.weight"]
            weight = weight + up @ down * (float(k[f"{module}.alpha"]) / down.shape[0])
            changed += 1
        np.testing.assert_allclose(weight, want[name], rtol=0, atol=1e-6 * np.abs(want[name]).max(), err_msg=name)
    assert changed == len(modules)


def flux_width_config(**overrides) -> FluxConfig:
    """FLUX.1-dev's widths (what diffusers' converters assume) with one block of each kind."""
    from purecc_jax.models.flux import preset

    return preset("flux-dev", depth=1, depth_single=1, **overrides)


def test_kohya_file_reads_in_diffusers_converter_at_flux_width(tmp_path):
    """diffusers' kohya converter (used by load_lora_weights) splits the fused qkv and linear1 by FLUX.1's
    widths: our kohya file of a LoRA on every linear layer gives, module by module, our diffusers file's update."""
    from diffusers import FluxPipeline

    cfg = flux_width_config()
    abstract, _ = flux_io.abstract_params(cfg)
    lcfg = lora.LoRAConfig(rank=2, alpha=3.0, targets=(".*",))
    adapter = lora.init(jax.random.key(0), abstract, lcfg)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), adapter)
    kohya_file = kohya.save(adapter, lcfg, cfg, tmp_path / "k.safetensors")
    ours = lora_export.to_diffusers(adapter, lcfg, flux_io.lora_layout(cfg))
    # The converter names the embedders' and the final layer's modules without the "transformer." prefix.
    theirs = {"transformer." + k.removeprefix("transformer."): v.float().numpy()
              for k, v in FluxPipeline.lora_state_dict(kohya_file).items()}
    assert {k.rsplit(".", 2)[0] for k in theirs} == {k.rsplit(".", 2)[0] for k in ours}
    rng = np.random.default_rng(0)
    for key in (k for k in ours if k.endswith(".lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        x = rng.standard_normal((ours[key].shape[1], 3)).astype(np.float32)
        want = ours[b_key] @ (ours[key] @ x)
        got = theirs[b_key] @ (theirs[key] @ x)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), key


def test_merged_full_formats_equal_the_lora(folder, run, inputs, tmp_path):
    """--merge_lora: diffusers' from_pretrained of transformer/ and the BFL file give the unmerged LoRA's output."""
    from diffusers import FluxTransformer2DModel

    _, final = run
    out = export(run[0], tmp_path / "full", "--format=diffusers-full,bfl", "--merge_lora")
    meta = json.loads((out / "purecc.json").read_text())
    assert meta["merged_lora"] and meta["formats"] == ["diffusers-full", "bfl"]
    want = jax_output(folder, inputs, final_adapter(final))
    model = FluxTransformer2DModel.from_pretrained(out / "transformer").eval()
    close(flux_reference.run_torch(model, inputs), want)
    cfg, params = load_transformer(out / "flux1-purecc.safetensors", axes_dim=flux_config(folder).axes_dim)
    close(np.asarray(FluxTransformer(cfg).apply({"params": params}, **{k: None if v is None else jnp.asarray(v)
                                                                        for k, v in inputs.items()})), want)
    card = (out / "README.md").read_text()
    assert "from_single_file" in card and "Load Diffusion Model" in card


def test_bfl_layout_reads_in_diffusers_single_file_converter_at_flux_width():
    """diffusers' from_single_file converter hard-codes FLUX.1's width: run it at that width on meta tensors
    named and shaped as our BFL export; it must produce exactly FluxTransformer2DModel's state dict."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from purecc_jax.backbones.flux.rules import bfl_rules
    from purecc_jax.weights import loader

    cfg = flux_width_config()
    abstract, _ = flux_io.abstract_params(cfg)
    specs = loader.export_specs(bfl_rules(cfg, cfg.scan_layers), abstract, np.float32)
    checkpoint = {name: torch.empty(shape, device="meta") for name, shape, _ in specs}
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert not checkpoint  # every tensor of the file was consumed


def test_full_weights_export_and_read_back(folder, tmp_path):
    """A full fine-tune's weights (here the pretrained ones, shifted) through write_export and load_export."""
    from purecc_jax.backbones.flux.folder import load_pipeline

    cfg, params = load_transformer(folder / "transformer")
    tuned = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01, params)
    info = trained_lib.ConceptInfo("sks", "dog", "none", "dreambooth", "stage_a", 5, str(folder))
    grid = tmp_path / "000005.png"
    grid.write_bytes(b"a png")
    out = trained_lib.write_export(tmp_path / "full", info, {"params": tuned}, None, cfg, backbones.FLUX,
                                   formats=("diffusers-full", "bfl"), sample_grid=grid)
    manifest.verify(out)
    assert (out / "samples.png").read_bytes() == b"a png" and "![last samples" in (out / "README.md").read_text()
    for fmt in ("diffusers-full", "bfl"):
        if fmt == "bfl":  # load_export reads the first format purecc.json lists
            meta = json.loads((out / "purecc.json").read_text())
            (out / "purecc.json").write_text(json.dumps(dict(meta, formats=["bfl"])))
        parts, trained = trained_lib.load_export(out, load_pipeline(folder))
        assert trained.lora is None and trained.embeddings is None
        for got, want in zip(jax.tree_util.tree_leaves(parts.transformer_params), jax.tree_util.tree_leaves(tuned)):
            np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="needs a LoRA, but this run fine-tuned the full weights"):
        trained_lib.write_export(tmp_path / "x", info, {"params": tuned}, None, cfg, backbones.FLUX, formats=("kohya",))


# ----------------------------------------------------------------------------- verification


def test_manifest_catches_a_damaged_export(run, tmp_path):
    out = export(run[0], tmp_path / "e")
    manifest.verify(out)
    entry = json.loads((out / manifest.NAME).read_text())["files"]["pytorch_lora_weights.safetensors"]
    assert entry["tensors"]["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"] == \
        {"shape": [4, 32], "dtype": "float32"}
    weights = out / "pytorch_lora_weights.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # one bit of the last tensor's data
    weights.write_bytes(bytes(flipped))
    with pytest.raises(manifest.ExportError, match="pytorch_lora_weights.safetensors: sha256 differs"):
        manifest.verify(out)
    with pytest.raises(manifest.ExportError, match="sha256 differs"):
        export_cli.cli(["export", f"--verify={out}"])
    weights.write_bytes(good[:-8])  # cut short, as by an interrupted copy
    with pytest.raises(manifest.ExportError, match=r"pytorch_lora_weights.safetensors: \d+ bytes, the manifest says"):
        manifest.verify(out)
    weights.write_bytes(good)
    (out / "concept_t5.safetensors").unlink()
    with pytest.raises(manifest.ExportError, match="concept_t5.safetensors: missing"):
        manifest.verify(out)


# ----------------------------------------------------------------------------- importing LoRAs


def test_peft_lora_file_gives_diffusers_output(folder, inputs, tmp_path):
    """A LoRA made and saved by peft / diffusers (alpha != rank, kept in the file's metadata), at two scales."""
    from diffusers import FluxPipeline

    from purecc_jax.backbones.flux.folder import load_pipeline

    file = pipeline_reference.save_peft_lora(
        FluxPipeline.from_pretrained(folder),
        ["to_q", "to_k", "add_v_proj", "to_out.0", "proj_mlp", "norm1.linear", "ff.net.2"], tmp_path)
    parts = load_pipeline(folder)
    for scale in (1.0, 0.5):
        fresh = FluxPipeline.from_pretrained(folder)
        fresh.load_lora_weights(file, adapter_name="peft")
        fresh.set_adapters("peft", scale)
        want = flux_reference.run_torch(fresh.transformer, inputs)
        close(jax_output(folder, inputs, formats.lora_variables(file, parts, scale)), want)


def test_kohya_file_samples_as_diffusers_with_the_diffusers_file(folder, run, inputs, tmp_path):
    """Our kohya file, imported, equals diffusers with our diffusers file of the same adapter; and
    `sample --lora=<kohya file>` equals generate() with that adapter."""
    from diffusers import FluxPipeline

    from purecc_jax.backbones.flux.folder import load_pipeline
    from purecc_jax.backbones.flux.generate import generate
    from purecc_jax.pipeline.settings import SampleSettings

    out = export(run[0], tmp_path / "both", "--format=diffusers-lora,kohya")
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    parts = load_pipeline(folder)
    adapter = formats.lora_variables(out / "lora_kohya.safetensors", parts)
    close(jax_output(folder, inputs, adapter), flux_reference.run_torch(pipe.transformer, inputs))

    args = ["--prompt=a photo of a dog", "--height=32", "--width=32", "--steps=1", f"--max_sequence_length={L}",
            "--noprogress", f"--pretrained={folder}", f"--output={tmp_path / 'k.npy'}"]
    sample_cli.cli(["sample", *args, f"--lora={out / 'lora_kohya.safetensors'}", "--lora_scale=0.7"])
    half = formats.lora_variables(out / "pytorch_lora_weights.safetensors", parts, 0.7)
    want = generate(parts, ["a photo of a dog"], SampleSettings(32, 32, 1, 3.5, L), lora=half).images
    np.testing.assert_allclose(np.load(tmp_path / "k.npy"), np.asarray(want), atol=1e-5)


def test_unknown_lora_keys_are_errors(folder, tmp_path):
    cfg = flux_config(folder)
    a, b = np.zeros((2, 32), np.float32), np.zeros((32, 2), np.float32)
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}
    cases = [
        ({**good, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": a[0]},
         "unexpected tensor 'transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector'"),
        ({**good, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a},
         "'text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight' names no linear layer"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a}, "lacks its lora_A or lora_B"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": np.zeros((96, 2), np.float32),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a},
         "'lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight' names no linear layer"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
          "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": a[0]},
         "unexpected tensor 'lora_unet_double_blocks_0_img_attn_qkv.dora_scale'"),
        ({"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": a,
          "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": np.zeros((96, 2), np.float32)},
         "'lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight' names no linear layer"),
    ]
    for i, (content, message) in enumerate(cases):
        save_file(content, tmp_path / f"{i}.safetensors")
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            formats.read_lora(tmp_path / f"{i}.safetensors", cfg)
    save_file(good, tmp_path / "good.safetensors")
    tree, _ = formats.read_lora(tmp_path / "good.safetensors", cfg)
    assert set(traverse_util.flatten_dict(tree)) == {("double_blocks", "img_attn", "q", "a"),
                                                     ("double_blocks", "img_attn", "q", "b")}


def test_extractor_lora_replaces_stage_a(folder, run, tmp_path, monkeypatch):
    """--config.extractor_lora=FILE: no stage A; stage B's frozen extractor LoRA is the file's."""
    from purecc_jax import train

    out = export(run[0], tmp_path / "k", "--stage=a", "--format=kohya")
    file = out / "lora_kohya.safetensors"
    with pytest.raises(ValueError, match="set concept_embedding=none"):
        train.validate(make_config(folder, extractor_lora=str(file)))
    seen = {}

    def run_stage(self, name, stage_cfg, step_cfg, trainable, frozen, sample_lora):
        seen.update(name=name, step_cfg=step_cfg, frozen=frozen)
        return trainable

    monkeypatch.setattr(train.Trainer, "run_stage", run_stage)
    workdir = tmp_path / "w"
    main_lib.run(make_config(folder, extractor_lora=str(file), concept_embedding="none",
                             **{"sample.prompts": ()}), workdir)
    assert seen["name"] == "stage_b" and not (workdir / "stage_a").exists()
    want, lcfg = kohya.load(file, flux_config(folder))
    assert seen["step_cfg"].extractor_lora == lcfg
    got = traverse_util.flatten_dict(jax.device_get(seen["frozen"].extractor.lora))
    assert got.keys() == traverse_util.flatten_dict(want).keys()
    for key, value in traverse_util.flatten_dict(want).items():
        np.testing.assert_array_equal(got[key], value)
    # ... and it is stage A's trained LoRA (alpha / rank = 1 here).
    stage_a = loop.restore_trainable(run[0] / "stage_a")[0]["lora"]
    np.testing.assert_allclose(got[("double_blocks", "img_attn", "q", "b")],
                               stage_a["double_blocks"]["img_attn"]["q"]["b"], rtol=1e-6)
    assert json.loads((workdir / "export" / "purecc.json").read_text())["stage"] == "stage_b"


# ----------------------------------------------------------------------------- composing LoRAs


def test_two_loras_compose_as_diffusers_set_adapters(folder, inputs, tmp_path):
    """Two PEFT LoRAs (different targets, ranks and alphas) at scales 0.8 and 0.6: the transformer's output
    is diffusers' after `set_adapters(["a", "b"], [0.8, 0.6])`, and neither LoRA's alone."""
    from diffusers import FluxPipeline

    from purecc_jax.backbones.flux.folder import load_pipeline

    files = [pipeline_reference.save_peft_lora(FluxPipeline.from_pretrained(folder), targets, tmp_path / name,
                                               r=r, lora_alpha=alpha)
             for name, targets, r, alpha in (("a", ["to_q", "to_k", "proj_mlp"], 3, 6.0),
                                             ("b", ["to_q", "add_v_proj", "ff.net.2"], 2, 1.0))]
    pipe = FluxPipeline.from_pretrained(folder)
    for name, file in zip("ab", files):
        pipe.load_lora_weights(file, adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.8, 0.6])
    want = flux_reference.run_torch(pipe.transformer, inputs)

    parts = load_pipeline(folder)
    _, composed = trained_lib.compose_loras(parts, None, files, [0.8, 0.6], backbones.FLUX)
    close(jax_output(folder, inputs, composed), want)
    for file, scale in zip(files, (0.8, 0.6)):  # each alone is far from the sum
        alone = jax_output(folder, inputs, formats.lora_variables(file, parts, scale))
        assert np.abs(alone - want).max() > 1e-2 * np.abs(want).max()


def test_sample_cli_composes_the_runs_lora_with_lora_files(folder, run, inputs, tmp_path):
    """`sample --workdir=RUN --lora=FILE --lora_scale=0.9,0.5`: the run's LoRA at 0.9 and the file's at 0.5,
    as diffusers' set_adapters gives them; the images are generate()'s with that composition."""
    from diffusers import FluxPipeline

    from purecc_jax.backbones.flux.folder import load_pipeline
    from purecc_jax.pipeline.settings import SampleSettings

    file = pipeline_reference.save_peft_lora(FluxPipeline.from_pretrained(folder), ["to_v", "to_out.0"], tmp_path)
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(run[0] / "export", adapter_name="concept")
    pipe.load_lora_weights(file, adapter_name="style")
    pipe.set_adapters(["concept", "style"], [0.9, 0.5])
    want = flux_reference.run_torch(pipe.transformer, inputs)

    parts, trained = trained_lib.load_trained(run[0], load_pipeline(folder))
    composed, lora = trained_lib.compose_loras(parts, trained, [file], [0.9, 0.5])
    assert lora is None and composed.embeddings is not None  # the LoRAs ride on the trained concept
    close(jax_output(folder, inputs, composed.lora), want)

    args = ["--prompt=a photo of sks dog", "--height=32", "--width=32", "--steps=1", f"--max_sequence_length={L}",
            "--noprogress", f"--workdir={run[0]}", f"--lora={file}"]
    sample_cli.cli(["sample", *args, "--lora_scale=0.9,0.5", f"--output={tmp_path / 'two.npy'}"])
    images = backbones.FLUX.generate(parts, ["a photo of sks dog"], SampleSettings(32, 32, 1, 3.5, L), seeds=[0],
                                     trained=composed)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.asarray(images), atol=1e-5)
    with pytest.raises(ValueError, match="3 LoRA scales .* for 2 LoRAs"):
        trained_lib.compose_loras(parts, trained, [file], [0.9, 0.5, 1.0])
    from absl import app

    with pytest.raises(app.UsageError, match="gives 3 scales for 1 --lora files"):
        sample_cli.cli(["sample", *args, "--lora_scale=0.9,0.5,1", f"--output={tmp_path / 'x.npy'}"])

