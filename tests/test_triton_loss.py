"""Triton reconstruction + KL loss (interpreted on CPU): values and gradients vs the float64 reference."""
import math

import pytest
import torch

from triton_helpers import assert_finite, flag_word, nan_tailed, poisoned, snan_like, strict  # noqa: F401 - fixtures
from fastvae.functional import bce_kl_loss
from fastvae.kernels import loss as kernels
from fastvae.ops.loss import loss_terms, recon_rows_reference
from fastvae.ops.reparam import kl_rows_reference


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


def _forward(logits, x, mu, logvar, beta=0.37, likelihood="bernoulli", need_grad=True, scale=1.0, flags=None, **blocks):
    return kernels.loss_forward(logits, x, mu, logvar, beta, likelihood, need_grad, scale, flags, **blocks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_beta_tensor_equals_beta_float(dtype, poisoned):
    logits, x, mu, logvar = (t.to(dtype) for t in _inputs(37, 50))
    for beta in (0.37, 1.0, 1e-3 / 3):
        by_value = _forward(logits, x, mu, logvar, beta)
        on_device = _forward(logits, x, mu, logvar, torch.tensor(beta, dtype=torch.float64))
        for a, b in zip(by_value, on_device):
            if dtype == torch.float64:  # a float travels as two float32 words: 48 of its 53 bits
                torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("batch,features,latent", [(1, 1, 1), (7, 37, 20), (33, 784, 3)])
def test_scale_is_folded_into_the_gradients(likelihood, batch, features, latent, poisoned):
    """scale * sum(recon + beta * kl): reduction="mean" needs no second pass over grad_logits."""
    logits, x, mu, logvar = _inputs(batch, features, latent)
    scale = 1.0 / batch if batch > 1 else 0.3
    got = _forward(logits, x, mu, logvar, 0.37, likelihood, True, scale)
    leaves = [t.clone().requires_grad_() for t in (logits, mu, logvar)]
    rows = recon_rows_reference(leaves[0], x, likelihood) + 0.37 * kl_rows_reference(leaves[1], leaves[2])
    (scale * rows.sum()).backward()
    torch.testing.assert_close(got[0] + 0.37 * got[1], rows.detach(), rtol=1e-12, atol=1e-12)  # rows are not scaled
    for a, b in zip(got[2:], leaves):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-14)


NAN, INF = float("nan"), float("inf")
FLAG_CASES = [
    ({"logits": NAN}, 1), ({"logits": INF}, 1), ({"logits": -INF}, 1), ({"logits": 1e30}, 0),
    ({"x": NAN}, 2), ({"x": -INF}, 2 | 4), ({"x": 1.5}, 4), ({"x": -0.01}, 4), ({"x": 1.0}, 0), ({"x": 0.0}, 0),
    ({"mu": NAN}, 8), ({"mu": INF}, 8), ({"logvar": NAN}, 16), ({"logvar": -INF}, 16), ({"logvar": 88.5}, 32), ({"logvar": 88.0}, 0),
    ({"logits": NAN, "x": 2.0, "logvar": 1e3}, 1 | 4 | 32), ({"x": NAN, "mu": -INF}, 2 | 8),
]


