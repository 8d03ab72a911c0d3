"""CUDA-graph training step for ``fastvae.Trainer``: the whole step replayed as one graph.

One replay = gather the batch on the device from the uint8 dataset by a static index buffer,
forward through the fused ops, backward, and Adam with ``capturable=True`` (its step counter
lives on the device). Per step the host only copies the batch's slice of the shuffled index
into the static buffer and launches the replay: no host sync, the running sums are read back
every ``log_every`` steps as in eager mode.

What changes per replay without the host: the KL warm-up weight is computed in the graph from
a device step counter (``warmup_beta``), and the fused reparameterisation's Philox seed is a
0-dim int64 tensor drawn by torch's CUDA generator inside the graph (``ops.reparam.new_seed``
during capture), so every replay samples new eps.

The first ``WARMUP_STEPS`` full batches run eagerly on a side stream (cuBLAS and autograd set
themselves up; they are real training steps), the next one is captured and replayed. The short
last batch of an epoch runs eagerly. If capture fails, one warning and eager from then on.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

from .backends import warn_once
from .ops.loss import LossTerms
from .schedules import CYCLE_RAMP

if TYPE_CHECKING:
    from .trainer import Trainer

WARMUP_STEPS = 3


def warmup_beta(step: torch.Tensor, beta: float, length: int, schedule: str = "linear", cycles: int = 1) -> torch.Tensor:
    """``schedules.kl_weight`` as a tensor on step's device (what Trainer.beta_at gives, read in the graph)."""
    if length <= 0:
        return torch.full_like(step, beta)
    if schedule == "linear":
        ramp = step / length
    else:
        t = step * cycles / length
        ramp = (t - torch.floor(t)) / CYCLE_RAMP
    return torch.where(step >= length, beta, torch.clamp(ramp, max=1.0) * beta)


def set_capturable(optimizer: torch.optim.Optimizer, flag: bool) -> None:
    """Switch Adam's capturable mode (a resumed state_dict carries the flag of the run that saved it)."""
    for group in optimizer.param_groups:
        group["capturable"] = flag
        if flag:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA while training (restored afterwards)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def unsupported(trainer: Trainer) -> str | None:
    """Why the training step of `trainer` is not captured, or None."""
    c = trainer.config
    if trainer.device.type != "cuda":
        return f"it needs a CUDA device, not {trainer.device}"
    if c.objective != "elbo":
        return f"objective={c.objective!r} is not captured (only 'elbo')"
    if trainer.labels is not None or hasattr(trainer.model, "training_step"):
        return f"{type(trainer.model).__name__} (labels or its own training_step) is not captured"
    if trainer.shard is not None:
        return "distributed training is not captured"
    return None


def engine(trainer: Trainer) -> GraphStep | None:
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

    ``step(idx)`` returns LossTerms (loss, recon, kl summed over the batch, detached) viewing a device
    buffer that the next step overwrites: consume them (in stream order) before calling again.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        c, dev = trainer.config, trainer.device
        self.length = c.warmup * (trainer.steps_per_epoch if c.warmup_unit == "epochs" else 1)
        self.idx = torch.zeros(c.batch_size, dtype=torch.int64, device=dev)
        self.step_t = torch.full((), float(trainer.step), dtype=torch.float64, device=dev)
        self.stats = torch.zeros(3, dtype=torch.float64, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.warm = 0
        self._grads: list[torch.Tensor | None] = []

    def _body(self, idx: torch.Tensor) -> None:
        t, c = self.trainer, self.trainer.config
        batch = t.data[idx]
        beta = warmup_beta(self.step_t, c.beta, self.length, c.warmup_schedule, c.cycles) if self.length else c.beta
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.amp, cache_enabled=False):  # no cast cache across a capture
            terms = t.model.loss_terms(batch, beta=beta, reduction="sum")
        terms.loss.backward()
        t.optimizer.step()
        self.stats.copy_(torch.stack([terms.loss.detach(), terms.recon, terms.kl]))
        self.step_t += 1

    def _eager(self, idx: torch.Tensor) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self._body(idx)

    def _capture(self) -> bool:
        params = [p for g in self.trainer.optimizer.param_groups for p in g["params"]]
        self.trainer.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body(self.idx)
        except Exception as exc:  # noqa: BLE001 - any capture failure means "train eagerly"
            torch.cuda.synchronize(self.trainer.device)
            self.failed = True
            warn_once("graph:capture", f"fastvae: CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); training eagerly")
            return False
        self.graph = graph
        self._grads = [p.grad for p in params]  # the graph's gradient buffers: keep them owned
        return True

    def step(self, idx: torch.Tensor) -> LossTerms:
        """One training step (forward, backward, update) on the rows `idx` of the dataset."""
        self._run(idx)
        return LossTerms(*self.stats)

    def _run(self, idx: torch.Tensor) -> None:
        if idx.shape[0] != self.idx.shape[0] or self.failed:
            self._eager(idx)
            return
        self.idx.copy_(idx)
        if self.graph is None:
            if self.warm < WARMUP_STEPS:
                self.warm += 1
                side = torch.cuda.Stream(self.trainer.device)
                side.wait_stream(torch.cuda.current_stream(self.trainer.device))
                with torch.cuda.stream(side):
                    self._eager(self.idx)
                torch.cuda.current_stream(self.trainer.device).wait_stream(side)
                return
            if not self._capture():
                self._eager(self.idx)
                return
        self.graph.replay()
