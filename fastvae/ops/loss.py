"""Reconstruction + beta * KL in one reduction, from decoder logits.

Bernoulli: BCE from logits, max(l, 0) - l x + log1p(exp(-|l|)), finite for any logit (no
sigmoid pass, no clamp). Gaussian: squared error sum((out - x)^2). Targets may be float or
uint8 (read as x / 255, so a uint8 dataset needs no float copy).

The fused backends make one pass over logits and targets that writes the per-row
reconstruction and KL (float32) and, when a gradient is needed, grad_logits =
scale * (sigmoid(l) - x) (or 2 scale (out - x)) and the KL gradients, with reduction="mean"'s
1/B folded in as `scale`; backward only scales them by the upstream gradient, which for a
scalar loss backpropagated from itself is 1: no pass at all. The same pass flags bad values
(NaN/Inf, targets outside [0, 1], logvar > 88) in the flag word of ``fastvae._checks``. The
final sum over rows is a fixed-order torch reduction: deterministic.

Backend interface:
    loss_forward(logits, x, mu, logvar, beta: float | Tensor, likelihood: str, need_grad: bool,
                 scale: float, flags: Tensor | None)
        -> (recon_rows (B,), kl_rows (B,), grad_logits | None, grad_mu | None, grad_logvar | None)
    where the gradients are those of scale * sum(recon_rows + beta * kl_rows).
    scale_grads(grad_out (0-dim or (B,)), grads: list) -> None: in place; nothing when grad_out is a 0-dim 1
        (read on the device by a kernel on GPUs: no host sync, capture-safe).
"""
from __future__ import annotations

from typing import Any, NamedTuple

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


def add_terms(window: torch.Tensor, terms: Any) -> None:
    """Add a step's [loss, recon, kl] (detached; any object with those attributes) to `window`, the Trainer's float64
    (3,) running sums."""
    window += torch.stack([terms.loss.detach(), terms.recon.detach(), terms.kl.detach()]).to(window.dtype)


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


