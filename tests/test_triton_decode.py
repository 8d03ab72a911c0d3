"""Triton decoding (interpreted on CPU): MLP kernels with given or prior latents, float and uint8."""
import pytest
import torch
from torch import nn

from triton_helpers import launches, poisoned, specialization, strict  # noqa: F401 - fixtures
from fastvae import MLPDecoder
from fastvae.kernels import decode as kernels
from fastvae.ops import philox
from fastvae.ops.decode import decode_latents, quantize_reference


def _decoder(hidden=(48,), latent=20, out=50):
    torch.manual_seed(4)
    return MLPDecoder(latent, hidden, out).double()


def _reference(decoder, z):
    return torch.sigmoid(decoder(z.double()))


def _assert_pixels_close(got, probs):
    """uint8 equal to the float64 quantisation except where float32 rounding sits on a .5 boundary."""
    diff = (got.int() - quantize_reference(probs).int()).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 0.01


@pytest.mark.parametrize("hidden", [(48,), (), (40, 24)])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_given_latents_equal_float64_reference(hidden, rows, poisoned):
    decoder = _decoder(hidden)
    z = torch.randn(rows, 20, dtype=torch.float64)
    probs = _reference(decoder, z)
    got = decode_latents(decoder, z, backend="triton")
    torch.testing.assert_close(got.double(), probs, rtol=1e-5, atol=1e-6)  # float32 matmuls
    _assert_pixels_close(decode_latents(decoder, z, out_dtype=torch.uint8, backend="triton"), probs)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("start", [0, 5, 2**31 + 3])  # counters past 2**32 need the high word
def test_prior_draw_is_the_philox_stream(fuse, start, poisoned):
    decoder = _decoder()
    layers = [(m.weight, m.bias) for m in decoder.linears()]
    out = torch.empty(45, 50)
    kernels.decode_mlp(layers, None, 2**62 + 9, start, out, fuse=fuse)
    z = philox.randn(2**62 + 9, 45 * 20, offset=start * 20).view(45, 20)
    torch.testing.assert_close(out.double(), _reference(decoder, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.uint8])
def test_prior_samples_equal_torch_backend_and_ignore_chunk_size(out_dtype):
    decoder = _decoder()
    got = decode_latents(decoder, n=130, latent_dim=20, seed=7, out_dtype=out_dtype, backend="triton")
    chunked = decode_latents(decoder, n=130, latent_dim=20, seed=7, out_dtype=out_dtype, chunk_size=47, backend="triton")
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-7) if out_dtype != torch.uint8 else _assert_pixels_close(chunked, got.double() / 255)
    expected = decode_latents(decoder, n=130, latent_dim=20, seed=7, out_dtype=torch.float64, backend="torch")
    if out_dtype == torch.uint8:
        _assert_pixels_close(got, expected)
    else:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_block_sizes_do_not_change_the_result():
    decoder = _decoder(out=70)
    layers = [(m.weight, m.bias) for m in decoder.linears()]
    z = torch.randn(50, 20)
    base = torch.empty(50, 70)
    kernels.decode_mlp(layers, z, 0, 0, base)
    for fuse, bm, bn, bk in [(True, 16, 16, 16), (False, 16, 32, 16), (True, 64, 128, 64)]:
        out = torch.full((50, 70), float("nan"))
        kernels.decode_mlp(layers, z, 0, 0, out, fuse=fuse, block_m=bm, block_n=bn, block_k=bk)
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_dtypes(dtype):
    decoder = _decoder().to(dtype)
    z = torch.randn(33, 20, dtype=dtype)
    got = decode_latents(decoder, z, backend="triton")
    torch.testing.assert_close(got.double(), _reference(decoder.double(), z), rtol=1e-5, atol=1e-6)  # float32 math on the same weights


def test_non_contiguous_output_is_written():
    decoder = _decoder()
    layers = [(m.weight, m.bias) for m in decoder.linears()]
    z = torch.randn(9, 20)
    out = torch.full((50, 9), float("nan")).t()
    kernels.decode_mlp(layers, z, 0, 0, out)
    torch.testing.assert_close(out.double(), _reference(decoder, z), rtol=1e-5, atol=1e-6)


