"""The Flax T5 encoder matches transformers' T5EncoderModel (fp32), loads strictly whichever
name the tied token table has, reads extra token rows, shards its parameters, and has
T5-XXL's parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import T5Config as HFConfig
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from purecc_jax import sharding
from purecc_jax.models.t5 import T5Config, T5Encoder, init_fn, preset, relative_position_buckets
from purecc_jax.weights.loader import WeightsError
from purecc_jax.weights.safetensors_io import Checkpoint, save_file
from purecc_jax.weights.t5_rules import load_t5

VOCAB = 100
LENGTH = 30  # beyond max_distance=20, so the logarithmic and clamped buckets are used


def tiny_hf(**kw) -> HFConfig:
    cfg = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
    return HFConfig(**{**cfg, **kw})


def build_torch(hf_config: HFConfig) -> T5EncoderModel:
    """Random weights everywhere (RMS norm scales away from 1) so a mis-mapped tensor shows."""
    model = T5EncoderModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def input_ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(2, VOCAB, (2, LENGTH))
    ids[1, 20], ids[1, 21:] = 1, 0  # EOS (1) then padding (0), as the T5 tokenizer pads
    return ids


def run_torch(model, ids=None, embeds=None) -> np.ndarray:
    with torch.no_grad():
        if embeds is not None:
            return model(inputs_embeds=torch.from_numpy(embeds)).last_hidden_state.numpy()
        return model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()


def assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, f"max abs diff {err} vs max |ref| {scale}"


def save(model, folder, drop=(), rename=None):
    """A transformers-layout folder with some tensors dropped or renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k not in drop}
    for old, new in (rename or {}).items():
        sd[new] = sd.pop(old)
    save_file(sd, folder / "model.safetensors")
    model.config.to_json_file(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_torch(tiny_hf())
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("scan", [True, False])
def test_matches_transformers(saved, scan):
    model, folder = saved
    cfg, params = load_t5(folder, scan_layers=scan)
    assert cfg.gated and cfg.activation == "gelu_new" and cfg.scan_layers == scan
    ids = input_ids()
    out = T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert_close(out, run_torch(model, ids))


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_buckets_match_transformers(buckets, max_distance):
    length = 600
    ours = relative_position_buckets(length, buckets, max_distance)
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = T5Attention._relative_position_bucket(rel, True, buckets, max_distance).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_relu_feed_forward(tmp_path):
    torch.manual_seed(1)
    model = build_torch(tiny_hf(feed_forward_proj="relu"))
    cfg, params = load_t5(save(model, tmp_path))
    assert not cfg.gated and cfg.activation == "relu"
    ids = input_ids(1)
    assert_close(T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)), run_torch(model, ids))


def test_extra_embeddings(saved):
    model, folder = saved
    cfg, params = load_t5(folder)
    extra = np.random.default_rng(1).standard_normal((3, cfg.d_model)).astype(np.float32)
    ids = input_ids()
    ids[0, 4], ids[1, 0], ids[1, 7] = VOCAB + 2, VOCAB + 0, VOCAB + 2
    table = model.shared.weight.detach().numpy()
    embeds = np.where((ids >= VOCAB)[..., None], extra[np.clip(ids - VOCAB, 0, 2)], table[np.clip(ids, 0, VOCAB - 1)])
    encoder = T5Encoder(cfg)
    out = encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(extra))
    assert_close(out, run_torch(model, embeds=embeds.astype(np.float32)))

    weights = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    loss = lambda e: jnp.sum(encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32), e) * weights)
    grad = np.abs(np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(extra)))).sum(-1)
    assert grad[0] > 0 and grad[2] > 0, "used extra rows must receive a gradient"
    assert grad[1] == 0, "an unused extra row must not"


