"""A failing or missing accelerated backend falls back to PyTorch with exactly one warning."""
import warnings

import pytest
import torch

import fastvae
import importlib

backends = importlib.import_module("fastvae.backends")  # the module (fastvae.backends the attribute is the report function)
from fastvae.functional import decode_latents, loss_terms, reparameterize_kl

import fake_backends as fake

CALLS = 4


def _reparam(backend):
    mu = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    logvar = (0.3 * torch.randn(7, 5, generator=torch.Generator().manual_seed(2))).requires_grad_()
    z, kl = reparameterize_kl(mu, logvar, seed=1234, backend=backend)
    (z.square().sum() + kl.sum()).backward()
    return z.detach(), kl.detach(), mu.grad, logvar.grad


def _loss(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 13, generator=g, requires_grad=True)
    x = torch.rand(9, 13, generator=g)
    mu, logvar = torch.randn(9, 3, generator=g, requires_grad=True), torch.randn(9, 3, generator=g, requires_grad=True)
    terms = loss_terms(logits, x, mu, logvar, beta=0.7, backend=backend)
    terms.loss.backward()
    return terms.loss.detach(), terms.recon, terms.kl, logits.grad, mu.grad, logvar.grad


def _decode(backend):
    torch.manual_seed(0)
    model = fastvae.VAE(input_dim=11, hidden_dims=(6,), latent_dim=3)
    z = torch.randn(10, 3, generator=torch.Generator().manual_seed(4))
    return decode_latents(model, z, chunk_size=3, backend=backend), decode_latents(model, n=5, latent_dim=3, seed=9, chunk_size=2, out_dtype=torch.uint8, backend=backend)


OPS = {"reparam": _reparam, "loss": _loss, "decode": _decode}


def _fastvae_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "fastvae" in str(w.message)]


def _assert_same(got, want):
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", sorted(OPS))
def test_kernel_failing_at_run_time_falls_back_with_one_warning(monkeypatch, op):
    fake.isolate(monkeypatch)
    want = OPS[op]("torch")
    fake.install(monkeypatch, op, fake.failing())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(CALLS):
            _assert_same(OPS[op](None), want)
    msgs = _fastvae_warnings(record)
    assert len(msgs) == 1, [str(w.message) for w in msgs]
    assert f"cpp kernel for {op} failed (RuntimeError: kernel exploded)" in str(msgs[0].message)
    assert "failed at run time" in fastvae.backends()[op]["backends"]["cpp"]
    with pytest.raises(backends.BackendUnavailable, match="failed at run time"):
        OPS[op]("cpp")  # asked for by name: an error, not a silent fallback


@pytest.mark.parametrize("op", sorted(OPS))
def test_backend_failing_to_load_falls_back_with_one_warning(monkeypatch, op):
    fake.isolate(monkeypatch)
    want = OPS[op]("torch")
    fake.install(monkeypatch, op, load_error=ImportError("libfastvae_cpp.so: cannot open shared object file"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(CALLS):
            _assert_same(OPS[op](None), want)
    msgs = _fastvae_warnings(record)
    assert len(msgs) == 1 and "cannot open shared object file" in str(msgs[0].message)


@pytest.mark.parametrize("op", sorted(OPS))
def test_strict_turns_fallbacks_into_errors(monkeypatch, op):
    fake.isolate(monkeypatch)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    fake.install(monkeypatch, op, fake.failing())
    with pytest.raises(RuntimeError, match="kernel exploded"):
        OPS[op](None)
    fake.install(monkeypatch, op, load_error=ImportError("no extension"))
    with pytest.raises(backends.BackendUnavailable, match="FASTVAE_STRICT=1 and the cpp backend for .* failed to load: ImportError: no extension"):
        OPS[op](None)


def test_one_warning_when_several_ops_fail_over_a_training_step(monkeypatch):
    fake.isolate(monkeypatch)
    for op in OPS:
        fake.install(monkeypatch, op, fake.failing())
    model = fastvae.VAE(input_dim=12, hidden_dims=(5,), latent_dim=2)
    x = torch.rand(6, 12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model.loss(x).backward()
            model.sample(4, seed=1)
    ops = sorted(str(w.message).split(" kernel for ")[1].split()[0] for w in _fastvae_warnings(record))
    assert ops == ["decode", "loss", "reparam"]  # one per op that failed, none repeated


def test_unsupported_inputs_go_to_torch_quietly_under_auto(monkeypatch):
    fake.isolate(monkeypatch)
    spy = fake.Spy()
    spy.unsupported = lambda *ts: "float64 is not supported" if any(t.dtype == torch.float64 for t in ts) else None
    fake.install(monkeypatch, "reparam", spy)
    mu, logvar = torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = fastvae.functional.reparameterize(mu, logvar, seed=5)
    assert torch.equal(z, fastvae.functional.reparameterize(mu, logvar, seed=5, backend="torch")) and spy.calls == []
    with pytest.raises(TypeError, match="backend='cpp' cannot run reparam on these inputs: float64 is not supported. Use backend='auto' or 'torch'"):
        fastvae.functional.reparameterize(mu, logvar, seed=5, backend="cpp")