class _Probabilities(nn.Module):
    """A decoder the MLP kernels cannot take (Tanh): decode_latents uses its output + the to_image tail."""

    def __init__(self, returns_logits):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 64))
        self.returns_logits = returns_logits

    def forward(self, z):
        out = self.net(z)
        return out if self.returns_logits else torch.sigmoid(out)


@pytest.mark.parametrize("returns_logits", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.uint8])
def test_other_decoders_use_the_image_tail(returns_logits, out_dtype, monkeypatch):
    decoder = _Probabilities(returns_logits).double()
    calls = []
    real = kernels.to_image
    monkeypatch.setattr(kernels, "to_image", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    z = torch.randn(41, 20, dtype=torch.float64)
    got = decode_latents(decoder, z, out_dtype=out_dtype, chunk_size=16, backend="triton")
    probs = torch.sigmoid(decoder.net(z))
    if out_dtype == torch.uint8:
        assert torch.equal(got, quantize_reference(probs))
    else:
        torch.testing.assert_close(got.double(), probs, rtol=1e-6, atol=1e-7)
    assert calls == ([returns_logits] * 3 if out_dtype == torch.uint8 else [])  # a float output is torch's sigmoid alone


def test_to_image_extremes(poisoned):
    values = torch.tensor([-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4, float("inf"), float("-inf")])
    out = torch.empty(9, dtype=torch.uint8)
    kernels.to_image(values, out, True)
    assert torch.equal(out, quantize_reference(torch.sigmoid(values)))
    with pytest.raises(ValueError, match="to_image writes uint8 images"):
        kernels.to_image(values, torch.empty(9), True)  # a float output is torch.sigmoid's


@pytest.mark.parametrize("latent,start", [(20, 0), (3, 5), (7, 2**31 + 1)])  # offsets start * latent off a group of 4
def test_prior_with_a_device_seed_is_the_int_seed_stream(latent, start, poisoned):
    decoder = _decoder(latent=latent)
    layers = [(m.weight, m.bias) for m in decoder.linears()]
    seed = 2**62 + 9
    z = philox.randn(seed, 45 * latent, offset=start * latent).view(45, latent)
    drawn = kernels.draw_prior(seed, start, 45, latent, torch.device("cpu"))
    torch.testing.assert_close(drawn, z, rtol=1e-5, atol=1e-5)  # float32 sin/cos/log: ulps apart
    assert torch.equal(kernels.draw_prior(torch.tensor(seed), start, 45, latent, torch.device("cpu")), drawn)
    by_value, on_device = torch.empty(45, 50), torch.empty(45, 50)
    kernels.decode_mlp(layers, None, seed, start, by_value)
    kernels.decode_mlp(layers, None, torch.tensor(seed), start, on_device)
    assert torch.equal(by_value, on_device)
    torch.testing.assert_close(by_value.double(), _reference(decoder, z), rtol=1e-5, atol=1e-6)


def test_seed_and_start_do_not_recompile():
    out = torch.empty(64, 50)

    def launch(seed, start):
        return launches(kernels.draw_prior, seed, start, 64, 20, out.device)[0]

    cases = [(0, 0), (16, 16), (17, 3), (2**40, 2**20 + 16), (2**63 - 1, 1)]
    keys = {specialization(fn, args, kw) for fn, _, args, kw in (launch(*c) for c in cases)}
    assert len(keys) == 1, keys


@pytest.mark.parametrize("latent", [1, 17, 256])
def test_every_fused_latent_size(latent, poisoned):
    """The one-kernel decoder walks the latent BLOCK_K at a time (bounded tiles up to MAX_FUSED_LATENT)."""
    decoder = _decoder(latent=latent)
    layers = [(m.weight, m.bias) for m in decoder.linears()]
    z = torch.randn(37, latent)
    out = torch.empty(37, 50)
    kernels.decode_mlp(layers, z, 0, 0, out, fuse=True, block_k=16)
    torch.testing.assert_close(out.double(), _reference(decoder, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_precision_follows_torch(setting, expected, monkeypatch):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        assert kernels.precision() == expected
    finally:
        matmul.fp32_precision = old


def test_precision_inherits_the_global_setting_and_reads_legacy_torch(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(fp32_precision="none"))
    monkeypatch.setattr(torch.backends, "fp32_precision", "tf32", raising=False)
    assert kernels.precision() == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=True))  # torch < 2.9
    assert kernels.precision() == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=False))
    assert kernels.precision() == "ieee"
