"""Masked loss (config.concept.masked_loss): masks from `<image>.mask.png` or the alpha channel, resized,
cropped and flipped with their image, averaged to latent resolution in each backbone's latent layout,
weighting L_CC per element while L_PureCC and λ* stay over the whole latent; refusals naming the file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from purecc_jax.backbones.flux.backbone import FLUX
from purecc_jax.backbones.sd3.backbone import SD3
from purecc_jax.data import concept as concept_lib
from purecc_jax.models import lora
from purecc_jax.pipeline import flow
from purecc_jax.pipeline.latents import pack
from purecc_jax.purecc.objective import ObjectiveConfig, flow_loss, purecc_loss
from purecc_jax.purecc.step import Extractor, Frozen, StepConfig, Weights, make_loss_fn
from step_fixtures import batch, denoiser_of, random_cache, random_lora, tiny_flux


def gradient_image(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (255 * np.arange(w) / (w - 1))[None, :]
    return Image.fromarray(arr)


def left_half_mask(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w), np.uint8)
    arr[:, : w // 2] = 255
    return Image.fromarray(arr, "L")


@pytest.fixture
def folder(tmp_path):
    """a.png with a mask file (left half), b.png with an alpha channel (top half opaque), c.jpg with neither."""
    folder = tmp_path / "concept"
    folder.mkdir()
    gradient_image(64, 48).save(folder / "a.png")
    left_half_mask(64, 48).save(folder / f"a{concept_lib.MASK_SUFFIX}")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[:24, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    gradient_image(48, 48).save(folder / "c.jpg", quality=95)
    return folder


def test_masks_are_found_beside_their_images(folder):
    concept = concept_lib.find(str(folder), class_word="dog")
    assert [p.name for p in concept.images] == ["a.png", "b.png", "c.jpg"]  # the mask is not a training image
    assert [m and m.name for m in concept.masks] == [f"a{concept_lib.MASK_SUFFIX}", None, None]
    (folder / f"z{concept_lib.MASK_SUFFIX}").write_bytes(b"")
    with pytest.raises(ValueError, match=r"masks \['z\.mask\.png'\] belong to no image"):
        concept_lib.find(str(folder), class_word="dog")


def test_views_carry_the_masks_cropped_and_flipped_with_their_images(folder):
    concept = concept_lib.find(str(folder), class_word="dog")
    (group,) = concept_lib.views_by_size(concept, [(32, 32)], flip=True, masks=True)
    assert group.images.shape == (6, 32, 32, 3) and group.weights.shape == (6, 32, 32)
    a, a_flipped, b, _, c, _ = group.weights
    # a.png (64x48) is resized to 43x32 and centre-cropped to 32 columns: the mask's edge moves with it.
    image, mask = concept_lib.load_view(folder / "a.png", (32, 32), mask=concept.masks[0])
    np.testing.assert_array_equal(a, mask)
    np.testing.assert_array_equal(a_flipped, mask[:, ::-1])
    assert a[:, :8].min() == 1.0 and a[:, -8:].max() == 0.0
    np.testing.assert_array_equal(b[:14], 1.0)  # b's alpha channel: the opaque top half
    np.testing.assert_array_equal(b[-14:], 0.0)
    np.testing.assert_array_equal(c, 1.0)  # no mask: every pixel counts
    # Without masked_loss the same views, and no weights.
    (plain,) = concept_lib.views_by_size(concept, [(32, 32)], flip=True)
    assert plain.weights is None
    np.testing.assert_array_equal(plain.images, group.images)


def test_a_mask_of_another_size_is_refused(folder):
    left_half_mask(32, 48).save(folder / f"a{concept_lib.MASK_SUFFIX}")
    concept = concept_lib.find(str(folder), class_word="dog")
    with pytest.raises(ValueError, match=r"a\.mask\.png is 32x48 but its image .*a\.png is 64x48"):
        concept_lib.views_by_size(concept, [(32, 32)], masks=True)


def test_latent_weights_follow_each_backbones_layout():
    """FLUX packs 2x2 latent pixels of 16 channels into a token's 64 features (channel * 4 + dy * 2 + dx),
    as it packs the latents; SD3 keeps NHWC latents."""
    pooled = np.random.default_rng(0).random((2, 4, 6)).astype(np.float32)
    flux = FLUX.loss_weights(pooled, 16)
    assert flux.shape == (2, 2 * 3, 64)
    latents = np.random.default_rng(1).random((2, 4, 6, 16)).astype(np.float32)
    packed = np.asarray(pack(latents * pooled[..., None]))
    np.testing.assert_allclose(np.asarray(pack(latents)) * flux, packed, rtol=1e-6)
    sd3 = SD3.loss_weights(pooled, 16)
    assert sd3.shape == (2, 4, 6, 16)
    np.testing.assert_array_equal(sd3[..., 5], pooled)


def test_flow_loss_ignores_the_masked_out_region():
    rng = np.random.default_rng(0)
    x0, x1, v = (jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32) for _ in range(3))
    weight = jnp.zeros((2, 8, 4)).at[:, :5].set(1.0).at[1, 5].set(0.5)
    masked = flow_loss(v, x0, x1, weight)
    d = np.asarray((x1 - x0 - v) ** 2)
    w = np.asarray(weight)
    want = np.mean([(w[i] * d[i]).sum() / w[i].sum() for i in range(2)])
    np.testing.assert_allclose(masked, want, rtol=1e-6)
    moved = v.at[:, 6:].add(100.0)  # the masked-out region
    assert float(flow_loss(moved, x0, x1, weight)) == float(masked)
    assert float(flow_loss(v.at[:, 0].add(1.0), x0, x1, weight)) != float(masked)
    np.testing.assert_allclose(flow_loss(v, x0, x1, jnp.ones_like(weight)), flow_loss(v, x0, x1), rtol=1e-6)


def test_purecc_term_is_not_masked():
    """The mask weights L_CC only: L_PureCC and λ* are those of the unmasked loss, and a change of v_c in the
    masked-out region moves L_PureCC but not L_CC."""
    rng = np.random.default_rng(1)
    v_c, v_b, r_tar, x0, x1 = (jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32) for _ in range(5))
    weight = jnp.zeros((2, 8, 4)).at[:, :4].set(1.0)
    cfg = ObjectiveConfig()
    _, plain = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg)
    _, masked = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg, weight=weight)
    for key in ("l_pure", "lambda_mean", "lambda_min", "lambda_max"):
        assert float(masked[key]) == float(plain[key]), key
    np.testing.assert_allclose(masked["l_cc"], flow_loss(v_c, x0, x1, weight), rtol=1e-6)
    _, moved = purecc_loss(v_c.at[:, 6:].add(1.0), v_b, r_tar, x0, x1, cfg, weight=weight)
    assert float(moved["l_cc"]) == float(masked["l_cc"]) and float(moved["l_pure"]) != float(masked["l_pure"])


@pytest.mark.parametrize("stage", ["cc", "purecc"])
def test_step_weights_l_cc_by_the_cached_weights(stage):
    """The step reads `loss_weight` from the cache: L_CC is the weighted flow loss of the trainable model's
    velocity (computed here by hand), L_PureCC that of the same step without weights."""
    cfg, params = tiny_flux()
    cache = random_cache(cfg)
    weight = np.zeros(cache["latents"].shape, np.float32)
    weight[:, :3] = 1.0  # the first of two rows of 3 tokens
    lcfg = lora.LoRAConfig(rank=2, alpha=4.0)
    trainable = {"lora": random_lora(params, lcfg, seed=2)}
    scfg = StepConfig(stage=stage, trainable_lora=lcfg, extractor_lora=lcfg)
    denoiser = denoiser_of(cfg)
    extractor = Extractor(lora=random_lora(params, lcfg, seed=1)) if stage == "purecc" else None
    b, rng = batch(), jax.random.key(3)
    loss_fn = jax.jit(make_loss_fn(denoiser, scfg))
    masked_cache = dict(cache, loss_weight=jnp.asarray(weight))
    _, masked = loss_fn(trainable, Frozen(params=params, cache=masked_cache, extractor=extractor), b, rng)
    _, plain = loss_fn(trainable, Frozen(params=params, cache=cache, extractor=extractor), b, rng)

    x0 = cache["latents"][b["image"]]
    noise_rng, t_rng = jax.random.split(rng)
    x1 = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    t = flow.sample_timesteps(t_rng, x0.shape[0], scfg.timesteps)
    model = Weights(params=params, lora=lora.variables(trainable["lora"], lcfg))
    v_c = denoiser.velocity(model, cache, flow.noisy(x0, x1, t), t, denoiser.condition(model, cache, "complete",
                                                                                       b["complete"]))
    d = np.asarray((x1 - x0 - v_c) ** 2)[:, :3]
    np.testing.assert_allclose(masked["l_cc"], d.mean(axis=(1, 2)).mean(), rtol=1e-5)
    assert abs(float(masked["l_cc"]) - float(plain["l_cc"])) > 1e-4
    if stage == "purecc":
        np.testing.assert_allclose(masked["l_pure"], plain["l_pure"], rtol=1e-6)
        np.testing.assert_allclose(masked["lambda_mean"], plain["lambda_mean"], rtol=1e-6)
