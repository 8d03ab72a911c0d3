"""CPU speed of the C++ kernels (backend="cpp") against eager PyTorch (backend="torch"), side by side.

    .venv/bin/python -m pytest benchmarks/bench_cpp.py --benchmark-group-by=func,param:size \
        --benchmark-columns=min,median,mean,rounds

Targets: fused loss forward+backward >= 3x eager (BCE-with-logits + KL), fused reparam+KL
forward+backward >= 2x eager. Input value checks are off for both (as in the Trainer's loop);
FASTVAE_STRICT=1 makes a silent fallback to PyTorch an error.
"""
import pytest
import torch

import fastvae
from fastvae.ops import loss, reparam

BACKENDS = ["cpp", "torch"]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    torch.manual_seed(0)
    with fastvae.value_checks(False):
        yield


def _rounds(numel: int) -> dict:
    return dict(rounds=5 if numel > 10_000_000 else 20, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("size", [4096, 65536])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_fwd_bwd(benchmark, backend, size):
    """bce_kl_loss forward + backward, (B, 784) logits and float targets, latent 20."""
    logits = torch.randn(size, 784, requires_grad=True)
    x = torch.rand(size, 784)
    mu, logvar = torch.randn(size, 20, requires_grad=True), torch.randn(size, 20, requires_grad=True)

    def step():
        for t in (logits, mu, logvar):
            t.grad = None
        loss.bce_kl_loss(logits, x, mu, logvar, backend=backend).backward()

    benchmark.pedantic(step, **_rounds(logits.numel()))
    assert logits.grad is not None


@pytest.mark.parametrize("size", [20, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reparam_kl_fwd_bwd(benchmark, backend, size):
    """reparameterize_kl forward + backward at B=65536, L=size (eps: torch.randn vs in-kernel Philox)."""
    mu, logvar = torch.randn(65536, size, requires_grad=True), torch.randn(65536, size, requires_grad=True)

    def step():
        mu.grad = logvar.grad = None
        z, kl = reparam.reparameterize_kl(mu, logvar, backend=backend)
        (z.sum() + kl.sum()).backward()

    benchmark.pedantic(step, **_rounds(mu.numel()))
    assert mu.grad is not None
