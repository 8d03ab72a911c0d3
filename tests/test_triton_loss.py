"""Triton reconstruction + KL loss (interpreted on CPU): values and gradients vs the float64 reference."""
import math

import pytest
import torch

from triton_helpers import assert_finite, poisoned, strict  # noqa: F401 - fixtures
from fastvae.functional import bce_kl_loss
from fastvae.kernels import loss as kernels
from fastvae.ops.loss import loss_terms


def _inputs(batch, features, latent=20, dtype=torch.float64):
    logits = (torch.randn(batch, features, dtype=torch.float64) * 4).to(dtype)
    x = torch.rand(batch, features, dtype=torch.float64)
    mu, logvar = torch.randn(batch, latent, dtype=torch.float64), torch.randn(batch, latent, dtype=torch.float64)
    return logits, x, mu, logvar


def _run(backend, logits, x, mu, logvar, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (logits, mu, logvar)]
    terms = loss_terms(leaves[0], x, leaves[1], leaves[2], backend=backend, **kw)
    weight = torch.randn_like(terms.loss, generator=torch.Generator().manual_seed(1)) if kw.get("reduction") == "none" else 1.0
    (terms.loss * weight).sum().backward()
    return (terms.loss.detach(), terms.recon, terms.kl) + tuple(t.grad for t in leaves)


@pytest.mark.parametrize("batch,features", [(1, 1), (1, 784), (7, 37), (129, 784), (2000, 50)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_values_and_gradients_equal_float64_reference(batch, features, likelihood, poisoned):
    inputs = _inputs(batch, features)
    got = _run("triton", *inputs, beta=0.37, likelihood=likelihood)
    ref = _run("torch", *inputs, beta=0.37, likelihood=likelihood)
    assert_finite(*got)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reductions(reduction):
    inputs = _inputs(33, 100)
    for a, b in zip(_run("triton", *inputs, reduction=reduction), _run("torch", *inputs, reduction=reduction)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_uint8_targets_equal_float_targets(dtype, rtol):
    logits, _, mu, logvar = _inputs(9, 784, dtype=dtype)
    pixels = torch.randint(0, 256, (9, 784), dtype=torch.uint8)
    got = _run("triton", logits, pixels, mu, logvar)
    expected = _run("triton", logits, pixels.to(dtype) / 255, mu, logvar)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_stay_finite_and_exact(dtype):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0]], dtype=dtype)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 1.0]], dtype=dtype)
    mu, logvar = torch.randn(1, 3, dtype=dtype), torch.randn(1, 3, dtype=dtype)
    loss, recon, _, g_logits, _, _ = _run("triton", logits, x, mu, logvar)
    assert_finite(loss, g_logits)
    expected = 200.0 + math.log(2.0) + math.log1p(math.exp(-30.0))
    torch.testing.assert_close(recon.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-7 if dtype == torch.float32 else 1e-15, atol=0)
    torch.testing.assert_close(g_logits.double(), torch.sigmoid(logits.double()) - x.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_logits_accumulate_in_float32(dtype, tol):
    logits, x, mu, logvar = _inputs(65, 784, dtype=dtype)
    got = _run("triton", logits, x.to(dtype), mu.float(), logvar.float())
    ref = _run("torch", logits.double(), x.to(dtype).double(), mu, logvar)
    assert got[0].dtype == torch.float32 and got[3].dtype == dtype
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-3)  # float32 sums of 65 x 784 terms
    torch.testing.assert_close(got[3].double(), ref[3], rtol=tol, atol=tol)  # grad_logits rounded to `dtype`
    for a, b in zip(got[4:], ref[4:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_no_gradient_pass_writes_no_gradients(monkeypatch):
    logits, x, mu, logvar = _inputs(17, 60)
    calls = []
    real = kernels.loss_forward
    monkeypatch.setattr(kernels, "loss_forward", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    with torch.no_grad():
        value = bce_kl_loss(logits, x, mu, logvar, backend="triton")
    torch.testing.assert_close(value, bce_kl_loss(logits, x, mu, logvar, backend="torch"), rtol=1e-12, atol=0)
    assert calls == [False]


def test_deterministic():
    inputs = _inputs(300, 784, dtype=torch.float32)
    first, second = _run("triton", *inputs), _run("triton", *inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
