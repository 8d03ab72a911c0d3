"""Multi-process data-parallel training: ``torchrun --nproc_per_node=N -m fastvae train ...``.

Every rank visits the same batches in the same order (``fastvae.stream.epoch_order`` of the
data seed, broadcast from rank 0, and the epoch); for each global batch of ``batch_size`` rows,
rank r takes its contiguous slice ``rows[lo_r:hi_r]`` (torch.tensor_split's cut): gathered from
the whole data set held on its device (resident), or the only rows it reads (streamed).
The model is wrapped in DistributedDataParallel, which averages gradients over ranks, so each
rank back-propagates world_size * (its summed loss): the averaged gradient is then the gradient
of the global batch's summed loss, as in one process.

eps: each step draws one Philox seed from torch's generator (identical on every rank), and
the eps of the global batch's row j is element block j of that stream, whichever rank holds
row j (a rank pads its mu/logvar with `lo_r` leading zero rows and keeps rows lo_r..hi_r).

Guarantee: a run on N processes equals the run on one process of the same code path (torchrun
with N=1) up to floating-point summation order (per-rank sums then the all-reduce, against one
sum): tests/test_distributed.py checks 2 processes against 1 to 1e-10 in float64. A run without
torch.distributed uses torch.randn for eps (no per-step seed), so it matches only in distribution.
Checkpoints, metrics and pictures are written by rank 0 only; logged losses are all-reduced.
NCCL (CUDA) and gloo (CPU) run the same code.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ops.loss import LossTerms, loss_terms
from .ops.reparam import new_seed, reparameterize


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with CUDA, else gloo. True if joined."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return active()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    """True on rank 0, and in a single process: the one that writes files."""
    return not active() or dist.get_rank() == 0


class _ShardLoss(nn.Module):
    """DDP's module: the summed loss terms of this rank's rows, with eps indexed by global row."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, offset: int, seed: int, beta: float) -> LossTerms:
        m = self.model
        if x.shape[0] == 0:  # more ranks than rows in the last batch: contribute zero gradients
            zero = sum(p.sum() for p in m.parameters()) * 0.0
            return LossTerms(zero, zero.detach(), zero.detach())
        flat = m.flatten(x)
        mu, logvar = m.encoder(flat)
        pad = mu.new_zeros(offset, mu.shape[1])
        z = reparameterize(torch.cat([pad, mu]), torch.cat([pad, logvar]), seed=seed, backend=m.backend)[offset:]
        target = x.reshape(flat.shape) if x.dtype == torch.uint8 else flat
        return loss_terms(m.decoder(z), target, mu, logvar, beta=beta, reduction="sum", likelihood=m.likelihood, backend=m.backend)


class Sharded:
    """The Trainer's per-step hook under torch.distributed: this rank's share of each global batch."""

    def __init__(self, model: nn.Module, device: torch.device, data_seed: int) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        states = [torch.get_rng_state(), data_seed]
        dist.broadcast_object_list(states, src=0)  # one data order and one eps stream, even with seed=None
        torch.set_rng_state(states[0])
        self.data_seed = int(states[1])
        self.ddp = DistributedDataParallel(_ShardLoss(model), device_ids=[device.index] if device.type == "cuda" else None)

    def loss_terms(self, x: torch.Tensor, offset: int, beta: float) -> tuple[LossTerms, torch.Tensor]:
        """(this rank's summed terms, the objective to back-propagate) for its rows `x` of a global batch,
        the first of them at row `offset` of that batch (``fastvae.stream.share``)."""
        seed = new_seed()  # drawn on every rank, so torch's generator stays in step
        terms = self.ddp(x, offset, seed, beta)
        return terms, terms.loss * self.world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (the logged loss sums)."""
        dist.all_reduce(t)
        return t
