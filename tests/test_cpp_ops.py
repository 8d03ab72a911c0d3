"""The C++ CPU kernels (backend="cpp") against float64 PyTorch references: values, gradients, value-check
flags, tensor seeds and betas, the folded scale, scale_grads, and both CPU copies (AVX2 and baseline).

Every output the ops allocate is NaN-poisoned first (fastvae._C._poison_outputs), so an element a
kernel forgets to write fails the comparison."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastvae
from cpp_helpers import require_extension
from fastvae import _checks, _extension
from fastvae.ops import decode, loss, philox, reparam

require_extension()

C = _extension.library()
OPS = torch.ops.fastvae
DTYPES = [torch.float32, torch.float64]
SEED = (7 << 32) + 12345  # both key words non-zero
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def poisoned():
    C._poison_outputs(True)
    yield
    C._poison_outputs(False)


@pytest.fixture
def baseline_copy():
    """Run the portable (non-AVX2) copy of the kernels for the test's duration."""
    C._force_isa(0)
    yield
    C._force_isa(-1)


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def latents(rows, dim, dtype):
    mu = torch.randn(rows, dim, dtype=torch.float64)
    logvar = torch.rand(rows, dim, dtype=torch.float64) * 6 - 3
    return mu.to(dtype), logvar.to(dtype)


def flag_word(value=0):
    return torch.tensor([value], dtype=torch.int32)


def fwd(mu, logvar, seed=SEED, k=1, need_kl=True, flags=None, seed_t=None):
    return OPS.reparam_forward(mu, logvar, seed_t, seed, k, need_kl, flags)


def bwd(grad_z, grad_kl, mu, logvar, z, seed=SEED, seed_t=None):
    return OPS.reparam_backward(grad_z, grad_kl, mu, logvar, z, seed_t, seed, z.shape[0])


def loss_op(logits, x, mu, logvar, beta=1.0, gaussian=False, need_grad=True, scale=1.0, flags=None, beta_t=None):
    return OPS.loss_forward(logits, x, mu, logvar, beta_t, beta, gaussian, need_grad, scale, flags)


def padded(t):
    """`t` as a view whose storage continues with NaN: a kernel reading past the end would see (and flag) it."""
    storage = torch.full((t.numel() + 67,), NAN, dtype=t.dtype) if t.is_floating_point() else torch.zeros(t.numel() + 67, dtype=t.dtype)
    storage[: t.numel()] = t.flatten()
    return storage[: t.numel()].view(t.shape)


def test_kernels_are_built_with_openmp():
    """at::parallel_for is an OpenMP pragma inlined from ATen's headers: built without -fopenmp, every
    CPU kernel silently runs on one thread."""
    assert b"GOMP_parallel" in Path(C.__file__).read_bytes()


def test_flag_bits_and_bound_agree_with_python():
    names = {name: getattr(_checks, name) for name in dir(_checks) if name.startswith("FLAG_")}
    assert C.FLAGS == names and len(names) == 6
    assert C.MAX_LOGVAR == _checks.MAX_LOGVAR


# ---- Philox -----------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", [1, 0])
@pytest.mark.parametrize("seed", [0, SEED, 2**63 - 1])
@pytest.mark.parametrize("first", [0, 2**32 - 3, 2**40 + 5])  # 2**32 - 3: the low counter word wraps inside a batch
def test_philox_words_equal_reference_bit_for_bit(isa, seed, first):
    C._force_isa(isa)
    try:
        got = C._philox_words(seed, first, 37)
    finally:
        C._force_isa(-1)
    want = torch.stack(philox.philox4x32(seed, torch.arange(first, first + 37)), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 127, 4099])
