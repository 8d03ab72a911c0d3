"""A layer's bias gradient with its ReLU's backward folded in: one pass over the output gradient.

For y = relu(a W^T + b) (``relu_out`` = y given) or y = a W^T + b (None): ``grad`` (B, N), the
gradient of y, becomes in place the gradient of the pre-activation (zero where y <= 0, as
torch's ReLU backward has it), and ``out`` (N,) its column sums, d loss / d b. Used by the
hand-written training step (``fastvae.step``); autograd does the same in two passes.

Backend interface (optional):
    bias_grad(grad (B, N) contiguous, relu_out (B, N) contiguous | None, out (N,)) -> None
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backends import BackendUnavailable, pick

OP = "bias_grad"


def bias_grad_reference(grad: torch.Tensor, relu_out: torch.Tensor | None, out: torch.Tensor) -> None:
    if relu_out is not None:
        torch.ops.aten.threshold_backward.grad_input(grad, relu_out, 0, grad_input=grad)
    torch.sum(grad, 0, out=out)


def implementation(backend: str | None, like: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], None]:
    """The bias_grad function of the backend `backend` picks for tensors like `like` (the reference when none)."""
    _, impl = pick(OP, backend, like)
    return impl.bias_grad if impl is not None else bias_grad_reference


def available(backend: str) -> bool:
    """Whether `backend` runs bias_grad on CPU tensors here (tests)."""
    try:
        return pick(OP, backend, torch.empty(1, 1))[1] is not None
    except (BackendUnavailable, TypeError):
        return False
