"""Triton reparameterisation + KL (interpreted on CPU): Philox eps, values and gradients vs float64."""
import pytest
import torch

from triton_helpers import assert_finite, poisoned, strict  # noqa: F401 - fixtures
from fastvae.kernels import reparam as kernels
from fastvae.ops import philox
from fastvae.ops.reparam import draw_eps, kl_rows_reference, reparameterize_kl


@pytest.mark.parametrize("batch,latent,k,seed", [(1, 1, 1, 0), (1, 5, 3, 1), (7, 20, 3, 123456789), (333, 33, 1, 2**63 - 1), (3001, 20, 1, 2**40 + 5)])
def test_eps_is_the_philox_stream(batch, latent, k, seed):
    mu = torch.randn(batch, latent)
    eps = draw_eps(mu, mu, seed=seed, k=k, backend="triton")
    expected = philox.randn(seed, k * batch * latent).view(k, batch, latent)
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)


def test_eps_statistics():
    eps = draw_eps(torch.zeros(4096, 64), torch.zeros(4096, 64), seed=2024, backend="triton").flatten().double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5
    for lag in (1, 2, 3, 4, 64):  # neighbours share a Philox counter or a Box-Muller pair
        corr = torch.corrcoef(torch.stack((eps[:-lag], eps[lag:])))[0, 1].item()
        assert abs(corr) < 5 / n**0.5, (lag, corr)
    assert 0.0 < (eps.abs() > 3).double().mean().item() < 0.005  # tails: P(|N| > 3) = 0.0027


def test_seed_determinism_and_block_size_independence():
    mu, logvar = torch.randn(101, 37), torch.randn(101, 37)
    z, kl = kernels.reparam_forward(mu, logvar, 77, 3)
    for rows, cols in [(16, 16), (8, 64), (128, 8), (256, 1024)]:
        z2, kl2 = kernels.reparam_forward(mu, logvar, 77, 3, block_rows=rows, block_cols=cols)
        assert torch.equal(z, z2)
        torch.testing.assert_close(kl, kl2, rtol=1e-6, atol=1e-6)  # only the sum order may change
    assert torch.equal(z, kernels.reparam_forward(mu, logvar, 77, 3)[0])
    assert not torch.equal(z, kernels.reparam_forward(mu, logvar, 78, 3)[0])


def _grads(backend, mu0, logvar0, seed, k, w_z, w_kl):
    mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
    z, kl = reparameterize_kl(mu, logvar, k=k, seed=seed, backend=backend)
    loss = (0.0 if w_z is None else (z * w_z).sum()) + (0.0 if w_kl is None else (kl * w_kl).sum())
    loss.backward()
    return z.detach(), kl.detach(), mu.grad, logvar.grad


@pytest.mark.parametrize("batch,latent,k", [(1, 1, None), (1, 20, 4), (7, 13, None), (129, 20, 3), (2500, 20, 1)])
def test_values_and_gradients_equal_float64_reference(batch, latent, k, poisoned):
    mu, logvar = torch.randn(batch, latent, dtype=torch.float64), torch.randn(batch, latent, dtype=torch.float64)
    shape = (batch, latent) if k is None else (k, batch, latent)
    w_z, w_kl = torch.randn(shape, dtype=torch.float64), torch.randn(batch, dtype=torch.float64)
    got = _grads("triton", mu, logvar, 5, k, w_z, w_kl)
    ref = _grads("torch", mu, logvar, 5, k, w_z, w_kl)
    assert_finite(*got)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # eps: float32 math in both, ulps apart
    torch.testing.assert_close(got[1], kl_rows_reference(mu, logvar), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("used", ["z", "kl"])
def test_gradient_when_one_output_is_unused(used):
    mu, logvar = torch.randn(9, 20, dtype=torch.float64), torch.randn(9, 20, dtype=torch.float64)
    w_z = torch.randn(2, 9, 20, dtype=torch.float64) if used == "z" else None
    w_kl = torch.randn(9, dtype=torch.float64) if used == "kl" else None
    got, ref = _grads("triton", mu, logvar, 3, 2, w_z, w_kl), _grads("torch", mu, logvar, 3, 2, w_z, w_kl)
    for a, b in zip(got[2:], ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs(dtype, tol):
    mu64, logvar64 = torch.randn(65, 20, dtype=torch.float64), torch.randn(65, 20, dtype=torch.float64)
    mu64, logvar64 = mu64.to(dtype).double(), logvar64.to(dtype).double()  # same values in both
    w_z, w_kl = torch.randn(2, 65, 20, dtype=torch.float64), torch.randn(65, dtype=torch.float64)
    got = _grads("triton", mu64.to(dtype), logvar64.to(dtype), 11, 2, w_z.to(dtype), w_kl.float())
    ref = _grads("torch", mu64, logvar64, 11, 2, w_z, w_kl)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
