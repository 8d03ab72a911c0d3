"""The "cpp"/"cuda" backends in fastvae's dispatch: registration, fallbacks, torch.compile, the model."""
import functools
import importlib

import pytest
import torch

import fastvae
from cpp_helpers import require_extension
from fastvae import _extension
from fastvae.ops import loss, reparam

backends = importlib.import_module("fastvae.backends")  # the module (fastvae.backends is the report function)

require_extension()


@pytest.fixture
def fresh_backends(monkeypatch):
    """Empty the backend caches (restored afterwards) so loaders and warnings run again."""
    for name in ("_loaded", "_errors", "_warned"):
        monkeypatch.setattr(backends, name, type(getattr(backends, name))())
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    monkeypatch.delenv("FASTVAE_STRICT", raising=False)


def inputs(rows=17, dim=30, latent=4, dtype=torch.float32):
    return (torch.randn(rows, dim, dtype=dtype), torch.rand(rows, dim, dtype=dtype),
            torch.randn(rows, latent, dtype=dtype), torch.randn(rows, latent, dtype=dtype))


def test_cpp_is_available_and_auto_picks_it_on_cpu(fresh_backends):
    report = fastvae.backends()
    for op in ("reparam", "loss", "decode"):
        assert report[op]["backends"]["cpp"] == "available"
        assert report[op]["active"]["cpu"] == "cpp"
    assert backends.resolve("loss", "cpu")[0] == "cpp"


def test_missing_extension_falls_back_to_torch_with_one_warning(fresh_backends):
    _extension._state.clear()
    _extension._state["error"] = RuntimeError("the fastvae C++ extension could not be loaded: forced by the test")
    logits, x, mu, logvar = inputs()
    with pytest.warns(RuntimeWarning, match="cpp backend is unavailable.*forced by the test") as caught:
        a = loss.bce_kl_loss(logits, x, mu, logvar)
        b = loss.bce_kl_loss(logits, x, mu, logvar)
    assert len([w for w in caught if "unavailable" in str(w.message)]) == 1
    assert torch.equal(a, b)
    torch.testing.assert_close(a, loss.bce_kl_loss(logits, x, mu, logvar, backend="torch"), rtol=0, atol=0)
    assert "forced by the test" in fastvae.backends()["loss"]["backends"]["cpp"]
    with pytest.raises(backends.BackendUnavailable, match="forced by the test"):
        loss.bce_kl_loss(logits, x, mu, logvar, backend="cpp")


def test_failed_build_is_remembered_not_retried(fresh_backends, monkeypatch):
    calls = []

    def broken_import():
        calls.append(1)
        raise ImportError("no compiler")
    _extension._state.clear()
    monkeypatch.setattr(_extension, "_import", broken_import)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="could not be loaded: ImportError: no compiler"):
            _extension.load_ops("loss", "cpu")
    assert len(calls) == 1


def test_cuda_loader_says_why_it_cannot_run(fresh_backends):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda backend may load")
    with pytest.raises(RuntimeError, match="no usable CUDA"):
        _extension.load_ops("loss", "cuda")
    assert "no usable CUDA" in fastvae.backends()["reparam"]["backends"]["cuda"]
    with pytest.raises(backends.BackendUnavailable, match="'cuda' backend takes CUDA tensors"):
        loss.bce_kl_loss(*inputs(), backend="cuda")


def test_unsupported_dtype_auto_uses_torch_explicit_cpp_refuses(fresh_backends):
    logits, x, mu, logvar = (t.bfloat16() for t in inputs())
    got = loss.bce_kl_loss(logits, x, mu, logvar)  # auto: quietly PyTorch
    torch.testing.assert_close(got, loss.bce_kl_loss(logits, x, mu, logvar, backend="torch"))
    with pytest.raises(TypeError, match="float32 or float64"):
        loss.bce_kl_loss(logits, x, mu, logvar, backend="cpp")
    with pytest.raises(TypeError, match="share a dtype"):
        loss.bce_kl_loss(logits.float(), x.float(), mu.double(), logvar.double(), backend="cpp")


