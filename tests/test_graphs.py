"""The CUDA-graph training engine: its device-side pieces on CPU, graph vs eager on a GPU."""
import dataclasses
import importlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastvae
from fastvae import graphs, mlp_step
from fastvae.ops import reparam as reparam_op
from fastvae.ops.loss import loss_terms
from fastvae.ops.reparam import reparameterize

import fake_backends as fake

backends_module = importlib.import_module("fastvae.backends")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("fused", [True, False], ids=["hand-written", "autograd"])
@pytest.mark.parametrize("unit,warmup,schedule", [("steps", 7, "linear"), ("epochs", 2, "linear"), ("steps", 0, "linear"), ("steps", 11, "cyclical")])
def test_graph_step_reads_the_warmup_weight_of_each_step(monkeypatch, unit, warmup, schedule, fused):
    """The KL weight the step body gives the loss (a device scalar during a warm-up) is Trainer.beta_at of that step."""
    cfg = fastvae.TrainConfig(epochs=2, batch_size=128, beta=0.7, warmup=warmup, warmup_unit=unit, warmup_schedule=schedule, cycles=3, progress=False)
    trainer = fastvae.Trainer(fastvae.VAE(), _images(300), cfg, device="cpu")
    seen = []

    def record(beta, run):
        seen.append((trainer.step, float(beta), isinstance(beta, torch.Tensor)))
        return run()

    def forced(t):
        step = graphs.GraphStep(t)
        step.failed = True  # every step through the body, eagerly
        if step.fused is not None:
            calls = step.fused.calls
            monkeypatch.setattr(step.fused, "calls", lambda x, beta, seed=None: record(beta, lambda: calls(x, beta, seed)))
        return step

    monkeypatch.setattr(graphs, "engine", forced)
    if fused:
        pytest.importorskip("fastvae._C")
    else:
        monkeypatch.setattr(mlp_step, "engine", lambda t: None)
        monkeypatch.setattr(trainer.model, "loss_terms", lambda batch, beta, reduction: record(beta, lambda: type(trainer.model).loss_terms(trainer.model, batch, beta=beta, reduction=reduction)))
    trainer.fit()
    assert [s for s, _, _ in seen] == list(range(2 * trainer.steps_per_epoch))
    assert all(b == pytest.approx(trainer.beta_at(s), rel=1e-6) and is_tensor == (warmup > 0) for s, b, is_tensor in seen)


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


# -- the captured step's kernel launches and bytes, counted on CPU -------------------------------------------------------

KERNELS = ("reparam_forward", "reparam_backward", "loss_forward", "scale_grads", "decode_mlp", "to_image", "bias_grad")
STEP_LAUNCHES = 25  # kernel launches of one captured training step of the reference model (docs/gpu.md "Checked without a GPU")
AUTOGRAD_LAUNCHES = 45  # the autograd step (other models, and the reference model before): 40 launches, 41 with a KL warm-up
GEMMS = ("aten.mm.", "aten.addmm.", "aten._addmm_activation.", "aten.bmm.", "aten.baddbmm.")
NO_LAUNCH = ("aten.empty.", "aten.empty_strided.", "aten.empty_like.")  # allocations: a captured graph takes them from its pool
PHILOX_OPS = ("bitwise_and", "bitwise_xor", "rshift", "lshift", "remainder", "gather")  # the PyTorch Philox reference's


@dataclasses.dataclass
class Launch:
    """One op of the step as a GPU runs it: whether it launches a kernel, and the bytes it reads and writes."""

    name: str
    launches: bool
    read: int = 0
    written: int = 0

    @property
    def gemm(self) -> bool:
        return self.name.startswith(GEMMS)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _bytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _aten_launch(func, args, kwargs, out) -> Launch:
    """Bytes of an ATen op by its schema: arguments it reads, arguments it writes (in-place: read and written;
    out=: written), results it allocates. An index_select reads the rows it gathers, not the whole source."""
    name = str(func)
    if func.is_view or name.startswith(NO_LAUNCH):
        return Launch(name, False)
    bound = {arg.name: value for arg, value in zip(func._schema.arguments, args)} | dict(kwargs)
    launch, mutated = Launch(name, True), False
    for arg in func._schema.arguments:
        size = _bytes(bound.get(arg.name))
        if not size:
            continue
        writes = arg.alias_info is not None and arg.alias_info.is_write
        mutated |= writes
        write_only = writes and (arg.name.startswith("out") or arg.name == "grad_input" or name.startswith("aten.copy_."))
        writes = writes and not (name.startswith("aten._fused_adam") and arg.name == "grads")  # mutable only for a grad scaler
        launch.read += 0 if write_only else size
        launch.written += size if writes else 0
    if not mutated:
        launch.written += _bytes(out)
    if name.startswith("aten.index_select."):
        launch.read = _bytes(bound["index"]) + launch.written
    return launch


