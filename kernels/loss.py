"""Triton reconstruction + KL loss: one pass over logits and targets per row block.

Each program owns BLOCK_R rows: it streams the logits and targets BLOCK_D columns at a time
(tiles of 4 elements per thread, so logits, uint8 targets and gradients share one register
layout and move as 16 / 4 / 16-byte vectors for float32), accumulates the reconstruction term
in registers (float32, float64 for float64 logits), writes scale * grad_logits in the same
pass when asked, then reduces the rows' KL and writes its gradients. The value checks test the
values already in registers and cost one atomic per program only when something is wrong.
Outputs are per row, so no atomics on data: the final sum is torch's, deterministic.

scale_grads multiplies the gradients by the upstream gradient in place. It reads a 0-dim
factor on the device, so when it is 1 (loss.sum().backward(), or reduction="mean" with 1/B
folded into the forward) each program returns at once: no host sync, no pass over the data,
CUDA-graph safe.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, LOGITS_NONFINITE, X_NONFINITE, X_RANGE, Config, acc_dtype, latent_flags, launch, nonfinite, or_all,
                      report)


@triton.jit
def _loss(l_ptr, x_ptr, mu_ptr, lv_ptr, recon_ptr, kl_ptr, gl_ptr, gmu_ptr, glv_ptr, flags_ptr, beta_ptr,
          B, D, L, beta_hi, beta_lo, scale_hi, scale_lo,
          X_U8: tl.constexpr, GAUSSIAN: tl.constexpr, NEED_GRAD: tl.constexpr, CHECK: tl.constexpr, BETA_PTR: tl.constexpr,
          ACC: tl.constexpr, ACC_KL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)  # float64 precision as two float32 words
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    bad = tl.zeros([BLOCK_R, BLOCK_D], tl.int32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        off = rows64[:, None] * D + cols[None, :]
        logit = tl.load(l_ptr + off, mask=mask, other=0.0).to(ACC)  # padding: 0, which never flags
        if X_U8:
            x = tl.load(x_ptr + off, mask=mask, other=0).to(ACC) / 255.0
        else:
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        if CHECK:
            bad |= tl.where(nonfinite(logit), LOGITS_NONFINITE, 0)
            if not X_U8:
                bad |= tl.where(nonfinite(x), X_NONFINITE, 0)
                if not GAUSSIAN:
                    bad |= tl.where((x < 0.0) | (x > 1.0), X_RANGE, 0)
        if GAUSSIAN:
            diff = logit - x
            term = diff * diff
            grad = 2.0 * diff
        else:
            t = tl.exp(-tl.abs(logit))  # in (0, 1]: finite for any logit
            u = 1.0 + t
            inv = 1.0 / u
            log1p_t = tl.log(u) - ((u - 1.0) - t) * inv  # log1p(t), corrected for the rounding of 1 + t
            term = tl.maximum(logit, 0.0) - logit * x + log1p_t
            grad = tl.where(logit >= 0, inv, t * inv) - x  # sigmoid(logit) - x
        acc += tl.where(mask, term, 0.0)
        if NEED_GRAD:
            tl.store(gl_ptr + off, (scale * grad).to(gl_ptr.dtype.element_ty), mask=mask)
    tl.store(recon_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)

    if BETA_PTR:
        beta = tl.load(beta_ptr).to(ACC_KL)
    else:
        beta = tl.cast(beta_hi, ACC_KL) + tl.cast(beta_lo, ACC_KL)
    grad_scale = scale.to(ACC_KL) * beta
    kl = tl.zeros([BLOCK_R], ACC_KL)
    bad_kl = tl.zeros([BLOCK_R, BLOCK_L], tl.int32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        off = rows64[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC_KL)
        lv = tl.load(lv_ptr + off, mask=mask, other=0.0).to(ACC_KL)
        if CHECK:
            bad_kl |= latent_flags(mu, lv)
        var = tl.exp(lv)
        kl += tl.sum(tl.where(mask, 1.0 + lv - mu * mu - var, 0.0), axis=1)
        if NEED_GRAD:
            tl.store(gmu_ptr + off, (grad_scale * mu).to(gmu_ptr.dtype.element_ty), mask=mask)
            tl.store(glv_ptr + off, (grad_scale * 0.5 * (var - 1.0)).to(glv_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + rows, -0.5 * kl, mask=row_ok)
    if CHECK:
        report(flags_ptr, or_all(bad) | or_all(bad_kl))


@triton.jit
def _scale(g_ptr, a_ptr, na, b_ptr, nb, c_ptr, nc, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """a, b, c *= g[()] in place, grid-stride over the three; nothing at all when g == 1."""
    g = tl.load(g_ptr).to(ACC)
    if g != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        first = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        for start in range(0, na, step):
            offs = start + first
            mask = offs < na
            tl.store(a_ptr + offs, (tl.load(a_ptr + offs, mask=mask).to(ACC) * g).to(a_ptr.dtype.element_ty), mask=mask)
        for start in range(0, nb, step):
            offs = start + first
            mask = offs < nb
            tl.store(b_ptr + offs, (tl.load(b_ptr + offs, mask=mask).to(ACC) * g).to(b_ptr.dtype.element_ty), mask=mask)
        for start in range(0, nc, step):
            offs = start + first
            mask = offs < nc
            tl.store(c_ptr + offs, (tl.load(c_ptr + offs, mask=mask).to(ACC) * g).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows(g_ptr, t_ptr, B, C, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """t (B, C) *= g[row] in place, grid-stride over row blocks."""
    for r0 in range(tl.program_id(0) * BLOCK_R, B, tl.num_programs(0) * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rows, mask=rows < B, other=0.0).to(ACC)[:, None]
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = (rows < B)[:, None] & (cols < C)[None, :]
            off = rows.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(t_ptr + off, (tl.load(t_ptr + off, mask=mask).to(ACC) * g).to(t_ptr.dtype.element_ty), mask=mask)


def _rows_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _split(value: float) -> tuple[float, float]:
    """value as float32 hi + lo (float64 precision): Triton passes Python floats as float32."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _columns(D: int) -> int:
    """The power-of-two column block (64..512) wasting the fewest lanes on D, the largest among ties."""
    return min((64, 128, 256, 512), key=lambda b: (triton.cdiv(D, b) * b, -b))