def test_vae_loss_cpp_equals_torch_with_the_same_seed(monkeypatch):
    """fastvae.VAE(backend="cpp").loss and backend="torch" draw the same eps from one Philox seed."""
    monkeypatch.setattr(fastvae.models.base, "reparameterize", functools.partial(reparam.reparameterize, seed=2024))
    x = torch.rand(12, 784)
    results = []
    for backend in ("cpp", "torch"):
        torch.manual_seed(0)
        model = fastvae.VAE(backend=backend)
        value = model.loss(x)
        value.backward()
        results.append((value.detach(), [p.grad for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)


def test_fake_implementations_pass_opcheck():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    logits, x, _, _ = inputs(rows=5, latent=3)
    flags, seed_t, beta_t = torch.zeros(1, dtype=torch.int32), torch.tensor(7), torch.tensor(0.5, dtype=torch.float64)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    ops = torch.ops.fastvae
    for seed_args in ((None, 1), (seed_t, 0)):
        for need_kl, flag in ((True, flags), (False, None)):
            torch.library.opcheck(ops.reparam_forward, (mu, logvar, *seed_args, 2, need_kl, flag), test_utils=checks)
        z, _ = ops.reparam_forward(mu, logvar, *seed_args, 2, True, None)
        for grad_kl in (torch.randn(5), None):
            torch.library.opcheck(ops.reparam_backward, (torch.randn_like(z), grad_kl, mu, logvar, z, *seed_args, 2), test_utils=checks)
    for need_grad in (True, False):
        for beta_args, flag in (((None, 1.0), flags), ((beta_t, 0.0), None)):
            args = (logits, x, mu, logvar, *beta_args, False, need_grad, 0.25, flag)
            torch.library.opcheck(ops.loss_forward, args, test_utils=checks)
    for grad_out in (torch.tensor(1.0), torch.tensor(3.0), torch.rand(5)):
        torch.library.opcheck(ops.scale_grads, (grad_out, [torch.randn(5, 30), torch.randn(5, 3)]), test_utils=checks)
    torch.library.opcheck(ops.to_image, (logits, torch.empty(logits.shape, dtype=torch.uint8), True), test_utils=checks)


def test_torch_compile_traces_the_ops():
    """torch.compile (aot_eager: FakeTensor tracing through the fake implementations, no C++ compiler)."""
    import torch._dynamo

    def step(logits, x, mu, logvar):
        z, kl = reparam.reparameterize_kl(mu, logvar, seed=5, backend="cpp")
        terms = loss.loss_terms(logits + z.sum(), x, mu, logvar, backend="cpp")
        return terms.loss + kl.sum()

    logits, x, mu, logvar = inputs()
    mu.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    with fastvae.value_checks(False):  # data-dependent checks would only cause graph breaks
        got = compiled(logits, x, mu, logvar)
        want = step(logits, x, mu, logvar)
    torch.testing.assert_close(got, want)
    got.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()


def test_torch_compile_keeps_the_flag_word_mutation_and_tensor_seed():
    """fullgraph aot_eager: the flag word (a mutable argument) is written back, the seed and beta are tensors."""
    import torch._dynamo

    def step(logits, x, mu, logvar, seed_t, beta_t, flags):
        z, kl = torch.ops.fastvae.reparam_forward(mu, logvar, seed_t, 0, 2, True, flags)
        out = torch.ops.fastvae.loss_forward(logits + z.mean(), x, mu, logvar, beta_t, 0.0, False, True, 0.5, flags)
        return out[0] + kl, out[2]

    logits, x, mu, logvar = inputs()
    logvar[3, 1] = 100.0  # sets FLAG_LOGVAR_HIGH in both kernels
    args = (logits, x, mu, logvar, torch.tensor(11), torch.tensor(0.3, dtype=torch.float64))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got_flags, want_flags = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    got, want = compiled(*args, got_flags), step(*args, want_flags)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got_flags.item() == want_flags.item() == fastvae._checks.FLAG_LOGVAR_HIGH
