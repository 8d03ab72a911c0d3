"""Triton latent-batch decoding: MLP decoders run per chunk of rows, z drawn from the prior on the device.

Per chunk (never the whole batch): prior latents are drawn once into a float32 (rows, latent)
buffer by `_normals` (one Philox call per 4 normals; the seed may live on the device, so a
captured sampling graph draws new samples per replay), then
- one hidden layer (the reference decoder, z -> ReLU(fc1) -> fc2 -> sigmoid): one kernel. Each
  program owns a BLOCK_M x BLOCK_N tile of the output and walks the hidden layer BLOCK_H units
  at a time, recomputing that slice of ReLU(z W1^T + b1) on chip from BLOCK_K-wide slices of
  the latent (cheap: the latent dim is small) and feeding it straight into the second tl.dot,
  so hidden activations never leave the SM;
- any other depth: one kernel per layer with the chunk's activations in a float32 buffer.
Matmuls run in float32 (half weights are upcast on load); float32 dots use TF32 exactly when
torch would (`precision`). The epilogue applies the sigmoid and, for uint8 output, quantises
floor(p * 255 + 0.5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Config, acc_dtype, interleave4, launch, load_seed, normals4, seed_args

MAX_FUSED_LATENT = 256  # the one-kernel path recomputes the hidden layer per output tile: worth it for small latents


@triton.jit(do_not_specialize=["seed", "offset"])
def _normals(out_ptr, seed_ptr, seed: tl.int64, offset: tl.int64, n, SEED_PTR: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[i] = normal at flat index offset + i of stream `seed`, i < n: one Philox call per 4 outputs."""
    key = load_seed(seed_ptr, seed, SEED_PTR)
    g0 = (offset >> 2) + tl.program_id(0).to(tl.int64) * BLOCK_G
    e0, e1, e2, e3 = normals4(key, g0 + tl.arange(0, BLOCK_G))
    idx = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
    tl.store(out_ptr + (idx - offset), interleave4(e0, e1, e2, e3), mask=(idx >= offset) & (idx < offset + n))