def _maxnreg(dtype: torch.dtype) -> int:
    """Register cap of the memory-bound loss kernels: 64 (at least 32 warps per SM), 128 for
    float64 (two registers a value); tighter caps spill in some variants."""
    return 128 if dtype == torch.float64 else 64


def config(B: int, D: int, L: int, dtype: torch.dtype, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of the loss kernel for (B, D) logits of `dtype` and (B, L) latents.

    GPU: tiles of 512 elements (4 per thread, 4 warps): every operand then has the same
    register layout (no shared-memory shuffles) and float32 moves in 16-byte vectors. BLOCK_D
    is the power of two wasting the fewest lanes on D (64 for D=784: 6 % padding; 1024 would pad
    31 %), BLOCK_R = 512 / BLOCK_D rows (at least 1), BLOCK_L covers L up to 256 at a time.
    Interpreter: a few large programs.
    """
    latent = min(triton.next_power_of_2(L), 256)
    if interpreted:
        cols = min(triton.next_power_of_2(D), 4096)
        return Config(dict(BLOCK_R=min(triton.next_power_of_2(B), (1 << 17) // max(cols, latent)), BLOCK_D=cols, BLOCK_L=latent))
    cols = _columns(D)
    rows = max(1, 512 // cols)
    return Config(dict(BLOCK_R=rows, BLOCK_D=cols, BLOCK_L=min(latent, max(16, 512 // rows))), num_warps=4, maxnreg=_maxnreg(dtype))


def loss_forward(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float | torch.Tensor, likelihood: str,
                 need_grad: bool, scale: float = 1.0, flags: torch.Tensor | None = None, *, block_rows: int | None = None,
                 block_cols: int | None = None):
    """(recon_rows, kl_rows, grad_logits | None, grad_mu | None, grad_logvar | None) of scale * sum(recon + beta * kl).

    Inputs contiguous, x of logits' shape (float or uint8); beta a float or a 0-dim float64
    tensor on the device (read there); flags an int32 (1,) tensor receiving the value-check
    bits, or None. Rows are float32 (float64 for float64 inputs); gradients take their tensor's dtype.
    """
    B, D = logits.shape
    L = mu.shape[1]
    recon = torch.empty(B, dtype=_rows_dtype(logits), device=logits.device)
    kl = torch.empty(B, dtype=_rows_dtype(mu), device=logits.device)
    grads = (torch.empty_like(logits), torch.empty_like(mu), torch.empty_like(logvar)) if need_grad else (logits, mu, logvar)
    cfg = config(B, D, L, logits.dtype).override(BLOCK_R=block_rows, BLOCK_D=block_cols)
    beta_is_ptr = isinstance(beta, torch.Tensor)
    beta_hi, beta_lo = (0.0, 0.0) if beta_is_ptr else _split(beta)
    launch(_loss, (triton.cdiv(B, cfg.blocks["BLOCK_R"]),), logits, x, mu, logvar, recon, kl, *grads,
           flags if flags is not None else recon, beta if beta_is_ptr else recon, B, D, L, beta_hi, beta_lo, *_split(scale), config=cfg,
           X_U8=x.dtype == torch.uint8, GAUSSIAN=likelihood == "gaussian", NEED_GRAD=need_grad, CHECK=flags is not None,
           BETA_PTR=beta_is_ptr, ACC=acc_dtype(logits), ACC_KL=acc_dtype(mu))
    return (recon, kl, *grads) if need_grad else (recon, kl, None, None, None)


def _programs(n: int, block: int, device: torch.device) -> int:
    """Grid of a grid-stride kernel: enough blocks for n, at most 4 waves of the device's SMs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(n, block), 4 * sms))


def scale_config(dtype: torch.dtype, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of scale_grads: 1024 elements (8 per thread, 4 warps) on a GPU; large in the interpreter."""
    return Config(dict(BLOCK=1 << 16 if interpreted else 1024), num_warps=4, maxnreg=_maxnreg(dtype))


def scale_rows_config(C: int, dtype: torch.dtype, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of the per-row scaling of a (B, C) gradient: [rows, <= 512 columns] tiles of 1024 elements, 4 warps."""
    cols = min(triton.next_power_of_2(C), 4096 if interpreted else 512)
    return Config(dict(BLOCK_R=max(1, (1 << 16 if interpreted else 1024) // cols), BLOCK_C=cols), num_warps=4, maxnreg=_maxnreg(dtype))


def scale_grads(grad_out: torch.Tensor, grads: list[torch.Tensor], *, block: int | None = None) -> None:
    """Every tensor of `grads` (each (B, ...), contiguous) times grad_out in place: a 0-dim factor
    read on the device (the kernel returns at once when it is 1), or (B,) factors, one per row."""
    live = [t for t in grads if t.numel()]
    if not live:
        return

    def widest(*tensors: torch.Tensor) -> torch.dtype:  # the accumulation follows the widest operand
        return max((grad_out, *tensors), key=lambda t: t.dtype.itemsize).dtype

    if grad_out.dim() == 0:
        for i in range(0, len(live), 3):
            group = live[i:i + 3]
            wide = widest(*group)
            cfg = scale_config(wide).override(BLOCK=block)
            n = max(t.numel() for t in group)
            args = [a for t in group for a in (t, t.numel())] + [group[0], 0] * (3 - len(group))
            launch(_scale, (_programs(n, cfg.blocks["BLOCK"], grad_out.device),), grad_out, *args, config=cfg,
                   ACC=tl.float64 if wide == torch.float64 else tl.float32)
        return
    for t in live:
        B = t.shape[0]
        C = t.numel() // B
        wide = widest(t)
        cfg = scale_rows_config(C, wide)
        launch(_scale_rows, (_programs(B, cfg.blocks["BLOCK_R"], grad_out.device),), grad_out, t, B, C, config=cfg,
               ACC=tl.float64 if wide == torch.float64 else tl.float32)
