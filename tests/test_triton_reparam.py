"""Triton reparameterisation + KL (interpreted on CPU): Philox eps, values and gradients vs float64."""
import pytest
import torch
import triton

from triton_helpers import assert_finite, flag_word, launches, nan_tailed, poisoned, specialization, strict  # noqa: F401 - fixtures
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


def test_declares_tensor_seeds():
    assert kernels.tensor_seed is True


@pytest.mark.parametrize("batch,latent,k", [(1, 1, 1), (7, 13, 3), (33, 20, 2)])
@pytest.mark.parametrize("seed", [0, 16, 2**63 - 1])
def test_tensor_seed_is_the_int_seed_stream(batch, latent, k, seed, poisoned):
    mu, logvar = torch.randn(batch, latent), torch.randn(batch, latent)
    z, kl = kernels.reparam_forward(mu, logvar, seed, k)
    z_t, kl_t = kernels.reparam_forward(mu, logvar, torch.tensor(seed), k)
    assert torch.equal(z, z_t) and torch.equal(kl, kl_t)
    grad_z, grad_kl = torch.randn(k, batch, latent), torch.randn(batch)
    for a, b in zip(kernels.reparam_backward(grad_z, grad_kl, mu, logvar, z, seed, k),
                    kernels.reparam_backward(grad_z, grad_kl, mu, logvar, z, torch.tensor(seed), k)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["_forward", "_backward"])
def test_seeds_do_not_recompile(kernel):
    """Triton specialises integers divisible by 16 (and 1): a random seed would compile the kernel
    again one call in 16. The launch-cache key must not depend on the seed."""
    mu = torch.randn(64, 20)

    def launch(seed):
        if kernel == "_forward":
            return launches(kernels.reparam_forward, mu, mu, seed, 1, False, None)[0]
        return launches(kernels.reparam_backward, mu[None], None, mu, mu, mu[None], seed, 1)[0]

    seeds = [0, 1, 16, 17, 2**31 + 16, 2**40 + 3, 2**63 - 1]
    keys = {specialization(fn, args, kw) for fn, _, args, kw in map(launch, seeds)}
    assert len(keys) == 1, keys
    fn, _, args, kw = launch(0)
    unprotected = {specialization(fn, args[:-4] + (s,) + args[-3:], kw, respect_do_not_specialize=False) for s in seeds}
    assert len(unprotected) > 1  # the check can fail: without do_not_specialize the key follows the seed


