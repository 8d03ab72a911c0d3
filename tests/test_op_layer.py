"""The Python op layer against the round-2 backend interface (device seeds and betas, need_kl, value-check
flags, the folded mean, scale_grads, routing hooks), first with a pure-PyTorch stand-in that honours the
interface (tests/fake_backends.py Contract), then with the real cpp and triton backends through the API."""
import importlib
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastvae
from fastvae import _checks, graphs
from fastvae.cli import info
from fastvae.functional import bce_kl_loss, decode_latents, loss_terms, reparameterize, reparameterize_kl
from fastvae.ops import philox
from fastvae.ops import reparam as reparam_op
from fastvae.trainer import restore_rng

import fake_backends as fake

backends = importlib.import_module("fastvae.backends")


@pytest.fixture
def contract(monkeypatch):
    """The Contract stand-in as the backend "auto" picks on CPU, for every op; strict: no quiet fallback."""
    fake.isolate(monkeypatch)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    impl = fake.Contract()
    for op in ("reparam", "loss"):
        fake.install(monkeypatch, op, impl)
    return impl


@pytest.fixture
def device_seeds(monkeypatch):
    """Fresh seeds drawn as on CUDA: 0-dim int64 tensors on the device."""
    monkeypatch.setattr(reparam_op, "DEVICE_SEEDS", {"cuda", "cpu"})


@pytest.fixture
def deferred(monkeypatch):
    """Flags on the CPU wait for check_values, as on CUDA."""
    monkeypatch.setattr(_checks, "DEFERRED", {"cuda", "cpu"})


def _loss_args(b=5, d=11, lat=3, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(b, d, generator=g, dtype=dtype) * 3).requires_grad_(grad)
    mu = torch.randn(b, lat, generator=g, dtype=dtype).requires_grad_(grad)
    logvar = (0.5 * torch.randn(b, lat, generator=g, dtype=dtype)).requires_grad_(grad)
    return logits, torch.rand(b, d, generator=g, dtype=dtype), mu, logvar


def _grads(*leaves):
    out = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


# -- fastvae.value_checks: a call and a context manager --------------------------------------------------------------

def test_value_checks_as_a_call_and_as_a_context_manager(contract):
    logits, x, mu, logvar = _loss_args(grad=False)
    bad = logits.clone()
    bad[2, 3] = math.nan
    previous = fastvae.value_checks(False)
    try:
        assert bool(previous) is True and _checks.flag_word(bad.device) is None
        bce_kl_loss(bad, x, mu, logvar)  # off: nothing checked, the kernel gets no flag word
        assert contract.called("loss_forward")[-1]["flags"] is False
    finally:
        assert bool(fastvae.value_checks(previous)) is False  # restores; returns the mode it replaces
    with pytest.raises(ValueError, match="logits contains NaN or Inf"):
        bce_kl_loss(bad, x, mu, logvar)
    with fastvae.value_checks(False) as mode:
        assert bool(mode) is True
        bce_kl_loss(bad, x, mu, logvar)
        with fastvae.value_checks(True):
            with pytest.raises(ValueError, match="logits contains NaN"):
                bce_kl_loss(bad, x, mu, logvar)
        bce_kl_loss(bad, x, mu, logvar)
    with pytest.raises(ValueError, match="logits contains NaN"):
        bce_kl_loss(bad, x, mu, logvar)


# -- the flag word: read at once on the CPU, by check_values on CUDA ---------------------------------------------------

@pytest.mark.parametrize("poison, message", [
    (("mu", "logvar", "logits", "x"), "mu contains NaN"),
    (("logvar", "logits"), "logvar contains NaN"),
    (("logvar_high", "logits", "x"), "logvar has values above 88.0"),
    (("logits", "x", "x_range"), "logits contains NaN"),
    (("x", "x_range"), "x contains NaN"),
    (("x_range",), r"x \(targets\) must lie in \[0, 1\]"),
])
def test_the_first_flagged_value_in_the_order_of_the_python_checks_is_raised(contract, poison, message):
    logits, x, mu, logvar = (t.detach().clone() for t in _loss_args(grad=False))
    for name in poison:
        if name == "logvar_high":
            logvar[0, 0] = 89.0
        elif name == "x_range":
            x[1, 1] = 1.5
        else:
            {"mu": mu, "logvar": logvar, "logits": logits, "x": x}[name][1, 2] = math.inf
    with pytest.raises(ValueError, match=message):
        loss_terms(logits, x, mu, logvar)
    with pytest.raises(ValueError, match=message):  # the torch backend's own checks: the same error
        loss_terms(logits, x, mu, logvar, backend="torch")
    assert int(_checks.flag_word(logits.device)[0]) == 0  # read and cleared
    loss_terms(*_loss_args(grad=False))  # clean input passes again


