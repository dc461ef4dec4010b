"""docs/method.md Eq. 8-15 against a float64 numpy transcription, per sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purecc_jax.pipeline import flow
from purecc_jax.purecc.objective import ObjectiveConfig, adaptive_lambda, flow_loss, purecc_loss


def _arrays(seed=0, shape=(3, 10, 8)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(5)]


def _numpy_reference(v_c, v_b, r_tar, x0, x1, eta, lam=None, clip=None, eps=1e-8):
    v_c, v_b, r_tar, x0, x1 = (np.asarray(a, np.float64) for a in (v_c, v_b, r_tar, x0, x1))
    b = v_c.shape[0]
    if lam is None:
        lam = np.array([np.vdot(v_c[i] - v_b[i], r_tar[i]) / (np.vdot(r_tar[i], r_tar[i]) + eps) for i in range(b)])
    else:
        lam = np.full(b, lam)
    if clip is not None:
        lam = np.clip(lam, *clip)
    l_cc = np.mean([np.mean(((x1 - x0) - v_c)[i] ** 2) for i in range(b)])
    v_pure = v_b + lam[:, None, None] * r_tar
    l_pure = np.mean([np.mean((v_pure[i] - v_c[i]) ** 2) for i in range(b)])
    return lam, l_cc, l_pure, l_cc + eta * l_pure


def test_lambda_closed_form_per_sample():
    v_c, v_b, r_tar, _, _ = _arrays(1)
    lam = adaptive_lambda(v_c - v_b, r_tar)
    expected, *_ = _numpy_reference(v_c, v_b, r_tar, v_c, v_c, 1.0)
    np.testing.assert_allclose(lam, expected, rtol=1e-5)
    assert lam.shape == (3,) and len(set(np.round(np.asarray(lam), 6))) == 3


def test_lambda_recovers_projection():
    # If R_learn = c_i * R_tar + (orthogonal part), λ*_i = c_i exactly.
    rng = np.random.default_rng(2)
    r_tar = rng.standard_normal((4, 64)).astype(np.float32)
    ortho = rng.standard_normal((4, 64)).astype(np.float32)
    ortho -= (np.sum(ortho * r_tar, 1) / np.sum(r_tar * r_tar, 1))[:, None] * r_tar
    c = np.array([0.25, -1.0, 2.0, 0.0], np.float32)
    lam = adaptive_lambda(jnp.asarray(c[:, None] * r_tar + ortho), jnp.asarray(r_tar))
    np.testing.assert_allclose(lam, c, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [ObjectiveConfig(), ObjectiveConfig(eta=2.0), ObjectiveConfig(lambda_mode="fixed", fixed_lambda=3.0),
     ObjectiveConfig(lambda_clip=(0.0, 0.1))],
)
def test_purecc_loss_matches_numpy(cfg):
    v_c, v_b, r_tar, x0, x1 = _arrays(3)
    loss, m = purecc_loss(v_c, v_b, r_tar, x0, x1, cfg)
    lam, l_cc, l_pure, total = _numpy_reference(
        v_c, v_b, r_tar, x0, x1, cfg.eta, None if cfg.lambda_mode == "adaptive" else cfg.fixed_lambda, cfg.lambda_clip)
    np.testing.assert_allclose(float(m["l_cc"]), l_cc, rtol=1e-5)
    np.testing.assert_allclose(float(m["l_pure"]), l_pure, rtol=1e-5)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    np.testing.assert_allclose([m["lambda_mean"], m["lambda_min"], m["lambda_max"]],
                               [lam.mean(), lam.min(), lam.max()], rtol=1e-5, atol=1e-7)
    learn, tar = (np.asarray(x, np.float64).reshape(3, -1) for x in (v_c - v_b, r_tar))
    cos = [learn[i] @ tar[i] / (np.linalg.norm(learn[i]) * np.linalg.norm(tar[i])) for i in range(3)]
    np.testing.assert_allclose(float(m["cos_learn_tar"]), np.mean(cos), rtol=1e-5)


def test_gradients_follow_method():
    v_c, v_b, r_tar, x0, x1 = (jnp.asarray(a) for a in _arrays(4))

    def grads(cfg):
        return jax.grad(lambda c, b, r: purecc_loss(c, b, r, x0, x1, cfg)[0], argnums=(0, 1, 2))(v_c, v_b, r_tar)

    g_c, g_b, g_r = grads(ObjectiveConfig())
    assert float(jnp.abs(g_r).max()) == 0.0  # the extractor's guidance is a constant
    # d/dv_b is the derivative of the L_PureCC term through v_pure with λ* held constant.
    lam = adaptive_lambda(v_c - v_b, r_tar)[:, None, None]
    n = v_c[0].size
    expected_b = 2.0 * (v_b + lam * r_tar - v_c) / (n * v_c.shape[0])
    np.testing.assert_allclose(g_b, expected_b, rtol=1e-4, atol=1e-9)
    _, g_b_sg, _ = grads(ObjectiveConfig(stop_grad_original=True))
    assert float(jnp.abs(g_b_sg).max()) == 0.0
    assert float(jnp.abs(g_c).max()) > 0.0


def test_lambda_is_a_constant_to_autodiff():
    """λ* carries no gradient (Eq. 12's stop-gradient).

    At the least-squares λ* the loss is flat in λ, so the loss's gradients are the same with or
    without the stop-gradient and `test_gradients_follow_method` cannot tell them apart. Two checks
    that can: λ* itself has zero gradient, and with a large `eps` λ* is no longer the minimiser
    (the loss is not flat in λ there), where only the stop-gradient gives the λ-constant gradient.
    """
    v_c, v_b, r_tar, x0, x1 = (jnp.asarray(a) for a in _arrays(5))
    g_learn, g_tar = jax.grad(lambda a, b: jnp.sum(adaptive_lambda(a, b) ** 2), argnums=(0, 1))(v_c - v_b, r_tar)
    assert float(jnp.abs(g_learn).max()) == 0.0 and float(jnp.abs(g_tar).max()) == 0.0

    eps = float(jnp.sum(r_tar[0] ** 2))  # shrinks λ* about twofold: far from the least-squares value
    cfg = ObjectiveConfig(eps=eps)
    g_c, g_b = jax.grad(lambda c, b: purecc_loss(c, b, r_tar, x0, x1, cfg)[0], argnums=(0, 1))(v_c, v_b)
    lam = adaptive_lambda(v_c - v_b, r_tar, eps)[:, None, None]
    n, b = v_c[0].size, v_c.shape[0]
    residual = v_b + lam * r_tar - v_c
    np.testing.assert_allclose(g_b, 2.0 * residual / (n * b), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(g_c, 2.0 * ((v_c - (x1 - x0)) - residual) / (n * b), rtol=1e-4, atol=1e-9)


def test_flow_loss_and_noising():
    x0, x1 = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))
    t = jnp.array([0.25, 1.0])
    xt = flow.noisy(x0, x1, t)
    np.testing.assert_allclose(xt[0], 0.75)
    np.testing.assert_allclose(xt[1], 0.0)
    assert float(flow_loss(x1 - x0, x0, x1)) == 0.0


def test_timestep_samplers():
    t = flow.sample_timesteps(jax.random.key(0), 20000, flow.TimestepConfig())
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert abs(float(jnp.median(t)) - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    shifted = flow.sample_timesteps(jax.random.key(0), 20000, flow.TimestepConfig(shift=3.0))
    assert float(jnp.median(shifted)) > 0.7  # 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    u = flow.sample_timesteps(jax.random.key(1), 20000, flow.TimestepConfig(sampler="uniform"))
    assert abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError):
        flow.TimestepConfig(sampler="discrete")
    with pytest.raises(ValueError):
        ObjectiveConfig(lambda_mode="learned")
