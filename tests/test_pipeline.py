"""The JAX FLUX pipeline against diffusers' FluxPipeline on tiny random pipeline folders.

Covers tokenization, text encoding, sigmas, end-to-end images (CLI and `generate`; guidance
embedding on and off; true CFG), the fused vs progress-bar loops, LoRA and concept
inputs, the prompt cache, concept tokens, folder errors, sharded sampling and the shapes
of a full-size 1024x1024 FLUX.1-dev sample.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import app
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

import pipeline_reference as ref
from purecc_jax import sample as cli
from purecc_jax import sharding
from purecc_jax.backbones.flux import sampler
from purecc_jax.backbones.flux import text
from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.backbones.flux.generate import generate
from purecc_jax.backbones.flux.text import PromptCache, TextEncoders
from purecc_jax.models import clip_text, flux, lora, t5, vae
from purecc_jax.models.flux import ConceptInjection
from purecc_jax.pipeline.codec import VAECodec
from purecc_jax.pipeline.latents import unpack
from purecc_jax.pipeline.schedule import flux_sigmas
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.pipeline.tokenizers import load_tokenizers

PROMPTS = ["a photo of a dog", "a red cat sitting on the blue grass"]
L = 16  # T5 tokens
STEPS = 4
TOL = 1e-3  # images in [0, 1]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(folder, diffusers pipeline, our parts) with a guidance embedding and dynamic shifting."""
    folder = tmp_path_factory.mktemp("flux_dev")
    pipe = ref.save_pipeline(folder, guidance_embeds=True, seed=0)
    return folder, pipe, load_pipeline(folder)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    """Without guidance embedding, static shift (FLUX.1-schnell's scheduler)."""
    folder = tmp_path_factory.mktemp("flux_schnell")
    pipe = ref.save_pipeline(folder, guidance_embeds=False, seed=1)
    return folder, pipe, load_pipeline(folder)


def _diffusers_latents(pipe, prompts, latents, height, width, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=STEPS,
                   latents=torch.from_numpy(latents), output_type="latent", max_sequence_length=L, **kwargs)
    return out.images.numpy()


# --- tokenizers and text ------------------------------------------------------------------


def test_tokenize_matches_flux_pipeline(dev):
    _, pipe, parts = dev
    prompts = PROMPTS + [" ".join(["a photo of a red dog"] * 20)]  # truncated by both tokenizers
    clip_ids, t5_ids = parts.tokenizers.tokenize(prompts, L)
    want_clip = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length,
                               truncation=True).input_ids
    want_t5 = pipe.tokenizer_2(prompts, padding="max_length", max_length=L, truncation=True).input_ids
    assert clip_ids.dtype == np.int32 and clip_ids.shape == (3, 77) and t5_ids.shape == (3, L)
    np.testing.assert_array_equal(clip_ids, want_clip)
    np.testing.assert_array_equal(t5_ids, want_t5)
    with pytest.raises(ValueError, match="max_sequence_length=513"):
        parts.tokenizers.tokenize(prompts, 513)


def test_text_encoding_matches_flux_pipeline(dev):
    _, pipe, parts = dev
    with torch.no_grad():
        want_t5, want_pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=L)
    t5_hidden, pooled = parts.text.encode_prompts(PROMPTS, L)
    for got, want in ((t5_hidden, want_t5), (pooled, want_pooled)):
        want = want.numpy()
        assert got.shape == want.shape
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def test_prompt_cache_encodes_each_prompt_once(dev):
    _, _, parts = dev
    cache = PromptCache(parts.text)
    first = cache([PROMPTS[0], PROMPTS[1], PROMPTS[0]], L)
    assert cache.encoded == 2 and first.t5.shape[0] == 3
    again = cache([PROMPTS[1], PROMPTS[0]], L)
    assert cache.encoded == 2
    np.testing.assert_array_equal(again.t5[1], first.t5[0])
    np.testing.assert_array_equal(again.pooled[0], first.pooled[1])
    cache([PROMPTS[0]], 8)  # another length is another entry
    assert cache.encoded == 3 and len(cache) == 3
    direct = parts.text.encode_prompts(PROMPTS, L)
    np.testing.assert_allclose(first.t5[:2], direct.t5, atol=1e-6)


