"""SD3's text encoders: CLIPTextModelWithProjection parity (penultimate hidden states, projected pooled
output) and bigG's parameter count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as HFConfig
from transformers import CLIPTextModelWithProjection

from purecc_jax import sharding
from purecc_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder, init_fn, preset
from purecc_jax.weights.clip_rules import load_clip

VOCAB = 100
IDS = np.array([[98, 7, 41, 60, VOCAB - 1, VOCAB - 1, 0, 0, 0],
                [12, 60, 90, 55, 5, 3, VOCAB - 1, 0, 0]], np.int64)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=[2, 60], ids=["legacy_eos2", "real_eos"])
def saved(request, tmp_path_factory):
    """A bigG-like (gelu, projection) tiny CLIPTextModelWithProjection, random weights, saved."""
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(HFConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", projection_dim=20, eos_token_id=request.param,
        bos_token_id=0, pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    folder = tmp_path_factory.mktemp(f"clip_proj{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_matches_clip_with_projection(saved, scan):
    model, folder = saved
    cfg, params = load_clip(folder, scan_layers=scan)
    assert cfg.projection_dim == 20
    with torch.no_grad():
        ref = model(torch.from_numpy(IDS), output_hidden_states=True)
    encoder = CLIPTextEncoder(cfg)
    ids = jnp.asarray(IDS, jnp.int32)
    penultimate, pooled = jax.jit(lambda p: encoder.apply({"params": p}, ids, penultimate=True))(params)
    last, pooled_again = encoder.apply({"params": params}, ids)
    assert _rel(penultimate, ref.hidden_states[-2].numpy()) < 1e-5
    assert _rel(last, ref.last_hidden_state.numpy()) < 1e-5
    assert _rel(pooled, ref.text_embeds.numpy()) < 1e-5
    np.testing.assert_allclose(pooled, pooled_again, rtol=1e-5, atol=1e-6)


def test_config_round_trip(saved):
    _, folder = saved
    cfg, _ = load_clip(folder)
    assert CLIPTextConfig.from_hf(cfg.to_hf()) == cfg


def test_clip_g_parameter_count():
    hf = HFConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        expected = sum(p.numel() for p in CLIPTextModelWithProjection(hf).parameters())
    shapes = jax.eval_shape(init_fn(preset("clip-g"), jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sharding.unbox(shapes))) == expected
    assert 690_000_000 < expected < 700_000_000
