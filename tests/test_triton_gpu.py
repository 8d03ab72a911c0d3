"""The Triton kernels compiled for a real GPU (skipped without one; run with FASTVAE_TEST_GPU=1 so
Triton compiles instead of interpreting): the same checks as the interpreted tests, on CUDA tensors."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import fastvae  # noqa: E402
from fastvae.ops import philox  # noqa: E402
from fastvae.ops.decode import decode_latents  # noqa: E402
from fastvae.ops.loss import loss_terms  # noqa: E402
from fastvae.ops.reparam import draw_eps, reparameterize_kl  # noqa: E402


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setenv("FASTVAE_STRICT", "1")


@pytest.mark.parametrize("batch,latent,k", [(1, 1, 1), (7, 20, 3), (4099, 33, 2)])
def test_eps_and_gradients(batch, latent, k):
    mu = torch.randn(batch, latent, device="cuda", dtype=torch.float64)
    eps = draw_eps(mu.float(), mu.float(), seed=2**63 - 1, k=k, backend="triton")
    torch.testing.assert_close(eps, philox.randn(2**63 - 1, eps.numel(), device="cuda").view(eps.shape), rtol=1e-5, atol=1e-5)
    grads = []
    for backend in ("triton", "torch"):
        m, lv = mu.clone().requires_grad_(), (mu * 0.3).clone().requires_grad_()
        z, kl = reparameterize_kl(m, lv, k=k, seed=9, backend=backend)
        (z.sin().sum() + kl.sum()).backward()
        grads.append((z.detach(), kl.detach(), m.grad, lv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_values_and_gradients(dtype, likelihood):
    logits = (torch.randn(1031, 784, device="cuda") * 4).to(dtype)
    x = torch.randint(0, 256, (1031, 784), dtype=torch.uint8, device="cuda")
    mu, logvar = torch.randn(1031, 20, device="cuda"), torch.randn(1031, 20, device="cuda")
    out = []
    for backend, cast in (("triton", dtype), ("torch", torch.float64)):
        leaves = [t.detach().clone().to(cast).requires_grad_() for t in (logits, mu, logvar)]
        loss = loss_terms(*leaves[:1], x, *leaves[1:], beta=0.3, likelihood=likelihood, backend=backend).loss
        loss.backward()
        out.append([loss.detach().double()] + [t.grad.double() for t in leaves])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("hidden", [(400,), (256, 128)])
def test_decode_matches_torch(hidden):
    model = fastvae.VAE(784, hidden, 20).cuda()
    for out_dtype in (torch.float32, torch.uint8):
        got = decode_latents(model, n=5003, latent_dim=20, seed=3, out_dtype=out_dtype, backend="triton")
        chunked = decode_latents(model, n=5003, latent_dim=20, seed=3, out_dtype=out_dtype, chunk_size=999, backend="triton")
        ref = decode_latents(model, n=5003, latent_dim=20, seed=3, out_dtype=out_dtype, backend="torch")
        atol = 1 if out_dtype == torch.uint8 else 1e-3  # TF32 only where torch allows it; 1e-3 covers it
        torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=atol)
        torch.testing.assert_close(chunked.double(), got.double(), rtol=0, atol=atol)


def test_device_seed_flags_and_no_recompilation():
    """The round-2 kernel interface compiled: a device seed draws the int seed's stream, the
    value-check bits arrive, and new seeds hit the kernel cache."""
    from fastvae.kernels import reparam
    mu, logvar = torch.randn(4099, 33, device="cuda"), torch.randn(4099, 33, device="cuda")
    z, kl = reparam.reparam_forward(mu, logvar, 2**40 + 16, 2)
    z_t, kl_t = reparam.reparam_forward(mu, logvar, torch.tensor(2**40 + 16, device="cuda"), 2)
    assert torch.equal(z, z_t) and torch.equal(kl, kl_t)
    flags = torch.zeros(1, dtype=torch.int32, device="cuda")
    logvar[7, 3] = 100.0
    reparam.reparam_forward(mu, logvar, 1, 1, False, flags)
    assert flags.item() == 32
    cache = reparam._forward.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    for seed in (0, 1, 16, 32, 2**31, 2**62 + 48):
        reparam.reparam_forward(mu, logvar, seed, 1, False, flags)
    assert len(cache) == before  # seed is do_not_specialize and typed int64


def test_scale_grads_by_one_touches_nothing():
    from fastvae.kernels import loss
    snan = torch.full((1031, 784), 0, dtype=torch.int32, device="cuda").fill_(0x7F800001).view(torch.float32)
    before = snan.clone()
    loss.scale_grads(torch.tensor(1.0, device="cuda"), [snan])
    assert torch.equal(snan.view(torch.int32), before.view(torch.int32))
    g = torch.randn(1031, 784, device="cuda")
    expected = g * 2.5
    loss.scale_grads(torch.tensor(2.5, device="cuda"), [g])
    assert torch.equal(g, expected)


def test_decode_with_a_device_seed():
    from fastvae.kernels import decode
    model = fastvae.VAE(784, (400,), 20).cuda()
    layers = [(m.weight, m.bias) for m in model.decoder.linears()]
    a, b = torch.empty(999, 784, device="cuda"), torch.empty(999, 784, device="cuda")
    decode.decode_mlp(layers, None, 5, 17, a)
    decode.decode_mlp(layers, None, torch.tensor(5, device="cuda"), 17, b)
    assert torch.equal(a, b)
