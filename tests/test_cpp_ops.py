"""The C++ CPU kernels (backend="cpp") against float64 PyTorch references: values and gradients."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastvae
from cpp_helpers import require_extension
from fastvae import _extension
from fastvae.ops import decode, loss, philox, reparam

require_extension()

OPS = torch.ops.fastvae
DTYPES = [torch.float32, torch.float64]
SEED = (7 << 32) + 12345  # both key words non-zero


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def latents(rows, dim, dtype):
    mu = torch.randn(rows, dim, dtype=torch.float64)
    logvar = torch.rand(rows, dim, dtype=torch.float64) * 6 - 3
    return mu.to(dtype), logvar.to(dtype)


# ---- Philox -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 4, 5, 127, 4099])
@pytest.mark.parametrize("seed", [0, SEED, 2**63 - 1])
def test_eps_equals_philox_reference(n, seed):
    z, _ = OPS.reparam_forward(torch.zeros(1, n), torch.zeros(1, n), seed, 1)
    torch.testing.assert_close(z.flatten(), philox.randn(seed, n), rtol=1e-5, atol=1e-6)


def test_eps_of_k_samples_is_one_stream_at_any_offset():
    # (k, B, L) = (3, 7, 5): element offsets not multiples of 4 in every row and sample
    eps = reparam.draw_eps(torch.zeros(7, 5), torch.zeros(7, 5), seed=SEED, k=3, backend="cpp")
    torch.testing.assert_close(eps, philox.randn(SEED, 105).view(3, 7, 5), rtol=1e-5, atol=1e-6)
    assert eps.std() > 0.5 and not torch.equal(eps[0], eps[1])


# ---- reparam + KL -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim,k", [(1, 1, None), (7, 3, 2), (33, 20, None), (3001, 20, 3), (5, 257, None)])
def test_reparam_kl_values_and_gradients_equal_float64_reference(dtype, rows, dim, k):
    mu, logvar = latents(rows, dim, dtype)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl = reparam.reparameterize_kl(mu, logvar, k=k, seed=SEED, backend="cpp")
    shape = (rows, dim) if k is None else (k, rows, dim)
    assert z.shape == shape and kl.shape == (rows,) and z.dtype == dtype and kl.dtype == dtype

    mu64, lv64 = (t.detach().double().requires_grad_(True) for t in (mu, logvar))
    eps = philox.randn(SEED, z.numel()).view(shape).double()
    z_ref = reparam.reparam_reference(mu64, lv64, eps)
    kl_ref = reparam.kl_rows_reference(mu64, lv64)
    # eps is float32 on both sides (one ulp apart at most), so z is compared at float32 precision
    torch.testing.assert_close(z.double(), z_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), **tol(dtype))

    w_z, w_kl = torch.randn(shape, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    ((z * w_z.to(dtype)).sum() + (kl * w_kl.to(dtype)).sum()).backward()
    ((z_ref * w_z).sum() + (kl_ref * w_kl).sum()).backward()
    torch.testing.assert_close(mu.grad.double(), mu64.grad, **tol(dtype))
    torch.testing.assert_close(logvar.grad.double(), lv64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_backward_without_kl_gradient_equals_zero_kl_gradient(dtype):
    mu, logvar = latents(9, 11, dtype)
    z, _ = OPS.reparam_forward(mu, logvar, SEED, 2)
    gz = torch.randn_like(z)
    none = OPS.reparam_backward(gz, None, mu, logvar, z)
    zero = OPS.reparam_backward(gz, torch.zeros(9, dtype=dtype), mu, logvar, z)
    for a, b in zip(none, zero):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(none[0], gz.sum(0), **tol(dtype))


def test_reparam_seed_reproducible_and_streams_differ():
    mu, logvar = latents(16, 20, torch.float32)
    a = reparam.reparameterize(mu, logvar, seed=1, backend="cpp")
    assert torch.equal(a, reparam.reparameterize(mu, logvar, seed=1, backend="cpp"))
    assert not torch.equal(a, reparam.reparameterize(mu, logvar, seed=2, backend="cpp"))


# ---- loss ------------------------------------------------------------------------------------

def loss_inputs(rows, dim, latent, dtype, target):
    logits = (torch.randn(rows, dim, dtype=torch.float64) * 4).to(dtype)
    if target == "uint8":
        x = torch.randint(0, 256, (rows, dim), dtype=torch.uint8)
    else:
        x = torch.rand(rows, dim, dtype=torch.float64).to(dtype)
    return logits, x, *latents(rows, latent, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("target", ["float", "uint8"])
@pytest.mark.parametrize("rows,dim,latent", [(1, 1, 1), (7, 13, 3), (33, 784, 20), (2003, 37, 5)])
def test_loss_values_and_gradients_equal_float64_reference(dtype, likelihood, target, rows, dim, latent):
    logits, x, mu, logvar = loss_inputs(rows, dim, latent, dtype, target)
    beta = 0.7
    leaves = [t.requires_grad_(True) for t in (logits, mu, logvar)]
    terms = loss.loss_terms(logits, x, mu, logvar, beta=beta, reduction="none", likelihood=likelihood, backend="cpp")

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    x64 = x.double() / 255 if x.dtype == torch.uint8 else x.double()
    recon_ref = loss.recon_rows_reference(ref_leaves[0], x64, likelihood)
    kl_ref = reparam.kl_rows_reference(*ref_leaves[1:])
    rows_ref = recon_ref + beta * kl_ref
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(terms, (rows_ref, recon_ref, kl_ref)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=rtol * dim)

    w = torch.rand(rows, dtype=torch.float64) + 0.5  # a non-trivial upstream gradient per row
    (terms.loss * w.to(terms.loss.dtype)).sum().backward()
    (rows_ref * w).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want.grad, **tol(dtype))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_reductions_equal_torch_backend(reduction):
    logits, x, mu, logvar = loss_inputs(65, 100, 8, torch.float32, "float")
    a = loss.loss_terms(logits, x, mu, logvar, beta=2.0, reduction=reduction, backend="cpp")
    b = loss.loss_terms(logits, x, mu, logvar, beta=2.0, reduction=reduction, backend="torch")
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_logits_pm100_exact(dtype):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0, -30.0]], dtype=dtype)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.75]], dtype=dtype)
    mu, logvar = latents(1, 3, dtype)
    recon, _, g, _, _ = OPS.loss_forward(logits, x, mu, logvar, 1.0, False, True)
    l64, x64 = logits.double().requires_grad_(True), x.double()
    want = F.binary_cross_entropy_with_logits(l64, x64, reduction="sum")
    want.backward()
    torch.testing.assert_close(recon.double(), want.detach().reshape(1), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(g.double(), l64.grad, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(recon).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_nan_inf_logits_behave_as_torch(dtype):
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 100.0, -100.0], dtype=dtype)
    targets = torch.tensor([0.0, 1.0, 0.5], dtype=dtype)
    logits = specials.repeat_interleave(len(targets)).reshape(-1, 1)
    x = targets.repeat(len(specials)).reshape(-1, 1)
    mu, logvar = latents(len(logits), 2, dtype)
    recon, _, g, _, _ = OPS.loss_forward(logits, x, mu, logvar, 1.0, False, True)
    l = logits.clone().requires_grad_(True)
    want = F.binary_cross_entropy_with_logits(l, x, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(recon, want.detach().reshape(-1), equal_nan=True, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(g, l.grad, equal_nan=True, rtol=1e-6, atol=1e-30)
    # (atol: exp(-100) is a float32 denormal that Sleef flushes to 0)
    # through the public API with the value checks off, the rows carry the same NaN/Inf
    with fastvae.value_checks(False):
        rows = loss.loss_terms(logits, x, mu, logvar, reduction="none", backend="cpp").recon
    torch.testing.assert_close(rows, want.detach().reshape(-1), equal_nan=True, rtol=1e-6, atol=1e-30)


def test_loss_softplus_term_alone_is_float_accurate_per_element():
    """Targets x = (l > 0) leave only log1p(exp(-|l|)) per element: the float32 kernel's polynomial
    log1p must stay within a few ulp of float64, relative, from |l| = 0 to 80 (exp(-80) is still a normal float)."""
    l = torch.cat([torch.linspace(-30, 30, 200_001), torch.tensor([0.0, 1e-8, -1e-8, 80.0, -80.0])]).view(-1, 1)
    x = (l > 0).float()
    mu, logvar = torch.zeros(len(l), 1), torch.zeros(len(l), 1)
    recon, _, _, _, _ = _extension.load_ops("loss", "cpu").loss_forward(l, x, mu, logvar, 1.0, "bernoulli", False)
    want = torch.log1p(torch.exp(-l.double().abs())).view(-1)
    rel = ((recon.double() - want).abs() / want.clamp_min(1e-300))[want > 0]
    assert rel.max().item() < 4e-7, rel.max().item()


def test_loss_without_gradients_returns_none():
    logits, x, mu, logvar = loss_inputs(5, 9, 2, torch.float32, "float")
    _, _, g_logits, g_mu, g_logvar = _extension.load_ops("loss", "cpu").loss_forward(logits, x, mu, logvar, 1.0, "bernoulli", False)
    assert g_logits is None and g_mu is None and g_logvar is None


def test_loss_float_target_of_other_dtype_is_converted():
    logits, x, mu, logvar = loss_inputs(6, 50, 4, torch.float64, "float")
    a = loss.loss_terms(logits, x.float(), mu, logvar, reduction="none", backend="cpp").loss
    b = loss.loss_terms(logits, x.float().double(), mu, logvar, reduction="none", backend="torch").loss
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- decode tail -----------------------------------------------------------------------------

def decode_values(n, dtype, from_logits):
    if from_logits:
        v = torch.randn(n, dtype=torch.float64) * 6
        v[:4] = torch.tensor([100.0, -100.0, 0.0, 1e-3])[: min(4, n)]
    else:  # probabilities, some outside [0, 1] (clamped) and some on quantisation boundaries
        v = torch.rand(n, dtype=torch.float64) * 1.2 - 0.1
        v[: min(n, 64)] = (torch.arange(min(n, 64), dtype=torch.float64) * 4 + 0.5) / 255
    return v.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.uint8, "same", torch.float16])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (129, 785)])
def test_to_image_equals_reference_and_writes_every_element(dtype, out_dtype, from_logits, shape):
    out_dtype = dtype if out_dtype == "same" else out_dtype
    values = decode_values(shape[0] * shape[1], dtype, from_logits).view(shape)
    out = torch.full(shape, 77, dtype=torch.uint8) if out_dtype == torch.uint8 else torch.full(shape, float("nan"), dtype=out_dtype)
    want = torch.empty_like(out)
    decode.to_image_reference(values, want, from_logits)
    _extension.load_ops("decode", "cpu").to_image(values, out, from_logits)
    if out_dtype == torch.uint8:
        # exact, except where sigmoid's last bit (Sleef vs torch) lands on a rounding boundary
        diff = (out.int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        if not from_logits:
            assert torch.equal(out, want)
    else:
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, **(tol(dtype) if out_dtype == dtype else {}))


def test_decode_latents_cpp_equals_torch_backend():
    model = fastvae.VAE(hidden_dims=(32,), latent_dim=4).eval()
    a = decode.decode_latents(model, n=37, latent_dim=4, seed=3, out_dtype=torch.uint8, backend="cpp", chunk_size=10)
    b = decode.decode_latents(model, n=37, latent_dim=4, seed=3, out_dtype=torch.uint8, backend="torch")
    assert (a.int() - b.int()).abs().max() <= 1
    p = decode.decode_latents(model, n=37, latent_dim=4, seed=3, backend="cpp")
    torch.testing.assert_close(p, decode.decode_latents(model, n=37, latent_dim=4, seed=3, backend="torch"))


# ---- both CPU code paths -----------------------------------------------------------------------

def test_baseline_cpu_path_matches_when_avx2_is_disabled(tmp_path):
    """ATEN_CPU_CAPABILITY=default runs the portable (non-AVX2) copy of the kernels: same results."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import torch\nfrom fastvae import _extension\nfrom fastvae.ops import philox\n_extension.library()\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "torch.manual_seed(0)\nl = torch.randn(37, 91) * 5; x = torch.rand(37, 91); m = torch.randn(37, 7); v = torch.randn(37, 7)\n"
        "r, k, g, gm, gv = torch.ops.fastvae.loss_forward(l, x, m, v, 1.0, False, True)\n"
        "torch.testing.assert_close(r, torch.nn.functional.binary_cross_entropy_with_logits(l, x, reduction='none').sum(1))\n"
        "torch.testing.assert_close(g, torch.sigmoid(l) - x)\n"
        "z, kl = torch.ops.fastvae.reparam_forward(torch.zeros(1, 1001), torch.zeros(1, 1001), 99, 1)\n"
        "torch.testing.assert_close(z.flatten(), philox.randn(99, 1001), rtol=1e-5, atol=1e-6)\n"
        "print('ok')\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
