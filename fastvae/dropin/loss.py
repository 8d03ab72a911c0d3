"""``vae_loss``: the reference VAE loss as one call, fused when x_hat carries its logits.

``fastvae.accelerate`` already runs a user's own ``binary_cross_entropy(x_hat, x)`` from the
logits, so most code needs no other change; ``vae_loss`` is for code that wants the whole
BCE + beta * KL in one fused pass (or the reference loss from probabilities).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..ops.loss import _reduce, loss_terms, target_values
from ..ops.reparam import kl_rows_reference
from .output import DecoderOutput, logits_of, used


def _refuse_swapped(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if isinstance(x, DecoderOutput):
        raise ValueError("vae_loss(x_hat, x, mu, logvar): x carries the model's decoder logits, so the arguments are swapped; "
                         "pass the model's output first and the data second (a loss written as f(x, x_hat, ...) cannot be "
                         "replaced by vae_loss without reordering its arguments)")
    if isinstance(x, torch.Tensor) and x.requires_grad and not x_hat.requires_grad:
        raise ValueError("vae_loss(x_hat, x, mu, logvar): x requires grad but x_hat does not, so the arguments look swapped; "
                         "pass the model's output first and the data second")


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0,
             *, reduction: str = "sum") -> torch.Tensor:
    """binary_cross_entropy(x_hat, x, reduction='sum') + beta * KLD, the reference loss.

    x_hat holds probabilities; image-shaped x is flattened as the reference's ``x.view(-1, 784)``.
    When x_hat comes from a model passed through ``fastvae.accelerate`` it carries its logits:
    the loss is then the fused ``bce_kl_loss`` from them (unclamped, equal except where a
    probability saturates to 0 or 1). Otherwise torch's clamp of each log at -100 is kept for
    parity, computed in float32 under autocast (where PyTorch refuses binary_cross_entropy).
    reduction: "sum" (the reference), "mean" (per sample: the sum / batch) or "none" (per row).
    Swapped arguments (an x that carries the model's logits, or requires grad when x_hat does
    not) are refused.
    """
    _checks.floating("x_hat", x_hat)
    _refuse_swapped(x_hat, x)
    _checks.latent_pair(mu, logvar)
    _checks.reduction(reduction)
    if isinstance(x_hat, DecoderOutput) and x_hat._fastvae_kind == "logits":
        raise ValueError("vae_loss takes probabilities, but x_hat is the decoder's raw logits (it ends without a sigmoid); "
                         "use fastvae.functional.bce_kl_loss(x_hat, x, mu, logvar) or F.binary_cross_entropy_with_logits")
    logits = logits_of(x_hat, "sigmoid")
    if logits is not None:
        used(x_hat)
        return loss_terms(logits.reshape(mu.shape[0], -1), x, mu, logvar, beta=beta, reduction=reduction).loss
    _checks.latent_values(mu, logvar)
    beta = _checks.beta(beta)
    if x.numel() != x_hat.numel():
        raise ValueError(f"x must have as many elements as x_hat {tuple(x_hat.shape)}, got {tuple(x.shape)}")
    with torch.autocast(x_hat.device.type, enabled=False):
        probs = _checks.accumulate(x_hat).reshape(mu.shape[0], -1)
        target = target_values(x, probs).to(probs.dtype).reshape(probs.shape)
        if _checks.values_checked() and bool(((target < 0) | (target > 1)).any()):
            raise ValueError("x (targets) must lie in [0, 1] for binary cross-entropy; scale the data to [0, 1]")
        rows = F.binary_cross_entropy(probs, target, reduction="none").sum(-1)
        rows = rows + beta * kl_rows_reference(_checks.accumulate(mu), _checks.accumulate(logvar))
    return _reduce(rows, reduction)
