"""Shared by the Triton kernels: launch configurations, the single launch point, the Philox
normals (one Philox call per 4 outputs), device-side seeds and the value-check flag word."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, NamedTuple

import torch
import triton
import triton.language as tl

from fastvae import _checks

# The interpreter pays ~6 ms per program instance, whatever its size: there, few large blocks.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Value-check bits ORed into the flag word and the logvar bound, as the constexprs the kernels read
# (a @triton.jit function may only read constexpr globals); fastvae/_checks.py defines them.
LOGITS_NONFINITE = tl.constexpr(_checks.FLAG_LOGITS_NONFINITE)
X_NONFINITE = tl.constexpr(_checks.FLAG_X_NONFINITE)
X_RANGE = tl.constexpr(_checks.FLAG_X_RANGE)
MU_NONFINITE = tl.constexpr(_checks.FLAG_MU_NONFINITE)
LOGVAR_NONFINITE = tl.constexpr(_checks.FLAG_LOGVAR_NONFINITE)
LOGVAR_HIGH = tl.constexpr(_checks.FLAG_LOGVAR_HIGH)
MAX_LOGVAR = tl.constexpr(_checks.MAX_LOGVAR)


class Config(NamedTuple):
    """What a wrapper launches: the block-size constexprs and the compile options.

    maxnreg: ptxas's register cap, which sets the occupancy. Without one, ptxas 12.8 (Triton
    3.6's) aims some kernels at a count of its own (32, 80) and spills a few bytes to reach it;
    with one it allocates up to the cap without spilling (.ci/check_triton_compile.py compiles
    with both Triton versions' ptxas)."""

    blocks: dict[str, int]
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int = 128

    def override(self, **blocks: int | None) -> Config:
        """These block sizes instead of the defaults (tests pin them); None keeps the default."""
        for name, value in blocks.items():
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two, got {value}")
        return self._replace(blocks=dict(self.blocks, **{k: v for k, v in blocks.items() if v is not None}))


def acc_dtype(t: torch.Tensor) -> tl.dtype:
    """Accumulate in float64 for float64 tensors, else in float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


_recorder: list | None = None  # set by `recording`


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Launches recorded instead of run, as (kernel, grid, args, kwargs): .ci/check_triton_compile.py
    compiles what a GPU would launch, tests read the launch configuration."""
    global _recorder
    calls: list = []
    _recorder = calls
    try:
        yield calls
    finally:
        _recorder = None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, config: Config, **constexprs: Any) -> None:
    """The one place the wrappers launch a kernel, so that .ci/check_triton_compile.py can record
    each launch (arguments, constexprs, options) and compile exactly that for a GPU."""
    kwargs = dict(constexprs, **config.blocks, num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg)
    if _recorder is not None:
        _recorder.append((kernel, grid, args, kwargs))
    else:
        kernel[grid](*args, **kwargs)


def seed_args(seed: int | torch.Tensor, dummy: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(seed_ptr, seed, SEED_PTR) for a kernel: a 0-dim int64 device tensor is read by the kernel
    (no host sync, CUDA-graph safe); an int travels by value (seed_ptr is then any tensor, unread)."""
    if isinstance(seed, torch.Tensor):
        return seed, 0, True
    return dummy, seed, False


@triton.jit
def load_seed(seed_ptr, seed, SEED_PTR: tl.constexpr):
    """The 64-bit Philox key: read from device memory, or the by-value argument."""
    if SEED_PTR:
        key = tl.load(seed_ptr).to(tl.int64)
    else:
        key = seed.to(tl.int64)
    return key


@triton.jit
def normals4(key, counter):
    """Four float32 N(0, 1) per int64 counter, the lanes 0..3 of ``fastvae.ops.philox``: one
    Philox4x32-10 call and two Box-Muller pairs (one sin/cos pair each)."""
    c_lo = counter.to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    w0, w1, w2, w3 = tl.philox(key, c_lo, c_hi, zero, zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    return n0, n1, n2, n3


@triton.jit
def interleave4(a, b, c, d):
    """[N] x 4 -> [4N] with element 4i + j taken from the j-th argument at i."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [4 * a.shape[0]])


@triton.jit
def nonfinite(x):
    """NaN or +-Inf: NaN compares false, so the test is `not abs(x) < inf`."""
    return (tl.abs(x) < float("inf")) == 0


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def or_all(bad):
    """The OR of every element of an int32 tile."""
    return tl.reduce(tl.reshape(bad, [bad.numel]), 0, _bit_or)


@triton.jit
def report(flags_ptr, bits):
    """OR `bits` into flags[0]: one atomic per program, and only when a bit is set."""
    if bits != 0:
        tl.atomic_or(flags_ptr, bits)


@triton.jit
def latent_flags(mu, lv):
    """int32 flag bits of mu / logvar values (padding lanes are loaded as 0: they never flag)."""
    lv_bad = nonfinite(lv)
    return (tl.where(nonfinite(mu), MU_NONFINITE, 0) | tl.where(lv_bad, LOGVAR_NONFINITE, 0)
            | tl.where((lv > MAX_LOGVAR) & (lv_bad == 0), LOGVAR_HIGH, 0))