@pytest.mark.parametrize("layout", ["embed_tokens_only", "both_names"])
def test_tied_table_under_either_name(saved, tmp_path, layout):
    model, _ = saved
    if layout == "embed_tokens_only":
        folder = save(model, tmp_path, rename={"shared.weight": "encoder.embed_tokens.weight"})
    else:
        folder = save(model, tmp_path)
        ckpt = Checkpoint(folder)
        tensors = {k: np.array(ckpt.get(k)) for k in ckpt.keys()}
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
        save_file(tensors, folder / "model.safetensors")
    cfg, params = load_t5(folder)
    ids = input_ids()
    assert_close(T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)), run_torch(model, ids))


def test_missing_tensor_is_named(saved, tmp_path):
    model, _ = saved
    gone = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    with pytest.raises(WeightsError, match=f"missing tensor '{gone}'"):
        load_t5(save(model, tmp_path, drop=(gone,)))


def test_unexpected_tensor_is_named(saved, tmp_path):
    model, _ = saved
    folder = save(model, tmp_path)
    ckpt = Checkpoint(folder)
    tensors = {k: np.array(ckpt.get(k)) for k in ckpt.keys()}
    tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match="unexpected tensor 'encoder.block.1.layer.0.SelfAttention"):
        load_t5(folder)


def test_sharded_load_matches(saved):
    """On a (data=2, fsdp=2, tensor=2) mesh, matrices are sharded and the output is unchanged."""
    model, folder = saved
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = load_t5(folder, mesh=mesh)
    for path, x in traverse_util.flatten_dict(params).items():
        if path[-1] in ("kernel", "token_embedding", "relative_attention_bias"):
            assert not x.sharding.is_fully_replicated, f"{'/'.join(path)} is replicated"
    ids = input_ids()
    with sharding.activate(mesh):
        out = jax.jit(T5Encoder(cfg).apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert_close(out, run_torch(model, ids))


def test_bfloat16_close_to_float32(saved):
    _, folder = saved
    ids = jnp.asarray(input_ids(), jnp.int32)
    cfg32, p32 = load_t5(folder)
    cfg16, p16 = load_t5(folder, dtype="bfloat16", param_dtype="bfloat16")
    ref = np.asarray(T5Encoder(cfg32).apply({"params": p32}, ids))
    out = T5Encoder(cfg16).apply({"params": p16}, ids)
    assert out.dtype == jnp.bfloat16 and jax.tree_util.tree_leaves(p16)[0].dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_t5_xxl_parameter_count_and_sharding():
    hf = HFConfig(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        expected = sum(p.numel() for p in T5EncoderModel(hf).parameters())
    cfg = preset("t5-v1_1-xxl")
    assert T5Config.from_hf(hf.to_dict()) == cfg
    boxed = jax.eval_shape(init_fn(cfg, jax.random.key(0)))
    shapes = sharding.unbox(boxed)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert count == expected
    assert 4_700_000_000 < count < 4_800_000_000

    # 4.7 B parameters must not be replicated: on (fsdp=4, tensor=2) each device holds ~1/8.
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = sharding.logical_shardings(boxed, mesh)
    per_device = sum(int(np.prod(s.shard_shape(x.shape)))
                     for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)))
    assert per_device < count / 7


@pytest.mark.parametrize("scan", [True, False])
def test_remat_keeps_gradients(scan):
    cfg = preset("tiny", scan_layers=scan)
    params = sharding.unbox(jax.jit(init_fn(cfg, jax.random.key(1)))())
    ids = jnp.asarray(input_ids()[:, :8], jnp.int32)

    def grads(policy):
        model = T5Encoder(cfg.replace(remat_policy=policy))
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, ids) ** 2)))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads("full")), jax.tree_util.tree_leaves(grads("none"))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_loads_sharded_checkpoint(saved, tmp_path):
    """text_encoder_2/ in a FLUX folder is sharded with an index json."""
    model, _ = saved
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_t5(tmp_path)
    ids = input_ids()
    assert_close(T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)), run_torch(model, ids))
