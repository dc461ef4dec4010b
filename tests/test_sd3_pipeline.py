"""A tiny StableDiffusion3Pipeline folder sampled by diffusers and by purecc_jax: same prompt encoding,
same schedule, same images (CFG on, fixed latents); the CLI dispatches on model_index.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline_reference
from purecc_jax.backbones.sd3 import pipeline as sd3_pipeline
from sd3_reference import T5_WIDTH, build_pipeline

PROMPTS = ["a photo of a red dog", "a blue cat sitting on the grass"]
NEGATIVE = ["blurry", "ugly"]
HEIGHT, WIDTH, STEPS, GUIDANCE, T5_LENGTH = 32, 48, 3, 4.5, 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    pipe = build_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


@pytest.fixture(scope="module")
def parts(saved):
    return sd3_pipeline.load_sd3_pipeline(saved[1])


def test_schedule_matches_scheduler(saved):
    pipe, _ = saved
    for steps in (1, 3, 28):
        pipe.scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(sd3_pipeline.sd3_sigmas(steps, dict(pipe.scheduler.config)),
                                      pipe.scheduler.sigmas.numpy())


def test_prompt_encoding_matches(saved, parts):
    pipe, _ = saved
    with torch.no_grad():
        ref = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=NEGATIVE,
                                 max_sequence_length=T5_LENGTH)
    context, pooled = parts.text.encode_prompts(PROMPTS, T5_LENGTH)
    neg_context, neg_pooled = parts.text.encode_prompts(NEGATIVE, T5_LENGTH)
    for ours, theirs in zip((context, neg_context, pooled, neg_pooled), ref):
        theirs = theirs.numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5 * np.abs(theirs).max())
    assert context.shape == (2, 77 + T5_LENGTH, T5_WIDTH)


def test_sampled_images_match_diffusers(saved, parts):
    pipe, _ = saved
    latents = np.random.default_rng(3).standard_normal((2, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                        output_type="np", max_sequence_length=T5_LENGTH).images
    ours = sd3_pipeline.sample_sd3(parts, PROMPTS, negative_prompts=NEGATIVE, height=HEIGHT, width=WIDTH,
                                   steps=STEPS, guidance=GUIDANCE, init_latents=latents,
                                   max_sequence_length=T5_LENGTH)
    assert ours.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    assert expected.std() > 0.01
    assert np.abs(ours - expected).max() < 1e-3
    # The guidance matters: without it the same latents give another image.
    unguided = sd3_pipeline.sample_sd3(parts, PROMPTS, height=HEIGHT, width=WIDTH, steps=STEPS, guidance=1.0,
                                       init_latents=latents, max_sequence_length=T5_LENGTH)
    assert np.abs(unguided - expected).max() > 1e-2


def test_sampling_on_a_mesh_splits_the_padded_rows(saved):
    """On a (data 1, fsdp 4) mesh the 2 prompts (4 rows with guidance) are padded to the batch axes, split
    over them and cut back: the same images as on one device."""
    import jax

    from purecc_jax import sharding

    latents = np.random.default_rng(4).standard_normal((2, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    kw = dict(negative_prompts=NEGATIVE, height=HEIGHT, width=WIDTH, steps=2, guidance=GUIDANCE,
              init_latents=latents, max_sequence_length=T5_LENGTH)
    alone = sd3_pipeline.sample_sd3(sd3_pipeline.load_sd3_pipeline(saved[1]), PROMPTS, **kw)
    mesh = sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4])
    meshed = sd3_pipeline.sample_sd3(sd3_pipeline.load_sd3_pipeline(saved[1], mesh=mesh), PROMPTS, **kw)
    assert meshed.shape == alone.shape == (2, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(meshed, alone, atol=1e-5)


def test_vae_has_sd3_factors(parts):
    assert (parts.codec.config.scaling_factor, parts.codec.config.shift_factor) == (1.5305, 0.0609)
    assert parts.codec.config.latent_channels == 16


def test_sample_cli_dispatches_on_model_index(saved, tmp_path):
    """`python -m purecc_jax.sample --pretrained=SD3_FOLDER ...` samples as StableDiffusion3Pipeline."""
    from purecc_jax import sample

    pipe, folder = saved
    latents = np.random.default_rng(4).standard_normal((2, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS, negative_prompt=["blurry"] * 2, height=HEIGHT, width=WIDTH,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                        output_type="np", max_sequence_length=T5_LENGTH).images
    sample.cli(["sample", f"--pretrained={folder}", *(f"--prompt={p}" for p in PROMPTS), "--negative_prompt=blurry",
                f"--height={HEIGHT}", f"--width={WIDTH}", f"--steps={STEPS}", f"--guidance={GUIDANCE}", "--seed=0",
                f"--max_sequence_length={T5_LENGTH}", f"--init_latents={tmp_path / 'latents.npy'}",
                f"--output={tmp_path / 'out.npy'}", "--noprogress"])
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() < 1e-3


def test_lora_export_loads_in_diffusers(saved, tmp_path):
    """A LoRA on the authors' targets, exported, loaded by StableDiffusion3Pipeline.load_lora_weights: the
    transformer's output equals ours with the adapter (and differs from the one without)."""
    import jax
    from diffusers import StableDiffusion3Pipeline

    from purecc_jax.weights import diffusers_lora
    from purecc_jax.backbones.sd3 import weights as sd3_io
    from purecc_jax.models import lora as lora_lib
    from purecc_jax.models import sd3
    from sd3_reference import random_inputs, run_torch

    _, folder = saved
    cfg, params = sd3_io.load_transformer(folder / "transformer")
    lcfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=sd3.LORA_TARGETS)
    adapter = lora_lib.init(jax.random.key(0), params, lcfg)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
    diffusers_lora.save(adapter, lcfg, sd3_io.lora_layout(cfg), tmp_path / "pytorch_lora_weights.safetensors")

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    inputs = random_inputs(cfg, 2, 4, 6, 9, seed=5)
    without = run_torch(pipe.transformer, inputs)
    pipe.load_lora_weights(tmp_path)
    expected = run_torch(pipe.transformer, inputs)
    ours = sd3.SD3Transformer(cfg).apply({"params": params, "lora": lora_lib.variables(adapter, lcfg)}, **inputs)
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(ours) - expected).max() < 1e-4 * scale
    assert np.abs(expected - without).max() > 1e-2 * scale
    # ... and reads back (scale folded into B) to the same output.
    loaded, loaded_cfg = diffusers_lora.load(tmp_path / "pytorch_lora_weights.safetensors", sd3_io.lora_layout(cfg))
    again = sd3.SD3Transformer(cfg).apply({"params": params, "lora": lora_lib.variables(loaded, loaded_cfg)}, **inputs)
    assert np.abs(np.asarray(again) - expected).max() < 1e-4 * scale