class _Ops(TorchDispatchMode):
    """Records every op dispatched (each a node of a captured graph) as a Launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "profiler":  # optimizer.step's record_function markers
            self.ops.append(_aten_launch(func, args, kwargs or {}, out))
        return out


class _OneOp:
    """An implementation seen as a GPU runs it: each kernel call is one launch, whatever torch it runs inside,
    reading its tensor arguments and writing its results."""

    def __init__(self, inner, counter: _Ops) -> None:
        self.inner, self.counter = inner, counter
        self.tensor_seed = getattr(inner, "tensor_seed", False)

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name not in KERNELS:
            return fn

        def launch(*args, **kwargs):
            with _disable_current_modes():
                out = fn(*args, **kwargs)
            self.counter.ops.append(Launch(f"kernel.{name}", True, _bytes(list(args) + list(kwargs.values())), _bytes(out)))
            return out
        return launch


def _step_ops(monkeypatch, impls, *, autograd: bool = False, likelihood: str = "bernoulli", **cfg) -> list[Launch]:
    """The launches of one training step body (GraphStep._body, what a capture records), with tensor seeds on CPU:
    the hand-written step's, or (autograd=True) the autograd step's with torch.optim.Adam (the engine before issue 19)."""
    fake.isolate(monkeypatch)
    monkeypatch.setenv("FASTVAE_STRICT", "1")
    monkeypatch.setattr(reparam_op, "DEVICE_SEEDS", {"cuda", "cpu"})  # fresh seeds as on CUDA: 0-dim int64 tensors
    counter = _Ops()
    for op, inner in impls.items():
        fake.install(monkeypatch, op, _OneOp(inner, counter))
    model = fastvae.VAE(likelihood=likelihood)
    trainer = fastvae.Trainer(model, _images(256), fastvae.TrainConfig(batch_size=128, progress=False, **cfg), device="cpu")
    if autograd:
        trainer.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    else:
        trainer._fused = mlp_step.engine(trainer)  # as Trainer.fit sets it
        assert trainer._fused is not None
    step = graphs.GraphStep(trainer)
    assert (step.fused is None) == autograd
    idx = torch.arange(128)
    step._prepare(128)
    step._body(idx)  # as the warm-up steps: optimizer state and the flag word exist before the capture
    step._prepare(128)  # the host's fills before a replay: outside the graph
    counter.ops.clear()
    monkeypatch.setattr(backends_module, "capturing", lambda: True)  # what the step does while a CUDA stream captures it
    with counter:
        step._body(idx)
    assert trainer.optimizer.state and all(p.grad is not None for p in trainer.model.parameters())
    return counter.ops


def _assert_within_budget(ops: list[Launch], budget: int = STEP_LAUNCHES) -> None:
    names = [op.name for op in ops]
    philox = [n for n in names if any(p in n for p in PHILOX_OPS)]
    assert not philox, f"the PyTorch Philox reference runs in the step: {sorted(set(philox))}"
    assert names.count("kernel.reparam_forward") == 1 and "kernel.loss_forward" in names
    launches = [op.name for op in ops if op.launches]
    assert len(launches) <= budget, f"{len(launches)} kernel launches in one training step (budget {budget}):\n" + "\n".join(launches)


def test_readme_states_the_counted_launches(monkeypatch):
    contract = fake.Contract()
    ops = _step_ops(monkeypatch, {"reparam": contract, "loss": contract})
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"one captured training step of the reference model is {sum(op.launches for op in ops)} kernel launches" in " ".join(readme.split())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_captured_step_launches_at_most_25_kernels(monkeypatch, warmup, likelihood):
    contract = fake.Contract()
    ops = _step_ops(monkeypatch, {"reparam": contract, "loss": contract}, warmup=warmup, likelihood=likelihood)
    _assert_within_budget(ops)
    assert contract.called("reparam_forward") == [{"seed": "Tensor", "need_kl": False, "flags": True}] * 2
    assert [d["beta"] for d in contract.called("loss_forward")] == ["Tensor" if warmup else "float"] * 2
    assert not [op.name for op in ops if op.name.startswith(("aten._local_scalar_dense", "aten.item"))]  # no host sync


def test_the_autograd_step_stays_within_its_own_budget(monkeypatch):
    """The step models other than fastvae.VAE capture (the engine's only step before the hand-written one)."""
    contract = fake.Contract()
    ops = _step_ops(monkeypatch, {"reparam": contract, "loss": contract}, autograd=True)
    _assert_within_budget(ops, AUTOGRAD_LAUNCHES)
    assert contract.called("scale_grads") == ["skipped"] * 2  # the loss's upstream gradient is the scalar one
    assert sum(op.launches for op in ops) > STEP_LAUNCHES


def test_the_launch_budget_catches_the_philox_fallback(monkeypatch):
    """A kernel that cannot read a device seed sends the step to the PyTorch Philox: hundreds of ops."""
    contract = fake.Contract()
    int_seeds_only = SimpleNamespace(**{name: getattr(contract, name) for name in ("reparam_forward", "reparam_backward", "unsupported")})
    ops = _step_ops(monkeypatch, {"reparam": int_seeds_only, "loss": contract}, autograd=True)
    with pytest.raises(AssertionError, match="Philox reference runs in the step"):
        _assert_within_budget(ops)
    assert len(ops) > 3 * STEP_LAUNCHES


def test_captured_step_with_the_cpp_kernels_within_the_launch_budget(monkeypatch):
    pytest.importorskip("fastvae._C")
    real = {op: backends_module.load(op, "cpp") for op in ("reparam", "loss", "bias_grad")}
    assert all(real.values())
    _assert_within_budget(_step_ops(monkeypatch, real))


def _minimum_bytes(batch: int, dim: int, hidden: int, latent: int, params: int, size: int = 4) -> dict[str, int]:
    """What the step's work other than its matrix products must move at least, given products that read and write
    float matrices in memory: the batch gathered and made float once, each fused stage reading its inputs once and
    writing its outputs once (the output bias gradient within the loss's pass, the heads' within the sample's
    backward), and Adam reading parameters, gradients and both moments and writing three of them."""
    B, D, H, L, s = batch, dim, hidden, latent, size
    return {
        "batch": 8 * B + B * D + B * D * s,
        "latent": 3 * B * L * s + 5 * B * L * s + 2 * L * s,
        "loss": B * D * s + B * D + 2 * B * L * s + B * D * s + D * s,
        "hidden ReLU + bias": 2 * (3 * B * H * s + H * s),
        "adam": 7 * params * s,
    }


def test_the_steps_other_kernels_move_at_most_1_5x_the_minimum_bytes(monkeypatch):
    """A byte model of the captured step's kernels other than the products, against _minimum_bytes."""
    contract = fake.Contract()
    ops = _step_ops(monkeypatch, {"reparam": contract, "loss": contract, "bias_grad": _ReferenceBiasGrad()})
    params = sum(p.numel() for p in fastvae.VAE().parameters())
    minimum = _minimum_bytes(128, 784, 400, 20, params)
    others = [op for op in ops if op.launches and not op.gemm]
    moved = sum(op.read + op.written for op in others)
    adam = sum(op.read + op.written for op in others if op.name.startswith("aten._fused_adam_"))
    table = "\n".join(f"{op.name}: {op.read + op.written} bytes" for op in others)
    assert minimum["adam"] <= adam <= 1.001 * minimum["adam"], table  # the flat buffers' alignment gaps: a few elements
    assert moved <= 1.5 * sum(minimum.values()), table
    assert moved - adam <= 1.5 * (sum(minimum.values()) - adam), f"{moved - adam} bytes besides Adam, minimum {sum(minimum.values()) - adam}:\n{table}"


class _ReferenceBiasGrad:
    """bias_grad as one kernel (the PyTorch reference inside), for the byte model: it reads grad and the activation,
    and writes grad (when a ReLU is folded in) and the bias gradient."""

    def bias_grad(self, grad, relu_out, out):
        from fastvae.ops.bias_grad import bias_grad_reference

        bias_grad_reference(grad, relu_out, out)
        return (grad, out) if relu_out is not None else out
