"""FLUX checkpoint I/O: BFL files, strictness, sharded files, exports, orbax, the convert CLI, streaming."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tracemalloc
import weakref

import jax
import numpy as np
import pytest

from flux_reference import build_torch, random_inputs, run_torch, save_torch, tiny_config
from purecc_jax import convert, sharding
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.models.flux import FluxTransformer
from purecc_jax.weights import loader
from purecc_jax.weights.loader import WeightsError
from purecc_jax.weights.safetensors_io import Checkpoint, save_file, write_sharded

TINY = tiny_config()
AXES = tuple(TINY["axes_dims_rope"])
PREFIX = "model.diffusion_model."


def to_bfl(sd: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """A diffusers FLUX state dict renamed and fused into Black Forest Labs' layout."""
    out = {}
    put = lambda name, x: out.__setitem__(prefix + name, np.ascontiguousarray(x))
    for wb in ("weight", "bias"):
        put(f"img_in.{wb}", sd[f"x_embedder.{wb}"])
        put(f"txt_in.{wb}", sd[f"context_embedder.{wb}"])
        for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                         ("guidance_in", "guidance_embedder")):
            if f"time_text_embed.{dif}.linear_1.{wb}" in sd:
                put(f"{bfl}.in_layer.{wb}", sd[f"time_text_embed.{dif}.linear_1.{wb}"])
                put(f"{bfl}.out_layer.{wb}", sd[f"time_text_embed.{dif}.linear_2.{wb}"])
        put(f"final_layer.linear.{wb}", sd[f"proj_out.{wb}"])
        scale, shift = np.split(sd[f"norm_out.linear.{wb}"], 2)  # diffusers (scale, shift), BFL (shift, scale)
        put(f"final_layer.adaLN_modulation.1.{wb}", np.concatenate([shift, scale]))
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(doubles):
        t, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for wb in ("weight", "bias"):
            put(f"{b}.img_mod.lin.{wb}", sd[f"{t}.norm1.linear.{wb}"])
            put(f"{b}.txt_mod.lin.{wb}", sd[f"{t}.norm1_context.linear.{wb}"])
            put(f"{b}.img_attn.qkv.{wb}", np.concatenate([sd[f"{t}.attn.to_{x}.{wb}"] for x in "qkv"]))
            put(f"{b}.txt_attn.qkv.{wb}", np.concatenate([sd[f"{t}.attn.add_{x}_proj.{wb}"] for x in "qkv"]))
            put(f"{b}.img_attn.proj.{wb}", sd[f"{t}.attn.to_out.0.{wb}"])
            put(f"{b}.txt_attn.proj.{wb}", sd[f"{t}.attn.to_add_out.{wb}"])
            put(f"{b}.img_mlp.0.{wb}", sd[f"{t}.ff.net.0.proj.{wb}"])
            put(f"{b}.img_mlp.2.{wb}", sd[f"{t}.ff.net.2.{wb}"])
            put(f"{b}.txt_mlp.0.{wb}", sd[f"{t}.ff_context.net.0.proj.{wb}"])
            put(f"{b}.txt_mlp.2.{wb}", sd[f"{t}.ff_context.net.2.{wb}"])
        put(f"{b}.img_attn.norm.query_norm.scale", sd[f"{t}.attn.norm_q.weight"])
        put(f"{b}.img_attn.norm.key_norm.scale", sd[f"{t}.attn.norm_k.weight"])
        put(f"{b}.txt_attn.norm.query_norm.scale", sd[f"{t}.attn.norm_added_q.weight"])
        put(f"{b}.txt_attn.norm.key_norm.scale", sd[f"{t}.attn.norm_added_k.weight"])
    for i in sorted(singles):
        t, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for wb in ("weight", "bias"):
            put(f"{b}.modulation.lin.{wb}", sd[f"{t}.norm.linear.{wb}"])
            put(f"{b}.linear1.{wb}", np.concatenate([sd[f"{t}.attn.to_{x}.{wb}"] for x in "qkv"]
                                                    + [sd[f"{t}.proj_mlp.{wb}"]]))
            put(f"{b}.linear2.{wb}", sd[f"{t}.proj_out.{wb}"])
        put(f"{b}.norm.query_norm.scale", sd[f"{t}.attn.norm_q.weight"])
        put(f"{b}.norm.key_norm.scale", sd[f"{t}.attn.norm_k.weight"])
    return out


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, inputs):
    return FluxTransformer(cfg).apply({"params": params}, **inputs)


def forward(cfg, params, inputs) -> np.ndarray:
    return np.asarray(_apply(cfg, params, inputs))