def test_peft_lora_file_gives_diffusers_output(saved, tmp_path):
    """A LoRA made and saved by peft / diffusers with alpha != rank (the scale only in the file's
    metadata) and PEFT's `base_model.model.` key prefix: read, it gives diffusers' output."""
    from diffusers import StableDiffusion3Pipeline

    from purecc_jax.weights import diffusers_lora
    from purecc_jax.backbones.sd3 import weights as sd3_io
    from purecc_jax.models import lora as lora_lib
    from purecc_jax.models import sd3
    from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file
    from sd3_reference import random_inputs, run_torch

    _, folder = saved
    cfg, params = sd3_io.load_transformer(folder / "transformer")
    file = pipeline_reference.save_peft_lora(StableDiffusion3Pipeline.from_pretrained(folder),
                                             ["to_q", "to_k", "add_v_proj", "to_out.0"], tmp_path)
    fresh = StableDiffusion3Pipeline.from_pretrained(folder)
    fresh.load_lora_weights(file)
    inputs = random_inputs(cfg, 2, 4, 6, 9, seed=6)
    expected = run_torch(fresh.transformer, inputs)
    scale = np.abs(expected).max()

    def ours(path):
        adapter, lcfg = diffusers_lora.load(path, sd3_io.lora_layout(cfg))
        return np.asarray(sd3.SD3Transformer(cfg).apply({"params": params, "lora": lora_lib.variables(adapter, lcfg)},
                                                        **inputs))

    assert np.abs(ours(file) - expected).max() < 1e-4 * scale
    # without the metadata's alpha / rank = 2 the output would differ: the scale is read, not assumed 1
    st = SafetensorsFile(file)
    bare = tmp_path / "bare.safetensors"
    save_file({k.replace("transformer.", "base_model.model.", 1): np.asarray(st.get(k)) for k in st.keys()}, bare)
    assert np.abs(ours(bare) - expected).max() > 1e-3 * scale


