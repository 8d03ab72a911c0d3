"""The CUDA-graph training engine: its device-side pieces on CPU, graph vs eager on a GPU."""
import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastvae
from fastvae import graphs
from fastvae.ops import reparam as reparam_op
from fastvae.ops.loss import loss_terms
from fastvae.ops.reparam import reparameterize

import fake_backends as fake

backends_module = importlib.import_module("fastvae.backends")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("unit,warmup,schedule", [("steps", 7, "linear"), ("epochs", 2, "linear"), ("steps", 0, "linear"), ("steps", 11, "cyclical")])
def test_graph_step_reads_the_warmup_weight_of_each_step(monkeypatch, unit, warmup, schedule):
    """The KL weight the step body gives the loss (a device scalar during a warm-up) is Trainer.beta_at of that step."""
    cfg = fastvae.TrainConfig(epochs=2, batch_size=128, beta=0.7, warmup=warmup, warmup_unit=unit, warmup_schedule=schedule, cycles=3, progress=False)
    trainer = fastvae.Trainer(fastvae.VAE(), _images(300), cfg, device="cpu")
    seen = []

    def record(model, batch, beta, reduction):
        seen.append((trainer.step, float(beta), isinstance(beta, torch.Tensor)))
        return type(model).loss_terms(model, batch, beta=beta, reduction=reduction)

    def forced(t):
        step = graphs.GraphStep(t)
        step.failed = True  # every step through the body, eagerly
        return step

    monkeypatch.setattr(graphs, "engine", forced)
    monkeypatch.setattr(trainer.model, "loss_terms", lambda batch, beta, reduction: record(trainer.model, batch, beta, reduction))
    trainer.fit()
    assert [s for s, _, _ in seen] == list(range(2 * trainer.steps_per_epoch))
    assert all(b == trainer.beta_at(s) and is_tensor == (warmup > 0) for s, b, is_tensor in seen)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_tensor_beta_matches_float_beta(reduction):
    b, d, lat = 7, 13, 3
    logits, mu, logvar = (torch.randn(b, d, dtype=torch.float64) * 3, torch.randn(b, lat, dtype=torch.float64), torch.randn(b, lat, dtype=torch.float64) * 0.5)
    x = torch.rand(b, d, dtype=torch.float64)
    results = []
    for beta in (0.37, torch.tensor(0.37, dtype=torch.float64)):
        leaves = [t.clone().requires_grad_() for t in (logits, mu, logvar)]
        terms = loss_terms(leaves[0], x, leaves[1], leaves[2], beta=beta, reduction=reduction)
        terms.loss.sum().backward()
        results.append((terms, [t.grad for t in leaves]))
    (a, ga), (t, gt) = results
    for u, v in zip(a, t):
        torch.testing.assert_close(u, v)
    for u, v in zip(ga, gt):
        torch.testing.assert_close(u, v)
    with pytest.raises(ValueError, match="0-dim float tensor"):
        loss_terms(logits, x, mu, logvar, beta=torch.ones(2))


def test_tensor_seed_draws_the_int_seed_stream():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(reparameterize(mu, logvar, seed=torch.tensor(1234), backend="torch"), reparameterize(mu, logvar, seed=1234, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="0-dim int64"):
        reparameterize(mu, logvar, seed=torch.tensor([1]))
    with pytest.raises(ValueError, match="0-dim int64"):
        reparameterize(mu, logvar, seed=torch.tensor(1.0))


def _history(cuda_graph, device, **cfg):
    torch.manual_seed(0)
    images = fastvae.data.load("fashion-mnist", "train").images[:3000] if device == "cuda" else _images(300)
    config = fastvae.TrainConfig(epochs=2, batch_size=128, warmup=5, progress=False, cuda_graph=cuda_graph, log_every=7, **cfg)
    trainer = fastvae.Trainer(fastvae.VAE(), images, config, device=device)
    return trainer, trainer.fit()


def test_cpu_trains_eagerly_and_cuda_graph_true_warns_once():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer, auto = _history(None, "cpu")
    assert trainer._graph is None
    with pytest.warns(RuntimeWarning, match="cuda_graph=True but it needs a CUDA device"):
        _, forced = _history(True, "cpu")
    assert [h["loss"] for h in forced] == [h["loss"] for h in auto]


def test_tf32_needs_cuda():
    with pytest.raises(ValueError, match="tf32=True needs a CUDA device"):
        fastvae.Trainer(fastvae.VAE(), _images(10), fastvae.TrainConfig(tf32=True), device="cpu")


@needs_cuda
@pytest.mark.parametrize("amp", [False, True])
def test_graph_replay_matches_eager_training(amp):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer, replayed = _history(True, "cuda", amp=amp)
    assert trainer._graph is not None and trainer._graph.graph is not None and not trainer._graph.failed
    assert trainer.step == 2 * trainer.steps_per_epoch
    _, eager = _history(False, "cuda", amp=amp)
    for r, e in zip(replayed, eager):
        assert r["loss"] == pytest.approx(e["loss"], rel=0.02)
        assert r["kl"] == pytest.approx(e["kl"], rel=0.1)


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_reparam_in_a_graph_draws_new_eps_per_replay(backend):
    if fastvae.backends()["reparam"]["backends"][backend] != "available":
        pytest.skip(f"{backend} not available")
    mu, logvar = torch.randn(64, 20, device="cuda"), torch.randn(64, 20, device="cuda")
    reparameterize(mu, logvar, backend=backend)  # warm-up: compile / load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = reparameterize(mu, logvar, backend=backend)
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z)
    assert torch.isfinite(z).all()