def test_concept_token_ids_masks_and_extra_embeddings(dev):
    folder, _, parts = dev
    toks = load_tokenizers(folder)  # a fresh copy: adding tokens must not touch the shared one
    with pytest.raises(ValueError, match="'a' is already an entry of the clip tokenizer"):
        toks.add_concept_token("a")  # a vocabulary entry: diffusers' loader would refuse it
    assert toks.add_concept_token("sks") == 0
    with pytest.raises(ValueError, match="'sks'"):
        toks.add_concept_token("sks")
    clip_ids, t5_ids = toks.tokenize(["a photo of sks dog", "a photo of cat dog"], L)
    clip_vocab, t5_vocab = parts.text.clip_config.vocab_size, parts.text.t5_config.vocab_size
    assert t5_vocab == len(toks.t5) - 1 + ref.T5_TABLE_PADDING  # the T5 table is larger than its tokenizer
    # "sks" takes the place of "cat" (one token in both tokenizers), as the first extra row.
    assert clip_ids[0, 4] == clip_vocab and t5_ids[0, 3] == t5_vocab
    np.testing.assert_array_equal(np.delete(clip_ids[0], 4), np.delete(clip_ids[1], 4))
    np.testing.assert_array_equal(np.delete(t5_ids[0], 3), np.delete(t5_ids[1], 3))
    expected = np.zeros((2, L), bool)
    expected[0, 3] = True
    np.testing.assert_array_equal(toks.word_mask(t5_ids, "sks"), expected)
    np.testing.assert_array_equal(toks.word_mask(t5_ids, "dog")[:, :6], [[0, 0, 0, 0, 1, 0]] * 2)
    np.testing.assert_array_equal(toks.word_mask(clip_ids, "sks", "clip")[0, :6], [0, 0, 0, 0, 1, 0])

    # With the extra rows equal to the table rows of "cat", "sks" encodes exactly as "cat".
    clip_extra = parts.text.clip_params["token_embedding"][clip_ids[1, 4]][None]
    t5_extra = parts.text.t5_params["token_embedding"][t5_ids[1, 3]][None]
    got = parts.text.encode(clip_ids, t5_ids, clip_extra, t5_extra)
    np.testing.assert_allclose(got.t5[0], got.t5[1], atol=1e-6)
    np.testing.assert_allclose(got.pooled[0], got.pooled[1], atol=1e-6)


# --- schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [ref.DEV_SCHEDULER, ref.SCHNELL_SCHEDULER, dict(ref.SCHNELL_SCHEDULER, shift=3.0)],
                         ids=["dev_dynamic", "schnell", "static_shift3"])
def test_sigmas_equal_diffusers(config):
    for steps in (1, 4, 28, 50):
        for seq_len in (6, 256, 1024, 4096):
            scheduler = FlowMatchEulerDiscreteScheduler(**config)
            mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
            retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            np.testing.assert_array_equal(flux_sigmas(steps, seq_len, config), scheduler.sigmas.numpy())
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        flux_sigmas(4, 256, dict(config, use_karras_sigmas=True))


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("which,height,width", [("dev", 32, 48), ("schnell", 48, 32)])
def test_generate_matches_flux_pipeline(which, height, width, request):
    _, pipe, parts = request.getfixturevalue(which)
    latents = ref.packed_noise(len(PROMPTS), height, width, seed=3)
    want = ref.run_diffusers(pipe, PROMPTS, latents, height=height, width=width, steps=STEPS, guidance=3.5)
    want_latents = _diffusers_latents(pipe, PROMPTS, latents, height, width, guidance_scale=3.5)
    out = generate(parts, PROMPTS, SampleSettings(height, width, STEPS, 3.5, L), init_latents=latents)
    assert out.images.shape == (2, height, width, 3) and out.images.dtype == jnp.float32
    assert np.abs(np.asarray(out.images) - want).max() <= TOL
    assert np.abs(np.asarray(out.latents) - want_latents).max() <= 1e-5 * np.abs(want_latents).max()
    assert np.abs(want[0] - want[1]).max() > 0.05  # the prompts matter, so text conditioning is checked


def test_true_cfg_matches_flux_pipeline(dev):
    _, pipe, parts = dev
    latents = ref.packed_noise(1, 32, 48, seed=4)
    kwargs = dict(negative_prompt="blurry ugly", true_cfg_scale=4.0)
    want = ref.run_diffusers(pipe, PROMPTS[:1], latents, height=32, width=48, steps=STEPS, guidance=2.0, **kwargs)
    want_latents = _diffusers_latents(pipe, PROMPTS[:1], latents, 32, 48, guidance_scale=2.0, **kwargs)
    plain_latents = _diffusers_latents(pipe, PROMPTS[:1], latents, 32, 48, guidance_scale=2.0)
    scale = np.abs(want_latents).max()
    assert np.abs(want_latents - plain_latents).max() > 100 * 1e-5 * scale  # CFG matters far beyond the tolerance
    out = generate(parts, PROMPTS[:1], SampleSettings(32, 48, STEPS, 2.0, L, **kwargs), init_latents=latents)
    assert np.abs(np.asarray(out.images) - want).max() <= TOL
    assert np.abs(np.asarray(out.latents) - want_latents).max() <= 1e-5 * scale