def test_sample_cli_with_lora(saved, tmp_path):
    """--lora on an SD3 folder: the image diffusers makes after load_lora_weights of the same file."""
    import jax
    from diffusers import StableDiffusion3Pipeline

    from purecc_jax import sample
    from purecc_jax.weights import diffusers_lora
    from purecc_jax.backbones.sd3 import weights as sd3_io
    from purecc_jax.models import lora as lora_lib
    from purecc_jax.models import sd3

    _, folder = saved
    cfg, params = sd3_io.load_transformer(folder / "transformer")
    lcfg = lora_lib.LoRAConfig(rank=2, alpha=2.0, targets=sd3.LORA_TARGETS)
    adapter = jax.tree_util.tree_map(lambda x: 0.2 * jax.random.normal(jax.random.key(2), x.shape),
                                     lora_lib.init(jax.random.key(0), params, lcfg))
    diffusers_lora.save(adapter, lcfg, sd3_io.lora_layout(cfg), tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    latents = np.random.default_rng(6).standard_normal((1, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
                        max_sequence_length=T5_LENGTH).images
    sample.cli(["sample", f"--pretrained={folder}", f"--prompt={PROMPTS[0]}", f"--height={HEIGHT}", f"--width={WIDTH}",
                f"--steps={STEPS}", f"--guidance={GUIDANCE}", f"--max_sequence_length={T5_LENGTH}",
                f"--init_latents={tmp_path / 'latents.npy'}", f"--lora={tmp_path / 'lora' / 'pytorch_lora_weights.safetensors'}",
                f"--output={tmp_path / 'out.npy'}", "--noprogress"])
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() < 1e-3


def test_sample_cli_composes_two_loras(saved, tmp_path):
    """--lora twice with --lora_scale=0.7,1.3 on an SD3 folder: the image diffusers makes after
    `set_adapters(["ours", "peft"], [0.7, 1.3])` of the same files (one ours, one peft's, alpha != rank)."""
    import jax
    from diffusers import StableDiffusion3Pipeline

    from purecc_jax import sample
    from purecc_jax.backbones.sd3 import weights as sd3_io
    from purecc_jax.models import lora as lora_lib
    from purecc_jax.models import sd3
    from purecc_jax.weights import diffusers_lora

    _, folder = saved
    cfg, params = sd3_io.load_transformer(folder / "transformer")
    lcfg = lora_lib.LoRAConfig(rank=2, alpha=2.0, targets=sd3.LORA_TARGETS)
    adapter = jax.tree_util.tree_map(lambda x: 0.2 * jax.random.normal(jax.random.key(3), x.shape),
                                     lora_lib.init(jax.random.key(0), params, lcfg))
    ours = diffusers_lora.save(adapter, lcfg, sd3_io.lora_layout(cfg),
                               tmp_path / "ours" / "pytorch_lora_weights.safetensors")
    peft = pipeline_reference.save_peft_lora(StableDiffusion3Pipeline.from_pretrained(folder),
                                             ["to_q", "add_k_proj", "to_out.0"], tmp_path / "peft")
    latents = np.random.default_rng(7).standard_normal((1, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(ours, adapter_name="ours")
    pipe.load_lora_weights(peft, adapter_name="peft")
    pipe.set_adapters(["ours", "peft"], [0.7, 1.3])
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
                        max_sequence_length=T5_LENGTH).images
    args = ["sample", f"--pretrained={folder}", f"--prompt={PROMPTS[0]}", f"--height={HEIGHT}", f"--width={WIDTH}",
            f"--steps={STEPS}", f"--guidance={GUIDANCE}", f"--max_sequence_length={T5_LENGTH}",
            f"--init_latents={tmp_path / 'latents.npy'}", f"--lora={ours}", f"--lora={peft}", "--noprogress"]
    sample.cli([*args, "--lora_scale=0.7,1.3", f"--output={tmp_path / 'out.npy'}"])
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() < 1e-3
    sample.cli([*args, "--lora_scale=0.7", f"--output={tmp_path / 'one_scale.npy'}"])  # one scale: both at 0.7
    assert np.abs(np.load(tmp_path / "one_scale.npy") - expected).max() > 1e-2
