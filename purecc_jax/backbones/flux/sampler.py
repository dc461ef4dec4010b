"""FLUX Euler flow sampler: one jitted function with the step loop inside.

For i in 0..steps-1:  x <- x + (sigma[i+1] - sigma[i]) * v(x, sigma[i])
where v is the transformer called with timestep sigma (it multiplies by 1000 itself),
embedded guidance for configs with a guidance embedding (FLUX.1-dev), and, with a
negative prompt and true_cfg_scale > 1, FluxPipeline's true CFG
v = v_neg + scale * (v_pos - v_neg), both halves in one batched call.

`progress=False` runs the whole loop as one `lax.fori_loop`; `progress=True` runs the
same step function, jitted alone, from a Python loop with a tqdm bar (same numbers).

Initial noise for seed s (`initial_noise`): N(0, 1) latents of shape (h, w, C) (NHWC,
h = H / downsample_factor) drawn from `jax.random.key(s)`, then packed 2x2. It depends on
the seed only, so one seed gives every prompt the same start. Given latents are packed
(B, N, 4C) like FluxPipeline's `latents=`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from purecc_jax import sharding
from purecc_jax.backbones.flux.text import TextEmbeddings
from purecc_jax.models.flux import ConceptInjection, FluxConfig, FluxTransformer
from purecc_jax.pipeline import placement
from purecc_jax.pipeline.codec import ImageCodec
from purecc_jax.pipeline.latents import latent_image_ids, pack, unpack


class Transformer(NamedTuple):
    """The FLUX transformer to sample with; `lora` is a `lora` collection (models.lora.variables)."""

    config: FluxConfig
    params: Any
    lora: Any = None

    def variables(self) -> dict[str, Any]:
        return {"params": self.params} if self.lora is None else {"params": self.params, "lora": self.lora}


class SampleOutput(NamedTuple):
    images: jax.Array  # (B, H, W, 3) float32 in [0, 1]
    latents: jax.Array  # (B, N, 4C) final packed latents


class _Conditioning(NamedTuple):
    """Everything but x and sigma that a step needs; with true CFG, batched [positive; negative]."""

    txt: jax.Array
    pooled: jax.Array
    guidance: jax.Array | None
    img_ids: jax.Array
    txt_ids: jax.Array
    concept: ConceptInjection | None
    cfg_scale: jax.Array | None  # None: no true CFG


def initial_noise(seeds: Sequence[int], height: int, width: int, latent_channels: int,
                  downsample_factor: int) -> jax.Array:
    """Packed noise (len(seeds), N, 4C) for H x W images, one draw per seed (see module doc)."""
    h, w = height // downsample_factor, width // downsample_factor
    draw = lambda key: jax.random.normal(key, (h, w, latent_channels), jnp.float32)
    noise = jax.vmap(draw)(jnp.stack([jax.random.key(int(s)) for s in seeds]))
    return pack(noise)


def _velocity(config: FluxConfig, variables: Any, x: jax.Array, sigma: jax.Array, cond: _Conditioning) -> jax.Array:
    batch = x.shape[0]
    xin = x if cond.cfg_scale is None else jnp.concatenate([x, x], axis=0)
    t = jnp.full((xin.shape[0],), sigma, jnp.float32)
    v = FluxTransformer(config).apply(variables, xin, cond.txt, cond.pooled, t, cond.img_ids, cond.txt_ids,
                                      cond.guidance, cond.concept)
    if cond.cfg_scale is None:
        return v
    positive, negative = v[:batch], v[batch:]
    return negative + cond.cfg_scale * (positive - negative)


def _euler(config: FluxConfig, variables: Any, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
           cond: _Conditioning) -> jax.Array:
    return x + (sigma_next - sigma) * _velocity(config, variables, x, sigma, cond)


_step = jax.jit(_euler, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _fused(config: FluxConfig, variables: Any, x: jax.Array, sigmas: jax.Array, cond: _Conditioning) -> jax.Array:
    body = lambda i, x: _euler(config, variables, x, sigmas[i], sigmas[i + 1], cond)
    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def _conditioning(config: FluxConfig, text: TextEmbeddings, img_ids: np.ndarray, guidance: float | None,
                  negative: TextEmbeddings | None, true_cfg_scale: float,
                  concept: ConceptInjection | None) -> _Conditioning:
    txt, pooled = text
    use_cfg = negative is not None and true_cfg_scale > 1  # FluxPipeline's condition for true CFG
    if use_cfg:
        if negative.t5.shape != text.t5.shape or negative.pooled.shape != text.pooled.shape:
            raise ValueError(f"negative embeddings {negative.t5.shape}, {negative.pooled.shape} do not match "
                             f"the prompts' {text.t5.shape}, {text.pooled.shape}")
        txt = jnp.concatenate([txt, negative.t5], axis=0)
        pooled = jnp.concatenate([pooled, negative.pooled], axis=0)
        if concept is not None:  # the concept is written into the positive prompts only
            concept = concept._replace(mask=jnp.concatenate([concept.mask, jnp.zeros_like(concept.mask)], axis=0))
    g = None
    if config.guidance_embed:
        if guidance is None:
            raise ValueError("this FLUX transformer has a guidance embedding (FLUX.1-dev): pass `guidance`")
        g = jnp.full((txt.shape[0],), guidance, jnp.float32)
    if concept is not None and concept.mask.shape != txt.shape[:2]:
        raise ValueError(f"concept mask {concept.mask.shape} does not match the text tokens {txt.shape[:2]}")
    return _Conditioning(txt, pooled, g, jnp.asarray(img_ids), jnp.zeros((txt.shape[1], 3), jnp.float32), concept,
                         jnp.float32(true_cfg_scale) if use_cfg else None)


def denoise(
    model: Transformer,
    latents: jax.Array,
    text: TextEmbeddings,
    sigmas: np.ndarray | jax.Array,
    *,
    latent_size: tuple[int, int],
    guidance: float | None = None,
    negative: TextEmbeddings | None = None,
    true_cfg_scale: float = 1.0,
    concept: ConceptInjection | None = None,
    progress: bool = False,
) -> jax.Array:
    """Runs the Euler loop from packed `latents` (B, N, 4C) over `sigmas` (steps + 1,); returns the final latents.

    `latent_size`: (h, w) of the unpacked latents (for the RoPE image ids). `text` and
    `negative` have B rows; `concept.mask` is (B, L). No mesh handling (see `sample`).
    """
    h, w = latent_size
    if latents.ndim != 3 or latents.shape[1] != (h // 2) * (w // 2) or latents.shape[2] != model.config.in_channels:
        raise ValueError(f"latents {latents.shape} are not packed ({(h // 2) * (w // 2)} tokens, "
                         f"{model.config.in_channels} features) for {h}x{w} latents")
    if text.t5.shape[0] != latents.shape[0] or text.pooled.shape[0] != latents.shape[0]:
        raise ValueError(f"text embeddings have {text.t5.shape[0]} rows, latents {latents.shape[0]}")
    cond = _conditioning(model.config, text, latent_image_ids(h, w), guidance, negative, true_cfg_scale, concept)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x = jnp.asarray(latents, jnp.float32)
    variables = model.variables()
    if not progress:
        return _fused(model.config, variables, x, sigmas, cond)
    for i in tqdm(range(sigmas.shape[0] - 1), desc="sampling", unit="step"):
        x = _step(model.config, variables, x, sigmas[i], sigmas[i + 1], cond)
        x.block_until_ready()  # so the bar advances with the work, not with the dispatch
    return x


def lower_denoise(
    model: Transformer,
    latents: jax.ShapeDtypeStruct,
    text: TextEmbeddings,
    steps: int,
    *,
    latent_size: tuple[int, int],
    guidance: float | None = None,
    concept: ConceptInjection | None = None,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> jax.stages.Lowered:
    """The fused loop `sample` runs, lowered from ShapeDtypeStructs: `latents`, `text` and the concept
    mask as `sample` places them (batch-split on `mesh`, rows already padded), the transformer's
    parameters and LoRA as they lie. The few inputs `denoise` makes on the default device (sigmas,
    guidance, position ids) are replicated here, where jit would place them at run time."""
    h, w = latent_size
    cond = jax.eval_shape(lambda t, c: _conditioning(model.config, t, latent_image_ids(h, w), guidance, None, 1.0, c),
                          text, concept)
    batched = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.shape, rules))
    replicated = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh))
    concept_in = None
    if concept is not None:
        concept_in = concept._replace(mask=batched(cond.concept.mask))
    cond = cond._replace(txt=batched(cond.txt), pooled=batched(cond.pooled), concept=concept_in,
                         **{k: None if getattr(cond, k) is None else replicated(getattr(cond, k))
                            for k in ("guidance", "img_ids", "txt_ids", "cfg_scale")})
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=sharding.replicated(mesh))
    with sharding.activate(mesh, rules):
        return _fused.lower(model.config, model.variables(), latents, sigmas, cond)


def sample(
    model: Transformer,
    codec: ImageCodec,
    text: TextEmbeddings,
    latents: jax.Array,
    sigmas: np.ndarray | jax.Array,
    *,
    height: int,
    width: int,
    guidance: float | None = None,
    negative: TextEmbeddings | None = None,
    true_cfg_scale: float = 1.0,
    concept: ConceptInjection | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    progress: bool = False,
) -> SampleOutput:
    """Denoises packed `latents` (B, N, 4C) and decodes them through `codec`: images (B, H, W, 3) in [0, 1].

    With a `mesh`, inputs and outputs are sharded over its data axes (the batch is padded
    to a multiple of their size for the computation) and the model's logical constraints
    are resolved with `rules`.
    """
    f = codec.downsample_factor
    if height % (2 * f) or width % (2 * f):
        raise ValueError(f"image size {height}x{width} must be a multiple of {2 * f} in both dimensions")
    batch = latents.shape[0]
    rows = placement.padded_size(batch, placement.batch_multiple(mesh, rules))
    pad = lambda x: placement.pad_rows(jnp.asarray(x), rows)
    text = TextEmbeddings(*map(pad, text))
    negative = None if negative is None else TextEmbeddings(*map(pad, negative))
    if concept is not None:
        concept = concept._replace(mask=pad(concept.mask))
    latents, text, negative, mask = placement.place(
        (pad(latents), text, negative, None if concept is None else concept.mask), mesh, rules)
    if concept is not None:
        concept = concept._replace(mask=mask)
    lh, lw = height // f, width // f
    with placement.maybe_activate(mesh, rules):
        x = denoise(model, latents, text, sigmas, latent_size=(lh, lw), guidance=guidance, negative=negative,
                    true_cfg_scale=true_cfg_scale, concept=concept, progress=progress)
        decoded = codec.decode(unpack(x, lh, lw))
    images = jnp.clip(decoded / 2 + 0.5, 0.0, 1.0).astype(jnp.float32)
    if rows == batch:
        return SampleOutput(images, x)
    return SampleOutput(images[:batch], x[:batch])