def test_cli_matches_flux_pipeline(dev, tmp_path):
    folder, pipe, _ = dev
    latents = ref.packed_noise(2, 32, 48, seed=5)
    np.save(tmp_path / "init.npy", latents)
    want = ref.run_diffusers(pipe, PROMPTS, latents, height=32, width=48, steps=STEPS, guidance=3.5)
    common = [f"--pretrained={folder}", f"--prompt={PROMPTS[0]}", "--height=32", "--width=48", f"--steps={STEPS}",
              "--guidance=3.5", f"--max_sequence_length={L}", "--noprogress"]

    _run_cli(common + [f"--prompt={PROMPTS[1]}", f"--init_latents={tmp_path / 'init.npy'}",
                       f"--output={tmp_path / 'out.npy'}"])
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (2, 32, 48, 3) and np.abs(got - want).max() <= TOL

    # One prompt, two images from one latent per image: PNGs named stem_i.
    _run_cli(common + ["--num_images=2", f"--init_latents={tmp_path / 'init.npy'}", f"--output={tmp_path / 'x.png'}"])
    want_one = ref.run_diffusers(pipe, PROMPTS[:1] * 2, latents, height=32, width=48, steps=STEPS, guidance=3.5)
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / f"x_{i}.png"), np.float32) / 255
        assert np.abs(png - want_one[i]).max() <= 1 / 255 + TOL

    with pytest.raises(app.UsageError, match="--height=40"):
        _run_cli(common + ["--height=40", f"--output={tmp_path / 'y.png'}"])


def _run_cli(args: list[str]) -> None:
    cli.cli(["sample", *args])


# --- sampler inputs -------------------------------------------------------------------------


def test_progress_loop_equals_fused_loop(dev):
    _, _, parts = dev
    settings = SampleSettings(32, 48, STEPS, 3.5, L)
    fused = generate(parts, PROMPTS, settings, seeds=(7,), progress=False)
    stepped = generate(parts, PROMPTS, settings, seeds=(7,), progress=True)
    # Two XLA programs (one scans over the steps, one runs a step per call) may fuse the
    # attention's float32 arithmetic differently: equal up to a few ulps, not bit for bit.
    # A wrong sigma, step order or guidance would differ by orders of magnitude more.
    np.testing.assert_allclose(np.asarray(fused.latents), np.asarray(stepped.latents), rtol=0, atol=1e-6)
    # The VAE decoder amplifies those few-ulp latent differences about fivefold.
    np.testing.assert_allclose(np.asarray(fused.images), np.asarray(stepped.images), rtol=0, atol=1e-5)


def test_seeds_give_documented_noise(dev):
    _, _, parts = dev
    noise = sampler.initial_noise([3, 5], 32, 48, 16, 8)
    draw = jax.random.normal(jax.random.key(5), (4, 6, 16))
    np.testing.assert_array_equal(noise[1], np.asarray(draw).reshape(2, 2, 3, 2, 16).transpose(0, 2, 4, 1, 3)
                                  .reshape(6, 64))
    settings = SampleSettings(32, 48, 1, 3.5, L)
    seeded = generate(parts, PROMPTS, settings, seeds=(3, 5))  # prompt-major: p0s3, p0s5, p1s3, p1s5
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    given = generate(parts, prompts, settings, init_latents=jnp.concatenate([noise, noise]))
    np.testing.assert_array_equal(np.asarray(seeded.latents), np.asarray(given.latents))