def _weighted(recon: torch.Tensor, kl: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """recon + beta * kl in recon's dtype (a float64 tensor beta does not promote a float32 loss)."""
    if isinstance(beta, torch.Tensor):
        return recon + (kl * beta).to(recon.dtype)
    return torch.add(recon, kl, alpha=beta)


def loss_reference(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float | torch.Tensor,
                   likelihood: str, reduction: str) -> LossTerms:
    """The torch backend: for a sum or mean, the best eager formulation (one reduced BCE-with-logits or
    squared error over the batch, whose backward is one fused pass); per-row sums for reduction="none"."""
    kl = kl_rows_reference(_checks.accumulate(mu), _checks.accumulate(logvar))
    if reduction == "none":
        recon = recon_rows_reference(logits, x, likelihood)
    else:
        out, target = _checks.accumulate(logits), target_values(x, logits)
        if likelihood == "gaussian":
            recon = F.mse_loss(out, target, reduction="sum")
        else:
            recon = F.binary_cross_entropy_with_logits(out, target, reduction="sum")
        kl = kl.sum()
        if reduction == "mean":
            recon, kl = recon / logits.shape[0], kl / logits.shape[0]
    return LossTerms(_weighted(recon, kl, beta), recon.detach(), kl.detach())


_SPENT = ()  # ctx.grads after the one backward a forward allows


class _FusedLoss(torch.autograd.Function):
    """One kernel writes the rows and the gradients of scale * sum(recon + beta * kl); this node
    reduces the rows itself and its backward only scales the stored gradients by the upstream one.

    Its one output is the loss; the reduced recon and kl (no gradients) are appended to `terms`.
    """

    @staticmethod
    def forward(ctx, impl, logits, x, mu, logvar, beta, likelihood, reduction, flags, terms):  # type: ignore[override]
        needs = ctx.needs_input_grad
        need_grad = needs[1] or needs[3] or needs[4]
        scale = 1.0 / logits.shape[0] if reduction == "mean" else 1.0
        recon, kl, g_logits, g_mu, g_logvar = impl.loss_forward(logits, x, mu, logvar, beta, likelihood, need_grad, scale, flags)
        # The gradients are intermediates owned by this node: kept as attributes (not saved tensors) so that
        # backward scales them in place instead of allocating another logits-sized tensor.
        ctx.impl, ctx.grads = impl, ((g_logits, g_mu, g_logvar) if need_grad else None)
        if reduction == "none":
            loss = _weighted(recon, kl, beta)
        else:
            reduce = torch.mean if reduction == "mean" else torch.sum
            # a tensor beta weighs the rows (in their dtype: no float64 promotion, no cast) before one reduction
            loss = reduce(torch.addcmul(recon, kl, beta)) if isinstance(beta, torch.Tensor) else None
            recon, kl = reduce(recon), reduce(kl)
            loss = torch.add(recon, kl, alpha=beta) if loss is None else loss
        ctx.kl = kl if needs[5] else None
        terms += (recon, kl)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, _SPENT
        if grads is _SPENT:
            raise RuntimeError("the fused loss's backward ran twice (retain_graph=True); use backend='torch' for double backward")
        g_logits = g_mu = g_logvar = None
        if grads is not None:
            # 0-dim for "sum"/"mean": nothing to do when it is 1 (on GPUs a kernel that reads it on the
            # device, no sync); (B,) per row for "none".
            ctx.impl.scale_grads(grad_loss if grad_loss.dim() == 0 else grad_loss.contiguous(), list(grads))
            g_logits, g_mu, g_logvar = grads
        g_beta = (grad_loss * ctx.kl).sum().to(torch.float64) if ctx.kl is not None else None
        return None, g_logits, None, g_mu, g_logvar, g_beta, None, None, None, None


def _check(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str, reduction: str) -> torch.Tensor:
    """Validate shapes, dtypes and devices (no pass over the data); return x flattened to logits' shape."""
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
    device = logits.device
    if not (x.device == device and mu.device == device and logvar.device == device):
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
    return x


def _check_values(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str) -> None:
    """The torch backend's value checks, in the order of the flag bits' messages (fastvae._checks.ERRORS_BY_FLAG)."""
    _checks.latent_values(mu, logvar)
    _checks.finite("logits", logits)
    if x.is_floating_point():
        _checks.finite("x", x)
        if likelihood == "bernoulli" and _checks.values_checked(x) and bool(((x < 0) | (x > 1)).any()):
            raise ValueError(_checks.X_RANGE_MESSAGE)


def _beta(beta: object, device: torch.device) -> float | torch.Tensor:
    """The KL weight: a float >= 0, or a 0-dim float tensor moved to `device` as float64 (what the kernels read)."""
    if not isinstance(beta, torch.Tensor):
        return _checks.beta(beta)
    if beta.dim() != 0 or not beta.is_floating_point():
        raise ValueError(f"a tensor beta must be a 0-dim float tensor, got shape {tuple(beta.shape)} and {beta.dtype}")
    if beta.device != device and beta.device.type != "cpu":
        raise ValueError(f"the beta tensor is on {beta.device} but logits are on {device}; create it on {device}")
    return beta.to(device, torch.float64)


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

    ``beta`` may be a 0-dim float tensor (a KL warm-up computed on the device, as in CUDA graphs):
    the kernels read it from device memory.
    """
    x = _check(logits, x, mu, logvar, likelihood, reduction)
    beta = _beta(beta, logits.device)
    name, impl = backends.pick(OP, backend, logits, x, mu, logvar)

    def eager() -> LossTerms:
        _check_values(logits, x, mu, logvar, likelihood)
        return loss_reference(logits, x, mu, logvar, beta, likelihood, reduction)

    if impl is None:
        return eager()
    flags = _checks.flag_word(logits.device)

    def fused() -> LossTerms:
        terms: list[torch.Tensor] = []
        loss = _FusedLoss.apply(impl, logits.contiguous(), x.contiguous(), mu.contiguous(), logvar.contiguous(),
                                beta, likelihood, reduction, flags, terms)
        return LossTerms(loss, *terms)

    terms = backends.run_fused(OP, name, fused, eager)
    _checks.raise_flags(flags)
    return terms


def bce_kl_loss(logits, x, mu, logvar, *, beta: float = 1.0, reduction: str = "sum", backend: str | None = None) -> torch.Tensor:
    """BCE(sigmoid(logits), x) + beta * KL, from logits, numerically stable; one fused pass."""
    return loss_terms(logits, x, mu, logvar, beta=beta, reduction=reduction, backend=backend).loss


def mse_kl_loss(out, x, mu, logvar, *, beta: float = 1.0, reduction: str = "sum", backend: str | None = None) -> torch.Tensor:
    """sum((out - x)^2) + beta * KL: the Gaussian likelihood for data not in [0, 1]."""
    return loss_terms(out, x, mu, logvar, beta=beta, reduction=reduction, likelihood="gaussian", backend=backend).loss

