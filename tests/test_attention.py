"""The attention kernels agree with a float64 reference; remat policies do not change gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_reference import random_inputs
from purecc_jax.models.attention import attention, reference_attention, splash_block
from purecc_jax.models.flux import FluxTransformer, init_fn, preset
from purecc_jax.models.runtime import REMAT_POLICIES


def _qkv(seq, heads=2, dim=16, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, seq, heads, dim)).astype(np.float32) for _ in range(3)]


def test_xla_matches_reference():
    q, k, v = _qkv(37)
    out = attention(q, k, v, "xla")
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-5)


def test_xla_recompute_forward_is_xla_forward():
    q, k, v = _qkv(37, heads=3)
    for run in (lambda *a: attention(*a, "xla"), lambda *a: attention(*a, "xla_recompute")):
        np.testing.assert_allclose(run(q, k, v), reference_attention(q, k, v), atol=1e-5)
    for wrap in (lambda f: f, jax.jit):
        np.testing.assert_array_equal(wrap(lambda *a: attention(*a, "xla_recompute"))(q, k, v),
                                      wrap(lambda *a: attention(*a, "xla"))(q, k, v))


@pytest.mark.parametrize("implementation", ["xla", "xla_recompute"])
def test_gradients_match_pytorch_sdpa(implementation):
    # The backward pass against PyTorch's own (scaled_dot_product_attention in float64), for a
    # cotangent that is not the output's own direction; logits of a few units so the softmax is peaked.
    torch = pytest.importorskip("torch")
    q, k, v = (3 * x for x in _qkv(45, heads=3, dim=32, seed=2))
    g = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, implementation), q, k, v)
    grads = vjp(jnp.asarray(g))

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64).transpose(1, 2).requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    ref.backward(torch.tensor(g, dtype=torch.float64).transpose(1, 2))
    np.testing.assert_allclose(out, ref.detach().transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, (tq.grad, tk.grad, tv.grad)):
        want = want.transpose(1, 2).numpy()
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err < 1e-5, f"d{name}: relative error {err:.2e}"


def test_auto_on_cpu_is_xla_recompute(caplog):
    q, k, v = _qkv(23, heads=1)  # a shape no other test logs
    with caplog.at_level("INFO", logger="purecc_jax.models.attention"):
        attention(q, k, v, "auto")
    assert "attention xla_recompute: q (2, 23, 1, 16)" in caplog.text


def test_xla_recompute_bfloat16_gradients():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(40))
    loss = lambda impl: lambda q, k, v: jnp.sum(attention(q, k, v, impl).astype(jnp.float32) ** 2)
    got = jax.grad(loss("xla_recompute"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b)).max() < 3e-2 * np.abs(np.asarray(b)).max()


def test_splash_interpret_matches_reference():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v = _qkv(256, heads=2, dim=128, batch=1)
    try:
        out = attention(q, k, v, "splash", interpret=True)
    except Exception as e:  # pragma: no cover - depends on Pallas' CPU interpreter
        pytest.skip(f"Pallas interpret mode unavailable on this platform: {e}")
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("seq,heads,block", [(37, 3, 128), (200, 2, 256)])
def test_splash_pads_lengths_no_block_divides(seq, heads, block):
    """SD3-like lengths (no block divides them) run the kernel padded; values and gradients
    match the XLA path."""
    assert splash_block(seq, seq) == block
    q, k, v = (jnp.asarray(x) for x in _qkv(seq, heads=heads, dim=32, batch=2, seed=seq))
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl, interpret=True)) * q[..., :1])
    out = attention(q, k, v, "splash", interpret=True)
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=2e-5)
    grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_splash_on_a_mesh_whose_batch_axes_do_not_divide_the_batch():
    """A batch of 2 on (data 1, fsdp 4): the kernel's shard_map splits the batch only over the mesh axes
    that divide it, as the activations around it are split (it used to be refused: 4 does not divide 2),
    and its values match the XLA path."""
    from purecc_jax import sharding

    q, k, v = (jnp.asarray(x) for x in _qkv(37, heads=2, dim=32, batch=2))
    mesh = sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4])
    with sharding.activate(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, "splash", interpret=True))(q, k, v)
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=2e-5)


def test_splash_kernel_of_one_trace_leaks_nothing_into_the_next():
    """A kernel built for a shape under jit carries no tracer of that trace into the next program of the
    same shape (a recompile, another stage): it traces."""
    q = jnp.ones((2, 80, 2, 64), jnp.bfloat16)
    for scale in (1.0, 2.0):  # two programs, one kernel
        grad = jax.jit(jax.grad(lambda q: jnp.sum(attention(q * scale, q, q, "splash", interpret=True)
                                                  .astype(jnp.float32))))
        assert grad(q).shape == q.shape


def test_splash_bfloat16_gradients_through_default_precision():
    """bf16 splash goes through its default-precision custom_vjp, forward and backward, and its
    gradients match the XLA path. (Without that wrapper Mosaic refuses the kernels under the
    tests' "highest" precision: tests/test_attention_splash_tpu.py.)"""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(37, heads=2, dim=32, batch=2))
    loss = lambda impl: lambda q, k, v: jnp.sum(attention(q, k, v, impl, interpret=True).astype(jnp.float32) ** 2)
    for got, want in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


def test_splash_block_keeps_dividing_lengths_unpadded():
    assert [splash_block(n, n) for n in (4608, 1536, 1280, 1408, 1357, 4429)] == [512, 512, 256, 128, 128, 128]


def test_unknown_implementation():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="not one of"):
        attention(q, k, v, "flash3")


