"""Counter-based normal RNG shared by every fused backend, written in plain PyTorch.

Element ``i`` of a flattened ``eps`` tensor is lane ``i % 4`` of Philox4x32-10 keyed by
``seed`` (64 bits: low word k0, high word k1) at counter ``(i // 4)`` (64 bits: low word c0,
high word c1, c2 = c3 = 0). The four 32-bit outputs become uniforms as Triton's
``uint_to_uniform_float`` does and two Box-Muller pairs give four normals (lanes 0,1 from
outputs 0,1 and lanes 2,3 from outputs 2,3), so no output is discarded. Triton's
``tl.philox``, the C++ kernels and this file implement the same mapping: one seed gives
the same eps on every backend, independent of block sizes.
"""
from __future__ import annotations

import torch

_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF
UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2**31 - 1) * s < 1 in float32
MIN_UNIFORM = 1.0e-7  # Box-Muller's guard against log(0)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant and int64 tensor b < 2**32."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _M32
    return hi, lo


def philox4x32(seed: int | torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of (counter low, counter high, 0, 0) under a 64-bit key; int64 words.

    `seed` may be a 0-dim int64 tensor on counter's device (read on the device: no sync)."""
    counter = counter.to(torch.int64)
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=MIN_UNIFORM)))
    th = 6.283185307179586 * u2
    return r * torch.cos(th), r * torch.sin(th)


def randn(seed: int | torch.Tensor, numel: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 N(0, 1) values for flat indices offset .. offset+numel-1 of the stream `seed`."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    words = philox4x32(seed if isinstance(seed, torch.Tensor) else int(seed), idx // 4)
    n0, n1 = _box_muller(_uniform(words[0]), _uniform(words[1]))
    n2, n3 = _box_muller(_uniform(words[2]), _uniform(words[3]))
    lanes = torch.stack((n0, n1, n2, n3), dim=-1)
    return lanes.gather(-1, (idx % 4).unsqueeze(-1)).squeeze(-1)
