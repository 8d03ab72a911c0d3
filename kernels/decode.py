"""Triton latent-batch decoding: MLP decoders run per chunk of rows, z drawn from the prior in-kernel.

Two shapes of launch, both per chunk (never the whole batch):
- one hidden layer (the reference decoder, z -> ReLU(fc1) -> fc2 -> sigmoid): one kernel. Each
  program owns a BLOCK_M x BLOCK_N tile of the output and walks the hidden layer BLOCK_H units
  at a time, recomputing that slice of ReLU(z W1^T + b1) on chip (cheap: the latent dim is
  small) and feeding it straight into the second tl.dot, so hidden activations never leave the SM;
- any other depth: one kernel per layer with the chunk's activations in a float32 buffer.
Matmuls run in float32 (half weights are upcast on load); float32 dots use TF32 exactly when
torch would (torch.backends.cuda.matmul.allow_tf32). The epilogue applies the sigmoid and, for
uint8 output, quantises floor(p * 255 + 0.5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, normal_at, pick

MAX_FUSED_LATENT = 256  # the one-kernel path keeps a BLOCK_M x latent tile of z in registers
NUM_WARPS = 8  # 64 x 128 float32 tiles: with 4 warps ptxas spills (.ci/check_triton_compile.py)


@triton.jit
def _latents(z_ptr, seed, start, rows64, ks, M, K, PRIOR: tl.constexpr):
    """float32 [rows, ks] tile of the chunk's latents: read, or drawn at element (start + row) * K + k."""
    mask = (rows64 < M)[:, None] & (ks < K)[None, :]
    if PRIOR:
        z = tl.where(mask, normal_at(seed, (rows64 + start)[:, None] * K + ks[None, :]), 0.0)
    else:
        z = tl.load(z_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _weight_t(w_ptr, ks, cols, K, N):
    """float32 [ks, cols] tile of W^T for a (N, K) row-major weight; zero outside."""
    mask = (ks < K)[:, None] & (cols < N)[None, :]
    return tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _finish(acc, b_ptr, out_ptr, rows64, cols, M, N, SIGMOID: tl.constexpr, U8: tl.constexpr):
    """acc + bias, then ReLU (hidden) or sigmoid (+ uint8 quantisation), stored under the mask."""
    acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if SIGMOID:
        acc = tl.sigmoid(acc)
        if U8:
            acc = tl.floor(tl.minimum(tl.maximum(acc, 0.0), 1.0) * 255.0 + 0.5)
    else:
        acc = tl.maximum(acc, 0.0)
    mask = (rows64 < M)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp2(z_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, seed, start, M, K, H, N,
          PRIOR: tl.constexpr, U8: tl.constexpr, PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    rows64 = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)  # the whole latent (BLOCK_K >= K)
    z = _latents(z_ptr, seed, start, rows64, ks, M, K, PRIOR)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h = tl.dot(z, _weight_t(w1_ptr, ks, hs, K, H), input_precision=PRECISION)
        h = tl.maximum(h + tl.load(b1_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)[None, :], 0.0)  # padding stays 0
        acc = tl.dot(h, _weight_t(w2_ptr, hs, cols, H, N), acc, input_precision=PRECISION)
    _finish(acc, b2_ptr, out_ptr, rows64, cols, M, N, True, U8)


@triton.jit
def _linear(in_ptr, w_ptr, b_ptr, out_ptr, seed, start, M, K, N,
            PRIOR: tl.constexpr, SIGMOID: tl.constexpr, U8: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows64 = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(_latents(in_ptr, seed, start, rows64, ks, M, K, PRIOR), _weight_t(w_ptr, ks, cols, K, N), acc, input_precision=PRECISION)
    _finish(acc, b_ptr, out_ptr, rows64, cols, M, N, SIGMOID, U8)


@triton.jit
def _to_image(v_ptr, out_ptr, n, FROM_LOGITS: tl.constexpr, U8: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    if FROM_LOGITS:
        p = tl.sigmoid(p)
    if U8:
        p = tl.floor(tl.minimum(tl.maximum(p, 0.0), 1.0) * 255.0 + 0.5)
    tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _dot_block(n: int, gpu: int, interpreted: int, override: int | None) -> int:
    """A tl.dot dimension: at least 16 (GPU-legal), at most what `n` needs."""
    return pick(max(16, min(triton.next_power_of_2(n), gpu)), max(16, min(triton.next_power_of_2(n), interpreted)), override)


def decode_mlp(layers: list[tuple[torch.Tensor, torch.Tensor]], z: torch.Tensor | None, seed: int | torch.Tensor, start: int, out: torch.Tensor, *,
               fuse: bool | None = None, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None) -> None:
    """Write sigmoid(MLP(z)) for rows start .. start + len(out) into `out` (float or uint8).

    z None draws the latents from the prior (stream `seed`, element offset start * latent_dim).
    fuse None: one kernel when there is one hidden layer and latent_dim <= MAX_FUSED_LATENT.
    """
    M, N = out.shape
    K = layers[0][0].shape[1]
    if M == 0:
        return
    if isinstance(seed, torch.Tensor):  # interface shim: read on the host until the kernel loads it
        seed = int(seed.item())
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    zc = z.contiguous() if z is not None else out  # out: an unused pointer when drawing from the prior
    params = [(w.contiguous(), b.contiguous()) for w, b in layers]
    u8, precision = out.dtype == torch.uint8, _precision()
    bm = pick(64, 128, block_m)
    if fuse is None:
        fuse = len(layers) == 2 and K <= MAX_FUSED_LATENT
    if fuse:
        if len(layers) != 2:
            raise ValueError(f"fuse=True needs exactly one hidden layer, got {len(layers)} layers")
        (w1, b1), (w2, b2) = params
        H = w1.shape[0]
        bn, bh = _dot_block(N, 128, 256, block_n), _dot_block(H, 64, 128, block_k)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _mlp2[grid](zc, w1, b1, w2, b2, target, seed, start, M, K, H, N, PRIOR=z is None, U8=u8, PRECISION=precision,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_H=bh, num_warps=NUM_WARPS)
    else:
        h = zc
        for i, (w, b) in enumerate(params):
            last = i == len(params) - 1
            n_out, k_in = w.shape
            dst = target if last else torch.empty(M, n_out, dtype=torch.float32, device=out.device)
            bn, bk = _dot_block(n_out, 128, 256, block_n), _dot_block(k_in, 32, 128, block_k)
            grid = (triton.cdiv(M, bm), triton.cdiv(n_out, bn))
            _linear[grid](h, w, b, dst, seed, start, M, k_in, n_out, PRIOR=i == 0 and z is None, SIGMOID=last, U8=u8 and last,
                          PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
            h = dst
    if target is not out:
        out.copy_(target)


def to_image(values: torch.Tensor, out: torch.Tensor, from_logits: bool, *, block: int | None = None) -> None:
    """out = sigmoid(values) (if from_logits) or values, quantised to floor(p * 255 + 0.5) for uint8 out."""
    n = values.numel()
    if n == 0:
        return
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    bs = pick(1024, 1 << 20, block)
    _to_image[(triton.cdiv(n, bs),)](values.contiguous(), target, n, FROM_LOGITS=from_logits, U8=out.dtype == torch.uint8,
                                     ACC=acc_dtype(values), BLOCK=bs)
    if target is not out:
        out.copy_(target)
