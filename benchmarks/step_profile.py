"""Top ops per training step of the reference run, from torch.profiler: the Trainer's step as it runs
now (the hand-written step, fastvae.mlp_step) and the autograd step it replaced (torch.optim.Adam).

    python -m benchmarks.step_profile [--steps 120] [--rows 12]

Prints one table per step kind: self CPU time per step of the ops that take the most, and the
total. Profiler times carry its own overhead; compare the two tables, not their sums with a
wall clock.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fastvae
from fastvae import mlp_step


def _trainer(images: torch.Tensor, autograd: bool) -> fastvae.Trainer:
    cfg = fastvae.TrainConfig(epochs=1, batch_size=128, progress=False, seed=0, log_every=10**9)
    trainer = fastvae.Trainer(fastvae.VAE(), images, cfg, device="cpu")
    if autograd:  # the engine before the hand-written step: autograd and torch.optim.Adam(fused=True)
        trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=cfg.lr, fused=True)
    return trainer


def table(steps: int, autograd: bool, rows: int) -> str:
    images = fastvae.data.load("fashion-mnist", "train").images[: 128 * steps]
    trainer = _trainer(images, autograd)
    trainer.fit()  # warm-up epoch
    trainer.config.epochs += 1
    original = mlp_step.engine
    if autograd:
        mlp_step.engine = lambda run: None
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit()
    finally:
        mlp_step.engine = original
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"| op ({'autograd step' if autograd else 'hand-written step'}) | calls per step | self CPU ms per step | share |",
             "| --- | --- | --- | --- |"]
    for e in events[:rows]:
        lines.append(f"| {e.key} | {e.count / steps:.1f} | {e.self_cpu_time_total / steps / 1e3:.3f} | {e.self_cpu_time_total / total:.0%} |")
    lines.append(f"| all ops | {sum(e.count for e in events) / steps:.1f} | {total / steps / 1e3:.3f} | 100% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120, help="profiled steps (one epoch of 128 x steps images)")
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args(argv)
    for autograd in (True, False):
        print(table(args.steps, autograd, args.rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
