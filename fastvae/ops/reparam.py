"""Reparameterised sampling z = mu + exp(0.5 logvar) * eps, fused with the KL term.

The fused backends draw eps inside the kernel from the Philox stream of ``fastvae.ops.philox``
(seed + element offset), never store it, and reduce KL(q || N(0, I)) per row in the same pass
when asked (``need_kl``). Backward gets the seed too: the GPU kernels regenerate eps there (exact
under bfloat16, where z - mu would cancel), the CPU one may use z - mu = eps * std.

Backend interface (``impl`` registered in ``fastvae.backends``):
    reparam_forward(mu, logvar, seed: int | Tensor, k: int, need_kl: bool, flags: Tensor | None)
        -> (z (k, B, L), kl_rows (B,) float32 | None); ORs FLAG_MU_*/FLAG_LOGVAR_* bits into flags.
    tensor_seed = True (optional attribute): the kernel reads a 0-dim int64 device `seed` from
        device memory; then every unseeded CUDA call passes one (new_seed), so eager steps, the
        capture and its replays run the same kernel. Without it a tensor seed (a capture, or one
        given by the caller) runs the PyTorch Philox reference instead.
    reparam_backward(grad_z (k, B, L), grad_kl (B,) | None, mu, logvar, z, seed, k) -> (grad_mu, grad_logvar)
"""
from __future__ import annotations

import threading

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


DEVICE_SEEDS = {"cuda"}  # device types whose fresh seeds are drawn on the device (tests add "cpu" to exercise that path)


def new_seed(seed: int | torch.Tensor | None = None, like: torch.Tensor | None = None, *, on_device: bool = False) -> int | torch.Tensor:
    """`seed` itself (validated), or a fresh 63-bit seed from torch's generator (so torch.manual_seed
    makes fused runs reproducible).

    A fresh seed is a Python int drawn on the CPU, except on CUDA (``like.is_cuda``) when
    `on_device` (the kernel reads a tensor seed: ``tensor_seed``) or while the stream is capturing
    a CUDA graph: then it is a 0-dim int64 tensor drawn by the device's generator, with no host
    sync, inside the graph, so that every replay draws a new one (a Python int would be frozen
    into the graph). A given `seed` may also be such a tensor, on `like`'s device.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise ValueError(f"a tensor seed must be a 0-dim int64 tensor, got shape {tuple(seed.shape)} and {seed.dtype}")
        if like is not None and seed.device != like.device:
            raise ValueError(f"the seed tensor is on {seed.device} but mu is on {like.device}; create it on {like.device}")
        return seed
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    if like is not None and like.device.type in DEVICE_SEEDS and (on_device or backends.capturing()):
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=like.device)
    buf = getattr(_host, "seed", None)
    if buf is None:
        buf = _host.seed = torch.empty((), dtype=torch.int64)
    return buf.random_(0, 2**62).item()  # torch.randint's draw from the same generator, without an allocation


_host = threading.local()  # per thread: a reusable CPU int64 scalar for new_seed's draws


def _torch_eps(mu: torch.Tensor, k: int | None, seed: int | torch.Tensor | None) -> torch.Tensor:
    """eps in the accumulation dtype (float32, float64 for float64 mu): torch.randn, or the Philox stream `seed`."""
    shape = mu.shape if k is None else (k, *mu.shape)
    dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if seed is None:
        return torch.randn(shape, dtype=dtype, device=mu.device)
    return philox.randn(seed, mu.numel() * (k or 1), device=mu.device).view(shape).to(dtype)


def _reference(mu: torch.Tensor, logvar: torch.Tensor, k: int | None, seed: int | torch.Tensor | None, need_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch path, computed in float32 for half inputs (z is then rounded once): autograd's
    grad_logvar comes from float32 eps * std, not from a z rounded to bfloat16."""
    mu_a, logvar_a = _checks.accumulate(mu), _checks.accumulate(logvar)
    z = reparam_reference(mu_a, logvar_a, _torch_eps(mu, k, seed))
    return z.to(mu.dtype), (kl_rows_reference(mu_a, logvar_a) if need_kl else None)