def test_backward_regenerates_eps_and_never_reads_z(poisoned):
    mu, logvar = torch.randn(9, 20, dtype=torch.float64), torch.randn(9, 20, dtype=torch.float64)
    z, _ = kernels.reparam_forward(mu, logvar, 4, 3)
    grad_z, grad_kl = torch.randn(3, 9, 20, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    expected = kernels.reparam_backward(grad_z, grad_kl, mu, logvar, z, 4, 3)
    got = kernels.reparam_backward(grad_z, grad_kl, mu, logvar, torch.full_like(z, float("nan")), 4, 3)
    assert_finite(*got)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_low_precision_gradients_equal_float32_autograd_with_the_same_eps(dtype, tol):
    """grad_logvar needs eps * std, which z - mu loses when z is rounded to bfloat16 (small std).
    tol: one rounding to `dtype` (the interpreter rounds toward zero: two units of roundoff)."""
    batch, latent, k, seed = 33, 20, 2, 99
    mu = (torch.randn(batch, latent) * 3).to(dtype)
    logvar = (torch.randn(batch, latent) - 8).to(dtype)  # std ~ 0.02
    grad_z, grad_kl = torch.randn(k, batch, latent).to(dtype), torch.randn(batch)
    m, lv = mu.float().requires_grad_(), logvar.float().requires_grad_()
    eps = philox.randn(seed, k * batch * latent).view(k, batch, latent)
    torch.autograd.backward([m + eps * torch.exp(0.5 * lv), kl_rows_reference(m, lv)], [grad_z.float(), grad_kl])
    z, _ = kernels.reparam_forward(mu, logvar, seed, k)
    g_mu, g_lv = kernels.reparam_backward(grad_z, grad_kl, mu, logvar, z, seed, k)
    assert g_mu.dtype == dtype and g_lv.dtype == dtype
    torch.testing.assert_close(g_mu.float(), m.grad, rtol=tol, atol=1e-6 * m.grad.abs().max().item())
    torch.testing.assert_close(g_lv.float(), lv.grad, rtol=tol, atol=1e-6 * lv.grad.abs().max().item())
    from_z = 0.5 * (grad_z.float() * (z.float() - mu.float())).sum(0) + grad_kl[:, None] * 0.5 * (logvar.float().exp() - 1)
    assert ((from_z - lv.grad).abs() > 10 * tol * lv.grad.abs()).any()  # the test tells the two apart


@pytest.mark.parametrize("batch,latent,k", [(5, 7, 3), (3, 1, 4), (2, 3, 2)])
def test_gradients_when_samples_straddle_philox_counters(batch, latent, k):
    """B * L % 4 != 0: sample s > 0 starts mid-counter; the backward still sums eps by element."""
    mu, logvar = torch.randn(batch, latent, dtype=torch.float64), torch.randn(batch, latent, dtype=torch.float64)
    w_z, w_kl = torch.randn(k, batch, latent, dtype=torch.float64), torch.randn(batch, dtype=torch.float64)
    got, ref = _grads("triton", mu, logvar, 7, k, w_z, w_kl), _grads("torch", mu, logvar, 7, k, w_z, w_kl)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for rows, groups in [(1, 1), (4, 2)] if batch == 5 else []:  # programs and loop steps that split groups of 4
        z, kl = kernels.reparam_forward(mu, logvar, 7, k, block_rows=rows, block_groups=groups)
        assert torch.equal(z, got[0])
        grads = kernels.reparam_backward(w_z, w_kl, mu, logvar, z, 7, k, block_rows=rows, block_groups=groups)
        for a, b in zip(grads, kernels.reparam_backward(w_z, w_kl, mu, logvar, z, 7, k)):
            assert torch.equal(a, b)


def test_need_kl_false_skips_the_kl(poisoned):
    mu, logvar = torch.randn(17, 20), torch.randn(17, 20)
    z, kl = kernels.reparam_forward(mu, logvar, 3, 2, need_kl=False)
    assert kl is None
    assert torch.equal(z, kernels.reparam_forward(mu, logvar, 3, 2)[0])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad,bits", [
    ({"mu": NAN}, 8), ({"mu": INF}, 8), ({"mu": -INF}, 8),
    ({"logvar": NAN}, 16), ({"logvar": INF}, 16), ({"logvar": -INF}, 16),
    ({"logvar": 88.5}, 32), ({"logvar": 88.0}, 0), ({"logvar": -1e30}, 0),
    ({"mu": NAN, "logvar": 100.0}, 40), ({"mu": -INF, "logvar": NAN}, 24), ({"mu": 1e30, "logvar": 87.9}, 0),
])
@pytest.mark.parametrize("dtype,need_kl", [(torch.float32, True), (torch.bfloat16, False), (torch.float64, False)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's NaN / Inf arithmetic
def test_value_check_flags(bad, bits, dtype, need_kl):
    tensors = {"mu": torch.randn(13, 7, dtype=dtype), "logvar": torch.randn(13, 7, dtype=dtype)}
    for i, (name, value) in enumerate(bad.items()):
        tensors[name].view(-1)[[90, 5][i]] = value
    flags = flag_word(64)  # bits already set stay set: the kernel ORs, the op layer clears
    z, _ = kernels.reparam_forward(tensors["mu"], tensors["logvar"], 1, 2, need_kl, flags, block_rows=8, block_groups=8)
    assert flags.item() == 64 | bits  # two programs, several steps each: the bits of every one reach the word
    if need_kl:  # flags=None: no checks, the same z
        z_unchecked = kernels.reparam_forward(tensors["mu"], tensors["logvar"], 1, 2, need_kl, None)[0]
        assert torch.equal(z.isnan(), z_unchecked.isnan()) and torch.equal(z.nan_to_num(), z_unchecked.nan_to_num())


@pytest.mark.parametrize("rows,groups", [(8, 4), (16, 64), (None, None)])
def test_padding_lanes_never_flag(rows, groups):
    mu, logvar = nan_tailed(torch.randn(5, 7)), nan_tailed(torch.randn(5, 7))
    flags = flag_word()
    z, kl = kernels.reparam_forward(mu, logvar, 1, 3, True, flags, block_rows=rows, block_groups=groups)
    assert flags.item() == 0
    assert_finite(z, kl)


@pytest.mark.parametrize("batch", [1, 128, 4099, 65536])
@pytest.mark.parametrize("latent", [1, 3, 20, 33, 256])
def test_gpu_launch_configuration(batch, latent):
    """What a GPU launch uses (compiled by .ci/check_triton_compile.py): programs of whole groups of
    4 rows, one group of 4 contiguous elements per thread (no Philox call repeated across threads)."""
    cfg = kernels.config(batch, latent, interpreted=False)
    assert cfg.blocks["BLOCK_R"] % 4 == 0
    assert cfg.blocks["BLOCK_G"] == 32 * cfg.num_warps
    assert cfg.blocks["BLOCK_R"] * cfg.blocks["BLOCK_L"] <= max(1024, 16 * cfg.blocks["BLOCK_R"])
    if batch >= 65536:
        assert triton.cdiv(batch, cfg.blocks["BLOCK_R"]) >= 264  # two programs per SM at least
