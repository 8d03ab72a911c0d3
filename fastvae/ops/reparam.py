"""Reparameterised sampling z = mu + exp(0.5 logvar) * eps, fused with the KL term.

The fused backends draw eps inside the kernel from the Philox stream of ``fastvae.ops.philox``
(seed + element offset), never store it, and reduce KL(q || N(0, I)) per row in the same
pass. Backward needs no eps: z - mu = eps * std, which the decoder keeps anyway, gives
grad_logvar = 0.5 * grad_z * (z - mu).

Backend interface (``impl`` registered in ``fastvae.backends``):
    reparam_forward(mu, logvar, seed: int | Tensor, k: int, need_kl: bool, flags: Tensor | None)
        -> (z (k, B, L), kl_rows (B,) float32 | None)
    tensor_seed = True (optional attribute): the kernel reads a 0-dim int64 device `seed` from
        device memory (CUDA graphs draw it per replay, see new_seed); without it such calls run
        the PyTorch Philox reference.
    reparam_backward(grad_z (k, B, L), grad_kl (B,) | None, mu, logvar, z, seed, k) -> (grad_mu, grad_logvar)
"""
from __future__ import annotations

import torch

from .. import _checks, backends
from . import philox

OP = "reparam"


def kl_rows_reference(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-row KL(N(mu, exp(logvar)) || N(0, I)), as the reference writes it."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def reparam_reference(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + eps * exp(0.5 logvar), in the reference's order of operations."""
    std = torch.exp(0.5 * logvar)
    return mu + eps * std


def new_seed(seed: int | torch.Tensor | None = None, like: torch.Tensor | None = None) -> int | torch.Tensor:
    """`seed` itself, or a fresh 63-bit seed from torch's default generator (so torch.manual_seed
    makes fused runs reproducible; drawn on the CPU, so no device sync).

    Device seeds (for CUDA graphs): `seed` may be a 0-dim int64 tensor on `like`'s device, and
    while a CUDA stream is capturing, the fresh seed is such a tensor drawn by the CUDA generator
    inside the graph, so each replay gets a new one (a Python int would be frozen into the graph).
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise ValueError(f"a tensor seed must be a 0-dim int64 tensor, got shape {tuple(seed.shape)} and {seed.dtype}")
        if like is not None and seed.device != like.device:
            raise ValueError(f"the seed tensor is on {seed.device} but mu is on {like.device}; create it on {like.device}")
        return seed
    if seed is None and like is not None and like.is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=like.device)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _torch_eps(mu: torch.Tensor, k: int | None, seed: int | None) -> torch.Tensor:
    shape = mu.shape if k is None else (k, *mu.shape)
    if seed is None:
        return torch.randn(shape, dtype=mu.dtype, device=mu.device)
    seed = new_seed(seed, like=mu)
    return philox.randn(seed, mu.numel() * (k or 1), device=mu.device).view(shape).to(mu.dtype)


class _FusedReparam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, mu, logvar, seed, k):  # type: ignore[override]
        z, kl = impl.reparam_forward(mu, logvar, seed, k, True, None)
        ctx.impl, ctx.seed, ctx.k = impl, seed, k
        ctx.save_for_backward(mu, logvar, z)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):  # type: ignore[override]
        mu, logvar, z = ctx.saved_tensors
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        grad_mu, grad_logvar = ctx.impl.reparam_backward(grad_z.contiguous(), grad_kl, mu, logvar, z, ctx.seed, ctx.k)
        return None, grad_mu, grad_logvar, None, None


def _check(mu: torch.Tensor, logvar: torch.Tensor, k: int | None, seed: int | None) -> None:
    _checks.latent_pair(mu, logvar)
    if k is not None:
        _checks.positive_int("k (samples per input)", k)
    if seed is not None:
        new_seed(seed)  # validates it: every backend must refuse the same seeds


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    k: int | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z (shape of mu, or (k, *mu.shape) with k samples per input) and the per-row KL (B,).

    One fused pass on accelerated backends. ``seed`` pins the Philox stream: every backend then
    draws the same eps. Without it, "torch" uses torch.randn and fused backends a seed drawn
    from torch's generator.
    """
    _check(mu, logvar, k, seed)
    name, impl = backends.pick(OP, backend, mu, logvar)

    def eager() -> tuple[torch.Tensor, torch.Tensor]:
        z = reparam_reference(mu, logvar, _torch_eps(mu, k, seed))
        return z, kl_rows_reference(_checks.accumulate(mu), _checks.accumulate(logvar))

    stream = new_seed(seed, like=mu) if impl is not None else seed
    if isinstance(stream, torch.Tensor) and not getattr(impl, "tensor_seed", False):
        seed, impl = stream, None  # this kernel takes int seeds only: PyTorch draws the same Philox stream
    if impl is None:
        return eager()

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        z, kl = _FusedReparam.apply(impl, mu.contiguous(), logvar.contiguous(), stream, k or 1)
        return (z if k is not None else z[0]), kl

    return backends.run_fused(OP, name, fused, eager)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    k: int | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I); see ``reparameterize_kl``."""
    return reparameterize_kl(mu, logvar, k=k, seed=seed, backend=backend)[0]


def draw_eps(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int, k: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Testing hook: the eps a backend draws for these shapes and `seed` (its z at mu=0, logvar=0)."""
    zeros = torch.zeros_like(mu)
    return reparameterize(zeros, torch.zeros_like(logvar), k=k, seed=seed, backend=backend)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)).

    reduction: "sum" (the reference's), "mean" (per sample: sum / batch) or "none" (per row).
    """
    _checks.reduction(reduction)
    _checks.latent_pair(mu, logvar)
    if reduction == "mean" and mu.shape[0] == 0:
        raise ValueError("mu and logvar hold an empty batch (0 rows): reduction='mean' is undefined; pass at least one sample or use reduction='sum'")
    rows = kl_rows_reference(mu, logvar)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / mu.shape[0] if reduction == "mean" else total