@triton.jit
def _tile(ptr, rows, cols, R, C):
    """float32 [rows, cols] tile of a row-major (R, C) matrix; zero outside."""
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight_t(w_ptr, ks, cols, K, N):
    """float32 [ks, cols] tile of W^T for a (N, K) row-major weight; zero outside."""
    mask = (ks < K)[:, None] & (cols < N)[None, :]
    return tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _finish(acc, b_ptr, out_ptr, rows, cols, M, N, SIGMOID: tl.constexpr, U8: tl.constexpr):
    """acc + bias, then ReLU (hidden) or sigmoid (+ uint8 quantisation), stored under the mask."""
    acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if SIGMOID:
        acc = tl.sigmoid(acc)
        if U8:
            acc = tl.floor(tl.minimum(tl.maximum(acc, 0.0), 1.0) * 255.0 + 0.5)
    else:
        acc = tl.maximum(acc, 0.0)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp2(z_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, M, K, H, N, U8: tl.constexpr, PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the latent BLOCK_K at a time: bounded registers and shared memory
            ks = k0 + tl.arange(0, BLOCK_K)
            h = tl.dot(_tile(z_ptr, rows, ks, M, K), _weight_t(w1_ptr, ks, hs, K, H), h, input_precision=PRECISION)
        h = tl.maximum(h + tl.load(b1_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)[None, :], 0.0)  # padding stays 0
        acc = tl.dot(h, _weight_t(w2_ptr, hs, cols, H, N), acc, input_precision=PRECISION)
    _finish(acc, b2_ptr, out_ptr, rows, cols, M, N, True, U8)


@triton.jit
def _linear(in_ptr, w_ptr, b_ptr, out_ptr, M, K, N, SIGMOID: tl.constexpr, U8: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(_tile(in_ptr, rows, ks, M, K), _weight_t(w_ptr, ks, cols, K, N), acc, input_precision=PRECISION)
    _finish(acc, b_ptr, out_ptr, rows, cols, M, N, SIGMOID, U8)


@triton.jit
def _to_image(v_ptr, out_ptr, n, FROM_LOGITS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    if FROM_LOGITS:
        p = tl.sigmoid(p)
    p = tl.floor(tl.minimum(tl.maximum(p, 0.0), 1.0) * 255.0 + 0.5)
    tl.store(out_ptr + offs, p.to(tl.uint8), mask=mask)


def precision() -> str:
    """tl.dot precision for float32 operands: "tf32" exactly when torch's matmuls use TF32.

    torch >= 2.9 has fp32_precision (and raises when a program mixes it with the legacy
    allow_tf32 flags); "none" inherits torch.backends.fp32_precision.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        value = matmul.fp32_precision
        if value == "none":
            value = getattr(torch.backends, "fp32_precision", "none")
        return "tf32" if value == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def _dot(n: int, cap: int) -> int:
    """A tl.dot dimension: at least 16 (GPU-legal), at most `cap`, no more than `n` needs."""
    return max(16, min(triton.next_power_of_2(n), cap))


def mlp2_config(K: int, H: int, N: int, precision: str, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of the one-kernel two-layer decoder (latent K, hidden H, output N) for tl.dot `precision`.

    GPU: 64-row output tiles, the hidden layer 32 units and the latent 16 at a time (so any
    latent size up to MAX_FUSED_LATENT fits), 8 warps: 64 x 128 tiles on tensor cores (tf32,
    2 stages); 64 x 64 tiles, 1 stage for IEEE float32, which runs on the FMA units with more
    registers per output (larger tiles or 2 stages spill on sm_80; .ci/check_triton_compile.py).
    """
    if interpreted:
        return Config(dict(BLOCK_M=128, BLOCK_N=_dot(N, 256), BLOCK_K=_dot(K, 256), BLOCK_H=_dot(H, 128)))
    if precision == "tf32":
        return Config(dict(BLOCK_M=64, BLOCK_N=_dot(N, 128), BLOCK_K=_dot(K, 16), BLOCK_H=_dot(H, 32)), num_warps=8, num_stages=2, maxnreg=255)
    return Config(dict(BLOCK_M=64, BLOCK_N=_dot(N, 64), BLOCK_K=_dot(K, 16), BLOCK_H=_dot(H, 32)), num_warps=8, num_stages=1, maxnreg=255)


def linear_config(K: int, N: int, precision: str, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of one decoder layer: 64 x 128 output tiles, K 32 at a time (tf32); 64 x 64, K 16
    at a time for IEEE float32 (FMA units: larger tiles spill); 8 warps, 3 stages."""
    if interpreted:
        return Config(dict(BLOCK_M=128, BLOCK_N=_dot(N, 256), BLOCK_K=_dot(K, 128)))
    if precision == "tf32":
        return Config(dict(BLOCK_M=64, BLOCK_N=_dot(N, 128), BLOCK_K=_dot(K, 32)), num_warps=8, num_stages=3, maxnreg=255)
    return Config(dict(BLOCK_M=64, BLOCK_N=_dot(N, 64), BLOCK_K=_dot(K, 16)), num_warps=8, num_stages=3, maxnreg=255)


def normals_config(n: int, interpreted: bool = INTERPRETED) -> Config:
    """Blocks of the prior draw: 256 counters (1024 normals, 8 per thread) per program, 4 warps."""
    return Config(dict(BLOCK_G=min(1 << 14 if interpreted else 256, triton.next_power_of_2(triton.cdiv(n, 4) + 1))), num_warps=4)


def image_config(interpreted: bool = INTERPRETED) -> Config:
    """Blocks of the image tail: 1024 elements per program (8 per thread), 4 warps."""
    return Config(dict(BLOCK=1 << 20 if interpreted else 1024), num_warps=4)


def draw_prior(seed: int | torch.Tensor, start: int, rows: int, latent: int, device: torch.device) -> torch.Tensor:
    """(rows, latent) float32 normals at flat indices start * latent .. of stream `seed` (``fastvae.ops.philox``)."""
    z = torch.empty(rows, latent, dtype=torch.float32, device=device)
    n, offset = rows * latent, start * latent
    cfg = normals_config(n)
    groups = ((offset + n - 1) >> 2) - (offset >> 2) + 1
    seed_ptr, seed_val, seed_is_ptr = seed_args(seed, z)
    launch(_normals, (triton.cdiv(groups, cfg.blocks["BLOCK_G"]),), z, seed_ptr, seed_val, offset, n, config=cfg, SEED_PTR=seed_is_ptr)
    return z


def decode_mlp(layers: list[tuple[torch.Tensor, torch.Tensor]], z: torch.Tensor | None, seed: int | torch.Tensor, start: int, out: torch.Tensor, *,
               fuse: bool | None = None, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None) -> None:
    """Write sigmoid(MLP(z)) for rows start .. start + len(out) into `out` (float or uint8).

    z None draws the latents from the prior (stream `seed`, an int or a 0-dim int64 device
    tensor, element offset start * latent_dim) into a float32 chunk first, once per chunk.
    fuse None: one kernel when there is one hidden layer and latent_dim <= MAX_FUSED_LATENT.
    """
    M, N = out.shape
    K = layers[0][0].shape[1]
    if M == 0:
        return
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    zc = z.contiguous() if z is not None else draw_prior(seed, start, M, K, out.device)
    params = [(w.contiguous(), b.contiguous()) for w, b in layers]
    u8, prec = out.dtype == torch.uint8, precision()
    if fuse is None:
        fuse = len(layers) == 2 and K <= MAX_FUSED_LATENT
    if fuse:
        if len(layers) != 2:
            raise ValueError(f"fuse=True needs exactly one hidden layer, got {len(layers)} layers")
        (w1, b1), (w2, b2) = params
        H = w1.shape[0]
        cfg = mlp2_config(K, H, N, prec).override(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_k, BLOCK_K=block_k)
        grid = (triton.cdiv(M, cfg.blocks["BLOCK_M"]), triton.cdiv(N, cfg.blocks["BLOCK_N"]))
        launch(_mlp2, grid, zc, w1, b1, w2, b2, target, M, K, H, N, config=cfg, U8=u8, PRECISION=prec)
    else:
        h = zc
        for i, (w, b) in enumerate(params):
            last = i == len(params) - 1
            n_out, k_in = w.shape
            dst = target if last else torch.empty(M, n_out, dtype=torch.float32, device=out.device)
            cfg = linear_config(k_in, n_out, prec).override(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
            grid = (triton.cdiv(M, cfg.blocks["BLOCK_M"]), triton.cdiv(n_out, cfg.blocks["BLOCK_N"]))
            launch(_linear, grid, h, w, b, dst, M, k_in, n_out, config=cfg, SIGMOID=last, U8=u8 and last, PRECISION=prec)
            h = dst
    if target is not out:
        out.copy_(target)


def to_image(values: torch.Tensor, out: torch.Tensor, from_logits: bool, *, block: int | None = None) -> None:
    """uint8 out = floor(clamp(p, 0, 1) * 255 + 0.5) of p = sigmoid(values) (if from_logits) or values.
    A float output is not this kernel's: decode_latents writes it with torch's sigmoid."""
    if out.dtype != torch.uint8:
        raise ValueError(f"to_image writes uint8 images, got out of {out.dtype} (a float output is torch.sigmoid's)")
    n = values.numel()
    if n == 0:
        return
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    cfg = image_config().override(BLOCK=block)
    launch(_to_image, (triton.cdiv(n, cfg.blocks["BLOCK"]),), values.contiguous(), target, n, config=cfg, FROM_LOGITS=from_logits,
           ACC=acc_dtype(values))
    if target is not out:
        out.copy_(target)
