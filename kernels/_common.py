"""Helpers shared by the Triton kernels: the Philox normal, block-size defaults, the accumulation dtype."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter pays ~6 ms per program instance, whatever its size: there, few large blocks.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pick(gpu: int, interpreted: int, override: int | None = None) -> int:
    """A block size: `override` if given (tests pin it), else the default for where kernels run."""
    value = override if override is not None else (interpreted if INTERPRETED else gpu)
    if value < 1 or value & (value - 1):
        raise ValueError(f"block sizes must be powers of two, got {value}")
    return value


def acc_dtype(t: torch.Tensor) -> tl.dtype:
    """Accumulate in float64 for float64 tensors, else in float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@triton.jit
def normal_at(seed, idx):
    """float32 N(0, 1) at int64 flat indices `idx` of stream `seed` (``fastvae.ops.philox``'s mapping):
    lane idx % 4 of Philox4x32-10(seed) at 64-bit counter idx // 4, two Box-Muller pairs."""
    counter = idx >> 2
    lane = idx & 3
    c_lo = counter.to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    w0, w1, w2, w3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    first_pair = lane < 2
    u1 = tl.uint_to_uniform_float(tl.where(first_pair, w0, w2))
    u2 = tl.uint_to_uniform_float(tl.where(first_pair, w1, w3))
    n_cos, n_sin = tl.pair_uniform_to_normal(u1, u2)
    return tl.where((lane & 1) == 0, n_cos, n_sin)
