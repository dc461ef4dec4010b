"""A diffusers Stable Diffusion 3 / 3.5 pipeline folder in JAX, sampled as `StableDiffusion3Pipeline`.

Layout read (the `stabilityai/stable-diffusion-3.5-medium` download):
    model_index.json                   _class_name StableDiffusion3Pipeline
    scheduler/scheduler_config.json    FlowMatchEulerDiscreteScheduler (shift 3.0)
    transformer/                       SD3Transformer2DModel
    vae/                               AutoencoderKL, 16 latent channels, scaling 1.5305, shift 0.0609
    text_encoder/, tokenizer/          CLIP-L with projection
    text_encoder_2/, tokenizer_2/      OpenCLIP bigG with projection
    text_encoder_3/, tokenizer_3/      T5-XXL (optional: without it the T5 part of the context is zeros)

Text conditioning (`encode_prompt`): each CLIP's penultimate hidden states (77 tokens),
concatenated on the feature axis and zero-padded to T5's width, then T5's tokens appended
on the sequence axis: context (B, 77 + max_sequence_length, 4096); the two projected pooled
outputs concatenated: pooled (B, 768 + 1280).

Sampling: the scheduler's own SD3 schedule (`sd3_sigmas`), classifier-free guidance with
the negative prompt when guidance > 1 (uncond + g (cond - uncond)), Euler steps in float32,
decode `latents / scaling + shift`, images (x / 2 + 0.5) clipped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.backbones.sd3 import weights as sd3_io
from purecc_jax.models import runtime as runtime_lib
from purecc_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from purecc_jax.models.sd3 import SD3Config, SD3Transformer
from purecc_jax.models.t5 import T5Config, T5Encoder
from purecc_jax.models.vae import VAEConfig
from purecc_jax.pipeline import placement
from purecc_jax.pipeline.codec import VAECodec
from purecc_jax.weights.clip_rules import load_clip
from purecc_jax.weights.t5_rules import load_t5
from purecc_jax.weights.vae_rules import load_vae

PIPELINE_CLASS = "StableDiffusion3Pipeline"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 7.0
DEFAULT_MAX_SEQUENCE_LENGTH = 256
_SHARED_RUNTIME = ("dtype", "param_dtype")
_UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                          "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


def is_sd3_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers folder whose model_index.json names StableDiffusion3Pipeline."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None


def sd3_sigmas(steps: int, scheduler_config: dict[str, Any]) -> np.ndarray:
    """(steps + 1,) float32 sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps(steps) without `sigmas`,
    as StableDiffusion3Pipeline calls it: a linspace between the shifted training schedule's ends, shifted
    again, then a final 0 (the arithmetic and its float32/float64 steps follow diffusers')."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    turned_on = [k for k in _UNSUPPORTED_SCHEDULER if scheduler_config.get(k)]
    if turned_on:
        raise ValueError(f"scheduler config sets {turned_on}: only SD3's static-shift flow-match Euler is supported")
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    shift = float(scheduler_config.get("shift", 1.0))
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train = (np.float32(shift) * train / (1 + np.float32(shift - 1) * train)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 7))
def _encode(clip_l: CLIPTextConfig, clip_g: CLIPTextConfig, t5: T5Config | None, params, ids_l, ids_g, ids_t5,
            context_dim: int):
    hidden_l, pooled_l = CLIPTextEncoder(clip_l).apply({"params": params["clip_l"]}, ids_l, penultimate=True)
    hidden_g, pooled_g = CLIPTextEncoder(clip_g).apply({"params": params["clip_g"]}, ids_g, penultimate=True)
    clip = jnp.concatenate([hidden_l, hidden_g], axis=-1)
    if t5 is None:
        t5_hidden = jnp.zeros((ids_t5.shape[0], ids_t5.shape[1], context_dim), clip.dtype)
    else:
        t5_hidden = T5Encoder(t5).apply({"params": params["t5"]}, ids_t5)
    width = t5_hidden.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(f"CLIP widths {hidden_l.shape[-1]} + {hidden_g.shape[-1]} exceed T5's {width}")
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    context = jnp.concatenate([clip.astype(jnp.float32), t5_hidden.astype(jnp.float32)], axis=1)
    return context, jnp.concatenate([pooled_l, pooled_g], axis=-1).astype(jnp.float32)


