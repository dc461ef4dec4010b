"""A tiny FLUX, a random concept cache and batches, shared by the train-step tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flux_reference import latent_ids
from purecc_jax import sharding
from purecc_jax.backbones.flux.denoiser import FluxDenoiser
from purecc_jax.models import lora
from purecc_jax.models.flux import FluxTransformer, init_fn, preset


def tiny_flux(**kw):
    cfg = preset("tiny", **kw)
    params = sharding.unbox(jax.jit(init_fn(cfg, jax.random.key(0)))())
    # Perturb so the model is far from its (near-)zero init and the LoRA matters.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return cfg, params


def denoiser_of(cfg, concept_embedding="none", guidance=1.0):
    """The step's view of a tiny FLUX (training guidance 1.0, as the trainer's default)."""
    return FluxDenoiser(FluxTransformer(cfg), guidance, concept_embedding)


def random_cache(cfg, n_images=3, n_texts=5, text_len=6, h=2, w=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_texts, text_len), bool)
    mask[0, 2] = mask[2, 0] = True  # the identifier in the complete (0) and target (2) texts
    return dict(
        latents=jnp.asarray(rng.standard_normal((n_images, h * w, cfg.in_channels)), jnp.float32),
        t5=jnp.asarray(rng.standard_normal((n_texts, text_len, cfg.context_dim)), jnp.float32),
        pooled=jnp.asarray(rng.standard_normal((n_texts, cfg.pooled_dim)), jnp.float32),
        ident_mask=jnp.asarray(mask),
        img_ids=jnp.asarray(latent_ids(h, w)),
    )


def batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        image=jnp.asarray(rng.integers(0, 3, b), jnp.int32),
        complete=jnp.zeros(b, jnp.int32),
        base=jnp.ones(b, jnp.int32),
        target=jnp.full(b, 2, jnp.int32),
        null=jnp.full(b, 3, jnp.int32),
    )


def random_lora(params, cfg: lora.LoRAConfig, seed=1, scale=0.05):
    adapter = lora.init(jax.random.key(seed), params, cfg)
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