def test_graph_step_body_trains_like_the_eager_loop(monkeypatch):
    """The captured body (device warm-up weight, stats buffer, step counter), run eagerly on CPU."""
    _, eager = _history(False, "cpu")

    def forced(trainer):
        step = graphs.GraphStep(trainer)
        step.failed = True  # every step through the body, eagerly
        return step

    monkeypatch.setattr(graphs, "engine", forced)
    trainer, body = _history(False, "cpu")
    for b, e in zip(body, eager):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(e[key], rel=1e-5)


# -- the captured step's op budget, counted on CPU ---------------------------------------------------------------------

KERNELS = ("reparam_forward", "reparam_backward", "loss_forward", "scale_grads", "decode_mlp", "to_image")
STEP_BUDGET = 80  # ops in one captured training step of the reference model (docs/gpu.md "Checked without a GPU")
PHILOX_OPS = ("bitwise_and", "bitwise_xor", "rshift", "lshift", "remainder", "gather")  # the PyTorch Philox reference's


class _Ops(TorchDispatchMode):
    """Records every op dispatched (each a node of a captured graph; views included, though they launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # optimizer.step's record_function markers
            self.ops.append(str(func) + (" (view)" if func.is_view else ""))
        return func(*args, **(kwargs or {}))


class _OneOp:
    """An implementation seen as a GPU runs it: each kernel call is one op, whatever torch it runs inside."""

    def __init__(self, inner, counter: _Ops) -> None:
        self.inner, self.counter = inner, counter
        self.tensor_seed = getattr(inner, "tensor_seed", False)

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name not in KERNELS:
            return fn

        def launch(*args, **kwargs):
            self.counter.ops.append(f"kernel.{name}")
            with _disable_current_modes():
                return fn(*args, **kwargs)
        return launch


def _step_ops(monkeypatch, impls, **cfg) -> list[str]:
    """The ops of one training step body (GraphStep._body, what a capture records), with tensor seeds on CPU."""
    fake.isolate(monkeypatch)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    monkeypatch.setattr(reparam_op, "DEVICE_SEEDS", {"cuda", "cpu"})  # fresh seeds as on CUDA: 0-dim int64 tensors
    counter = _Ops()
    for op, inner in impls.items():
        fake.install(monkeypatch, op, _OneOp(inner, counter))
    trainer = fastvae.Trainer(fastvae.VAE(), _images(256), fastvae.TrainConfig(batch_size=128, progress=False, **cfg), device="cpu")
    step = graphs.GraphStep(trainer)
    idx = torch.arange(128)
    step._body(idx)  # as the warm-up steps: optimizer state and the flag word exist before the capture
    counter.ops.clear()
    monkeypatch.setattr(backends_module, "capturing", lambda: True)  # what the step does while a CUDA stream captures it
    with counter:
        step._body(idx)
    assert trainer.optimizer.state and all(p.grad is not None for p in trainer.model.parameters())
    return counter.ops


def _assert_within_budget(ops: list[str], budget: int = STEP_BUDGET) -> None:
    philox = [op for op in ops if any(name in op for name in PHILOX_OPS)]
    assert not philox, f"the PyTorch Philox reference runs in the step: {sorted(set(philox))}"
    assert sum(op == "kernel.reparam_forward" for op in ops) == 1 and "kernel.loss_forward" in ops
    assert len(ops) <= budget, f"{len(ops)} ops in one training step (budget {budget}):\n" + "\n".join(ops)


@pytest.mark.parametrize("warmup", [0, 10])
def test_captured_step_runs_the_fused_sampler_within_the_op_budget(monkeypatch, warmup):
    contract = fake.Contract()
    ops = _step_ops(monkeypatch, {"reparam": contract, "loss": contract}, warmup=warmup)
    _assert_within_budget(ops)
    assert contract.called("reparam_forward") == [{"seed": "Tensor", "need_kl": False, "flags": True}] * 2
    assert [d["beta"] for d in contract.called("loss_forward")] == ["Tensor" if warmup else "float"] * 2
    assert contract.called("scale_grads") == ["skipped"] * 2  # the loss's upstream gradient is the scalar one


def test_the_op_budget_catches_the_philox_fallback(monkeypatch):
    """A kernel that cannot read a device seed sends the step to the PyTorch Philox: hundreds of ops."""
    contract = fake.Contract()
    int_seeds_only = SimpleNamespace(**{name: getattr(contract, name) for name in ("reparam_forward", "reparam_backward", "unsupported")})
    ops = _step_ops(monkeypatch, {"reparam": int_seeds_only, "loss": contract})
    with pytest.raises(AssertionError, match="Philox reference runs in the step"):
        _assert_within_budget(ops)
    assert len(ops) > 3 * STEP_BUDGET


def test_captured_step_with_the_cpp_kernels_within_the_op_budget(monkeypatch):
    pytest.importorskip("fastvae._C")
    real = {op: backends_module.load(op, "cpp") for op in ("reparam", "loss")}
    assert all(real.values())
    _assert_within_budget(_step_ops(monkeypatch, real))
