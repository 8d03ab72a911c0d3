"""The measurement behind fastvae/dropin/routing.py's CPU thresholds: where a fused op beats the
user's own code, forward + backward, both interleaved, min of N runs (python -m benchmarks.dropin_routing).

- sampling: the user's ``mu + randn_like(std) * std`` against ``reparameterize`` (what the drop-in
  runs instead, the user's calls skipped);
- sampling + KL: a latent-diffusion posterior's ``mean + std * randn`` and its ``kl()`` (0.5 * sum of
  mean^2 + var - 1 - logvar per row; std and var computed up front, as the posterior does) against
  ``reparameterize_kl`` (the drop-in answers ``posterior.kl()`` from the sampling pass);
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
from fastvae.ops.reparam import reparameterize, reparameterize_kl

SAMPLING = [(16, 8), (128, 20), (256, 32), (512, 32), (1024, 20), (4096, 128), (65536, 16)]
SAMPLING_KL = [(8, 1024), (8, 2048), (8, 4096), (16, 4096), (8, 16384)]  # batch x (C * H * W) of the latents
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


def sampling_kl(B: int, L: int, runs: int) -> tuple[float, float]:
    mu, logvar = torch.randn(B, L, requires_grad=True), torch.randn(B, L, requires_grad=True)

    def user() -> None:
        std, var = torch.exp(0.5 * logvar), torch.exp(logvar)
        z = mu + std * torch.randn(mu.shape)
        kl = 0.5 * torch.sum(torch.pow(mu, 2) + var - 1.0 - logvar, dim=1)
        (z.sum() + kl.sum()).backward()

    def fused() -> None:
        torch.exp(0.5 * logvar), torch.exp(logvar)  # the posterior still computes std and var up front
        z, kl = reparameterize_kl(mu, logvar)
        (z.sum() + kl.sum()).backward()
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
    for name, fn, sizes in (("sampling", sampling, SAMPLING), ("sampling + KL", sampling_kl, SAMPLING_KL),
                            ("loss from logits", loss, LOSS)):
        print(f"{name}: user vs fused, us (forward + backward)")
        for a, b in sizes:
            runs = max(10, args.runs * 100_000 // max(100_000, a * b))
            user, fused = fn(a, b, runs)
            print(f"  {a}x{b} ({a * b} values): {user:.1f} vs {fused:.1f}, fused {user / fused:.2f}x")


if __name__ == "__main__":
    main()