def test_bfloat16_logits_in_float32():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(64))
    out = attention(q, k, v, "xla")
    assert out.dtype == jnp.bfloat16
    ref = reference_attention(*(np.asarray(x, np.float32) for x in (q, k, v)))
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 2e-2


def _model_gradients(scan):
    """grads(**runtime): the tiny FLUX model's parameter gradients of a fixed loss, the model run with
    `runtime` (remat_policy, attention, ...) and the same parameters and inputs every call."""
    base = preset("tiny", scan_layers=scan)
    params = jax.jit(init_fn(base, jax.random.key(1)))()
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                    is_leaf=lambda x: hasattr(x, "value"))
    inputs = random_inputs(base, 2, 2, 3, 5)

    def grads(**runtime):
        model = FluxTransformer(base.replace(**runtime))
        loss = lambda p: jnp.mean(model.apply({"params": p}, **inputs) ** 2)
        return jax.jit(jax.grad(loss))(params)

    return grads


@pytest.mark.parametrize("scan,policy", [(True, "full"), (True, "qkv_attn_mlp"), (False, "dots")])
def test_remat_policies_keep_gradients(scan, policy):
    grads = _model_gradients(scan)
    for a, b in zip(jax.tree_util.tree_leaves(grads(remat_policy=policy)),
                    jax.tree_util.tree_leaves(grads(remat_policy="none"))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert set(REMAT_POLICIES) >= {"none", "full", "dots", "attn"}


@pytest.mark.parametrize("scan,policy", [(True, "none"), (True, "qkv_attn_mlp"), (False, "dots_no_batch"),
                                         (True, "dots_no_batch_attn")])
def test_xla_recompute_in_the_model_keeps_gradients(scan, policy):
    # The custom_vjp attention inside scanned / looped, rematerialised blocks: the model's
    # gradients are those of the plain XLA attention.
    grads = _model_gradients(scan)
    got = grads(attention="xla_recompute", remat_policy=policy)
    want = grads(attention="xla", remat_policy="none")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dots_no_batch_attn_keeps_the_attention_forward():
    """Under remat, `dots_no_batch` reruns xla_recompute's forward (two batched dots) in the backward to
    rebuild its output and log-sum-exp; `dots_no_batch_attn` saves them (attention.RESIDUALS), so the
    gradient has as many dots as without remat, and the same values."""
    b, s, h, d = 2, 12, 2, 8
    w = jax.random.normal(jax.random.key(0), (h * d, 3 * h * d))
    x = jax.random.normal(jax.random.key(1), (b, s, h * d))

    def block(x, w):
        q, k, v = jnp.split(jnp.dot(x, w).reshape(b, s, 3 * h, d), 3, axis=2)
        return jnp.sum(jnp.tanh(attention(q, k, v, "xla_recompute")))

    def dots(policy):
        f = block if policy == "none" else jax.checkpoint(block, policy=REMAT_POLICIES[policy])
        return str(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w)).count("dot_general"), jax.grad(f, argnums=1)(x, w)

    (plain, want), (lean, _), (kept, got) = dots("none"), dots("dots_no_batch"), dots("dots_no_batch_attn")
    assert kept == plain and lean == plain + 2
    np.testing.assert_array_equal(got, want)