class _FusedReparam(torch.autograd.Function):
    """z (and the KL rows when need_kl) from one kernel; backward from (seed, k), mu, logvar and z."""

    @staticmethod
    def forward(ctx, impl, mu, logvar, seed, k, need_kl, flags, squeeze):  # type: ignore[override]
        z, kl = impl.reparam_forward(mu, logvar, seed, k, need_kl, flags)
        ctx.impl, ctx.seed, ctx.k = impl, seed, k
        ctx.save_for_backward(mu, logvar, z)
        out = z.squeeze(0) if squeeze else z
        return (out, kl) if need_kl else out

    @staticmethod
    def backward(ctx, grad_z, grad_kl=None):  # type: ignore[override]
        mu, logvar, z = ctx.saved_tensors
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        else:
            grad_z = grad_z.contiguous()
            grad_z = grad_z.unsqueeze(0) if grad_z.dim() == 2 else grad_z
        grad_mu, grad_logvar = ctx.impl.reparam_backward(grad_z, grad_kl, mu, logvar, z, ctx.seed, ctx.k)
        return None, grad_mu, grad_logvar, None, None, None, None, None


def _check(mu: torch.Tensor, logvar: torch.Tensor, k: int | None, seed: int | torch.Tensor | None) -> None:
    _checks.latent_pair(mu, logvar)
    if k is not None:
        _checks.positive_int("k (samples per input)", k)
    if seed is not None:
        new_seed(seed, like=mu)  # validates it: every backend must refuse the same seeds


def _sample(mu: torch.Tensor, logvar: torch.Tensor, k: int | None, seed: int | torch.Tensor | None, backend: str | None,
            need_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(mu, logvar, k, seed)
    name, impl = backends.pick(OP, backend, mu, logvar)

    def eager() -> tuple[torch.Tensor, torch.Tensor | None]:
        _checks.latent_values(mu, logvar)
        return _reference(mu, logvar, k, seed, need_kl)

    if impl is None:
        return eager()
    tensor_seed = getattr(impl, "tensor_seed", False)
    stream = new_seed(seed, like=mu, on_device=tensor_seed)
    if isinstance(stream, torch.Tensor) and not tensor_seed:
        seed = stream  # this kernel takes int seeds only: PyTorch draws the same Philox stream
        return eager()
    flags = _checks.flag_word(mu.device)

    def fused() -> tuple[torch.Tensor, torch.Tensor | None]:
        out = _FusedReparam.apply(impl, mu.contiguous(), logvar.contiguous(), stream, k or 1, need_kl, flags, k is None)
        return out if need_kl else (out, None)

    out = backends.run_fused(OP, name, fused, eager)
    _checks.raise_flags(flags)
    return out


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    k: int | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z (shape of mu, or (k, *mu.shape) with k samples per input) and the per-row KL (B,).

    One fused pass on accelerated backends. ``seed`` pins the Philox stream: every backend then
    draws the same eps (it may be a 0-dim int64 tensor on mu's device). Without it, "torch" uses
    torch.randn and fused backends a seed drawn from torch's generator (on CUDA by the device's
    generator, with no host sync).
    """
    z, kl = _sample(mu, logvar, k, seed, backend, True)
    return z, kl  # type: ignore[return-value]


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    k: int | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I); see ``reparameterize_kl`` (here no KL is computed)."""
    return _sample(mu, logvar, k, seed, backend, False)[0]


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
    _checks.latent_values(mu, logvar)
    if reduction == "mean" and mu.shape[0] == 0:
        raise ValueError("mu and logvar hold an empty batch (0 rows): reduction='mean' is undefined; pass at least one sample or use reduction='sum'")
    rows = kl_rows_reference(mu, logvar)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / mu.shape[0] if reduction == "mean" else total