@dataclasses.dataclass
class SD3TextEncoders:
    """CLIP-L, CLIP-G (with projections) and T5 (or None) with their transformers tokenizers."""

    clip_l_config: CLIPTextConfig
    clip_g_config: CLIPTextConfig
    t5_config: T5Config | None
    params: dict[str, Any]  # {"clip_l": ..., "clip_g": ..., "t5": ... (absent without T5)}
    tokenizers: tuple[Any, Any, Any]  # CLIPTokenizer, CLIPTokenizer, T5 tokenizer (or None)
    context_dim: int  # the transformer's joint_attention_dim (T5's width)

    def tokenize(self, prompts: Sequence[str], max_sequence_length: int) -> tuple[np.ndarray, ...]:
        """(ids_l, ids_g (B, 77), ids_t5 (B, max_sequence_length)) padded and truncated as the pipeline does."""
        out = []
        for tok, length in zip(self.tokenizers, (None, None, max_sequence_length)):
            if tok is None:
                out.append(np.zeros((len(prompts), length), np.int32))
                continue
            length = length or tok.model_max_length
            out.append(np.asarray(tok(list(prompts), padding="max_length", max_length=length, truncation=True,
                                      add_special_tokens=True).input_ids, np.int32))
        return tuple(out)

    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
                       ) -> tuple[jax.Array, jax.Array]:
        """(context (B, 77 + max_sequence_length, context_dim), pooled (B, clip_l + clip_g projections))."""
        ids = self.tokenize(list(prompts), max_sequence_length)
        return _encode(self.clip_l_config, self.clip_g_config, self.t5_config, self.params, *ids, self.context_dim)


@dataclasses.dataclass
class SD3Parts:
    """Everything StableDiffusion3Pipeline holds, as configs and parameters (placed on `mesh` when given)."""

    transformer_config: SD3Config
    transformer_params: Any
    text: SD3TextEncoders
    codec: VAECodec
    scheduler: dict[str, Any]
    mesh: Mesh | None = None
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES


def check_folder(path: str | Path) -> None:
    """Raises naming the folder and every missing component before anything heavy is read."""
    path = Path(path)
    if not is_sd3_folder(path):
        raise ValueError(f"{path} is not a diffusers {PIPELINE_CLASS} folder (model_index.json names another class "
                         "or is missing)")
    required = ["scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json",
                "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer", "tokenizer_2"]
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"SD3 pipeline folder {path} is incomplete; missing: {missing}")