def test_gaussian_targets_outside_0_1_are_fine(contract):
    logits, x, mu, logvar = _loss_args(grad=False)
    loss_terms(logits, x * 5 - 2, mu, logvar, likelihood="gaussian")


def test_on_cuda_flags_wait_for_check_values(contract, deferred):
    logits, x, mu, logvar = _loss_args(grad=False)
    bad_mu = mu.clone()
    bad_mu[0, 0] = math.nan
    reparameterize(bad_mu, logvar)  # no sync per call: nothing raised here
    loss_terms(logits, x, mu, logvar)
    with pytest.raises(ValueError, match=r"^mu contains NaN or Inf; .* \(detected by a fused kernel since the last check\)$"):
        fastvae.check_values()
    fastvae.check_values()  # cleared
    loss_terms(logits, x * 2, mu, logvar)
    fastvae.check_values("meta")  # a device without a flag word: nothing to report
    with pytest.raises(ValueError, match=r"x \(targets\) must lie in \[0, 1\].*since the last check"):
        fastvae.check_values("cpu")


def test_the_trainer_checks_the_flags_at_its_logging_steps(contract, tmp_path):
    torch.manual_seed(0)
    model = fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=3)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        mu, logvar = output
        return (mu * math.nan, logvar) if len(calls) == 7 else output  # step 6

    model.encoder.register_forward_hook(poison)
    cfg = fastvae.TrainConfig(epochs=1, batch_size=4, log_every=5, progress=False)
    trainer = fastvae.Trainer(model, torch.rand(64, 6), cfg, device="cpu", out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"mu contains NaN or Inf; .* \(detected by a fused kernel in steps 5\.\.9 of epoch 1\)$"):
        trainer.fit()
    assert trainer.step == 10  # found at the logging step after it, not at once (no sync per step)
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and '"step": 5' in logged[0]  # the window with the bad values was not logged
    assert not any(d["flags"] is False for d in contract.called("loss_forward"))  # checks stayed on in the loop


def test_flags_of_a_run_stopped_by_another_error_do_not_leak(contract):
    """check_finite stops the run at the bad step, before the logging step reads the flags: they are cleared."""
    torch.manual_seed(0)
    model = fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=3)
    hook = model.encoder.register_forward_hook(lambda m, i, out: (out[0] * math.nan, out[1]))
    cfg = fastvae.TrainConfig(epochs=1, batch_size=4, log_every=5, progress=False, check_finite=True)
    with pytest.raises(FloatingPointError, match="at step 0"):
        fastvae.Trainer(model, torch.rand(16, 6), cfg, device="cpu").fit()
    hook.remove()
    loss_terms(*_loss_args(grad=False))  # the next CPU call does not raise the stale bit
    fastvae.Trainer(fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=3), torch.rand(16, 6), cfg, device="cpu").fit()


# -- seeds ------------------------------------------------------------------------------------------------------------

def test_unseeded_calls_pass_device_seeds_to_a_kernel_that_reads_them(contract, device_seeds):
    mu, logvar = _loss_args()[2:]
    z = reparameterize(mu, logvar)
    z.sum().backward()
    assert contract.called("reparam_forward")[-1]["seed"] == "Tensor"
    assert contract.called("reparam_backward")[-1]["seed"] == "Tensor"  # the same seed reaches the backward
    reparameterize(mu, logvar, seed=5)
    assert contract.called("reparam_forward")[-1]["seed"] == "int"


def test_a_kernel_without_tensor_seed_gets_int_seeds_and_during_capture_the_philox_reference(contract, device_seeds, monkeypatch):
    int_only = SimpleNamespace(**{n: getattr(contract, n) for n in ("reparam_forward", "reparam_backward")})
    fake.install(monkeypatch, "reparam", int_only)
    mu, logvar = _loss_args()[2:]
    reparameterize(mu, logvar)
    assert contract.called("reparam_forward")[-1]["seed"] == "int"  # eager: a host seed, the kernel runs
    monkeypatch.setattr(backends, "capturing", lambda: True)
    torch.manual_seed(3)
    z = reparameterize(mu, logvar)
    assert len(contract.called("reparam_forward")) == 1  # not called: the Philox reference ran
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # the device seed that call drew
    torch.testing.assert_close(z, reparameterize(mu, logvar, seed=seed, backend="torch"), rtol=0, atol=0)


