"""Triton bias gradient with the ReLU's backward folded in (``fastvae.ops.bias_grad``).

Each program owns BLOCK_N columns and walks every row in tiles of BLOCK_B: it zeroes the
gradient where the ReLU's output is <= 0 (writing it back: the pre-activation gradient the next
product reads) and accumulates the column sums in registers, then stores them once. One pass over
the gradient (and the activation); the fixed row order makes the sums deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Config, acc_dtype, launch


@triton.jit
def _bias_grad(grad_ptr, y_ptr, out_ptr, B, N, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_N], ACC)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & col_ok[None, :]
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        g = tl.load(grad_ptr + off, mask=mask, other=0.0)
        if RELU:
            y = tl.load(y_ptr + off, mask=mask, other=1.0)
            g = tl.where(y <= 0, 0.0, g).to(g.dtype)  # NaN activations keep their gradient, as threshold_backward
            tl.store(grad_ptr + off, g, mask=mask)
        acc += tl.sum(g.to(ACC), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def config(rows: int, cols: int) -> Config:
    """64 columns a program (coalesced 256-byte rows of float32), 32 rows a tile; one program per column block
    and all rows in one tile in the interpreter."""
    if INTERPRETED:
        return Config({"BLOCK_B": triton.next_power_of_2(max(rows, 1)), "BLOCK_N": triton.next_power_of_2(max(cols, 1))})
    return Config({"BLOCK_B": 32, "BLOCK_N": 64}, num_warps=4)


def bias_grad(grad: torch.Tensor, relu_out: torch.Tensor | None, out: torch.Tensor, *, block_b: int | None = None,
              block_n: int | None = None) -> None:
    """grad (B, N) zeroed where relu_out <= 0 (if given), in place; out (N,) = its column sums."""
    B, N = grad.shape
    cfg = config(B, N).override(BLOCK_B=block_b, BLOCK_N=block_n)
    launch(_bias_grad, (triton.cdiv(N, cfg.blocks["BLOCK_N"]),), grad, relu_out if relu_out is not None else grad, out, B, N,
           config=cfg, RELU=relu_out is not None, ACC=acc_dtype(grad))
