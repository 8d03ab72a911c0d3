"""The hand-written training step (fastvae.mlp_step) and its flat Adam (fastvae.arena) against autograd and torch.optim.Adam."""
import copy
import math

import pytest
import torch

import fastvae
from fastvae import backends as report
from fastvae.arena import FlatAdam
from fastvae.iwae import iwae_terms
from fastvae import mlp_step
from fastvae.mlp_step import MLPStep, make_optimizer
from fastvae.ops import bias_grad as bias_grad_op
from fastvae.ops.loss import loss_reference, loss_terms
from fastvae.ops.reparam import reparameterize

needs_cpp = pytest.mark.skipif(report()["loss"]["backends"]["cpp"] != "available", reason="the C++ extension is not built")


def _model(hidden, likelihood="bernoulli", input_dim=50, latent=6, dtype=torch.float64, backend=None):
    torch.manual_seed(1)
    return fastvae.VAE(input_dim, hidden, latent, likelihood, backend=backend).to(dtype)


def _batch(b, d, kind, dtype=torch.float64):
    g = torch.Generator().manual_seed(b * 31 + d)
    if kind == "uint8":
        return torch.randint(0, 256, (b, d), dtype=torch.uint8, generator=g)
    if kind == "unit":
        return torch.rand(b, d, dtype=dtype, generator=g)
    return torch.randn(b, d, dtype=dtype, generator=g) * 2


def _autograd(model, x, beta, seed, backend):
    """Loss terms and gradients of the reference computation (autograd), eps from the Philox stream `seed`."""
    model.zero_grad(set_to_none=True)
    flat = model.flatten(x)
    mu, logvar = model.posterior(flat)
    z = reparameterize(mu, logvar, seed=seed, backend=backend)
    logits = model.decode_logits(z)
    if backend == "torch":
        terms = loss_reference(logits, model.target(x, flat), mu, logvar, beta, model.likelihood, "sum")
    else:
        terms = loss_terms(logits, model.target(x, flat), mu, logvar, beta=beta, likelihood=model.likelihood, backend=backend)
    terms.loss.backward()
    return terms, [p.grad.clone() for p in model.parameters()]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


CASES = [  # (batch, hidden_dims, likelihood, input kind, input_dim)
    (1, (9,), "bernoulli", "uint8", 50),
    (7, (33, 17), "bernoulli", "uint8", 50),
    (130, (40,), "bernoulli", "unit", 50),
    (37, (), "gaussian", "normal", 50),
    (33, (16,), "gaussian", "uint8", 29),
]


@needs_cpp
@pytest.mark.parametrize("whole", [True, False], ids=["one-op", "calls"])
@pytest.mark.parametrize("batch,hidden,likelihood,kind,dim", CASES)
def test_step_matches_autograd_in_float64(batch, hidden, likelihood, kind, dim, whole):
    """Values and every gradient equal autograd's through the same fused kernels (same eps): float64 rounding only."""
    model = _model(hidden, likelihood, dim)
    ref = copy.deepcopy(model)
    x = _batch(batch, dim, kind)
    step = MLPStep(model, make_optimizer(model, 1e-3))
    if not whole:
        step._whole = None
    assert (step._whole is not None) == whole
    terms = step.forward_backward(x, 0.7, seed=1234)
    expected, grads = _autograd(ref, x, 0.7, 1234, "cpp")
    for got, want in zip(terms, expected):
        assert float(got) == pytest.approx(float(want.detach()), rel=1e-12, abs=1e-9)
    for (name, p), want in zip(model.named_parameters(), grads):
        assert _rel(p.grad, want) < 1e-10, name


@needs_cpp
@pytest.mark.parametrize("batch,hidden,likelihood,kind,dim", CASES[:3])
def test_step_matches_the_pytorch_reference(batch, hidden, likelihood, kind, dim):
    """Against backend="torch" (its eps differ from the kernels' by float32 rounding of sin/cos/log)."""
    model = _model(hidden, likelihood, dim)
    ref = copy.deepcopy(model)
    x = _batch(batch, dim, kind)
    terms = MLPStep(model, make_optimizer(model, 1e-3)).forward_backward(x, 1.3, seed=99)
    expected, grads = _autograd(ref, x, 1.3, 99, "torch")
    assert float(terms.loss) == pytest.approx(float(expected.loss.detach()), rel=1e-6)
    for (name, p), want in zip(model.named_parameters(), grads):
        assert _rel(p.grad, want) < 1e-5, name


