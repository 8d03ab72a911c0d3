"""Importance-weighted bounds (Burda et al. 2016) with k samples per input through the fused sampler.

log w_i = log p(x | z_i) + beta * (log p(z_i) - log q(z_i | x)),  z_i = mu + std * eps_i,
IWAE_k = log (1/k) sum_i w_i  (a log-mean-exp), which is >= the ELBO and tightens as k grows.

log p(x | z) is minus the model's reconstruction loss (Bernoulli: BCE from logits, exact;
Gaussian: minus the squared error, the same constant-free convention as the training loss),
so IWAE_1 is the single-sample ELBO with a sampled KL, and all figures are in nats per sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _checks
from .ops.loss import LossTerms, loss_terms
from .ops.reparam import kl_rows_reference, reparameterize


class LogWeights(NamedTuple):
    """log_w (k, B); recon (k, B): reconstruction loss per sample; kl (B,): analytic KL per input."""

    log_w: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def log_weights(model, x: torch.Tensor, k: int, *, beta: float = 1.0, seed: int | None = None, **condition: torch.Tensor) -> LogWeights:
    """The k importance log-weights of each input of a batch (differentiable), for any model with one
    Gaussian latent level (``posterior`` and ``train_logits``: vae, cvae with labels=..., conv, rvae);
    a model whose bound differs provides its own ``log_weights`` (hvae), or refuses (aae)."""
    _checks.positive_int("k", k)
    own = getattr(model, "log_weights", None)
    if own is not None:
        return own(x, k, beta=beta, seed=seed, **condition)
    flat = model.flatten(x)
    target = x.reshape(flat.shape) if x.dtype == torch.uint8 else flat
    mu, logvar = model.posterior(flat, **condition)
    # z in float32 (float64 for float64 models): eps = (z - mu) / std in the log-weights would cancel
    # catastrophically in a z rounded to bfloat16 (autocast) wherever std << |mu|.
    muf, lvf = _checks.accumulate(mu), _checks.accumulate(logvar)
    zf = reparameterize(muf, lvf, k=k, seed=seed, backend=model.backend)  # (k, B, L)
    b = mu.shape[0]
    logits = model.train_logits(zf.to(mu.dtype).reshape(k * b, -1), repeat(flat, k), **{name: repeat(c, k) for name, c in condition.items()})
    recon = recon_rows(model, logits, repeat(target, k)).view(k, b)
    kl = kl_rows_reference(muf.detach(), lvf.detach())
    return LogWeights(-recon + beta * (neg_log_normal(zf, muf, lvf) - neg_log_normal(zf)), recon, kl)


def repeat(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (k * B, ...): the batch k times over, in the order of k samples (k, B, ...) reshaped to (k * B, ...)."""
    return t.unsqueeze(0).expand(k, *t.shape).reshape(k * t.shape[0], *t.shape[1:])


def recon_rows(model, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) per row through the fused loss (beta=0: the reconstruction rows, with gradients)."""
    none = logits.new_zeros(logits.shape[0], 1)
    return loss_terms(logits, target, none, none, beta=0.0, reduction="none", likelihood=model.likelihood, backend=model.backend).loss


def neg_log_normal(z: torch.Tensor, mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """-log N(z; mu, exp(logvar)) summed over the last dim (N(0, I) without mu and logvar), less the
    2*pi terms, which cancel in every log-ratio of densities over the same dimensions."""
    if mu is None or logvar is None:
        return 0.5 * z.pow(2).sum(-1)
    return 0.5 * (((z - mu) * torch.exp(-0.5 * logvar)).pow(2) + logvar).sum(-1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log-mean-exp over the k samples (dim 0): the IWAE bound per input."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def iwae_terms(model, x: torch.Tensor, k: int, *, beta: float = 1.0, reduction: str = "sum", seed: int | None = None) -> LossTerms:
    """(loss, recon, kl) with loss = -IWAE_k (differentiable); recon is the mean over the k samples,
    kl the analytic KL (both for logging, detached), reduced like the ELBO's."""
    _checks.reduction(reduction)
    w = log_weights(model, x, k, beta=beta, seed=seed)
    rows = -iwae_bound(w.log_w)
    recon = w.recon.detach().mean(0)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return t if reduction == "none" else (t.sum() / t.shape[0] if reduction == "mean" else t.sum())

    return LossTerms(reduce(rows), reduce(recon), reduce(w.kl))


def iwae_loss(model, x: torch.Tensor, k: int, *, beta: float = 1.0, reduction: str = "sum", seed: int | None = None) -> torch.Tensor:
    """Minus the IWAE_k bound of a batch (reduction "sum", "mean" per sample, or "none"): a training loss."""
    return iwae_terms(model, x, k, beta=beta, reduction=reduction, seed=seed).loss


class Evaluation(NamedTuple):
    """Mean per sample, in nats: the ELBO (analytic KL, reconstruction averaged over the k samples)
    and the IWAE_k bound; n: how many samples; k: samples per input."""

    elbo: float
    iwae: float
    n: int
    k: int


@torch.no_grad()
def per_sample_bounds(model, images: torch.Tensor, k: int = 1, *, batch_size: int = 256, seed: int | None = 0,
                      labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(elbo (N,), iwae (N,)) float64 on the CPU, in eval mode, in batches of `batch_size` inputs;
    `labels` (one per image) condition a conditional model. images: a tensor, or a data set that
    ``fastvae.stream.in_order`` reads (a shard set from fastvae.data.open, a Dataset, a DataLoader)."""
    from .stream import in_order, is_shardset

    _checks.positive_int("k", k)
    _checks.positive_int("batch_size", batch_size)
    if isinstance(images, torch.Tensor) and (images.dim() < 1 or images.shape[0] == 0):
        raise ValueError(f"images must be a non-empty (N, ...) tensor, got {tuple(images.shape)}")
    if is_shardset(images) and math.prod(images.shape) != model.input_dim:
        raise ValueError(f"{images.path} holds images of shape {tuple(images.shape)} ({math.prod(images.shape)} values) but the model "
                         f"takes input_dim={model.input_dim}; score images of the size the model was trained on")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    elbo, iwae = [], []
    start = 0
    try:
        for i, (batch, _) in enumerate(in_order(images, batch_size)):
            condition = {"labels": labels[start:start + batch.shape[0]].to(device)} if labels is not None else {}
            start += batch.shape[0]
            batch = batch.to(device)
            w = log_weights(model, batch, k, seed=None if seed is None else seed + i, **condition)
            elbo.append((-(w.recon.mean(0) + w.kl)).double().cpu())
            iwae.append(iwae_bound(w.log_w).double().cpu())
    finally:
        model.train(was_training)
    if not elbo:
        raise ValueError("images must be a non-empty data set; it holds no samples")
    return torch.cat(elbo), torch.cat(iwae)


def evaluate(model, images: torch.Tensor, *, k: int = 50, batch_size: int = 256, seed: int | None = 0) -> Evaluation:
    """ELBO and IWAE_k bound of a test set, mean per sample in nats (higher is better)."""
    elbo, iwae = per_sample_bounds(model, images, k, batch_size=batch_size, seed=seed)
    return Evaluation(float(elbo.mean()), float(iwae.mean()), int(elbo.shape[0]), k)