def test_lora_and_concept_inputs(dev):
    _, _, parts = dev
    settings = SampleSettings(32, 48, 2, 3.5, L)
    cfg = lora.LoRAConfig(rank=2, alpha=2.0)
    adapter = lora.init(jax.random.key(0), parts.transformer_params, cfg)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
    with_lora = generate(parts, PROMPTS, settings, lora=lora.variables(adapter, cfg))
    base = generate(parts, PROMPTS, settings)
    merged = dataclasses.replace(parts, transformer_params=lora.merge(parts.transformer_params, adapter, cfg))
    want = generate(merged, PROMPTS, settings)
    assert np.abs(np.asarray(with_lora.latents) - np.asarray(base.latents)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(with_lora.latents), np.asarray(want.latents), atol=1e-4)

    c = parts.transformer_config
    _, t5_ids = parts.tokenizers.tokenize(PROMPTS, L)
    vectors = jax.random.normal(jax.random.key(2), (c.depth + c.depth_single, c.hidden_size))
    concept = ConceptInjection(parts.tokenizers.word_mask(t5_ids, "dog"), vectors[:c.depth], vectors[c.depth:])
    assert concept.mask[0].any() and not concept.mask[1].any()
    injected = generate(parts, PROMPTS, settings, concept=concept).latents
    assert np.abs(np.asarray(injected[0] - base.latents[0])).max() > 1e-3  # the dog prompt changes
    np.testing.assert_allclose(np.asarray(injected[1]), np.asarray(base.latents[1]), atol=1e-6)  # the other not


def test_sharded_sampling_equals_single_device(dev):
    folder, _, parts = dev
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:4])
    sharded = load_pipeline(folder, mesh=mesh)
    for leaf in (sharded.transformer_params["img_in"]["kernel"], sharded.text.t5_params["token_embedding"],
                 sharded.text.clip_params["token_embedding"], sharded.vae_params["decoder"]["conv_in"]["kernel"]):
        assert not leaf.sharding.is_fully_replicated  # every model is sharded by the same rules
    settings = SampleSettings(32, 48, 2, 3.5, L)
    prompts = PROMPTS + ["a blue dog"]  # 3 images: padded to the 4 data-parallel devices
    want = generate(parts, prompts, settings, seeds=(1,))
    got = generate(sharded, prompts, settings, seeds=(1,))
    assert got.images.shape == (3, 32, 48, 3)
    np.testing.assert_allclose(np.asarray(got.images), np.asarray(want.images), atol=1e-5)


# --- errors and full size ---------------------------------------------------------------------


def test_size_must_be_a_multiple_of_16(dev):
    _, _, parts = dev
    with pytest.raises(ValueError, match="width=40"):
        generate(parts, PROMPTS, SampleSettings(32, 40, STEPS, 3.5, L))


def test_missing_components_are_listed(dev, tmp_path):
    folder, _, _ = dev
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_pipeline(broken)
    message = str(info.value)
    for expected in ("text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json",
                     "transformer/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                     "huggingface-cli download black-forest-labs/FLUX.1-dev"):
        assert expected in message
    assert "vae/" not in message and "text_encoder/" not in message


def test_full_size_flux_dev_shapes_for_1024():
    """eval_shape (no weights) of the FLUX.1-dev text encoders, 28 sampling steps and VAE decode."""
    clip_cfg, t5_cfg = clip_text.preset("clip-l"), t5.preset("t5-v1_1-xxl")
    flux_cfg, vae_cfg = flux.preset("flux-dev"), vae.preset("flux")
    params = [sharding.unbox(jax.eval_shape(fn)) for fn in (
        clip_text.init_fn(clip_cfg, jax.random.key(0), length=1), t5.init_fn(t5_cfg, jax.random.key(0), length=1),
        flux.init_fn(flux_cfg, jax.random.key(0)), vae.init_fn(vae_cfg, jax.random.key(0)))]
    sigmas = flux_sigmas(28, 4096, ref.DEV_SCHEDULER)

    def pipeline(clip_p, t5_p, flux_p, vae_p, clip_ids, t5_ids, noise):
        emb = TextEncoders(clip_cfg, clip_p, t5_cfg, t5_p).encode(clip_ids, t5_ids)
        x = sampler.denoise(sampler.Transformer(flux_cfg, flux_p), noise, emb, sigmas, latent_size=(128, 128),
                            guidance=3.5)
        return emb, x, VAECodec(vae_cfg, vae_p).decode(unpack(x, 128, 128))

    ids = lambda n: jax.ShapeDtypeStruct((1, n), jnp.int32)
    emb, x, images = jax.eval_shape(pipeline, *params, ids(77), ids(512),
                                    jax.ShapeDtypeStruct((1, 4096, 64), jnp.float32))
    assert isinstance(emb, text.TextEmbeddings)
    assert emb.t5.shape == (1, 512, 4096) and emb.pooled.shape == (1, 768)
    assert x.shape == (1, 4096, 64) and images.shape == (1, 1024, 1024, 3)