def load_sd3_pipeline(path: str | Path, *, mesh: Mesh | None = None,
                      rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES, **runtime: Any) -> SD3Parts:
    """Loads a diffusers StableDiffusion3Pipeline folder (see module doc), on the default device or, with a
    `mesh`, every model's parameters sharded by their logical axis names through `rules`.

    `runtime`: SD3Config runtime fields for the transformer (dtype, param_dtype, scan_layers, remat_policy,
    attention); dtype and param_dtype also apply to the text encoders and the VAE.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    path = Path(path)
    check_folder(path)
    unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(SD3Config)})
    if unknown:
        raise TypeError(f"load_sd3_pipeline: unknown runtime options {unknown}")
    shared = lambda cls: dict(runtime_lib.select(cls, runtime, _SHARED_RUNTIME), mesh=mesh, rules=rules)

    transformer_config, transformer_params = sd3_io.load_transformer(
        path / "transformer", mesh=mesh, rules=rules, **runtime_lib.select(SD3Config, runtime))
    clip_l_config, clip_l = load_clip(path / "text_encoder", **shared(CLIPTextConfig))
    clip_g_config, clip_g = load_clip(path / "text_encoder_2", **shared(CLIPTextConfig))
    for name, cfg in (("text_encoder", clip_l_config), ("text_encoder_2", clip_g_config)):
        if cfg.projection_dim is None:
            raise ValueError(f"{path / name}/config.json is not a CLIPTextModelWithProjection; SD3 needs its projection")
    params = {"clip_l": clip_l, "clip_g": clip_g}
    t5_config, t5_tokenizer = None, None
    if (path / "text_encoder_3" / "config.json").is_file():
        t5_config, params["t5"] = load_t5(path / "text_encoder_3", **shared(T5Config))
        t5_tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer_3")
    tokenizers = (CLIPTokenizer.from_pretrained(path / "tokenizer"), CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
                  t5_tokenizer)
    text = SD3TextEncoders(clip_l_config, clip_g_config, t5_config, params, tokenizers,
                           transformer_config.context_dim)
    vae_config, vae_params = load_vae(path / "vae", mesh=mesh, axis_rules=rules,
                                      **runtime_lib.select(VAEConfig, runtime, _SHARED_RUNTIME))
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return SD3Parts(transformer_config, transformer_params, text, VAECodec(vae_config, vae_params), scheduler,
                    mesh, rules)


@functools.partial(jax.jit, static_argnums=0)
def _euler_step(config: SD3Config, variables: Any, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                context: jax.Array, pooled: jax.Array, guidance: jax.Array) -> jax.Array:
    """One Euler step; with guidance the batch of context/pooled is [negative; positive]."""
    model = SD3Transformer(config)
    guided = context.shape[0] == 2 * x.shape[0]
    inputs = jnp.concatenate([x, x]) if guided else x
    t = jnp.full((inputs.shape[0],), sigma, jnp.float32)
    v = model.apply(variables, inputs, context, pooled, t)
    if guided:
        uncond, cond = jnp.split(v, 2)
        v = uncond + guidance * (cond - uncond)
    return x + (sigma_next - sigma) * v


def sample_sd3(
    parts: SD3Parts,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    negative_prompts: Sequence[str] | None = None,
    init_latents: np.ndarray | None = None,
    seed: int = 0,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    lora: Any = None,
) -> np.ndarray:
    """Images (B, height, width, 3) float32 in [0, 1], as StableDiffusion3Pipeline(output_type="np") makes them.

    `init_latents`: the NCHW array (B, 16, height/8, width/8) the pipeline's `latents=` takes; without it the
    noise is drawn from `seed` with JAX's generator (it cannot equal torch's). Guidance > 1 turns on
    classifier-free guidance with `negative_prompts` (default: "" for each prompt). `lora`: a `lora`
    collection (`models.lora.variables`) applied on top of the transformer.
    """
    prompts = list(prompts)
    codec, cfg = parts.codec, parts.transformer_config
    multiple = codec.downsample_factor * cfg.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height={height} and width={width} must be multiples of {multiple}")
    shape = (len(prompts), cfg.in_channels, height // codec.downsample_factor, width // codec.downsample_factor)
    if init_latents is None:
        init_latents = np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
    init_latents = np.asarray(init_latents, np.float32)
    if init_latents.shape != shape:
        raise ValueError(f"init_latents has shape {init_latents.shape}; {len(prompts)} prompt(s) at {height}x{width} "
                         f"need {shape} (NCHW, as StableDiffusion3Pipeline's `latents`)")
    # With a mesh the rows are split over its batch axes (padded to a multiple of them), as the
    # transformer's activations are, and the step runs under the mesh's rules.
    rows = placement.padded_size(len(prompts), placement.batch_multiple(parts.mesh, parts.rules))
    pad = lambda x: placement.pad_rows(jnp.asarray(x), rows)  # noqa: E731
    context, pooled = map(pad, parts.text.encode_prompts(prompts, max_sequence_length))
    if guidance > 1:
        negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        neg_context, neg_pooled = map(pad, parts.text.encode_prompts(negative, max_sequence_length))
        context, pooled = jnp.concatenate([neg_context, context]), jnp.concatenate([neg_pooled, pooled])

    x = pad(init_latents.transpose(0, 2, 3, 1))
    x, context, pooled = placement.place((x, context, pooled), parts.mesh, parts.rules)
    sigmas = sd3_sigmas(steps, parts.scheduler)
    variables = {"params": parts.transformer_params} | ({} if lora is None else {"lora": lora})
    with placement.maybe_activate(parts.mesh, parts.rules):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = _euler_step(cfg, variables, x, sigma, sigma_next, context, pooled,
                            jnp.float32(guidance))
        images = codec.decode(x)
    return np.clip(np.asarray(images[:len(prompts)], np.float32) / 2 + 0.5, 0.0, 1.0)
