"""SD3 / SD3.5 transformer parity with diffusers' SD3Transformer2DModel, loaded through sd3_io."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from purecc_jax import sharding
from purecc_jax.backbones.sd3 import weights as sd3_io
from purecc_jax.models import sd3
from purecc_jax.models.sd3 import SD3Transformer
from sd3_reference import build_torch, random_inputs, run_torch, save_torch, tiny_config

# (diffusers config, latent height, width, text length)
CONFIGS = {
    # MMDiT-X block, plain block, pre-only last block; non-square latents, odd text length.
    "mmdit_x": (tiny_config(), 6, 10, 7),
    # SD3.0-like: no dual attention, no q/k norm, out_channels != in_channels.
    "sd3_plain": (tiny_config(num_layers=2, dual_attention_layers=(), qk_norm=None, in_channels=8,
                              num_attention_heads=4, attention_head_dim=8, pos_embed_max_size=9), 8, 4, 5),
    # Every block MMDiT-X, the pre-only one included; an odd crop of the position table.
    "all_dual": (tiny_config(num_layers=2, dual_attention_layers=(0, 1), pos_embed_max_size=9,
                             sample_size=12), 4, 8, 11),
}
BATCH = 2


def _rel_error(out, expected) -> float:
    return float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(diffusers folder, inputs, torch output, torch model) for one config; the torch model is built once."""
    cfg, h, w, text_len = CONFIGS[request.param]
    model = build_torch(cfg, seed=len(request.param))
    folder = save_torch(model, tmp_path_factory.mktemp(request.param) / "transformer", cfg)
    inputs = random_inputs(sd3_io.read_config(folder), BATCH, h, w, text_len, seed=1)
    return folder, inputs, run_torch(model, inputs), model


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_matches_diffusers(reference, scan):
    folder, inputs, expected, _ = reference
    cfg, params = sd3_io.load_transformer(folder, scan_layers=scan)
    assert ("joint_blocks_0" in params or "dual_blocks_0" in params) is not scan
    out = jax.jit(lambda p, x: SD3Transformer(cfg).apply({"params": p}, **x))(params, inputs)
    assert out.shape == expected.shape
    assert np.abs(expected).max() > 0.1
    assert _rel_error(out, expected) < 1e-5


def test_position_table_is_diffusers_buffer(reference):
    folder, _, _, model = reference
    cfg = sd3_io.read_config(folder)
    m = cfg.pos_embed_max_size
    np.testing.assert_allclose(sd3.position_table(cfg, m, m), model.pos_embed.pos_embed[0].numpy(), atol=1e-6)


def test_remat_policy_keeps_gradients():
    """Rematerialising every block (all three stacks) changes memory, not gradients."""
    grads = {}
    for policy in ("none", "full"):
        cfg = sd3.preset("tiny", remat_policy=policy)
        params = jax.jit(lambda: sharding.unbox(sd3.init_fn(cfg, jax.random.key(0))()))()
        inputs = random_inputs(cfg, 1, 4, 6, 5, seed=2)
        loss = lambda p: (SD3Transformer(cfg).apply({"params": p}, **inputs) ** 2).mean()
        grads[policy] = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads["none"]), jax.tree_util.tree_leaves(grads["full"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_single_file_layout_loads_to_the_same_outputs(reference, tmp_path):
    """Our single-file export is what diffusers' own converter turns back into the diffusers state dict,
    and loading it gives the same outputs."""
    import torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from purecc_jax.weights.safetensors_io import Checkpoint

    folder, inputs, expected, model = reference
    cfg, params = sd3_io.load_transformer(folder)
    path = sd3_io.export_single_file(params, cfg, tmp_path / "sd3.5_tiny.safetensors")
    ckpt = Checkpoint(path)
    converted = convert_sd3_transformer_checkpoint_to_diffusers({k: torch.from_numpy(np.array(ckpt.get(k)))
                                                                 for k in ckpt.keys()})
    state = model.state_dict()
    assert sorted(converted) == sorted(state)
    for name, value in state.items():
        np.testing.assert_allclose(converted[name].numpy(), value.numpy(), atol=1e-6, err_msg=name)

    assert sd3_io.read_config(path, head_dim=cfg.head_dim) == cfg
    cfg2, params2 = sd3_io.load_transformer(path, head_dim=cfg.head_dim)
    out = SD3Transformer(cfg2).apply({"params": params2}, **inputs)
    assert _rel_error(out, expected) < 1e-5


def test_wrong_position_table_config_is_refused(reference):
    import json

    from purecc_jax.weights.loader import WeightsError

    folder, _, _, _ = reference
    raw = json.loads((folder / "config.json").read_text())
    bad = folder.parent / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    (bad / "config.json").write_text(json.dumps({**raw, "sample_size": raw["sample_size"] * 2}))
    with pytest.raises(WeightsError, match="position table"):
        sd3_io.load_transformer(bad)


def test_full_size_parameter_count_matches_diffusers():
    """eval_shape of the sd3.5-medium preset (no memory) counts what diffusers' model has (~2.2 B)."""
    import torch
    from diffusers import SD3Transformer2DModel

    cfg = sd3.preset("sd3.5-medium")
    abstract = sharding.unbox(jax.eval_shape(sd3.init_fn(cfg, jax.random.key(0))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    assert ours == sum(p.numel() for p in ref.parameters())
    assert 2.0e9 < ours < 2.6e9


def test_export_and_sharded_load(tmp_path):
    """export_diffusers -> load_transformer on a (data=2, fsdp=2, tensor=2) mesh: parameters land in their
    logical shardings (matrices split) and the output under the mesh is the unsharded one."""
    cfg = sd3.preset("tiny")
    params = jax.jit(lambda: sharding.unbox(sd3.init_fn(cfg, jax.random.key(3))()))()
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
    sd3_io.export_diffusers(params, cfg, tmp_path / "transformer")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    loaded_cfg, loaded = sd3_io.load_transformer(tmp_path / "transformer", mesh=mesh)
    assert loaded_cfg == cfg
    fc1 = loaded["joint_blocks"]["x_mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    inputs = random_inputs(cfg, 4, 4, 6, 5, seed=3)
    expected = SD3Transformer(cfg).apply({"params": params}, **inputs)
    with sharding.activate(mesh):
        out = jax.jit(lambda p, x: SD3Transformer(cfg).apply({"params": p}, **x))(loaded, inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="dual_attention_layers"):
        sd3.preset("tiny", dual_attention_layers=(1,))
    with pytest.raises(ValueError, match="qk_norm"):
        sd3.preset("tiny", qk_norm="layer_norm")
    with pytest.raises(ValueError, match="caption_projection_dim"):
        sd3.SD3Config.from_diffusers(tiny_config(caption_projection_dim=48))
    cfg = sd3.preset("tiny")
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        sd3.position_table(cfg, cfg.pos_embed_max_size + 1, 2)
