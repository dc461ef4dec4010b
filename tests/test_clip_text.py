"""The Flax CLIP text encoder matches transformers' CLIPTextModel (fp32), loads strictly,
reads extra token rows, shards its parameters, and has CLIP-L's parameter count."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import CLIPTextConfig as HFConfig
from transformers import CLIPTextModel

from purecc_jax import sharding
from purecc_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder, init_fn, preset
from purecc_jax.weights.clip_rules import load_clip
from purecc_jax.weights.loader import WeightsError
from purecc_jax.weights.safetensors_io import Checkpoint, save_file

VOCAB = 100
MAX_ID = VOCAB - 1  # CLIP's EOS has the largest id: what the legacy (eos_token_id=2) argmax finds
REAL_EOS = 60  # a config with a real eos id pools at its first occurrence instead
# Each row has its EOS before the end with padding after, and the two conventions pool at
# different positions (row 0: 4 vs 3, row 1: 5 vs 1); row 0 repeats the max (first one wins).
IDS = np.array([[98, 7, 41, REAL_EOS, MAX_ID, MAX_ID, 0, 0],
                [12, REAL_EOS, 90, 55, 5, MAX_ID, 0, 0]], np.int64)


def tiny_hf(eos_token_id: int, **kw) -> HFConfig:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=0)
    return HFConfig(**{**cfg, **kw})


def build_torch(hf_config: HFConfig) -> CLIPTextModel:
    """Random weights everywhere (LayerNorms away from 1/0) so a mis-mapped tensor shows."""
    model = CLIPTextModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def run_torch(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(ids, np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, f"max abs diff {err} vs max |ref| {scale}"


@pytest.fixture(scope="module", params=[2, REAL_EOS], ids=["legacy_eos2", "real_eos"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_torch(tiny_hf(request.param))
    folder = tmp_path_factory.mktemp(f"clip{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("scan", [True, False])
def test_matches_transformers(saved, scan):
    model, folder = saved
    cfg, params = load_clip(folder, scan_layers=scan)
    assert cfg.eos_token_id == model.config.eos_token_id and cfg.scan_layers == scan
    hidden, pooled = CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(IDS, jnp.int32))
    ref_hidden, ref_pooled = run_torch(model, IDS)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)


def test_extra_embeddings(saved):
    model, folder = saved
    cfg, params = load_clip(folder)
    width = cfg.hidden_size
    extra = np.random.default_rng(1).standard_normal((2, width)).astype(np.float32)
    # Our ids use the extra rows (vocab + j); the reference writes those rows into the
    # table at ordinary ids, which is what splicing them into inputs_embeds means
    # (CLIPTextModel.forward takes no inputs_embeds).
    ids = IDS.copy()
    ids[0, 1], ids[1, 2], ids[1, 4] = VOCAB + 1, VOCAB + 0, VOCAB + 1
    reference = copy.deepcopy(model)
    ref_ids = IDS.copy()
    ref_ids[0, 1], ref_ids[1, 2], ref_ids[1, 4] = 10, 11, 10
    with torch.no_grad():
        reference.embeddings.token_embedding.weight[10] = torch.from_numpy(extra[1])
        reference.embeddings.token_embedding.weight[11] = torch.from_numpy(extra[0])
    encoder = CLIPTextEncoder(cfg)
    hidden, pooled = encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(extra))
    ref_hidden, ref_pooled = run_torch(reference, ref_ids)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)

    rng = np.random.default_rng(2)
    w_hidden, w_pooled = (rng.standard_normal(x.shape).astype(np.float32) for x in (hidden, pooled))

    def loss(e):
        h, p = encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32), e)
        return jnp.sum(h * w_hidden) + jnp.sum(p * w_pooled)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(extra)))
    assert np.all(np.abs(grad).sum(-1) > 0), "each used extra row must receive a gradient"


def test_loads_text_model_prefix(saved, tmp_path):
    """FLUX's text_encoder/ holds `text_model.*` names and the position_ids buffer."""
    model, folder = saved
    ckpt = Checkpoint(folder)
    tensors = {f"text_model.{k}": np.array(ckpt.get(k)) for k in ckpt.keys()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    cfg, params = load_clip(tmp_path)
    hidden, pooled = CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(IDS, jnp.int32))
    ref_hidden, ref_pooled = run_torch(model, IDS)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved
    ckpt = Checkpoint(folder)
    gone = "encoder.layers.1.mlp.fc1.bias"
    save_file({k: np.array(ckpt.get(k)) for k in ckpt.keys() if k != gone}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match=f"missing tensor '{gone}'"):
        load_clip(tmp_path)


def test_sharded_load_matches(saved):
    """On a (data=2, fsdp=2, tensor=2) mesh, matrices are sharded and the output is unchanged."""
    model, folder = saved
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = load_clip(folder, mesh=mesh)
    for path, x in traverse_util.flatten_dict(params).items():
        if path[-1] in ("kernel", "token_embedding"):
            assert not x.sharding.is_fully_replicated, f"{'/'.join(path)} is replicated"
    with sharding.activate(mesh):
        hidden, pooled = jax.jit(CLIPTextEncoder(cfg).apply)({"params": params}, jnp.asarray(IDS, jnp.int32))
    ref_hidden, ref_pooled = run_torch(model, IDS)
    assert_close(hidden, ref_hidden)
    assert_close(pooled, ref_pooled)


def test_clip_l_parameter_count():
    hf = HFConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):
        expected = sum(p.numel() for p in CLIPTextModel(hf).parameters())
    cfg = preset("clip-l")
    assert CLIPTextConfig.from_hf(hf.to_dict()).replace(eos_token_id=2) == cfg
    shapes = jax.eval_shape(init_fn(cfg, jax.random.key(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sharding.unbox(shapes)))
    assert count == expected
    assert 122_000_000 < count < 124_000_000


def test_sequence_longer_than_positions_is_rejected():
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="17 tokens"):
        jax.eval_shape(lambda: CLIPTextEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32)))