@needs_cpp
def test_float32_step_and_update_match_autograd_and_torch_adam():
    """Three full steps (update included) in float32 against autograd + torch.optim.Adam(fused=True)."""
    model = _model((64,), input_dim=784, latent=20, dtype=torch.float32)
    ref = copy.deepcopy(model)
    step = MLPStep(model, make_optimizer(model, 1e-3))
    adam = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=True)
    for i in range(3):
        x = _batch(128, 784, "uint8")
        step.step(x, 1.0, seed=i)  # the C++ op's own Adam where the cpp backend has the whole step
        _autograd(ref, x, 1.0, i, "cpp")
        adam.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)


@needs_cpp
def test_step_rejects_mismatched_layers():
    model = _model((9,))
    step = MLPStep(model, make_optimizer(model, 1e-3))
    with pytest.raises(RuntimeError, match="layer 0 must take 49 inputs"):
        step.forward_backward(_batch(4, 49, "uint8"), 1.0, seed=1)


@needs_cpp
@pytest.mark.parametrize("whole", [True, False], ids=["one-op", "calls"])
@pytest.mark.parametrize("kind", ["uint8", "unit"])
def test_step_on_gathered_rows_equals_the_batch_and_adds_to_window(kind, whole):
    """step(data, rows=...) (the op gathers) is bit-identical to step(data[rows]); window receives the stats, added."""
    data = _batch(61, 50, kind)
    rows = torch.tensor([60, 0, 7, 7, 33, 12, 59], dtype=torch.int64)
    got, want = _model((17,)), _model((17,))
    a, b = MLPStep(got, make_optimizer(got, 1e-3)), MLPStep(want, make_optimizer(want, 1e-3))
    if not whole:
        a._whole = b._whole = None
    window = torch.full((3,), 0.5, dtype=torch.float64)
    total = window.clone()
    for seed in (3, 4):
        terms = a.step(data, 0.9, seed=seed, rows=rows, window=window)
        expected = b.step(data[rows], 0.9, seed=seed)
        assert torch.equal(torch.stack(tuple(terms)), torch.stack(tuple(expected)))
        total += torch.stack(tuple(expected))
    assert torch.equal(window, total)
    for p, q in zip(got.parameters(), want.parameters()):
        assert torch.equal(p, q)


@needs_cpp
def test_step_on_rows_of_data_the_op_cannot_read_gathers_in_python():
    """Rows of strided data: gathered in Python, the same step as on data[rows]; rows of data of another dtype: the
    error the autograd step gives."""
    data = _batch(40, 100, "unit", torch.float32)[:, ::2]  # (40, 50), strided rows
    rows = torch.tensor([3, 1, 4, 1, 5, 9], dtype=torch.int64)
    a, b = _model((9,), dtype=torch.float32), _model((9,), dtype=torch.float32)
    got = MLPStep(a, make_optimizer(a, 1e-3)).step(data, 1.0, seed=5, rows=rows)
    want = MLPStep(b, make_optimizer(b, 1e-3)).step(data[rows].contiguous(), 1.0, seed=5)
    assert torch.equal(torch.stack(tuple(got)), torch.stack(tuple(want)))
    with pytest.raises(TypeError, match="convert x with"):
        MLPStep(a, make_optimizer(a, 1e-3)).step(data.to(torch.float64), 1.0, seed=5, rows=rows)


@needs_cpp
def test_op_draws_the_seed_new_seed_would():
    """seed=None: the C++ op draws from torch's generator exactly as new_seed does (torch.manual_seed reproduces it)."""
    from fastvae.ops.reparam import new_seed

    x = _batch(9, 50, "uint8")
    a, b = _model((9,)), _model((9,))
    torch.manual_seed(77)
    got = MLPStep(a, make_optimizer(a, 1e-3)).forward_backward(x, 1.0)
    after_op = torch.rand(2)
    torch.manual_seed(77)
    seed = new_seed()
    after_new_seed = torch.rand(2)
    want = MLPStep(b, make_optimizer(b, 1e-3)).forward_backward(x, 1.0, seed=seed)
    assert torch.equal(torch.stack(tuple(got)), torch.stack(tuple(want)))
    assert torch.equal(after_op, after_new_seed)


