"""CUDA-graph training step for ``fastvae.Trainer``: the whole step replayed as one graph.

One replay = gather the batch on the device from the uint8 dataset by a static index buffer,
forward through the fused ops, backward, and Adam with ``capturable=True`` (its step counter
lives on the device). Per step the host only copies the batch's slice of the shuffled index
into the static buffer (and, during a KL warm-up, fills the weight) and launches the replay: no host sync, the running sums are read back
every ``log_every`` steps as in eager mode. A streamed source (``fastvae.stream``) hands the step
the batch's pixels instead, already on the device: they are copied into a static input buffer
that the graph reads (one device-to-device copy, in stream order).

What changes per replay: the KL warm-up weight (``Trainer.beta_at``, filled into a device scalar
by the host before the replay, no sync) is read by the loss kernel from device memory, and the
fused reparameterisation's Philox seed is a 0-dim int64 tensor drawn by torch's CUDA generator
inside the graph (``ops.reparam.new_seed``: on CUDA for every unseeded call, eager or captured),
so every replay samples new eps with the same fused kernel the eager warm-up steps ran. Bad
values are flagged by the kernels in a device word that ``fastvae.check_values`` reads at the
Trainer's logging steps.

Where the Trainer runs the hand-written step (``fastvae.mlp_step``: fastvae.VAE with a FlatAdam),
the body is that step's PyTorch calls and one fused Adam over the flat buffers: the host fills the
Philox seed, Adam's step count and (during a warm-up) the KL weight into device buffers before each
replay, so the graph holds no RNG draw and no counter arithmetic (25 kernels for the reference
model; tests/test_graphs.py counts them). Other models capture the autograd step.

The first ``WARMUP_STEPS`` full batches run eagerly on a side stream (cuBLAS and autograd set
themselves up; they are real training steps), the next one is captured and replayed. The short
last batch of an epoch runs eagerly. If capture fails, one warning and eager from then on.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from . import _checks
from .backends import warn_once
from .ops.loss import LossTerms
from .ops.reparam import new_seed

WARMUP_STEPS = 3


class StepConfig(Protocol):
    """The training settings the graph engine reads (``fastvae.TrainConfig`` has them)."""

    cuda_graph: bool | None
    objective: str
    batch_size: int
    beta: float
    warmup: int
    warmup_unit: str
    amp: bool


class TrainingRun(Protocol):
    """What the graph engine needs of the trainer whose step it runs (``fastvae.Trainer`` is one).
    Described here rather than imported: trainer.py imports this module, not the other way round."""

    config: StepConfig
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: torch.Tensor  # the whole data set on the device
    labels: torch.Tensor | None
    shard: object | None  # set under distributed training
    steps_per_epoch: int
    step: int

    def beta_at(self, step: int) -> float: ...


def set_capturable(optimizer: torch.optim.Optimizer, flag: bool) -> None:
    """Switch Adam's capturable mode (a resumed state_dict carries the flag of the run that saved it)."""
    for group in optimizer.param_groups:
        group["capturable"] = flag
        if flag:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, value meaning TF32) for matmuls and convolutions: torch's fp32_precision API
    where it has one (>= 2.9: reading the legacy allow_tf32 flags after it was used raises), else allow_tf32."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        return [(b.cuda.matmul, "fp32_precision", "tf32"), (b.cudnn.conv, "fp32_precision", "tf32")]
    return [(b.cuda.matmul, "allow_tf32", True), (b.cudnn, "allow_tf32", True)]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA while training (restored afterwards); nothing when not enabled."""
    if not enabled:
        yield
        return
    switches = _tf32_switches()
    old = [getattr(obj, attr) for obj, attr, _ in switches]
    for obj, attr, value in switches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for (obj, attr, _), value in zip(switches, old):
            setattr(obj, attr, value)


def unsupported(trainer: TrainingRun) -> str | None:
    """Why the training step of `trainer` is not captured, or None."""
    c = trainer.config
    if trainer.device.type != "cuda":
        return f"it needs a CUDA device, not {trainer.device}"
    if c.objective != "elbo":
        return f"objective={c.objective!r} is not captured (only 'elbo')"
    if getattr(trainer.model, "conditional", False) or hasattr(trainer.model, "training_step"):
        return f"{type(trainer.model).__name__} (labels or its own training_step) is not captured"
    if trainer.shard is not None:
        return "distributed training is not captured"
    return None


def engine(trainer: TrainingRun) -> GraphStep | None:
    """The graph engine if ``config.cuda_graph`` asks for it (None: on where supported) and it can run, else None."""
    flag = trainer.config.cuda_graph
    why = unsupported(trainer) if flag is not False else "cuda_graph=False"
    if flag and why:
        warn_once("graph:unsupported", f"fastvae: cuda_graph=True but {why}; training eagerly")
    if not hasattr(trainer.model, "training_step"):
        set_capturable(trainer.optimizer, why is None)
    return GraphStep(trainer) if why is None else None


class GraphStep:
    """Runs training steps of `trainer`: graph replays for full batches, eager otherwise.

    ``step(inp)`` takes the batch's row indices (a resident source) or its pixels (streamed) and returns LossTerms (loss, recon, kl summed over the batch, detached) viewing a device
    buffer that the next step overwrites: consume them (in stream order) before calling again.
    """

    def __init__(self, trainer: TrainingRun) -> None:
        self.trainer = trainer
        c, dev = trainer.config, trainer.device
        self.length = c.warmup * (trainer.steps_per_epoch if c.warmup_unit == "epochs" else 1)
        self.gathers = trainer.source.resident  # the step gathers its rows from trainer.data; else it is handed the batch
        self.batch_size = c.batch_size
        self.input: torch.Tensor | None = None  # static: the batch's row indices, or its pixels (made by the first full batch)
        # The KL weight of the step, read by the loss kernel from device memory: filled by the host before each
        # step (Trainer.beta_at, exact) with no sync, so the graph holds no warm-up arithmetic.
        self.beta = torch.zeros((), dtype=torch.float64, device=dev) if self.length else None
        self.stats = torch.zeros(3, dtype=torch.float64, device=dev)
        self._ones: dict[torch.dtype, torch.Tensor] = {}  # d loss / d loss, static (created by the eager warm-up steps)
        self.params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        # the hand-written step (fastvae.mlp_step), if the trainer runs one; its inputs that change per step live on the device
        self.fused = getattr(trainer, "_fused", None)
        if self.fused is not None and not getattr(self.fused._reparam, "tensor_seed", False):
            self.fused = None  # a sampler that takes int seeds only: the autograd step draws eps with the PyTorch Philox
        if self.fused is not None:
            self.seed = torch.zeros((), dtype=torch.int64, device=dev)
            self.count = int(trainer.optimizer.step_count.item())  # Adam's steps, kept on the host
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.warm = 0
        self._grads: list[torch.Tensor | None] = []

    def _body(self, inp: torch.Tensor) -> torch.Tensor:
        """One training step, as captured: every op here is a node of the graph (tests/test_graphs.py counts them).
        Returns the (3,) buffer of [loss, recon, kl] it writes."""
        t, c = self.trainer, self.trainer.config
        batch = torch.index_select(t.data, 0, inp) if self.gathers else inp
        if self.fused is not None:
            ws = self.fused.space(inp.shape[0])
            self.fused.calls(batch, ws.beta_t if self.length else c.beta, self.seed)
            t.optimizer.flat_step()  # at the step count the host filled
            return ws.stats
        beta = self.beta if self.beta is not None else c.beta
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.amp, cache_enabled=False):  # no cast cache across a capture
            terms = t.model.loss_terms(batch, beta=beta, reduction="sum")
        # autograd.grad, not backward(): no AccumulateGrad nodes; the static `one` saves a fill per step.
        one = self._ones.get(terms.loss.dtype)
        if one is None:
            one = self._ones[terms.loss.dtype] = torch.ones((), dtype=terms.loss.dtype, device=terms.loss.device)
        grads = torch.autograd.grad(terms.loss, self.params, one, allow_unused=True)
        for p, g in zip(self.params, grads):
            p.grad = g
        t.optimizer.step()
        with torch.no_grad():
            torch.stack((terms.loss, terms.recon, terms.kl), out=self.stats)
        return self.stats

    def _capture(self) -> bool:
        _checks.flag_word(self.trainer.device)  # allocated outside the graph, so replays write the same word
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._stats = self._body(self.input)
        except Exception as exc:  # noqa: BLE001 - any capture failure means "train eagerly"
            torch.cuda.synchronize(self.trainer.device)
            self.failed = True
            warn_once("graph:capture", f"fastvae: CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); training eagerly")
            return False
        self.graph = graph
        self._grads = [p.grad for p in self.params]  # the graph's gradient buffers: keep them owned
        return True

    def step(self, inp: torch.Tensor) -> LossTerms:
        """One training step (forward, backward, update) on the rows `inp` of the dataset (or, streamed, the batch `inp`)."""
        return LossTerms(*self._run(inp))

    def _prepare(self, batch: int) -> None:
        """The step's per-step inputs into their device buffers, before the replay (no sync)."""
        beta = self.trainer.beta_at(self.trainer.step)
        if self.beta is not None:
            self.beta.fill_(beta)
        if self.fused is not None:
            self.fused.set_beta(batch, beta)
            self.seed.fill_(new_seed())
            self.count += 1
            self.trainer.optimizer.step_count.fill_(self.count)

    def _run(self, inp: torch.Tensor) -> torch.Tensor:
        self._prepare(inp.shape[0])
        if inp.shape[0] != self.batch_size or self.failed:
            return self._body(inp)
        if self.input is None:
            self.input = torch.empty_like(inp)
        self.input.copy_(inp)
        if self.graph is None:
            if self.warm < WARMUP_STEPS:
                self.warm += 1
                side = torch.cuda.Stream(self.trainer.device)
                side.wait_stream(torch.cuda.current_stream(self.trainer.device))
                with torch.cuda.stream(side):
                    stats = self._body(self.input)
                torch.cuda.current_stream(self.trainer.device).wait_stream(side)
                return stats
            if not self._capture():
                return self._body(self.input)
        self.graph.replay()
        return self._stats
