"""FLUX VAE: parity with diffusers' AutoencoderKL, strict loading, latent helpers, FLUX size."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FluxPipeline

from purecc_jax import sharding
from purecc_jax.models.vae import AutoencoderKL, VAEConfig, init_fn, preset
from purecc_jax.pipeline.latents import decode_latents, encode_latents, latent_image_ids, pack, unpack
from purecc_jax.weights.loader import WeightsError, export
from purecc_jax.weights.safetensors_io import Checkpoint, save_file
from purecc_jax.weights.vae_rules import diffusers_rules, load_vae

# FLUX's structure (16 latent channels, no quant convs, mid attention, 2 resnets), tiny widths.
FLUX_LIKE = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
# SD-style: quant convs, 4 latent channels; the mid attention is switched off to cover that path too.
SD_LIKE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
               mid_block_add_attention=False)
H, W = 32, 48  # non-square


def build_torch(overrides: dict) -> TorchAutoencoderKL:
    n = len(overrides["block_out_channels"])
    cfg = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **overrides)
    model = TorchAutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # GroupNorm affine starts at (1, 0) and biases at 0: perturb so mis-mapping shows
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[FLUX_LIKE, SD_LIKE], ids=["flux_like", "sd_like"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_torch(request.param)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


def assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, f"max abs diff {err:.3g} > 1e-5 * {scale:.3g}"


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def outputs(saved):
    """Ours and diffusers' results on the same inputs, from one compiled function."""
    torch_vae, folder = saved
    config, params = load_vae(folder)
    vae = AutoencoderKL(config)
    rng = np.random.default_rng(0)
    f = config.downsample_factor
    images = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
    z = rng.standard_normal((2, H // f, W // f, config.latent_channels)).astype(np.float32)
    key = jax.random.key(3)

    @jax.jit
    def run(p, x, z):
        mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
        return dict(
            mean=mean, logvar=logvar, decoded=vae.apply({"params": p}, z, method=AutoencoderKL.decode),
            latents=encode_latents(vae, p, x), sampled=encode_latents(vae, p, x, rng=key, sample=True),
            images=decode_latents(vae, p, z),
        )

    ours = run(params, images, z)
    scale, shift = torch_vae.config.scaling_factor, torch_vae.config.shift_factor or 0.0
    with torch.no_grad():
        dist = torch_vae.encode(nchw(images)).latent_dist
        ref = dict(
            mean=dist.mean, logvar=dist.logvar, decoded=torch_vae.decode(nchw(z)).sample,
            latents=(dist.mean - shift) * scale, images=torch_vae.decode(nchw(z) / scale + shift).sample,
        )
    return dict(config=config, params=params, vae=vae, key=key, images=images, z=z, ours=ours,
                ref={k: nhwc(v) for k, v in ref.items()})


def test_encode_decode_match_diffusers(outputs):
    for name in ("mean", "logvar", "decoded"):
        assert_close(outputs["ours"][name], outputs["ref"][name])


def test_latent_normalisation_matches_flux_pipeline(outputs):
    """latents = (mean - shift) * scale on the way in, decode(latents / scale + shift) on the way out."""
    assert_close(outputs["ours"]["latents"], outputs["ref"]["latents"])
    assert_close(outputs["ours"]["images"], outputs["ref"]["images"])


def test_sampled_latents_are_reparameterised(outputs):
    ours, config = outputs["ours"], outputs["config"]
    noise = jax.random.normal(outputs["key"], ours["mean"].shape)
    expected = (ours["mean"] + np.exp(0.5 * ours["logvar"]) * noise - config.shift_factor) * config.scaling_factor
    np.testing.assert_allclose(ours["sampled"], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours["sampled"], ours["latents"], atol=1e-3)
    with pytest.raises(ValueError, match="rng"):
        encode_latents(outputs["vae"], outputs["params"], outputs["images"], sample=True)


def test_bfloat16_compute_stays_close(outputs, saved):
    config = outputs["config"]
    if config.use_quant_conv:
        pytest.skip("one configuration suffices")
    _, params16 = load_vae(saved[1], dtype="bfloat16", param_dtype="bfloat16")
    assert params16["decoder"]["conv_out"]["kernel"].dtype == jnp.bfloat16
    vae16 = AutoencoderKL(config.replace(dtype="bfloat16"))
    out = jax.jit(lambda p, z: vae16.apply({"params": p}, z, method=AutoencoderKL.decode))(params16, outputs["z"])
    ref = outputs["ours"]["decoded"]
    assert out.dtype == jnp.float32
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


def test_sharded_load_and_remat_agree(tmp_path):
    """fsdp=8 over channels (3- and 4-channel convs stay whole); remat changes no value or gradient."""
    torch.manual_seed(0)
    build_torch(SD_LIKE).save_pretrained(tmp_path)
    folder = tmp_path
    config, params = load_vae(folder)
    mesh = sharding.make_mesh(data=1, fsdp=8)
    _, sharded = load_vae(folder, mesh=mesh, remat=True)
    kernel = sharded["encoder"]["conv_in"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sharded["decoder"]["conv_out"]["kernel"].sharding.spec[3] is None

    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 6, config.latent_channels)), jnp.float32)

    def loss(cfg):
        vae = AutoencoderKL(cfg)
        return lambda p: jnp.sum(vae.apply({"params": p}, z, method=AutoencoderKL.decode) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss(config)))(params)
    with sharding.activate(mesh):
        value_r, grads_r = jax.jit(jax.value_and_grad(loss(config.replace(remat=True))))(sharded)
    np.testing.assert_allclose(value_r, value, rtol=1e-5)
    jax.tree_util.tree_map(assert_close, grads_r, grads)