@needs_cpp
@pytest.mark.parametrize("rows,match", [
    (torch.tensor([0, 61]), r"rows\[1\] = 61 is outside x's 61 rows"),
    (torch.tensor([-1]), r"rows\[0\] = -1 is outside"),
    (torch.tensor([0, 1], dtype=torch.int32), "rows must be a non-empty 1-D int64"),
    (torch.zeros(0, dtype=torch.int64), "rows must be a non-empty 1-D int64"),
])
def test_step_rejects_bad_rows(rows, match):
    model = _model((9,))
    step = MLPStep(model, make_optimizer(model, 1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match):
        step.step(_batch(61, 50, "uint8"), 1.0, seed=1, rows=rows)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing updated


# -- bias_grad ------------------------------------------------------------------------------------------------------

def _bias_grad_backends():
    return ["torch"] + [b for b in ("cpp", "triton") if bias_grad_op.available(b)]


@pytest.mark.parametrize("backend", _bias_grad_backends())
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (130, 33), (64, 784)])
@pytest.mark.parametrize("relu", [True, False])
def test_bias_grad_matches_threshold_backward_and_sum(backend, rows, cols, relu):
    g = torch.Generator().manual_seed(rows * cols)
    grad = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    act = torch.randn(rows, cols, dtype=torch.float64, generator=g).clamp_min(-0.1)  # zeros, negatives and positives
    act.view(-1)[:: 5] = 0
    if rows * cols > 3:
        act.view(-1)[3] = float("nan")  # kept gradient, as torch's ReLU backward
    want_grad = torch.where(act <= 0, 0.0, grad) if relu else grad.clone()
    got, out = grad.clone(), torch.full((cols,), float("nan"), dtype=torch.float64)
    bias_grad_op.implementation(backend, got)(got, act if relu else None, out)
    torch.testing.assert_close(got, want_grad, rtol=0, atol=0)
    torch.testing.assert_close(out, want_grad.sum(0), rtol=1e-12, atol=1e-12)


# -- FlatAdam --------------------------------------------------------------------------------------------------------

def _small():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g)).pow(2).sum().backward()
        opt.step()


def test_flat_adam_trains_like_torch_adam_and_state_dicts_load_both_ways():
    a, b = _small(), _small()
    flat, ref = FlatAdam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2, fused=True)
    _train(a, flat, 5)
    _train(b, ref, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # FlatAdam's state_dict into torch's Adam and back, then both train on
    c, d = _small(), _small()
    c.load_state_dict(a.state_dict())
    d.load_state_dict(b.state_dict())
    ref2, flat2 = torch.optim.Adam(c.parameters(), lr=1e-2, fused=True), FlatAdam(d.parameters(), lr=1e-2)
    ref2.load_state_dict(flat.state_dict())
    flat2.load_state_dict(ref.state_dict())
    assert float(flat2.step_count) == 5
    _train(c, ref2, 3, seed=1)
    _train(d, flat2, 3, seed=1)
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_flat_adam_views_gathers_stray_grads_and_unpacks():
    model = _small()
    opt = FlatAdam(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    assert all(p.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr() for p in params)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])  # autograd put a gradient elsewhere
    params[1].grad = None  # no gradient: updated as a zero gradient
    opt.step()
    assert params[0].grad.data_ptr() == opt.grad_view(params[0]).data_ptr()
    assert not torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    opt.unpack()
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    for p in params:
        assert opt.state[p]["exp_avg"].untyped_storage().data_ptr() != opt.exp_avg.untyped_storage().data_ptr()
    opt.pack()
    torch.testing.assert_close(opt.flat[opt._offsets[id(params[0])]:][:params[0].numel()], params[0].detach().view(-1))


def test_flat_adam_refuses_mixed_dtypes():
    model = _small()
    model.uses_every_parameter = True
    assert isinstance(make_optimizer(model, 1e-3), FlatAdam)
    model[2].double()
    with pytest.raises(ValueError, match="dtypes"):
        FlatAdam(model.parameters())
    assert not isinstance(make_optimizer(model, 1e-3), FlatAdam)


@pytest.mark.parametrize("name", fastvae.models.MODELS)
def test_every_builtin_model_that_gets_flat_adam_uses_every_parameter_at_every_step(name):
    """FlatAdam gives a parameter with no gradient a zero one (torch.optim.Adam skips it): the same only where every
    parameter gets a gradient from every step, which `uses_every_parameter` claims for fastvae's own models."""
    torch.manual_seed(0)
    model = fastvae.models.for_data(name, (28, 28), hidden_dims=(16,), latent_dim=4).train()
    if hasattr(model, "training_step"):  # its own optimizers (AAE): not the Trainer's
        return
    assert model.uses_every_parameter
    condition = {"labels": torch.arange(6) % 10} if model.conditional else {}
    x = torch.randint(0, 256, (6, 784), dtype=torch.uint8)
    for objective in ("elbo",) if model.conditional else ("elbo", "iwae"):  # the Trainer's IWAE takes no labels
        model.zero_grad(set_to_none=True)
        terms = iwae_terms(model, x, 3, beta=1.0) if objective == "iwae" else model.loss_terms(x, **condition)
        terms.loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == [], objective


