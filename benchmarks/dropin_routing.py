"""The measurement behind fastvae/dropin/routing.py's CPU thresholds: where a fused op beats the
user's own code, forward + backward, both interleaved, min of N runs (python -m benchmarks.dropin_routing).

- sampling: the user's ``mu + randn_like(std) * std`` against ``reparameterize`` (what the drop-in
  runs instead, the user's calls skipped);
- loss from logits: ``F.binary_cross_entropy_with_logits(..., reduction="sum")`` against fastvae's
  fused loss with no latent term (the drop-in's ``fused_bce``).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastvae.dropin.output import fused_bce
from fastvae.ops.reparam import reparameterize

SAMPLING = [(16, 8), (128, 20), (256, 32), (512, 32), (1024, 20), (4096, 128), (65536, 16)]
LOSS = [(16, 784), (32, 784), (64, 784), (96, 784), (128, 784), (4096, 784), (128, 12288)]


def _min_us(fns: list[Callable[[], None]], runs: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) * 1e6 for t in times]


def sampling(B: int, L: int, runs: int) -> tuple[float, float]:
    mu, logvar = (torch.randn(B, L, requires_grad=True) for _ in range(2))

    def user() -> None:
        std = torch.exp(0.5 * logvar)
        (mu + torch.randn_like(std) * std).sum().backward()

    def fused() -> None:
        reparameterize(mu, logvar).sum().backward()
    return tuple(_min_us([user, fused], runs))


def loss(B: int, D: int, runs: int) -> tuple[float, float]:
    logits, x = torch.randn(B, D, requires_grad=True), torch.rand(B, D)

    def user() -> None:
        F.binary_cross_entropy_with_logits(logits, x, reduction="sum").backward()

    def fused() -> None:
        fused_bce(logits, x, "sum").backward()
    return tuple(_min_us([user, fused], runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    for name, fn, sizes in (("sampling", sampling, SAMPLING), ("loss from logits", loss, LOSS)):
        print(f"{name}: user vs fused, us (forward + backward)")
        for a, b in sizes:
            runs = max(10, args.runs * 100_000 // max(100_000, a * b))
            user, fused = fn(a, b, runs)
            print(f"  {a}x{b} ({a * b} values): {user:.1f} vs {fused:.1f}, fused {user / fused:.2f}x")


if __name__ == "__main__":
    main()
