"""Top ops per training step of the reference run, from torch.profiler: the Trainer's step as it runs
now (the hand-written step, fastvae.mlp_step) and the autograd step it replaced (torch.optim.Adam).

    python -m benchmarks.step_profile [--steps 120] [--rows 12]
    python -m benchmarks.step_profile --split [--rounds 30]

Prints one table per step kind: self CPU time per step of the ops that take the most, and the
total. Profiler times carry its own overhead; compare the two tables, not their sums with a
wall clock.

``--split`` times, without the profiler, where the step's time above its GEMM floor goes: the step
(Adam included), the same step without the update, and Adam alone on the same buffers (FlatAdam's
flat_step: torch's fused Adam, the op's arithmetic; only the updates timed): back to back (its state
in cache), after a 64 MiB sweep (evicted), and after a step's time of idling that touches no memory
(what the machine alone does to the cache in that time). Each window of 50 steps runs right after the
floor's; the ratios to that floor are per round, the medians reported.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import fastvae
from fastvae import _memory, mlp_step

from .floor import WINDOW, GemmFloor


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


def split(rounds: int, window: int = WINDOW) -> str:
    """The step's time above its floor, apart: see the module docstring."""
    data = fastvae.data.load("fashion-mnist", "train").images.flatten(1)
    model = fastvae.VAE()
    optimizer = mlp_step.make_optimizer(model, 1e-3)
    floor, sweep = GemmFloor(), torch.zeros(16 << 20)  # 64 MiB: twice the last-level cache (zeros: no denormals)
    with mlp_step.packed(optimizer), _memory.heap_reuse(torch.device("cpu")):  # as Trainer.fit runs it
        engine = mlp_step.MLPStep(model, optimizer)

        def steps(update: bool) -> float:
            t0 = time.perf_counter()
            for _ in range(window):
                x = torch.index_select(data, 0, torch.randint(0, len(data), (128,)))  # as Resident.pixels (data[rows]: 10x slower)
                if update:
                    engine.step(x, 1.0)
                else:
                    engine.forward_backward(x, 1.0)  # the same op, update=False
            return time.perf_counter() - t0

        def adam(before: Callable[[], object] | None = None) -> float:  # the updates' own time, `before` run (untimed) ahead of each
            total = 0.0
            for _ in range(window):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                optimizer.step_count += 1
                optimizer.flat_step()
                total += time.perf_counter() - t0
            return total

        def idle() -> None:  # a step's time that touches no memory
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < step_s:
                pass

        parts = {"the step (Adam included)": lambda: steps(True),
                 "the step without Adam's update": lambda: steps(False),
                 "Adam alone, its buffers in cache": adam,
                 "Adam alone after a 64 MiB sweep": lambda: adam(lambda: sweep.add_(1)),
                 "Adam alone after a step's time idle": lambda: adam(idle)}
        step_s = floor.seconds(20) / 20
        for f in parts.values():
            f()  # warm
        seconds: dict[str, list[float]] = {k: [] for k in parts}
        floors: list[float] = []
        for _ in range(rounds):
            floors.append(floor.seconds(window))
            step_s = floors[-1] / window
            for name, f in parts.items():
                seconds[name].append(f())
    lines = [f"| measured ({rounds} rounds of {window} steps, each right after the floor's) | ms per step (median) | vs the floor (median of rounds) |",
             "| --- | --- | --- |",
             f"| the step's products alone (the floor) | {statistics.median(floors) / window * 1e3:.3f} | 1.00x |"]
    for name, v in seconds.items():
        lines.append(f"| {name} | {statistics.median(v) / window * 1e3:.3f} | {statistics.median(s / f for s, f in zip(v, floors)):.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120, help="profiled steps (one epoch of 128 x steps images)")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--split", action="store_true", help="where the step's time above its floor goes (no profiler)")
    p.add_argument("--rounds", type=int, default=30, help="--split's rounds")
    args = p.parse_args(argv)
    if args.split:
        print(split(args.rounds), flush=True)
        return 0
    for autograd in (True, False):
        print(table(args.steps, autograd, args.rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