class _Branchy(torch.nn.Module):
    """A user's VAE whose forward skips a branch on every other call (the branch then gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.enc, self.mu, self.logvar = torch.nn.Linear(36, 8), torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)
        self.extra, self.dec, self.calls = torch.nn.Linear(8, 8), torch.nn.Linear(2, 36), 0

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.enc(x.view(x.shape[0], -1)))
        if self.calls % 2:
            h = h + self.extra(h)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return torch.sigmoid(self.dec(z)), mu, logvar


def test_fit_gives_a_users_module_torch_adam_which_leaves_a_skipped_branch_alone():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 6, 6), dtype=torch.uint8)
    model = _Branchy()
    trainer = fastvae.Trainer(fastvae.dropin.DropinModel(model, (6, 6), example=images[:4] / 255.0), images,
                              fastvae.TrainConfig(batch_size=4, progress=False), device="cpu")
    assert type(trainer.optimizer) is torch.optim.Adam
    initial = model.extra.weight.detach().clone()
    trainer.fit()  # one epoch: two steps, the branch used in one of them (it moved) ...
    before = model.extra.weight.detach().clone()
    assert not torch.equal(before, initial)
    model.calls = 1  # ... and skipped on the next step: torch's Adam does not move it (FlatAdam's moments would)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.loss_terms(images[:4].view(4, -1)).loss.backward()
    assert model.extra.weight.grad is None
    trainer.optimizer.step()
    assert torch.equal(model.extra.weight, before)


# -- the Trainer ---------------------------------------------------------------------------------------------------

def _images(n):
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


@needs_cpp
def test_trainer_trains_the_reference_model_with_the_fused_step_and_hands_back_plain_parameters(tmp_path):
    torch.manual_seed(0)
    trainer = fastvae.Trainer(fastvae.VAE(), _images(300), fastvae.TrainConfig(epochs=2, progress=False), device="cpu", out_dir=tmp_path)
    seen = []
    trainer.fit(on_epoch=lambda record: seen.append(type(trainer._fused).__name__))
    assert seen == ["MLPStep", "MLPStep"]
    params = list(trainer.model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # unpacked when fit ends
    resumed = fastvae.Trainer(fastvae.VAE(), _images(300), fastvae.TrainConfig(epochs=3, progress=False), device="cpu")
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.fit()[-1]["epoch"] == 3
    assert math.isfinite(resumed.history[-1]["loss"])


@needs_cpp
def test_fused_step_reaches_the_autograd_runs_final_loss():
    """The same run (data, init, order) with the hand-written step and with the torch backend's autograd step."""
    images = fastvae.data.load("fashion-mnist", "train").images[:2560]
    losses = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        cfg = fastvae.TrainConfig(epochs=2, batch_size=128, progress=False, seed=0)
        trainer = fastvae.Trainer(fastvae.VAE(backend=None if backend == "auto" else backend), images, cfg, device="cpu")
        losses[backend] = trainer.fit()[-1]["loss"]
        assert (trainer._fused is not None) == (backend == "auto")
    assert losses["auto"] == pytest.approx(losses["torch"], rel=0.01)


@pytest.mark.parametrize("change", ["forward hook", "pre-hook", "replaced method", "parameter hook", "subclass"])
def test_a_model_the_step_would_bypass_keeps_the_autograd_step(change):
    """Hooks, replaced methods and subclasses run only in the autograd step: the hand-written one is never used then."""
    class Mine(fastvae.VAE):
        pass

    model = Mine() if change == "subclass" else fastvae.VAE()
    if change == "forward hook":
        model.encoder.register_forward_hook(lambda module, args, out: out)
    elif change == "pre-hook":
        model.decoder.fc1.register_forward_pre_hook(lambda module, args: None)
    elif change == "replaced method":
        model.posterior = model.posterior
    elif change == "parameter hook":
        model.encoder.fc1.weight.register_hook(lambda g: g)
    trainer = fastvae.Trainer(model, _images(16), fastvae.TrainConfig(epochs=1, progress=False), device="cpu")
    assert mlp_step.unsupported(trainer) is not None
    trainer.fit()
    assert trainer._fused is None
