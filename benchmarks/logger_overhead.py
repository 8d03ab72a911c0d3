"""What the TensorBoard logger costs a training run: the reference run (REFERENCE.md: fastvae.VAE, Adam 1e-3,
batch 128, 10 epochs over the 60,000 Fashion-MNIST images) with a run folder, logger "jsonl" against
"tensorboard" (what ``fastvae train --logger tensorboard`` runs), interleaved A B B A per round.

    python -m benchmarks.logger_overhead [--rounds 5] [--epochs 10] [--samples N] [--out FILE]
    python -m benchmarks.logger_overhead --smoke      (1 epoch on 512 images, 2 rounds: seconds)

Timed: ``Trainer.fit()`` (the loop, its checkpoints, metrics.jsonl and, for "tensorboard", the event
file: scalars every log_every=50 steps, images and a flush at each epoch's end). One throwaway run
first warms both paths up. Reported: each run's seconds, the min and median per logger and their
ratios (tensorboard / jsonl); the target is ratio_min <= 1.03. The one-off import of
torch.utils.tensorboard (paid when the Trainer is built, before training) is reported apart.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastvae
from fastvae import callbacks

from . import run as bench_run

LOGGERS = ("jsonl", "tensorboard")
TARGET = 1.03


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(images: torch.Tensor, logger: str, epochs: int, device: torch.device, out: Path) -> float:
    """Seconds of Trainer.fit() for the reference model with a run folder and `logger`."""
    torch.manual_seed(0)
    trainer = fastvae.Trainer(fastvae.VAE(), images, fastvae.TrainConfig(epochs=epochs, progress=False, logger=logger),
                              device=device, out_dir=out)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit()
    _sync(device)
    return time.perf_counter() - t0


def run(*, rounds: int = 5, epochs: int = 10, samples: int | None = None, device: str = "auto", data_dir: str | None = None) -> dict:
    dev = fastvae.trainer.resolve_device(device)
    images = fastvae.data.load("fashion-mnist", "train", root=data_dir).images
    images = images[:samples] if samples else images
    t0 = time.perf_counter()
    callbacks.TensorBoard()  # the one-off import of torch.utils.tensorboard (and tensorboard)
    import_s = time.perf_counter() - t0
    seconds: dict[str, list[float]] = {k: [] for k in LOGGERS}
    with tempfile.TemporaryDirectory() as tmp:
        for logger in LOGGERS:  # warm-up: kernels, allocator, the event writer's thread
            one_run(images[:128 * 20], logger, 1, dev, Path(tmp) / f"warm-{logger}")
        for r in range(rounds):
            for logger in (LOGGERS if r % 2 == 0 else LOGGERS[::-1]):  # A B, then B A: drift hits both alike
                s = one_run(images, logger, epochs, dev, Path(tmp) / f"{logger}-{r}")
                seconds[logger].append(s)
                print(json.dumps({"round": r, "logger": logger, "seconds": round(s, 3)}), flush=True)
    jsonl, board = seconds["jsonl"], seconds["tensorboard"]
    ratio_min = min(board) / min(jsonl)
    return {"name": "logger_overhead", "part": "logger_overhead", "device": dev.type, "threads": torch.get_num_threads(), "samples": len(images), "epochs": epochs,
            "rounds": rounds, "seconds": seconds, "min_s": {k: min(v) for k, v in seconds.items()},
            "median_s": {k: statistics.median(v) for k, v in seconds.items()}, "ratio_min": ratio_min,
            "ratio_median": statistics.median(board) / statistics.median(jsonl),
            "paired_ratios": [b / j for b, j in zip(board, jsonl)], "tensorboard_import_s": import_s,
            "target": f"ratio_min <= {TARGET}", "met": ratio_min <= TARGET}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="1 epoch on 512 images, 2 rounds (checks that it runs; the ratio means nothing)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--samples", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.epochs, args.samples = 2, 1, 512
    result = run(rounds=args.rounds, epochs=args.epochs, samples=args.samples, device=args.device, data_dir=args.data_dir)
    print(json.dumps(result, indent=2))
    if args.out:
        header = bench_run.module_meta(fastvae.trainer.resolve_device(args.device), "benchmarks.logger_overhead", argv)
        bench_run.write_results(args.out, header, [result])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