def test_export_round_trips_to_diffusers(saved, outputs, tmp_path):
    torch_vae, _ = saved
    export(outputs["params"], diffusers_rules(outputs["config"]), tmp_path, "diffusion_pytorch_model")
    ckpt = Checkpoint(tmp_path)
    reloaded = TorchAutoencoderKL.from_config(torch_vae.config)
    reloaded.load_state_dict({k: torch.from_numpy(ckpt.get(k).copy()) for k in ckpt.keys()}, strict=True)
    for (name, a), b in zip(torch_vae.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_is_strict(tmp_path):
    torch.manual_seed(0)
    model = build_torch(FLUX_LIKE)
    folder = tmp_path / "vae"  # load_vae also accepts the pipeline folder above `vae/`
    model.save_pretrained(folder)
    ckpt = Checkpoint(folder / "diffusion_pytorch_model.safetensors")
    tensors = {k: ckpt.get(k) for k in ckpt.keys()}

    def write(t):
        save_file(t, folder / "diffusion_pytorch_model.safetensors")

    missing = dict(tensors)
    del missing["decoder.mid_block.attentions.0.to_q.weight"]
    write(missing)
    with pytest.raises(WeightsError, match=r"missing tensor 'decoder.mid_block.attentions.0.to_q.weight'"):
        load_vae(tmp_path)

    write({**tensors, "quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected tensor 'quant_conv.weight'"):
        load_vae(tmp_path)

    bad = dict(tensors)
    bad["encoder.conv_in.weight"] = np.zeros((16, 3, 1, 1), np.float32)
    write(bad)
    with pytest.raises(WeightsError, match=r"'encoder.conv_in.weight' has shape \(16, 3, 1, 1\)"):
        load_vae(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_vae(tmp_path / "empty")


def test_config_errors():
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_diffusers({"block_out_channels": [8], "down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers({"latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(12,), norm_num_groups=8)
    with pytest.raises(ValueError, match=r"3 channels, got shape \(1, 8, 8, 16\)"):
        cfg = preset("tiny")
        AutoencoderKL(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), method=AutoencoderKL.encode)


def test_pack_unpack_and_ids_match_flux_pipeline():
    b, c, h, w = 2, 16, 6, 10
    latents = np.random.default_rng(0).standard_normal((b, h, w, c)).astype(np.float32)
    ref = FluxPipeline._pack_latents(nchw(latents), b, c, h, w).numpy()
    packed = pack(jnp.asarray(latents))
    np.testing.assert_array_equal(packed, ref)
    ref_unpacked = FluxPipeline._unpack_latents(torch.from_numpy(ref), h * 8, w * 8, 8)
    np.testing.assert_array_equal(unpack(packed, h, w), nhwc(ref_unpacked))
    np.testing.assert_array_equal(unpack(packed, h, w), latents)
    # prepare_latents builds ids for the (h/2, w/2) grid of packed tokens.
    ref_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(h, w), ref_ids)
    with pytest.raises(ValueError, match="even"):
        pack(jnp.zeros((1, 5, 4, 16)))
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack(packed, h, w + 2)


def test_flux_preset_matches_diffusers_size():
    flux_json = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
        "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
        "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False, "use_quant_conv": False,
    }
    config = VAEConfig.from_diffusers(json.loads(json.dumps(flux_json)))
    assert config == preset("flux")
    with torch.device("meta"):
        ref = TorchAutoencoderKL.from_config({k: v for k, v in flux_json.items() if not k.startswith("_")})
    expected = sum(p.numel() for p in ref.parameters())
    abstract = sharding.unbox(jax.eval_shape(init_fn(config, jax.random.key(0))))
    assert sum(x.size for x in jax.tree_util.tree_leaves(abstract)) == expected
    assert 83e6 < expected < 85e6
