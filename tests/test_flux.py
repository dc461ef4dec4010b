"""FLUX transformer parity with diffusers' FluxTransformer2DModel, loaded through flux_io."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flux_reference import build_torch, random_inputs, run_torch, save_torch, tiny_config
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.models.flux import FluxTransformer

CONFIGS = {
    "guidance": tiny_config(),
    "no_guidance": tiny_config(guidance_embeds=False, num_layers=3, num_single_layers=1,
                               num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4)),
    "out_channels": tiny_config(in_channels=12, out_channels=8, num_layers=1, num_single_layers=3,
                                joint_attention_dim=20, pooled_projection_dim=12),
}
BATCH, GRID, TEXT_LEN = 2, (3, 5), 7


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(diffusers folder, inputs, torch output) for one config; the torch model is built once."""
    cfg = CONFIGS[request.param]
    model = build_torch(cfg, seed=len(request.param))
    folder = save_torch(model, tmp_path_factory.mktemp(request.param) / "transformer", cfg)
    inputs = random_inputs(flux_io.read_config(folder), BATCH, *GRID, TEXT_LEN, seed=1)
    return folder, inputs, run_torch(model, inputs)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_matches_diffusers(reference, scan):
    folder, inputs, expected = reference
    cfg, params = flux_io.load_transformer(folder, scan_layers=scan)
    assert cfg.scan_layers is scan
    assert ("double_blocks" in params) is scan and ("double_blocks_0" in params) is not scan
    out = jax.jit(lambda p, x: FluxTransformer(cfg).apply({"params": p}, **x))(params, inputs)
    assert out.shape == expected.shape == (BATCH, GRID[0] * GRID[1], cfg.output_channels)
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_array_less(np.abs(np.asarray(out) - expected).max(), 1e-5 * scale)



@pytest.mark.parametrize("name,guidance", [("flux-dev", True), ("flux-schnell", False)])
def test_full_size_parameter_count_matches_diffusers(name, guidance):
    """eval_shape of the full presets (no memory) counts what diffusers' model has (~11.9 B)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from purecc_jax import sharding
    from purecc_jax.models.flux import init_fn, preset

    abstract = sharding.unbox(jax.eval_shape(init_fn(preset(name), jax.random.key(0))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=guidance)  # diffusers' defaults are FLUX.1's sizes
    assert ours == sum(p.numel() for p in ref.parameters())
    assert 11.8e9 < ours < 12.0e9