@pytest.mark.parametrize("bad,bits", FLAG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's NaN / Inf arithmetic
def test_value_check_flags(bad, bits, dtype):
    tensors = dict(zip(("logits", "x", "mu", "logvar"), (t.to(dtype) for t in _inputs(9, 37, 5))))
    for i, (name, value) in enumerate(bad.items()):
        tensors[name].view(-1)[[-1, 3, 17][i]] = value
    for likelihood in ("bernoulli", "gaussian"):
        expected = bits & ~4 if likelihood == "gaussian" else bits  # the [0, 1] range is Bernoulli's
        for need_grad in (True, False):
            flags = flag_word(64)  # set bits stay set: the kernel ORs, the op layer clears
            _forward(*tensors.values(), 0.5, likelihood, need_grad, 1.0, flags, block_rows=4, block_cols=16)
            assert flags.item() == 64 | expected, (likelihood, need_grad)


def test_uint8_targets_never_flag():
    logits, _, mu, logvar = _inputs(9, 37, 5)
    flags = flag_word()
    _forward(logits, torch.randint(0, 256, (9, 37), dtype=torch.uint8), mu, logvar, flags=flags)
    assert flags.item() == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_flag_word_no_checks():
    logits, x, mu, logvar = _inputs(9, 37, 5)
    logits[0, 0], x[1, 1], logvar[2, 2] = NAN, 7.0, 1e3
    recon, *_ = _forward(logits, x, mu, logvar, flags=None)
    assert recon[0].isnan() and recon[1:].isfinite().all()


@pytest.mark.parametrize("rows,cols", [(4, 16), (16, 64), (None, None)])
def test_padding_lanes_never_flag(rows, cols):
    logits, x, mu, logvar = (nan_tailed(t) for t in _inputs(5, 37, 3))
    flags = flag_word()
    out = _forward(logits, x, mu, logvar, flags=flags, block_rows=rows, block_cols=cols)
    assert flags.item() == 0
    assert_finite(*out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the control multiplies signalling NaNs
def test_scale_grads_by_one_writes_nothing(dtype):
    grads = [snan_like(torch.empty(33, 70, dtype=dtype)), snan_like(torch.empty(33, 5, dtype=dtype)), snan_like(torch.empty(33, 5, dtype=dtype))]
    before = [g.clone() for g in grads]
    kernels.scale_grads(torch.tensor(1.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32), grads, block=16)
    for g, b in zip(grads, before):
        assert torch.equal(g.view(torch.uint8), b.view(torch.uint8))
    kernels.scale_grads(torch.ones(33), grads)  # the control: a pass that multiplies by one does show
    assert not torch.equal(grads[0].view(torch.uint8), before[0].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("factor", [2.5, -0.75, 0.0, 1.0 + 2**-20])
@pytest.mark.parametrize("block", [16, None])  # 16: 4 programs walk 3 tensors in many grid-stride steps
def test_scale_grads_scalar(dtype, factor, block, poisoned):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grads = [torch.randn(33, 70).to(dtype), torch.randn(33, 5).to(dtype), torch.randn(33, 1).to(dtype), torch.randn(33, 3).to(dtype)]
    expected = [(g.to(acc) * factor).to(dtype) for g in grads]
    kernels.scale_grads(torch.tensor(factor, dtype=acc), grads, block=block)
    for g, e in zip(grads, expected):
        _assert_rounded_equal(g, e)


def _assert_rounded_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal, except that the interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest)."""
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_grads_per_row(dtype, poisoned):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    factors = torch.randn(33, dtype=acc)
    factors[3] = 1.0
    grads = [torch.randn(33, 70).to(dtype), torch.randn(33, 5).to(dtype), torch.randn(33, 2, 3).to(dtype)]
    expected = [(g.to(acc) * factors.view(-1, *[1] * (g.dim() - 1))).to(dtype) for g in grads]
    kernels.scale_grads(factors, grads)
    for g, e in zip(grads, expected):
        _assert_rounded_equal(g, e)


@pytest.mark.parametrize("features,cols", [(784, 64), (12288, 512), (50, 64), (1, 64), (300, 64), (1000, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_launch_configuration(features, cols, dtype):
    """Tiles of exactly 4 elements per thread (one register layout for every operand), with the
    column block that pads D least (784: 64 columns pad 6 %; 1024 would pad 31 %)."""
    cfg = kernels.config(65536, features, 20, dtype, interpreted=False)
    assert cfg.blocks["BLOCK_D"] == cols
    assert cfg.blocks["BLOCK_R"] * cfg.blocks["BLOCK_D"] == 4 * 32 * cfg.num_warps
