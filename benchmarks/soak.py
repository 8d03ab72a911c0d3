"""Long-run memory check: train a tiny VAE for many steps and print the process RSS along the way.

    python benchmarks/soak.py --steps 10000            # ~1 min on 2 CPU cores
    python benchmarks/soak.py --steps 10000 --backend cpp --device cuda

Leaks show as RSS growing after the warm-up (allocator caches, autograd graphs kept alive,
per-step Python objects). `history` keeps one small dict per epoch by design; its size is
printed so it is not mistaken for a leak. Exits 1 if RSS grew more than --max-growth-mib
between the first mark after warm-up and the end.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

import fastvae


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--marks", type=int, default=5, help="RSS readings after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="run folder: also write a checkpoint per epoch")
    p.add_argument("--max-growth-mib", type=float, default=5.0)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8 * args.batch_size, 28, 28), dtype=torch.uint8)
    model = fastvae.VAE(hidden_dims=(32,), latent_dim=4, backend=args.backend)
    cfg = fastvae.TrainConfig(epochs=1, batch_size=args.batch_size, progress=False, log_every=50)
    trainer = fastvae.Trainer(model, images, cfg, device=args.device, out_dir=args.out)
    per_epoch = trainer.steps_per_epoch

    def run_to(step: int) -> None:
        trainer.config.epochs = -(-step // per_epoch)
        trainer.fit()

    print(f"fastvae {fastvae.__version__}, torch {torch.__version__}, device {trainer.device}, "
          f"backends {({op: v['active'] for op, v in fastvae.backends().items()})}")
    print(f"RSS at start (after import and setup): {rss_mib():.1f} MiB")
    t0 = time.perf_counter()
    run_to(args.warmup_steps)
    gc.collect()
    readings = [(trainer.step, rss_mib())]
    print(f"step {trainer.step:6d}  RSS {readings[-1][1]:8.1f} MiB  (after warm-up)")
    for i in range(1, args.marks + 1):
        run_to(args.warmup_steps + (args.steps - args.warmup_steps) * i // args.marks)
        gc.collect()
        readings.append((trainer.step, rss_mib()))
        print(f"step {trainer.step:6d}  RSS {readings[-1][1]:8.1f} MiB  loss {trainer.history[-1]['loss']:.2f}  "
              f"{time.perf_counter() - t0:6.1f} s  history {len(trainer.history)} records ({sys.getsizeof(trainer.history) / 1024:.0f} KiB list)")
    growth = readings[-1][1] - readings[0][1]
    print(f"RSS growth from step {readings[0][0]} to {readings[-1][0]}: {growth:+.1f} MiB "
          f"({trainer.step} steps in {time.perf_counter() - t0:.1f} s)")
    return 0 if growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
