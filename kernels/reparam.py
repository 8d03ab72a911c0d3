"""Triton reparameterisation + KL: z = mu + exp(0.5 logvar) * eps with eps drawn in-kernel.

Each program owns BLOCK_R rows of (mu, logvar), reads them once (BLOCK_L columns at a time),
writes all k samples of z for them and the row's KL; eps is never stored. Backward recovers
eps * std as z - mu, so it needs no RNG.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, normal_at, pick


@triton.jit
def _forward(mu_ptr, lv_ptr, z_ptr, kl_ptr, seed, B, L, K, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    kl = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        off = rows64[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + off, mask=mask, other=0.0).to(ACC)
        kl += tl.sum(tl.where(mask, 1.0 + lv - mu * mu - tl.exp(lv), 0.0), axis=1)
        std = tl.exp(0.5 * lv)
        for s in range(K):
            zrow = rows64 + (rows64 * 0 + s) * B  # int64: k * B * L may pass 2**31
            idx = zrow[:, None] * L + cols[None, :]
            z = mu + normal_at(seed, idx).to(ACC) * std
            tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + rows, -0.5 * kl, mask=row_ok)


@triton.jit
def _backward(gz_ptr, gkl_ptr, mu_ptr, lv_ptr, z_ptr, gmu_ptr, glv_ptr, B, L, K, HAS_GKL: tl.constexpr, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        off = rows64[:, None] * L + cols[None, :]
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + off, mask=mask, other=0.0).to(ACC)
        g_mu = tl.zeros([BLOCK_R, BLOCK_L], ACC)
        g_lv = tl.zeros([BLOCK_R, BLOCK_L], ACC)
        for s in range(K):
            zrow = rows64 + (rows64 * 0 + s) * B
            idx = zrow[:, None] * L + cols[None, :]
            gz = tl.load(gz_ptr + idx, mask=mask, other=0.0).to(ACC)
            z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(ACC)
            g_mu += gz
            g_lv += gz * (z - mu)  # z - mu = eps * std
        g_lv = 0.5 * g_lv
        if HAS_GKL:
            gkl = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
            g_mu += gkl * mu
            g_lv += gkl * 0.5 * (tl.exp(lv) - 1.0)
        tl.store(gmu_ptr + off, g_mu.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + off, g_lv.to(glv_ptr.dtype.element_ty), mask=mask)


def _blocks(L: int, block_rows: int | None, block_cols: int | None) -> tuple[int, int]:
    cols = pick(min(triton.next_power_of_2(L), 128), min(triton.next_power_of_2(L), 1024), block_cols)
    rows = pick(max(1, 1024 // cols), max(1, 65536 // cols), block_rows)
    return rows, cols


def reparam_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor, k: int, need_kl: bool = True,
                    flags: torch.Tensor | None = None, *, block_rows: int | None = None,
                    block_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z (k, B, L) in mu's dtype, per-row KL (B,) float32, float64 for float64 inputs, or None); contiguous inputs."""
    if isinstance(seed, torch.Tensor):  # interface shim: read on the host until the kernel loads it
        seed = int(seed.item())
    B, L = mu.shape
    z = torch.empty((k, B, L), dtype=mu.dtype, device=mu.device)
    kl = torch.empty(B, dtype=torch.float64 if mu.dtype == torch.float64 else torch.float32, device=mu.device)
    if B == 0 or L == 0:
        return z, (kl.zero_() if need_kl else None)
    br, bc = _blocks(L, block_rows, block_cols)
    _forward[(triton.cdiv(B, br),)](mu, logvar, z, kl, seed, B, L, k, ACC=acc_dtype(mu), BLOCK_R=br, BLOCK_L=bc)
    return z, (kl if need_kl else None)


def reparam_backward(grad_z: torch.Tensor, grad_kl: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
                     seed: int | torch.Tensor, k: int, *, block_rows: int | None = None, block_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar) in mu's dtype, in one pass over grad_z and z."""
    k, B, L = z.shape
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    if B == 0 or L == 0:
        return grad_mu, grad_logvar
    br, bc = _blocks(L, block_rows, block_cols)
    gkl = grad_kl.contiguous() if grad_kl is not None else mu
    _backward[(triton.cdiv(B, br),)](grad_z.contiguous(), gkl, mu, logvar, z, grad_mu, grad_logvar, B, L, k,
                                     HAS_GKL=grad_kl is not None, ACC=acc_dtype(mu), BLOCK_R=br, BLOCK_L=bc)
    return grad_mu, grad_logvar