@pytest.mark.parametrize("seed", [0, SEED, 2**63 - 1])
def test_eps_equals_philox_reference(n, seed):
    # same words (above); the normals differ from torch's Sleef log/cos/sin by a few ulp at most
    z, _ = fwd(torch.zeros(1, n), torch.zeros(1, n), seed=seed)
    torch.testing.assert_close(z.flatten(), philox.randn(seed, n), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", [0, 1, 2, 3, 4097, 2**33 + 2])
def test_gpu_kernels_scalar_normals_equal_reference_at_any_offset(first):
    """philox.h's philox_normals_at (what the CUDA kernels run, here compiled for the host): the stream
    at offsets that are not multiples of 4 takes two counters and shifts the window."""
    got = C._philox_normals(SEED, first, 23)
    torch.testing.assert_close(got, philox.randn(SEED, 23, offset=first), rtol=1e-6, atol=1e-6)


def test_eps_of_k_samples_is_one_stream_at_any_offset():
    # (k, B, L) = (3, 7, 5): element offsets not multiples of 4 in every row and sample
    eps = reparam.draw_eps(torch.zeros(7, 5), torch.zeros(7, 5), seed=SEED, k=3, backend="cpp")
    torch.testing.assert_close(eps, philox.randn(SEED, 105).view(3, 7, 5), rtol=1e-6, atol=1e-6)
    assert eps.std() > 0.5 and not torch.equal(eps[0], eps[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_seed_draws_the_int_seed_stream_bit_for_bit(dtype):
    mu, logvar = latents(37, 13, dtype)
    z_int, kl_int = fwd(mu, logvar, seed=SEED, k=3)
    z_t, kl_t = fwd(mu, logvar, seed=0, k=3, seed_t=torch.tensor(SEED))
    assert torch.equal(z_int, z_t) and torch.equal(kl_int, kl_t)
    gz, gk = torch.randn_like(z_int), torch.randn(37, dtype=dtype)
    for a, b in zip(bwd(gz, gk, mu, logvar, z_int), bwd(gz, gk, mu, logvar, z_t, seed=0, seed_t=torch.tensor(SEED))):
        assert torch.equal(a, b)
    assert not torch.equal(z_int, fwd(mu, logvar, seed=0, k=3, seed_t=torch.tensor(SEED + 1))[0])


def test_bad_seed_tensors_are_refused():
    mu, logvar = latents(2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="seed_t must be a 0-dim"):
        fwd(mu, logvar, seed_t=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="seed_t must be a 0-dim"):
        fwd(mu, logvar, seed_t=torch.tensor(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seed >= 0"):
        fwd(mu, logvar, seed_t=torch.tensor(-5))
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        fwd(mu, logvar, seed=-1)


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
    # eps is float32 on both sides (a few ulp apart), so z is compared at float32 precision
    torch.testing.assert_close(z.double(), z_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), **tol(dtype))

    w_z, w_kl = torch.randn(shape, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    ((z * w_z.to(dtype)).sum() + (kl * w_kl.to(dtype)).sum()).backward()
    ((z_ref * w_z).sum() + (kl_ref * w_kl).sum()).backward()
    torch.testing.assert_close(mu.grad.double(), mu64.grad, **tol(dtype))
    torch.testing.assert_close(logvar.grad.double(), lv64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_without_kl_draws_the_same_z_and_returns_no_rows(dtype):
    mu, logvar = latents(11, 9, dtype)
    z, kl = fwd(mu, logvar, k=2)
    z2, none = fwd(mu, logvar, k=2, need_kl=False)
    assert torch.equal(z, z2) and none.numel() == 0
    impl = _extension.load_ops("reparam", "cpu")
    assert impl.tensor_seed and impl.reparam_forward(mu, logvar, SEED, 2, False, None)[1] is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_backward_without_kl_gradient_equals_zero_kl_gradient(dtype):
    mu, logvar = latents(9, 11, dtype)
    z, _ = fwd(mu, logvar, k=2)
    gz = torch.randn_like(z)
    none = bwd(gz, None, mu, logvar, z)
    zero = bwd(gz, torch.zeros(9, dtype=dtype), mu, logvar, z)
    for a, b in zip(none, zero):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(none[0], gz.sum(0), **tol(dtype))


def test_zero_width_rows_are_empty_sums_not_crashes():
    mu = torch.zeros(3, 0)
    z, kl = fwd(mu, mu, k=2, flags=flag_word())
    assert z.shape == (2, 3, 0) and torch.equal(kl, torch.zeros(3))
    assert all(g.shape == (3, 0) for g in bwd(z, torch.ones(3), mu, mu, z))
    recon, kl, g, g_mu, _ = loss_op(torch.zeros(3, 0), torch.zeros(3, 0), mu, mu, flags=flag_word())
    assert torch.equal(recon, torch.zeros(3)) and torch.equal(kl, torch.zeros(3)) and g.shape == (3, 0) and g_mu.shape == (3, 0)


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
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_scale_is_folded_into_the_gradients_only(dtype, likelihood):
    logits, x, mu, logvar = loss_inputs(37, 29, 6, dtype, "float")
    one = loss_op(logits, x, mu, logvar, beta=0.7, gaussian=likelihood == "gaussian")
    for scale in (0.25, 1 / 37):
        got = loss_op(logits, x, mu, logvar, beta=0.7, gaussian=likelihood == "gaussian", scale=scale)
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
        for g, g1 in zip(got[2:], one[2:]):
            if scale == 0.25:  # a power of two: exactly the scaled gradient
                assert torch.equal(g, g1 * scale)
            torch.testing.assert_close(g, g1 * scale, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_beta_equals_float_beta_bit_for_bit(dtype):
    logits, x, mu, logvar = loss_inputs(19, 23, 7, dtype, "float")
    a = loss_op(logits, x, mu, logvar, beta=0.7, scale=0.5)
    b = loss_op(logits, x, mu, logvar, beta=0.0, scale=0.5, beta_t=torch.tensor(0.7, dtype=torch.float64))
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    impl = _extension.load_ops("loss", "cpu")
    c = impl.loss_forward(logits, x, mu, logvar, torch.tensor(0.7, dtype=torch.float64), "bernoulli", True, 0.5, None)
    for p, q in zip(a, c):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="beta_t must be a 0-dim Double"):
        loss_op(logits, x, mu, logvar, beta_t=torch.tensor(0.7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_logits_pm100_exact(dtype):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0, -30.0]], dtype=dtype)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.75]], dtype=dtype)
    mu, logvar = latents(1, 3, dtype)
    recon, _, g, _, _ = loss_op(logits, x, mu, logvar)
    l64, x64 = logits.double().requires_grad_(True), x.double()
    want = F.binary_cross_entropy_with_logits(l64, x64, reduction="sum")
    want.backward()
    torch.testing.assert_close(recon.double(), want.detach().reshape(1), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(g.double(), l64.grad, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(recon).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_nan_inf_logits_behave_as_torch(dtype):
    specials = torch.tensor([NAN, INF, -INF, 100.0, -100.0], dtype=dtype)
    targets = torch.tensor([0.0, 1.0, 0.5], dtype=dtype)
    logits = specials.repeat_interleave(len(targets)).reshape(-1, 1)
    x = targets.repeat(len(specials)).reshape(-1, 1)
    mu, logvar = latents(len(logits), 2, dtype)
    recon, _, g, _, _ = loss_op(logits, x, mu, logvar)
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


# ---- value-check flags -----------------------------------------------------------------------

F_LOGITS, F_X, F_RANGE, F_MU, F_LV, F_HIGH = (getattr(_checks, n) for n in (
    "FLAG_LOGITS_NONFINITE", "FLAG_X_NONFINITE", "FLAG_X_RANGE", "FLAG_MU_NONFINITE", "FLAG_LOGVAR_NONFINITE", "FLAG_LOGVAR_HIGH"))
LOSS_CASES = [  # (argument, bad value, bits for the Bernoulli likelihood, bits for the Gaussian one)
    ("logits", NAN, F_LOGITS, F_LOGITS), ("logits", INF, F_LOGITS, F_LOGITS), ("logits", -INF, F_LOGITS, F_LOGITS),
    ("x", NAN, F_X, F_X), ("x", INF, F_X | F_RANGE, F_X), ("x", -INF, F_X | F_RANGE, F_X),
    ("x", -0.25, F_RANGE, 0), ("x", 1.5, F_RANGE, 0), ("x", 1.0, 0, 0), ("x", 0.0, 0, 0),
    ("mu", NAN, F_MU, F_MU), ("mu", -INF, F_MU, F_MU), ("mu", 1e30, 0, 0),
    ("logvar", NAN, F_LV, F_LV), ("logvar", INF, F_LV, F_LV), ("logvar", -INF, F_LV, F_LV),
    ("logvar", 88.5, F_HIGH, F_HIGH), ("logvar", 1e30, F_HIGH, F_HIGH), ("logvar", 88.0, 0, 0), ("logvar", -1e30, 0, 0),
]


def _poke(t, value, where):
    t = t.clone()
    flat = t.view(-1)
    flat[{"first": 0, "last": flat.numel() - 1, "middle": flat.numel() // 2}[where]] = value
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("arg,value,bits_b,bits_g", LOSS_CASES)
def test_loss_flags_each_bad_value_alone(dtype, where, likelihood, arg, value, bits_b, bits_g):
    args = dict(zip(("logits", "x", "mu", "logvar"), loss_inputs(5, 13, 5, dtype, "float")))  # 13, 5: vector tails
    args[arg] = _poke(args[arg], value, where)
    flags = flag_word()
    loss_op(*args.values(), gaussian=likelihood == "gaussian", flags=flags)
    assert flags.item() == (bits_b if likelihood == "bernoulli" else bits_g)


def test_loss_flags_combine_and_are_never_cleared():
    logits, x, mu, logvar = loss_inputs(6, 21, 3, torch.float32, "float")
    flags = flag_word(64)  # a bit no kernel uses: ORed into, never cleared
    loss_op(logits, x, mu, logvar, flags=flags)
    assert flags.item() == 64
    loss_op(_poke(logits, NAN, "last"), _poke(x, 2.0, "first"), mu, _poke(logvar, 100.0, "middle"), flags=flags)
    assert flags.item() == 64 | F_LOGITS | F_RANGE | F_HIGH
    loss_op(logits, x, _poke(mu, INF, "first"), logvar, need_grad=False, flags=flags)
    assert flags.item() == 64 | F_LOGITS | F_RANGE | F_HIGH | F_MU


def test_loss_uint8_targets_never_flag_and_no_flags_means_no_checks():
    logits, x, mu, logvar = loss_inputs(4, 30, 2, torch.float32, "uint8")
    flags = flag_word()
    loss_op(logits, x, mu, logvar, flags=flags)
    assert flags.item() == 0
    recon, *_ = loss_op(_poke(logits, NAN, "first"), x, mu, logvar, flags=None)  # no flag word: nothing is checked
    assert recon[0].isnan()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["float", "uint8"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 13, 5), (9, 7, 3), (2, 33, 17)])
def test_padding_lanes_never_flag_nor_read_past_the_end(dtype, target, shape):
    clean = loss_inputs(*shape, dtype, target)
    ends_in_nan = [padded(t) for t in clean]  # the memory after each tensor holds NaN
    flags = flag_word()
    got = loss_op(*ends_in_nan, flags=flags)
    assert flags.item() == 0
    for a, b in zip(got, loss_op(*clean)):
        assert torch.equal(a, b)
    mu, logvar = ends_in_nan[2:]
    for k in (1, 2):
        z, kl = fwd(mu, logvar, k=k, flags=flags)
        assert flags.item() == 0 and torch.isfinite(z).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_kl", [True, False])
@pytest.mark.parametrize("arg,value,bits", [(a, v, b) for a, v, b, _ in LOSS_CASES if a in ("mu", "logvar")])
def test_reparam_flags_each_bad_value_alone(dtype, need_kl, arg, value, bits):
    args = dict(zip(("mu", "logvar"), latents(7, 5, dtype)))
    args[arg] = _poke(args[arg], value, "last")
    flags = flag_word()
    fwd(args["mu"], args["logvar"], k=2, need_kl=need_kl, flags=flags)
    assert flags.item() == bits


def test_reparam_flags_combine():
    mu, logvar = latents(3, 41, torch.float32)
    flags = flag_word()
    fwd(_poke(mu, NAN, "first"), _poke(_poke(logvar, INF, "first"), 90.0, "last"), flags=flags)
    assert flags.item() == F_MU | F_LV | F_HIGH


# ---- scale_grads -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grads_is_a_noop_at_one_and_exact_otherwise(dtype):
    grads = [torch.randn(7, 13, dtype=dtype), torch.randn(7, 3, dtype=dtype), torch.randn(7, 3, dtype=dtype)]
    before = [g.clone() for g in grads]
    OPS.scale_grads(torch.tensor(1.0, dtype=dtype), grads)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))
    OPS.scale_grads(torch.tensor(2.5, dtype=dtype), grads)
    assert all(torch.equal(g, b * 2.5) for g, b in zip(grads, before))
    rows = torch.rand(7, dtype=dtype) + 0.5
    _extension.load_ops("loss", "cpu").scale_grads(rows, grads)
    assert all(torch.equal(g, b * 2.5 * rows[:, None]) for g, b in zip(grads, before))
    with pytest.raises(RuntimeError, match="needs grads of 6 rows"):
        OPS.scale_grads(torch.ones(6, dtype=dtype), grads)


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
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (129, 785)])
def test_to_image_equals_reference_and_writes_every_element(dtype, from_logits, shape):
    values = decode_values(shape[0] * shape[1], dtype, from_logits).view(shape)
    out = torch.full(shape, 77, dtype=torch.uint8)
    want = torch.empty_like(out)
    decode.to_image_reference(values, want, from_logits)
    _extension.load_ops("decode", "cpu").to_image(values, out, from_logits)
    # exact, except where sigmoid's last bit (Sleef vs torch) lands on a rounding boundary
    diff = (out.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    if not from_logits:
        assert torch.equal(out, want)


def test_to_image_writes_uint8_only():
    """A float output is torch.sigmoid's (decode_latents never asks the kernel for one)."""
    with pytest.raises(RuntimeError, match="to_image writes uint8 images"):
        _extension.load_ops("decode", "cpu").to_image(torch.randn(3, 4), torch.empty(3, 4), True)


def test_decode_latents_cpp_equals_torch_backend():
    model = fastvae.VAE(hidden_dims=(32,), latent_dim=4).eval()
    a = decode.decode_latents(model, n=37, latent_dim=4, seed=3, out_dtype=torch.uint8, backend="cpp", chunk_size=10)
    b = decode.decode_latents(model, n=37, latent_dim=4, seed=3, out_dtype=torch.uint8, backend="torch")
    assert (a.int() - b.int()).abs().max() <= 1
    p = decode.decode_latents(model, n=37, latent_dim=4, seed=3, backend="cpp")
    torch.testing.assert_close(p, decode.decode_latents(model, n=37, latent_dim=4, seed=3, backend="torch"))


# ---- both CPU copies ---------------------------------------------------------------------------

def _all_ops(dtype, target):
    """Every CPU op on awkward sizes with a few bad values: (output, whether it depends on eps), in order."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 91, generator=gen, dtype=torch.float64).mul(5).to(dtype)
    x = torch.randint(0, 256, (37, 91), generator=gen, dtype=torch.uint8) if target == "uint8" else torch.rand(37, 91, generator=gen, dtype=torch.float64).to(dtype)
    mu, logvar = torch.randn(37, 7, generator=gen, dtype=torch.float64).to(dtype), torch.randn(37, 7, generator=gen, dtype=torch.float64).to(dtype)
    out = []
    for gaussian in (False, True):
        flags = flag_word()
        out += [*loss_op(logits, x, mu, logvar, beta=0.3, gaussian=gaussian, scale=0.1, flags=flags), flags]
    flags = flag_word()
    if target != "uint8":
        loss_op(_poke(logits, INF, "middle"), _poke(x, -1.0, "last"), mu, _poke(logvar, 89.0, "first"), flags=flags)
    out.append(flags)
    flags = flag_word()
    z, kl = fwd(mu, logvar, k=3, flags=flags)
    grad_z = torch.randn(z.shape, generator=gen, dtype=torch.float64).to(dtype)
    return [(t, False) for t in out] + [(z, True), (kl, False), *((g, True) for g in bwd(grad_z, kl * 0 + 0.5, mu, logvar, z)), (flags, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["float", "uint8"])
def test_baseline_copy_agrees_with_avx2_copy(dtype, target):
    avx2 = _all_ops(dtype, target)
    C._force_isa(0)
    try:
        base = _all_ops(dtype, target)
    finally:
        C._force_isa(-1)
    for (a, from_eps), (b, _) in zip(avx2, base):
        if a.dtype == torch.int32:
            assert torch.equal(a, b)
        else:  # Sleef vs libm exp/log and FMA contraction: rounding differences (eps is float32 in both dtypes)
            close = 2e-6 if dtype == torch.float32 or from_eps else 1e-12
            torch.testing.assert_close(a, b, rtol=close, atol=close)


def test_aten_cpu_capability_default_selects_the_baseline_copy(baseline_copy, tmp_path):
    """ATEN_CPU_CAPABILITY=default (honoured by fastvae) runs the baseline copy: bit-equal to it here."""
    l, x, m, v = torch.randn(37, 91) * 5, torch.rand(37, 91), torch.randn(37, 7), torch.randn(37, 7)
    torch.save([l, x, m, v], tmp_path / "in.pt")
    script = ("import sys, torch, fastvae._extension as e\ne.library()\n"
              "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
              "l, x, m, v = torch.load(sys.argv[1])\n"
              "out = torch.ops.fastvae.loss_forward(l, x, m, v, None, 1.0, False, True, 1.0, None)\n"
              "z, kl = torch.ops.fastvae.reparam_forward(m, v, None, 99, 2, True, None)\n"
              "torch.save([*out, z, kl], sys.argv[2])\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    want = [*loss_op(l, x, m, v), *fwd(m, v, seed=99, k=2)]
    assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "out.pt"), want))