def test_tensor_seed_gives_the_int_seeds_stream_on_every_backend(contract):
    mu, logvar = (t.detach() for t in _loss_args()[2:])
    want = reparameterize(mu, logvar, seed=1234, backend="torch")
    torch.testing.assert_close(reparameterize(mu, logvar, seed=torch.tensor(1234)), want)
    torch.testing.assert_close(reparameterize(mu, logvar, seed=torch.tensor(1234), backend="torch"), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the seed tensor is on meta but mu is on cpu"):
        reparameterize(mu, logvar, seed=torch.tensor(1, device="meta"))


# -- need_kl -----------------------------------------------------------------------------------------------------------

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def test_reparameterize_computes_no_kl(contract):
    mu, logvar = (t.detach() for t in _loss_args()[2:])
    reparameterize(mu, logvar)
    assert contract.called("reparam_forward")[-1]["need_kl"] is False
    reparameterize_kl(mu, logvar)
    assert contract.called("reparam_forward")[-1]["need_kl"] is True
    with _Ops() as seen:
        reparameterize(mu, logvar, seed=3, backend="torch")
    assert not [op for op, shape in seen.ops if shape == (mu.shape[0],)], "a per-row KL was computed on the torch path"
    with _Ops() as seen:
        reparameterize_kl(mu, logvar, seed=3, backend="torch")
    assert [op for op, shape in seen.ops if shape == (mu.shape[0],)]  # the check above can fail


# -- beta as a device tensor ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_tensor_beta_reaches_the_kernel_as_a_float64_device_scalar(contract, reduction):
    args = _loss_args()
    results = []
    for beta in (0.37, torch.tensor(0.37, dtype=torch.float32), torch.tensor(0.37, dtype=torch.float64)):
        terms = loss_terms(*args, beta=beta, reduction=reduction)
        terms.loss.sum().backward()
        assert contract.called("loss_forward")[-1]["beta"] == type(beta).__name__
        results.append([terms.loss.detach(), terms.recon, terms.kl, *_grads(args[0], args[2], args[3])])
        assert terms.loss.dtype == torch.float32
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_tensor_beta_that_requires_grad_gets_the_kl_as_gradient(contract):
    args = _loss_args(grad=False)
    beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    terms = loss_terms(*args, beta=beta, reduction="mean")
    terms.loss.backward()
    torch.testing.assert_close(beta.grad, terms.kl.double())


# -- the loss node: mean's 1/B in the forward, scale_grads in the backward ---------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_loss_matches_torch_and_folds_the_mean(contract, reduction):
    args = _loss_args(b=7, dtype=torch.float64)
    got = loss_terms(*args, beta=0.6, reduction=reduction)
    upstream = torch.randn(7, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    got.loss.backward(upstream)
    g_got = _grads(args[0], args[2], args[3])
    want = loss_terms(*args, beta=0.6, reduction=reduction, backend="torch")
    want.loss.backward(upstream)
    for a, b in zip([*got, *g_got], [*want, *_grads(args[0], args[2], args[3])]):
        torch.testing.assert_close(a, b)
    assert contract.called("loss_forward")[-1]["scale"] == (1 / 7 if reduction == "mean" else 1.0)
    assert contract.called("scale_grads")[-1] == ("skipped" if reduction != "none" else (7,))


def test_an_upstream_gradient_other_than_one_scales_the_stored_gradients(contract):
    args = _loss_args()
    (3 * bce_kl_loss(*args)).backward()
    g = _grads(args[0], args[2], args[3])
    bce_kl_loss(*args).backward()
    assert contract.called("scale_grads") == [(), "skipped"]
    for a, b in zip(g, _grads(args[0], args[2], args[3])):
        torch.testing.assert_close(a, 3 * b)


class _LaunchesHidden(TorchDispatchMode):
    """Records the ops that move data (views excluded) with their output sizes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), max((t.numel() for t in outs if isinstance(t, torch.Tensor)), default=0)))
        return out


def _backward_ops(monkeypatch, backend: str) -> list:
    """The ops of the fused loss's backward when the upstream gradient is the scalar one."""
    logits, x, mu, logvar = _loss_args(b=16, d=64, lat=4)
    mode = _LaunchesHidden()
    if backend == "triton":
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def one_launch(self, *a, **k):  # a GPU runs it as one kernel: the interpreter's host copies are not ops
            mode.ops.append((f"triton.{self.fn.__name__}", 0))
            with _disable_current_modes():
                return launch(self, *a, **k)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", one_launch)
    loss = bce_kl_loss(logits, x, mu, logvar, backend=backend)
    mode.ops.clear()
    with mode:
        loss.backward()
    big = [op for op, n in mode.ops if n >= logits.numel()]
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits.detach()) - x, rtol=1e-5, atol=1e-6)
    return big


