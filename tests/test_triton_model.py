"""fastvae.VAE on the Triton backend (interpreted on CPU) against the same model on PyTorch."""
import sys

import pytest
import torch

from triton_helpers import strict  # noqa: F401 - fixture
import fastvae
from fastvae import _triton
from fastvae.ops.loss import loss_terms
from fastvae.ops.reparam import new_seed, reparameterize


def _pair(hidden=(64,), dtype=torch.float64, likelihood="bernoulli"):
    fused = fastvae.VAE(784, hidden, 20, likelihood, backend="triton").to(dtype)
    plain = fastvae.VAE(784, hidden, 20, likelihood, backend="torch").to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _torch_loss_with_the_fused_seed(model, x, rng_seed, beta):
    """What the fused path computes: its eps is Philox under a seed drawn from torch's generator."""
    flat = model.flatten(x)
    mu, logvar = model.encoder(flat)
    torch.manual_seed(rng_seed)
    z = reparameterize(mu, logvar, seed=new_seed(), backend="torch")
    target = x.reshape(flat.shape) if x.dtype == torch.uint8 else flat
    return loss_terms(model.decoder(z), target, mu, logvar, beta=beta, likelihood=model.likelihood, backend="torch")


@pytest.mark.parametrize("batch,hidden,likelihood", [(1, (64,), "bernoulli"), (37, (64,), "bernoulli"), (37, (32, 16), "gaussian")])
@pytest.mark.parametrize("uint8", [False, True])
def test_vae_loss_and_gradients_equal_torch_backend(batch, hidden, likelihood, uint8):
    fused, plain = _pair(hidden, likelihood=likelihood)
    x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8) if uint8 else torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(5)
    loss = fused.loss(x, beta=0.5)
    loss.backward()
    expected = _torch_loss_with_the_fused_seed(plain, x, 5, 0.5)
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-7, atol=0)  # eps: float32 Philox, ulps apart
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)  # grads ~10; eps ulps apart


def test_trainer_facing_loss_terms():
    fused, plain = _pair(dtype=torch.float32)
    x = torch.rand(64, 784)
    torch.manual_seed(2)
    terms = fused.loss_terms(x, beta=2.0, reduction="mean")
    expected = _torch_loss_with_the_fused_seed(plain, x, 2, 2.0)
    expected = [t / 64 for t in expected]
    assert terms.loss.requires_grad and not terms.recon.requires_grad and not terms.kl.requires_grad
    for a, b in zip(terms, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.loss, terms.recon + 2.0 * terms.kl, rtol=1e-6, atol=1e-6)
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


def test_sample_equals_torch_backend():
    fused, plain = _pair(dtype=torch.float32)
    got = fused.sample(70, seed=3, out_dtype=torch.uint8)
    expected = plain.sample(70, seed=3, out_dtype=torch.uint8)
    assert (got.int() - expected.int()).abs().max() <= 1


def test_backends_report_triton():
    report = fastvae.backends()
    for op in ("reparam", "loss", "decode"):
        assert report[op]["backends"]["triton"] == "available"


def test_missing_triton_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match="needs the triton package"):
        _triton.load_kernels("loss")
    with pytest.raises(ValueError, match="op must be one of"):
        _triton.load_kernels("conv")
