"""Reconstruction + beta * KL in one reduction, from decoder logits.

Bernoulli: BCE from logits, max(l, 0) - l x + log1p(exp(-|l|)), finite for any logit (no
sigmoid pass, no clamp). Gaussian: squared error sum((out - x)^2). Targets may be float or
uint8 (read as x / 255, so a uint8 dataset needs no float copy).

The fused backends make one pass over logits and targets that writes the per-row
reconstruction and KL (float32) and, when a gradient is needed, grad_logits =
sigmoid(l) - x (or 2 (out - x)) and the KL gradients; backward only scales them. The final
sum over rows is a fixed-order torch reduction: deterministic.

Backend interface:
    loss_forward(logits, x, mu, logvar, beta: float, likelihood: str, need_grad: bool)
        -> (recon_rows (B,), kl_rows (B,), grad_logits | None, grad_mu | None, grad_logvar | None)
    where the gradients are those of sum(recon_rows + beta * kl_rows).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _checks, backends
from .reparam import kl_rows_reference

OP = "loss"
LIKELIHOODS = ("bernoulli", "gaussian")


class LossTerms(NamedTuple):
    """loss = recon + beta * kl, each reduced the same way."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def target_values(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Targets as floats of `like`'s accumulation dtype; uint8 is read as x / 255."""
    dtype = _checks.accumulate(like).dtype
    return x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)


def recon_rows_reference(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Per-row reconstruction loss, computed in float32 (float64 for float64 logits)."""
    out = _checks.accumulate(logits)
    target = target_values(x, logits)
    if likelihood == "gaussian":
        return (out - target).pow(2).sum(-1)
    return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(-1)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() / rows.shape[0] if reduction == "mean" else rows.sum()


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, logits, x, mu, logvar, beta, likelihood):  # type: ignore[override]
        need_grad = any(ctx.needs_input_grad[i] for i in (1, 3, 4))
        recon, kl, g_logits, g_mu, g_logvar = impl.loss_forward(logits, x, mu, logvar, beta, likelihood, need_grad)
        # The gradients are intermediates owned by this node: kept as attributes (not saved tensors) so that
        # backward scales them in place instead of allocating another logits-sized tensor.
        ctx.grads = (g_logits, g_mu, g_logvar)
        ctx.mark_non_differentiable(recon, kl)
        return recon + beta * kl, recon, kl

    @staticmethod
    def backward(ctx, grad_rows, _grad_recon, _grad_kl):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the fused loss's backward ran twice (retain_graph=True); use backend='torch' for double backward")
        grads, ctx.grads = ctx.grads, None
        # loss.sum().backward() sends ones: on the CPU that is cheap to see and saves a pass over the
        # logits-sized gradient (on CUDA the check would cost a sync, more than the pass).
        if not (grad_rows.device.type == "cpu" and bool((grad_rows == 1).all())):
            g = grad_rows.unsqueeze(-1)
            grads = tuple(t.mul_(g) for t in grads)
        g_logits, g_mu, g_logvar = grads
        return None, g_logits, None, g_mu, g_logvar, None, None


def _check(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str, reduction: str) -> torch.Tensor:
    """Validate and return x flattened to logits' shape."""
    _checks.reduction(reduction)
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    _checks.floating("logits", logits)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"x (targets) must be floating point or uint8 (read as x/255), got {x.dtype}")
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _checks.same_device(logits=logits, x=x, mu=mu, logvar=logvar)
    _checks.latent_pair(mu, logvar)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, features), got shape {tuple(logits.shape)}")
    if x.shape != logits.shape:
        if x.shape[:1] == logits.shape[:1] and x[0].numel() == logits.shape[1]:
            x = x.reshape(logits.shape)
        else:
            raise ValueError(f"x must hold {logits.shape[1]} features per row like logits {tuple(logits.shape)}, got {tuple(x.shape)}")
    if mu.shape[0] != logits.shape[0]:
        raise ValueError(f"mu and logits must have the same batch size, got {mu.shape[0]} and {logits.shape[0]}")
    if logits.shape[0] == 0:
        raise ValueError("the batch is empty (0 rows); pass at least one sample")
    _checks.finite("logits", logits)
    if x.is_floating_point():
        _checks.finite("x", x)
        if likelihood == "bernoulli" and _checks.values_checked() and bool(((x < 0) | (x > 1)).any()):
            raise ValueError("x (targets) must lie in [0, 1] for the Bernoulli likelihood; scale the data to [0, 1] or use likelihood='gaussian'")
    return x


def loss_terms(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float | torch.Tensor = 1.0,
    reduction: str = "sum",
    likelihood: str = "bernoulli",
    backend: str | None = None,
) -> LossTerms:
    """(loss, recon, kl) with loss = recon + beta * kl; only ``loss`` carries gradients.

    ``beta`` may be a 0-dim float tensor (a KL warm-up read on the device, as in CUDA graphs):
    the fused pass then runs with beta=0 and PyTorch adds beta * KL with autograd.
    """
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise ValueError(f"a tensor beta must be a 0-dim float tensor, got shape {tuple(beta.shape)} and {beta.dtype}")
        terms = loss_terms(logits, x, mu, logvar, beta=0.0, reduction=reduction, likelihood=likelihood, backend=backend)
        kl = _reduce(kl_rows_reference(_checks.accumulate(mu), _checks.accumulate(logvar)), reduction)
        return LossTerms(terms.loss + beta.to(kl.dtype) * kl, terms.recon, kl.detach())
    x = _check(logits, x, mu, logvar, likelihood, reduction)
    beta = _checks.beta(beta)
    name, impl = backends.pick(OP, backend, logits, x, mu, logvar)

    def eager() -> LossTerms:
        recon = recon_rows_reference(logits, x, likelihood)
        kl = kl_rows_reference(_checks.accumulate(mu), _checks.accumulate(logvar))
        return LossTerms(_reduce(recon + beta * kl, reduction), _reduce(recon.detach(), reduction), _reduce(kl.detach(), reduction))

    if impl is None:
        return eager()

    def fused() -> LossTerms:
        rows, recon, kl = _FusedLoss.apply(impl, logits.contiguous(), x.contiguous(), mu.contiguous(), logvar.contiguous(), beta, likelihood)
        return LossTerms(_reduce(rows, reduction), _reduce(recon.detach(), reduction), _reduce(kl, reduction))

    return backends.run_fused(OP, name, fused, eager)


def bce_kl_loss(logits, x, mu, logvar, *, beta: float = 1.0, reduction: str = "sum", backend: str | None = None) -> torch.Tensor:
    """BCE(sigmoid(logits), x) + beta * KL, from logits, numerically stable; one fused pass."""
    return loss_terms(logits, x, mu, logvar, beta=beta, reduction=reduction, backend=backend).loss


def mse_kl_loss(out, x, mu, logvar, *, beta: float = 1.0, reduction: str = "sum", backend: str | None = None) -> torch.Tensor:
    """sum((out - x)^2) + beta * KL: the Gaussian likelihood for data not in [0, 1]."""
    return loss_terms(out, x, mu, logvar, beta=beta, reduction=reduction, likelihood="gaussian", backend=backend).loss

