"""The PureCC objective, docs/method.md Eq. 8-15, and nothing else.

All predictions share x0, x1, t (hence x_t). Shapes: velocities (B, N, C) packed latents.

    R_tar    = v_θ1(x_t | y_tar) - v_θ1(x_t | ∅)           (8)  frozen extractor, no gradient
    R_learn  = v_θ2(x_t | y_complete) - v_θ2(x_t | y_base)  (10)
    λ*       = <R_learn, R_tar> / (||R_tar||² + eps)        (12) per sample, stop-gradient
    v_pure   = v_b + λ* R_tar                               (13)
    L_PureCC = ||v_pure - v_c||²                            (14)
    L_PCC    = L_CC + η L_PureCC                            (15)

Squared norms in the losses are means over a sample's latent elements, then over the batch
(the same normalisation as L_CC); λ* uses plain inner products, where the normalisation cancels.
A masked loss weights L_CC's elements (a weighted mean per sample); L_PureCC and λ* stay over the
whole latent (docs/method.md §4). Rows whose caption was dropped have no L_PureCC term.
Everything here runs in float32 whatever the model's compute dtype: R_learn is a difference of
two close velocities and λ* a ratio of sums over ~10^5 elements, which bfloat16 would round away.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LAMBDA_MODES = ("adaptive", "fixed")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    eta: float = 1.0
    lambda_mode: str = "adaptive"
    fixed_lambda: float = 1.0
    lambda_clip: tuple[float, float] | None = None
    eps: float = 1e-8
    stop_grad_original: bool = False

    def __post_init__(self):
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode {self.lambda_mode!r} is not one of {LAMBDA_MODES}")


def per_sample_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean of (a - b)² over every axis but the first, in float32."""
    d = (a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2
    return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


def flow_loss(v_pred: jax.Array, x0: jax.Array, x1: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """L_CC: || (x1 - x0) - v ||², per-sample mean then batch mean. `weight` (x0's shape, >= 0, not all 0
    in a sample): per element, a weighted mean Σ w (x1 - x0 - v)² / Σ w per sample (masked loss)."""
    if weight is None:
        return jnp.mean(per_sample_mse(x1 - x0, v_pred))
    d = (x1.astype(jnp.float32) - x0.astype(jnp.float32) - v_pred.astype(jnp.float32)) ** 2
    w = weight.astype(jnp.float32).reshape(d.shape[0], -1)
    return jnp.mean(jnp.sum(w * d.reshape(d.shape[0], -1), axis=1) / jnp.sum(w, axis=1))


def adaptive_lambda(r_learn: jax.Array, r_tar: jax.Array, eps: float = 1e-8) -> jax.Array:
    """λ* (B,) = <R_learn, R_tar> / (||R_tar||² + eps) per sample, under stop_gradient (Eq. 12)."""
    r_learn = jax.lax.stop_gradient(r_learn).astype(jnp.float32).reshape(r_learn.shape[0], -1)
    r_tar = jax.lax.stop_gradient(r_tar).astype(jnp.float32).reshape(r_tar.shape[0], -1)
    return jnp.sum(r_learn * r_tar, axis=1) / (jnp.sum(r_tar * r_tar, axis=1) + eps)


def purecc_loss(
    v_complete: jax.Array,
    v_base: jax.Array,
    r_tar: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    cfg: ObjectiveConfig,
    weight: jax.Array | None = None,
    kept: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_PCC and its parts. `r_tar` must already be the frozen extractor's guidance (Eq. 8).

    `weight`: L_CC's per-element weights (`flow_loss`); L_PureCC and λ* do not read them. `kept` (B,) bool:
    rows whose complete text was kept; the others (caption dropped) add 0 to L_PureCC, whose batch mean
    still divides by B, and are left out of the λ* metrics (0 when no row is kept)."""
    r_tar = jax.lax.stop_gradient(r_tar).astype(jnp.float32)
    v_complete, v_base = v_complete.astype(jnp.float32), v_base.astype(jnp.float32)
    if cfg.stop_grad_original:
        v_base = jax.lax.stop_gradient(v_base)
    l_cc = flow_loss(v_complete, x0, x1, weight)
    if cfg.lambda_mode == "adaptive":
        lam = adaptive_lambda(v_complete - v_base, r_tar, cfg.eps)
    else:
        lam = jnp.full((v_complete.shape[0],), cfg.fixed_lambda, jnp.float32)
    if cfg.lambda_clip is not None:
        lam = jnp.clip(lam, *cfg.lambda_clip)
    lam_b = lam.reshape((-1,) + (1,) * (r_tar.ndim - 1))
    v_pure = v_base + lam_b * r_tar
    pure = per_sample_mse(v_pure, v_complete)
    if kept is None:
        l_pure = jnp.mean(pure)
        lam_stats = dict(lambda_mean=jnp.mean(lam), lambda_min=jnp.min(lam), lambda_max=jnp.max(lam))
    else:
        l_pure = jnp.mean(jnp.where(kept, pure, 0.0))
        n, any_kept = jnp.sum(kept), jnp.any(kept)
        lam_stats = dict(lambda_mean=jnp.sum(jnp.where(kept, lam, 0.0)) / jnp.maximum(n, 1),
                         lambda_min=jnp.where(any_kept, jnp.min(jnp.where(kept, lam, jnp.inf)), 0.0),
                         lambda_max=jnp.where(any_kept, jnp.max(jnp.where(kept, lam, -jnp.inf)), 0.0))
    loss = l_cc + cfg.eta * l_pure
    metrics = dict(loss=loss, l_cc=l_cc, l_pure=l_pure, **lam_stats,
                   cos_learn_tar=jnp.mean(cosine(v_complete - v_base, r_tar)))
    return loss, metrics


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-sample cosine of two arrays (B, ...) over all their other axes, in float32, without gradient:
    how much of the learned direction R_learn lies along the extractor's R_tar."""
    a = jax.lax.stop_gradient(a).astype(jnp.float32).reshape(a.shape[0], -1)
    b = jax.lax.stop_gradient(b).astype(jnp.float32).reshape(b.shape[0], -1)
    return jnp.sum(a * b, axis=1) / jnp.sqrt(jnp.sum(a * a, axis=1) * jnp.sum(b * b, axis=1) + eps)
