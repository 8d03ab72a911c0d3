"""Triton reparameterisation + KL: z = mu + exp(0.5 logvar) * eps with eps drawn in-kernel.

Each program owns BLOCK_R rows of (mu, logvar), i.e. the flat range m in [r0 * L, r1 * L) of
every sample. It walks that range in groups of four consecutive elements, so one Philox call
and two sin/cos pairs give the four normals of a group (element i of z = (s, b, l) flattened is
lane i % 4 of the counter i // 4, ``fastvae.ops.philox``'s stream), each thread reading and
writing 4 contiguous elements (vector loads and stores). The value checks (flag bits
for mu and logvar) test the values read there; when asked, a row-major pass over the same rows
(in cache by then) reduces the per-row KL. eps is never stored: the backward regenerates it
from (seed, index), exact whatever z's dtype, and does not read z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Config, INTERPRETED, acc_dtype, interleave4, latent_flags, launch, load_seed, normals4, or_all, report, seed_args

tensor_seed = True  # the kernels read a 0-dim int64 device `seed` (CUDA graphs draw a new one per replay)


@triton.jit
def _lane(a0, a1, a2, a3, b0, b1, b2, b3, t):
    """Lane t (0 <= t <= 6) of the 8 normals of counters q (a) and q + 1 (b)."""
    return tl.where(t == 0, a0, tl.where(t == 1, a1, tl.where(t == 2, a2, tl.where(t == 3, a3, tl.where(t == 4, b0, tl.where(t == 5, b1, b2))))))


@triton.jit
def _eps(key, base, g, ALIGNED: tl.constexpr):
    """eps at flat indices base + 4 g + j (j = 0..3), interleaved to [4 G]: one Philox call per
    group when every sample starts on a counter (ALIGNED: one sample, or B * L % 4 == 0),
    else two, counters q and q + 1, for every group (the rare variant stays branch-free)."""
    q = (base >> 2) + g
    e0, e1, e2, e3 = normals4(key, q)
    if not ALIGNED:
        o = base & 3  # the group straddles counters q and q + 1 (o != 0) or not
        f0, f1, f2, f3 = normals4(key, q + 1)
        e0, e1, e2, e3 = (_lane(e0, e1, e2, e3, f0, f1, f2, f3, o), _lane(e0, e1, e2, e3, f0, f1, f2, f3, o + 1),
                          _lane(e0, e1, e2, e3, f0, f1, f2, f3, o + 2), _lane(e0, e1, e2, e3, f0, f1, f2, f3, o + 3))
    return interleave4(e0, e1, e2, e3)


@triton.jit(do_not_specialize=["seed"])
def _forward(mu_ptr, lv_ptr, z_ptr, kl_ptr, flags_ptr, seed_ptr, seed: tl.int64, B, L, K,
             SEED_PTR: tl.constexpr, NEED_KL: tl.constexpr, CHECK: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr):
    key = load_seed(seed_ptr, seed, SEED_PTR)
    r0 = tl.program_id(0) * BLOCK_R
    m_lo = r0.to(tl.int64) * L
    m_hi = tl.minimum(r0 + BLOCK_R, B).to(tl.int64) * L
    BL = tl.cast(B, tl.int64) * L
    bad = tl.zeros([4 * BLOCK_G], tl.int32)
    for g0 in range(m_lo >> 2, (m_hi + 3) >> 2, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        m = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
        mask = (m >= m_lo) & (m < m_hi)
        mu = tl.load(mu_ptr + m, mask=mask, other=0.0).to(ACC)  # padding: 0, which never flags
        lv = tl.load(lv_ptr + m, mask=mask, other=0.0).to(ACC)
        if CHECK:
            bad |= latent_flags(mu, lv)
        std = tl.exp(0.5 * lv)
        for s in range(K):
            base = s * BL
            z = mu + _eps(key, base, g, ALIGNED).to(ACC) * std
            tl.store(z_ptr + base + m, z.to(z_ptr.dtype.element_ty), mask=mask)
    if CHECK:
        report(flags_ptr, or_all(bad))
    if NEED_KL:  # row-major over the same rows, in cache now
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        kl = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, L, BLOCK_L):
            cols = c0 + tl.arange(0, BLOCK_L)
            mask = row_ok[:, None] & (cols < L)[None, :]
            off = rows.to(tl.int64)[:, None] * L + cols[None, :]
            mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(ACC)
            lv = tl.load(lv_ptr + off, mask=mask, other=0.0).to(ACC)
            kl += tl.sum(tl.where(mask, 1.0 + lv - mu * mu - tl.exp(lv), 0.0), axis=1)
        tl.store(kl_ptr + rows, -0.5 * kl, mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _backward(gz_ptr, gkl_ptr, mu_ptr, lv_ptr, gmu_ptr, glv_ptr, seed_ptr, seed: tl.int64, B, L, K,
              SEED_PTR: tl.constexpr, HAS_GKL: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    key = load_seed(seed_ptr, seed, SEED_PTR)
    r0 = tl.program_id(0) * BLOCK_R
    m_lo = r0.to(tl.int64) * L
    m_hi = tl.minimum(r0 + BLOCK_R, B).to(tl.int64) * L
    BL = tl.cast(B, tl.int64) * L
    for g0 in range(m_lo >> 2, (m_hi + 3) >> 2, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        m = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
        mask = (m >= m_lo) & (m < m_hi)
        lv = tl.load(lv_ptr + m, mask=mask, other=0.0).to(ACC)
        g_mu = tl.zeros([4 * BLOCK_G], ACC)
        g_eps = tl.zeros([4 * BLOCK_G], ACC)
        for s in range(K):
            base = s * BL
            gz = tl.load(gz_ptr + base + m, mask=mask, other=0.0).to(ACC)
            g_mu += gz
            g_eps += gz * _eps(key, base, g, ALIGNED).to(ACC)
        g_lv = 0.5 * g_eps * tl.exp(0.5 * lv)
        if HAS_GKL:
            rows = r0 + ((m - m_lo).to(tl.int32) // L)
            gkl = tl.load(gkl_ptr + rows, mask=mask, other=0.0).to(ACC)
            g_mu += gkl * tl.load(mu_ptr + m, mask=mask, other=0.0).to(ACC)
            g_lv += gkl * 0.5 * (tl.exp(lv) - 1.0)
        tl.store(gmu_ptr + m, g_mu.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + m, g_lv.to(glv_ptr.dtype.element_ty), mask=mask)


def config(B: int, L: int, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of both kernels for (B, L) latents (of any dtype: the tiles hold 4-element groups).

    GPU: BLOCK_R rows per program, a power of two >= 4 (sample 0's groups of 4 never straddle
    two programs): about 2048 latent elements, fewer (down to 128) while that leaves under two
    programs per SM (132 SMs). One group of 4 per thread and loop step (BLOCK_G groups, up to
    128: 4 warps): one Philox call per thread and step, 4 contiguous elements (a 16-byte vector
    for float32), the layout eps comes in, so no shared-memory shuffles; never more threads
    than groups, which would repeat Philox calls. The KL pass (need_kl) reads tiles of at most
    1024 elements. At most 128 registers (tighter caps spill in some variants).
    Interpreter: a few large programs (~6 ms per instance).
    """
    if interpreted:
        cols = min(triton.next_power_of_2(L), 4096)
        rows = min(triton.next_power_of_2(B), max(4, (1 << 16) // cols))
        return Config(dict(BLOCK_R=rows, BLOCK_L=cols, BLOCK_G=min(1 << 14, triton.next_power_of_2(triton.cdiv(rows * L, 4)))))
    elements = min(2048, max(128, B * L // 264))
    rows = max(4, 1 << (max(1, elements // L).bit_length() - 1))
    groups = max(32, min(128, triton.next_power_of_2(triton.cdiv(rows * L, 4))))
    cols = min(triton.next_power_of_2(L), max(16, 1024 // rows))
    return Config(dict(BLOCK_R=rows, BLOCK_L=cols, BLOCK_G=groups), num_warps=groups // 32, maxnreg=128)


def _aligned(B: int, L: int, k: int) -> bool:
    """Every sample's flat range starts on a Philox counter (a group of 4)."""
    return k == 1 or (B * L) % 4 == 0


def reparam_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor, k: int, need_kl: bool = True,
                    flags: torch.Tensor | None = None, *, block_rows: int | None = None, block_cols: int | None = None,
                    block_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z (k, B, L) in mu's dtype, per-row KL (B,) float32 (float64 for float64 mu) or None).

    Contiguous inputs; `seed` an int or a 0-dim int64 tensor on mu's device; `flags` an int32
    (1,) tensor receiving the mu / logvar value-check bits, or None (no checks).
    """
    B, L = mu.shape
    z = torch.empty((k, B, L), dtype=mu.dtype, device=mu.device)
    kl = torch.empty(B, dtype=torch.float64 if mu.dtype == torch.float64 else torch.float32, device=mu.device) if need_kl else None
    if B == 0 or L == 0:
        return z, (kl.zero_() if need_kl else None)
    cfg = config(B, L).override(BLOCK_R=block_rows, BLOCK_L=block_cols, BLOCK_G=block_groups)
    seed_ptr, seed_val, seed_is_ptr = seed_args(seed, z)
    launch(_forward, (triton.cdiv(B, cfg.blocks["BLOCK_R"]),), mu, logvar, z, kl if need_kl else z, flags if flags is not None else z,
           seed_ptr, seed_val, B, L, k, config=cfg, SEED_PTR=seed_is_ptr, NEED_KL=need_kl, CHECK=flags is not None,
           ALIGNED=_aligned(B, L, k), ACC=acc_dtype(mu))
    return z, kl


def reparam_backward(grad_z: torch.Tensor, grad_kl: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
                     seed: int | torch.Tensor, k: int, *, block_rows: int | None = None, block_groups: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar) in mu's dtype: eps regenerated from (seed, index), z not read.

    grad_mu = sum_s grad_z + grad_kl * mu; grad_logvar = 0.5 sum_s grad_z eps std + grad_kl 0.5 (exp(logvar) - 1).
    """
    B, L = mu.shape
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    if B == 0 or L == 0:
        return grad_mu, grad_logvar
    cfg = config(B, L).override(BLOCK_R=block_rows, BLOCK_G=block_groups)
    cfg = cfg._replace(blocks={name: v for name, v in cfg.blocks.items() if name != "BLOCK_L"})  # the backward has no KL pass
    seed_ptr, seed_val, seed_is_ptr = seed_args(seed, grad_mu)
    launch(_backward, (triton.cdiv(B, cfg.blocks["BLOCK_R"]),), grad_z, grad_kl if grad_kl is not None else grad_mu, mu, logvar,
           grad_mu, grad_logvar, seed_ptr, seed_val, B, L, k, config=cfg, SEED_PTR=seed_is_ptr, HAS_GKL=grad_kl is not None,
           ALIGNED=_aligned(B, L, k), ACC=acc_dtype(mu))
    return grad_mu, grad_logvar