def assert_close(out, expected):
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_array_less(np.abs(out - expected).max(), 1e-5 * scale)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny torch model, its diffusers folder, params loaded from it, inputs and torch output."""
    model = build_torch(TINY)
    root = tmp_path_factory.mktemp("tiny")
    folder = save_torch(model, root / "pipeline" / "transformer", TINY)
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    cfg, params = flux_io.load_transformer(folder)
    inputs = random_inputs(cfg, 2, 3, 5, 7, seed=3)
    return dict(model=model, sd=state_dict(model), root=root, folder=folder, cfg=cfg, params=params,
                inputs=inputs, expected=run_torch(model, inputs))


# --- formats ---------------------------------------------------------------------------

def test_pipeline_folder_uses_its_transformer(tiny):
    pipeline = tiny["folder"].parent
    assert flux_io.detect_format(pipeline) == flux_io.detect_format(tiny["folder"]) == "diffusers"
    assert flux_io.read_config(pipeline) == tiny["cfg"]
    cfg, params = flux_io.load_transformer(pipeline)
    assert_trees_equal(params, tiny["params"])
    assert_close(forward(cfg, params, tiny["inputs"]), tiny["expected"])


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["bare", "prefixed"])
def test_bfl_file_matches_diffusers(tiny, tmp_path, prefix):
    tensors = to_bfl(tiny["sd"], prefix)
    if prefix:  # an all-in-one file: tensors outside the prefix are not the transformer's
        tensors["vae.decoder.conv_in.weight"] = np.ones((2, 2), np.float32)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tensors, path)
    assert flux_io.detect_format(path) == "bfl"
    assert flux_io.read_config(path, axes_dim=AXES) == tiny["cfg"]
    cfg, params = flux_io.load_transformer(path, axes_dim=AXES)
    assert_trees_equal(params, tiny["params"])
    assert_close(forward(cfg, params, tiny["inputs"]), tiny["expected"])


def test_bfl_architecture_inferred_from_shapes(tmp_path):
    arch = tiny_config(num_layers=3, num_single_layers=1, num_attention_heads=3, attention_head_dim=32,
                       axes_dims_rope=(4, 14, 14), guidance_embeds=False, joint_attention_dim=20,
                       pooled_projection_dim=12, in_channels=8, out_channels=4)
    path = tmp_path / "f.safetensors"
    save_file(to_bfl(state_dict(build_torch(arch)), PREFIX), path)
    cfg = flux_io.read_config(path)
    assert (cfg.depth, cfg.depth_single, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio) == (3, 1, 3, 32, 4.0)
    assert (cfg.context_dim, cfg.pooled_dim, cfg.in_channels, cfg.output_channels) == (20, 12, 8, 4)
    assert cfg.axes_dim == (4, 14, 14) and not cfg.guidance_embed
    assert cfg == flux_io.read_config(path.parent)  # a folder holding one BFL file


def test_bfl_head_dim_without_default_axes_needs_axes_dim(tiny, tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(to_bfl(tiny["sd"]), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*axes_dim"):
        flux_io.read_config(path)


def test_not_a_flux_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        flux_io.detect_format(tmp_path / "nowhere")
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors.*not a FLUX"):
        flux_io.detect_format(tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        flux_io.detect_format(tmp_path / "empty")


# --- strictness and sharded files ------------------------------------------------------

def _diffusers_folder(path, tensors):
    path.mkdir()
    save_file(tensors, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_strict_loading_names_the_tensor(tiny, tmp_path, problem):
    sd = dict(tiny["sd"])
    name = "single_transformer_blocks.1.attn.norm_k.weight"
    if problem == "missing":
        del sd[name]
    elif problem == "unexpected":
        name = "transformer_blocks.0.attn.extra.weight"
        sd[name] = np.zeros(3, np.float32)
    else:
        sd[name] = np.ones(sd[name].shape[0] + 1, np.float32)
    folder = _diffusers_folder(tmp_path / problem, sd)
    with pytest.raises(WeightsError, match=f"{problem.replace('misshaped', 'tensor')}.*{re.escape(name)}"):
        flux_io.load_transformer(folder)


def test_sharded_checkpoint_loads(tiny, tmp_path):
    sd = tiny["sd"]
    total = sum(x.nbytes for x in sd.values())
    specs = [(k, v.shape, v.dtype) for k, v in sd.items()]
    files = write_sharded(tmp_path, "diffusion_pytorch_model", specs, sd.__getitem__, int(total * 0.6))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert len(files) == 2 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    _, params = flux_io.load_transformer(tmp_path)
    assert_trees_equal(params, tiny["params"])


# --- exports ---------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_diffusers_export_loads_in_diffusers(tiny, tmp_path, scan):
    from diffusers import FluxTransformer2DModel

    cfg, params = flux_io.load_transformer(tiny["folder"], scan_layers=scan)
    files = flux_io.export_diffusers(params, cfg, tmp_path, max_shard_bytes=60_000)
    assert len(files) > 1 and files[0].name == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    model = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    exported = state_dict(model)
    assert exported.keys() == tiny["sd"].keys()
    for name, x in tiny["sd"].items():
        np.testing.assert_array_equal(exported[name], x, err_msg=name)
    np.testing.assert_array_equal(run_torch(model, tiny["inputs"]), tiny["expected"])


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["bare", "prefixed"])
def test_bfl_export_round_trip(tiny, tmp_path, prefix):
    path = flux_io.export_bfl(tiny["params"], tiny["cfg"], tmp_path / "flux.safetensors", prefix=prefix)
    ckpt, expected = Checkpoint(path), to_bfl(tiny["sd"], prefix)
    assert sorted(ckpt.keys()) == sorted(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(ckpt.get(name), x, err_msg=name)
    cfg, params = flux_io.load_transformer(path, axes_dim=AXES)
    assert cfg == tiny["cfg"]
    assert_trees_equal(params, tiny["params"])


# --- orbax -----------------------------------------------------------------------------

def test_orbax_round_trip_into_shardings(tiny, tmp_path):
    flux_io.save_orbax(tmp_path / "ckpt", tiny["cfg"], tiny["params"])
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = flux_io.restore_orbax(tmp_path / "ckpt", mesh=mesh)
    assert cfg == tiny["cfg"]
    assert_trees_equal(params, tiny["params"])
    _, expected = flux_io.abstract_params(cfg, mesh)
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        assert x.sharding == s
    fc1 = params["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    cfg16, params16 = flux_io.restore_orbax(tmp_path / "ckpt", param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(params16))
    with pytest.raises(ValueError, match="scan_layers"):
        flux_io.restore_orbax(tmp_path / "ckpt", scan_layers=False)


def test_load_with_mesh_places_shards(tiny):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = flux_io.load_transformer(tiny["folder"], mesh=mesh)
    assert_trees_equal(params, tiny["params"])
    qkv = params["single_blocks"]["attn"]["q"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert qkv.addressable_shards[0].data.shape == (cfg.depth_single, cfg.hidden_size // 2, cfg.hidden_size // 2)


# --- convert CLI -----------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    rc = convert.cli(["convert", *args])
    return rc, capsys.readouterr().out


def relative_diffs(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"relative diff ([0-9.e+-]+)", out)]


def test_cli_diffusers_folder(tiny, tmp_path, capsys):
    rc, out = run_cli(capsys, f"--input={tiny['folder'].parent}", f"--output={tmp_path / 'out'}",
                      "--verify_with_torch", "--verify_size=48x80", "--verify_size=16x32", "--verify_text_len=5")
    assert rc == 0, out
    rels = relative_diffs(out)
    assert len(rels) == 2 and max(rels) < 1e-5, out
    cfg, params = flux_io.restore_orbax(tmp_path / "out")
    assert cfg == tiny["cfg"]
    assert_trees_equal(params, tiny["params"])


def test_cli_bfl_file(tmp_path, capsys):
    arch = tiny_config(num_layers=1, num_single_layers=2, attention_head_dim=32, axes_dims_rope=(4, 14, 14),
                       guidance_embeds=False)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(to_bfl(state_dict(build_torch(arch, seed=5)), PREFIX), path)
    # The printed difference is tiny, but a tolerance no float32 computation meets fails the command.
    rc, out = run_cli(capsys, f"--input={path}", f"--output={tmp_path / 'out'}", "--verify_with_torch",
                      "--verify_size=32x48", "--tolerance=1e-12")
    rels = relative_diffs(out)
    assert len(rels) == 1 and 1e-12 < rels[0] < 1e-5, out
    assert rc == 1
    cfg, _ = flux_io.restore_orbax(tmp_path / "out")
    assert (cfg.head_dim, cfg.axes_dim, cfg.guidance_embed, cfg.depth_single) == (32, (4, 14, 14), False, 2)


def test_runtime_does_not_import_torch():
    code = ("import sys, purecc_jax.convert, purecc_jax.backbones.flux.weights; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- streaming -------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_load_streams_one_tensor_at_a_time(tmp_path, scan):
    """Every tensor the loader reads is materialised; few may be alive at once."""
    arch = tiny_config(attention_head_dim=64, axes_dims_rope=(8, 28, 28))
    folder = save_torch(build_torch(arch), tmp_path / "transformer", arch)
    cfg = flux_io.read_config(folder, scan_layers=scan)
    abstract, shardings = flux_io.abstract_params(cfg)
    ckpt = Checkpoint(folder)
    sizes = {name: ckpt.get(name).nbytes for name in ckpt.keys()}
    total, largest = sum(sizes.values()), max(sizes.values())

    alive: dict[int, int] = {}
    peak_alive = 0
    read_from_disk = ckpt.get

    def get(name):
        nonlocal peak_alive
        x = np.array(read_from_disk(name))  # a real host copy, freed when the loader drops it
        alive[id(x)] = x.nbytes
        weakref.finalize(x, alive.pop, id(x))
        peak_alive = max(peak_alive, sum(alive.values()))
        return x

    ckpt.get = get
    tracemalloc.start()
    try:
        params = loader.load(ckpt, flux_io.weight_rules(cfg, flux_io.resolve(folder)), abstract, shardings)
        _, peak_host = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sizes) > 100
    # A scanned leaf stacks one tensor per block, so up to max(depth) tensors may be alive.
    assert peak_alive <= max(cfg.depth, cfg.depth_single) * largest < total / 5
    assert peak_host < total / 3
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) == total
