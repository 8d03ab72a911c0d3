"""Triton reconstruction + KL loss: one pass over logits and targets per row block.

Each program owns BLOCK_R rows: it streams the logits and targets BLOCK_D columns at a time,
accumulating the reconstruction term in registers (float32, float64 for float64 logits),
writes grad_logits in the same pass when asked, then reduces the rows' KL and writes its
gradients. Outputs are per row, so no atomics: the final sum is torch's, deterministic.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, pick


@triton.jit
def _log1p(t):
    """log(1 + t) accurate for small t (Kahan's trick), for t >= 0; no libdevice needed."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _loss(l_ptr, x_ptr, mu_ptr, lv_ptr, recon_ptr, kl_ptr, gl_ptr, gmu_ptr, glv_ptr, B, D, L, beta_hi, beta_lo,
          X_U8: tl.constexpr, GAUSSIAN: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr, ACC_KL: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        off = rows64[:, None] * D + cols[None, :]
        logit = tl.load(l_ptr + off, mask=mask, other=0.0).to(ACC)
        if X_U8:
            x = tl.load(x_ptr + off, mask=mask, other=0).to(ACC) / 255.0
        else:
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        if GAUSSIAN:
            diff = logit - x
            term = diff * diff
            grad = 2.0 * diff
        else:
            t = tl.exp(-tl.abs(logit))  # in (0, 1]: finite for any logit
            term = tl.maximum(logit, 0.0) - logit * x + _log1p(t)
            inv = 1.0 / (1.0 + t)
            grad = tl.where(logit >= 0, inv, t * inv) - x  # sigmoid(logit) - x
        acc += tl.where(mask, term, 0.0)
        if NEED_GRAD:
            tl.store(gl_ptr + off, grad.to(gl_ptr.dtype.element_ty), mask=mask)
    tl.store(recon_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)

    beta = tl.cast(beta_hi, ACC_KL) + tl.cast(beta_lo, ACC_KL)  # beta to float64 precision as two float32 words
    kl = tl.zeros([BLOCK_R], ACC_KL)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        off = rows64[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC_KL)
        lv = tl.load(lv_ptr + off, mask=mask, other=0.0).to(ACC_KL)
        var = tl.exp(lv)
        kl += tl.sum(tl.where(mask, 1.0 + lv - mu * mu - var, 0.0), axis=1)
        if NEED_GRAD:
            tl.store(gmu_ptr + off, (beta * mu).to(gmu_ptr.dtype.element_ty), mask=mask)
            tl.store(glv_ptr + off, (beta * 0.5 * (var - 1.0)).to(glv_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + rows, -0.5 * kl, mask=row_ok)


def _rows_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def loss_forward(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float | torch.Tensor, likelihood: str,
                 need_grad: bool, scale: float = 1.0, flags: torch.Tensor | None = None, *, block_rows: int | None = None,
                 block_cols: int | None = None):
    """(recon_rows, kl_rows, grad_logits | None, grad_mu | None, grad_logvar | None) of scale * sum(recon + beta * kl).

    Inputs contiguous, x of logits' shape (float or uint8). Rows are float32 (float64 for float64
    inputs); gradients take their tensor's dtype.
    """
    if isinstance(beta, torch.Tensor):  # interface shim: read on the host until the kernel loads it
        beta = float(beta.item())
    B, D = logits.shape
    L = mu.shape[1]
    recon = torch.empty(B, dtype=_rows_dtype(logits), device=logits.device)
    kl = torch.empty(B, dtype=_rows_dtype(mu), device=logits.device)
    grads = (torch.empty_like(logits), torch.empty_like(mu), torch.empty_like(logvar)) if need_grad else (logits, mu, logvar)
    bd = pick(min(triton.next_power_of_2(D), 1024), min(triton.next_power_of_2(D), 1024), block_cols)
    bl = min(triton.next_power_of_2(L), 256)
    br = pick(max(1, 2048 // max(bd, bl)), max(1, 131072 // max(bd, bl)), block_rows)  # tiles of <= 2048 elements on a GPU
    beta_hi = float(np.float32(beta))
    beta_lo = float(np.float32(beta - beta_hi))
    _loss[(triton.cdiv(B, br),)](logits, x, mu, logvar, recon, kl, *grads, B, D, L, beta_hi, beta_lo,
                                 X_U8=x.dtype == torch.uint8, GAUSSIAN=likelihood == "gaussian", NEED_GRAD=need_grad,
                                 ACC=acc_dtype(logits), ACC_KL=acc_dtype(mu), BLOCK_R=br, BLOCK_D=bd, BLOCK_L=bl)
    if need_grad and scale != 1.0:  # interface shim: folded into the kernel later
        for g in grads:
            g.mul_(scale)
    return (recon, kl, *grads) if need_grad else (recon, kl, None, None, None)


def scale_grads(grad_out: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Every tensor of `grads` times grad_out (0-dim, or one factor per row) in place (interface shim)."""
    for t in grads:
        t.mul_(grad_out if grad_out.dim() == 0 else grad_out.reshape(-1, *([1] * (t.dim() - 1))))