def test_no_logits_sized_op_in_the_backward_of_a_scalar_loss(contract, monkeypatch):
    class Hidden(fake.Contract):
        def scale_grads(self, grad_out, grads):
            with _disable_current_modes():
                return super().scale_grads(grad_out, grads)
    fake.install(monkeypatch, "loss", Hidden())
    assert _backward_ops(monkeypatch, "cpp") == []


def test_no_logits_sized_op_in_the_backward_through_the_cpp_kernel(monkeypatch):
    pytest.importorskip("fastvae._C")
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    assert _backward_ops(monkeypatch, "cpp") == []


def test_no_logits_sized_op_in_the_backward_through_the_triton_kernel(monkeypatch):
    """The CUDA branch: Triton's scale_grads reads the scalar on the device (here through the interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    assert _backward_ops(monkeypatch, "triton") == []


# -- routing hooks ---------------------------------------------------------------------------------------------------------

def test_slower_routes_auto_to_torch_and_info_says_so(monkeypatch):
    fake.isolate(monkeypatch)
    impl = fake.Contract(slower_below=100)
    fake.install(monkeypatch, "reparam", impl)
    small, large = torch.zeros(4, 3), torch.zeros(50, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reparameterize(small, small)
    assert impl.calls == []  # "auto": torch was faster for this size
    reparameterize(large, large)
    assert len(impl.called("reparam_forward")) == 1
    reparameterize(small, small, backend="cpp")  # named explicitly: the kernel runs
    assert len(impl.called("reparam_forward")) == 2
    assert fastvae.backends()["reparam"]["routing"] == {"cpp": "contract fake: torch below 100 elements"}
    assert "reparam cpp: contract fake: torch below 100 elements" in info()["routing"]


# -- capture ------------------------------------------------------------------------------------------------------------------

def test_a_kernel_error_during_capture_raises_and_keeps_the_backend(monkeypatch):
    fake.isolate(monkeypatch)
    fake.install(monkeypatch, "loss", fake.failing())
    monkeypatch.setattr(backends, "capturing", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="kernel exploded"):
            bce_kl_loss(*_loss_args())
    assert fastvae.backends()["loss"]["backends"]["cpp"] == "available"  # not disabled for the process


def test_tf32_uses_fp32_precision_and_restores_it():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    assert hasattr(matmul, "fp32_precision")  # torch >= 2.9: the legacy flags must not be read after this API is used
    old = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = "ieee"  # a user who set the new API: reading allow_tf32 now raises in torch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with graphs.tf32(True):
                assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
            assert matmul.fp32_precision == "ieee"
            with graphs.tf32(False):
                assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, conv.fp32_precision = old


# -- decode's fresh seed ---------------------------------------------------------------------------------------------------------

def test_decode_draws_its_fresh_seed_on_the_device_during_capture(monkeypatch, device_seeds):
    fake.isolate(monkeypatch)
    seeds = []

    def decode_mlp(layers, z, seed, start, out):
        seeds.append(seed)
        out.fill_(0.5)
    monkeypatch.setattr(backends, "capturing", lambda: True)
    model = fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=3)
    fake.install(monkeypatch, "decode", SimpleNamespace(decode_mlp=decode_mlp, tensor_seed=True))
    decode_latents(model, n=4, latent_dim=3, chunk_size=2)
    assert len(seeds) == 2 and all(isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.int64 for s in seeds)
    assert seeds[0] is seeds[1]  # one stream, chunks at their element offsets
    fake.install(monkeypatch, "decode", SimpleNamespace(decode_mlp=decode_mlp))  # a kernel taking int seeds only
    out = decode_latents(model, n=4, latent_dim=3)
    assert len(seeds) == 2 and out.shape == (4, 6) and not torch.all(out == 0.5)  # PyTorch (torch.randn) ran instead


# -- resume on CUDA: generator states go back as CPU ByteTensors ---------------------------------------------------------------

def test_resume_restores_rng_states_loaded_onto_a_device(monkeypatch):
    """The CUDA branch on CPU: states that only become CPU ByteTensors through .cpu(), as checkpoint.load(map_location="cuda") gives."""
    class OnDevice:
        def __init__(self, t):
            self.t = t

        def cpu(self):
            return self.t
    want = {"torch": torch.get_rng_state(), "cuda": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    torch.manual_seed(99)
    cuda_states = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: cuda_states.append((state, device)))
    restore_rng({k: OnDevice(v) for k, v in want.items()}, torch.device("cuda"))
    assert torch.equal(torch.get_rng_state(), want["torch"])
    assert len(cuda_states) == 1 and cuda_states[0][0] is want["cuda"] and cuda_states[0][1] == torch.device("cuda")


# -- bfloat16: grad_logvar from eps, not from a z rounded to bf16 --------------------------------------------------------------

def _bf16_grad_logvar(backend):
    g = torch.Generator().manual_seed(2)
    mu = (3 * torch.randn(64, 9, generator=g)).to(torch.bfloat16).requires_grad_()
    logvar = torch.full((64, 9), -9.0, dtype=torch.bfloat16).requires_grad_()  # std ~ 0.011 << |mu|
    upstream = torch.randn(64, 9, generator=g)
    z = reparameterize(mu, logvar, seed=21, backend=backend)
    assert z.dtype == torch.bfloat16
    z.backward(upstream.to(torch.bfloat16))
    mu32, lv32 = mu.detach().float().requires_grad_(), logvar.detach().float().requires_grad_()
    eps = philox.randn(21, mu.numel()).view(mu.shape)
    (mu32 + eps * torch.exp(0.5 * lv32)).backward(upstream.to(torch.bfloat16).float())
    return logvar.grad.float(), lv32.grad


@pytest.mark.parametrize("backend", ["torch", "contract", "triton"])
def test_bf16_grad_logvar_matches_float32_autograd_with_the_same_eps(backend, monkeypatch):
    # One rounding to bfloat16 at the end: <= 2^-8 relative. z - mu from a bf16 z gives errors of order 100%
    # here, eps and std rounded to bf16 before the product (the former torch path) up to 0.8%. Triton's
    # interpreter truncates to bf16 instead of rounding (up to 2^-7; a GPU rounds): one ulp there.
    rtol = 1e-2 if backend == "triton" else 5e-3
    if backend == "contract":
        fake.isolate(monkeypatch)
        fake.install(monkeypatch, "reparam", fake.Contract())
        backend = "cpp"
    else:
        monkeypatch.setenv("FASTVAE_STRICT", "1")
    got, want = _bf16_grad_logvar(backend)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)


# -- the real backends through the public API ------------------------------------------------------------------------------------

REAL = ["cpp", "triton"]


def _real(backend):
    if fastvae.backends()["loss"]["backends"][backend] != "available":
        pytest.skip(f"{backend} is not available here")


@pytest.mark.parametrize("backend", REAL)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_real_backends_fold_the_mean_and_take_a_device_beta(monkeypatch, backend, reduction):
    _real(backend)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    args = _loss_args(b=9, d=37, lat=5)
    upstream = torch.randn(9) if reduction == "none" else torch.tensor(1.0)
    out = {}
    for name, beta, be in (("torch", 0.3, "torch"), ("fused", torch.tensor(0.3, dtype=torch.float64), backend)):
        terms = loss_terms(*args, beta=beta, reduction=reduction, backend=be)
        terms.loss.backward(upstream)
        out[name] = [*terms, *_grads(args[0], args[2], args[3])]
    for a, b in zip(out["fused"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if reduction == "none":  # rows summed afterwards: the upstream gradient is an expanded (stride 0) ones
        loss_terms(*args, reduction="none", backend=backend).loss.sum().backward()
        torch.testing.assert_close(args[0].grad, torch.sigmoid(args[0].detach()) - args[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", REAL)
def test_real_backends_sample_with_a_tensor_seed(monkeypatch, backend):
    _real(backend)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    mu, logvar = (t.detach() for t in _loss_args()[2:])
    torch.testing.assert_close(reparameterize(mu, logvar, seed=torch.tensor(77), backend=backend),
                               reparameterize(mu, logvar, seed=77, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", REAL)
@pytest.mark.parametrize("case", ["nan-logits", "inf-mu", "logvar-high", "x-range"])
def test_real_backends_flag_bad_values(monkeypatch, backend, case):
    _real(backend)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    logits, x, mu, logvar = (t.detach().clone() for t in _loss_args())
    if case == "nan-logits":
        logits[3, 5] = math.nan
    elif case == "inf-mu":
        mu[1, 1] = -math.inf
    elif case == "logvar-high":
        logvar[4, 2] = 90.0
    else:
        x[0, 0] = -0.25
    message = {"nan-logits": "logits contains NaN", "inf-mu": "mu contains NaN", "logvar-high": "logvar has values above 88.0",
               "x-range": r"x \(targets\) must lie in \[0, 1\]"}[case]
    with pytest.raises(ValueError, match=message):
        loss_terms(logits, x, mu, logvar, backend=backend)
    if case in ("inf-mu", "logvar-high"):
        with pytest.raises(ValueError, match=message):
            reparameterize(mu, logvar, backend=backend)
