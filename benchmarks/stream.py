"""The data path's numbers (issue 23): streamed vs resident training, the loader alone, memory while streaming.

    python -m benchmarks.stream [--smoke | --quick] [--parts loader,train,conv,memory] [--out FILE] [--gb 4]

Parts, each with its target (the results file says met / not met):
- "train":  the reference model (784-400-20, batch 128), one epoch of Fashion-MNIST streamed from
            shards (page cache warm) against the same epoch resident, interleaved rounds (min of
            each): resident_s / streamed_s >= 0.95. The second epoch of each run is timed (the
            first warms the page cache, the allocator and, on CUDA, captures the graph).
- "conv":   the same for the conv model on 64x64x3 images (Fashion-MNIST upscaled and tinted by
            class; CPU: the first --conv-images of them and 3 rounds, as a conv epoch is slow there).
- "loader": uint8 batches of 128 to the training device, random order, no model: fastvae's
            streamed source against torch's DataLoader over the same memory-mapped array with
            default settings (>= 3x its batches/s) and with num_workers=2, pin_memory=True (>= 1x).
- "memory": a shard set of --gb GiB (64x64x3, benchmarks.make_shards) streamed through one Trainer
            epoch (a small MLP) in a child process: peak RssAnon (sampled from /proc/self/status)
            < 1 GB; and the same for its first sixteenth, whose peak must differ by no more than
            the bound's part that grows with N (32 bytes an image). The set is written to
            --workdir (default: a temporary folder) and deleted afterwards.

--smoke: tiny sizes (seconds; tests/test_stream.py runs it); --quick: mid sizes. Without --out the
results go to a temporary folder (nothing committed is touched).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fastvae
from fastvae import shards, stream

from . import make_shards, run

PARTS = ("loader", "train", "conv", "memory")
SIZES = {  # images for train / loader and for conv on CPU (all 60,000 on CUDA), rounds, GiB of the memory part's set
    "smoke": {"train": 1024, "conv": 256, "loader": 2048, "rounds": 1, "conv_rounds": 1, "gb": 0.02, "conv_side": 16},
    "quick": {"train": 20000, "conv": 2048, "loader": 60000, "rounds": 3, "conv_rounds": 2, "gb": 1.0, "conv_side": 64},
    "full": {"train": 60000, "conv": 4096, "loader": 60000, "rounds": 5, "conv_rounds": 3, "gb": 4.0, "conv_side": 64},
}
TINTS = np.array([[255, 80, 80], [80, 255, 80], [80, 80, 255], [255, 255, 80], [255, 80, 255],
                  [80, 255, 255], [255, 160, 40], [160, 80, 255], [200, 200, 200], [120, 255, 160]], dtype=np.float32) / 255


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fashion(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    train = fastvae.data.load("fashion-mnist", "train")
    return (train.images[:n], train.labels[:n]) if n else (train.images, train.labels)


def rgb(images: torch.Tensor, labels: torch.Tensor, side: int) -> np.ndarray:
    """Fashion-MNIST (N, 28, 28) -> (N, 3, side, side) uint8: bilinear upscaling, tinted by class."""
    big = F.interpolate(images.unsqueeze(1).float(), size=(side, side), mode="bilinear", align_corners=False)
    tint = torch.from_numpy(TINTS[labels.numpy() % 10]).view(-1, 3, 1, 1)
    return (big * tint).round().clamp(0, 255).to(torch.uint8).numpy()


def _epoch_seconds(model_fn, data, device, stream_flag, read_threads=None, batch=128, epochs=2) -> float:
    """Seconds of the last of `epochs` epochs of a fresh Trainer (the first warms up)."""
    torch.manual_seed(0)
    cfg = fastvae.TrainConfig(epochs=epochs, batch_size=batch, progress=False, stream=stream_flag, read_threads=read_threads)
    trainer = fastvae.Trainer(model_fn(), data, cfg, device=device)
    trainer.fit()
    return trainer.history[-1]["seconds"]


def bench_train(ds, model_fn, device: torch.device, rounds: int, name: str) -> dict:
    """Interleaved rounds of resident and streamed epochs (the default reader threads, and 2 for comparison); min of each.

    The target is the default path's ratio; the 2-reader one shows what the default's choice is worth."""
    modes = {"resident": (False, None), "streamed": (True, None), "streamed_2_readers": (True, 2)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode, (flag, readers) in modes.items():
            times[mode].append(_epoch_seconds(model_fn, ds, device, flag, readers))
    ratio = min(times["resident"]) / min(times["streamed"])
    return {"part": name, "images": len(ds), "shape": list(ds.shape), "rounds": rounds, "resident_s": times["resident"],
            "streamed_s": times["streamed"], "streamed_2_readers_s": times["streamed_2_readers"], "speed_ratio": ratio,
            "speed_ratio_2_readers": min(times["resident"]) / min(times["streamed_2_readers"]), "target": ">= 0.95", "met": ratio >= 0.95}


class _Rows(torch.utils.data.Dataset):
    """What a PyTorch user writes over a memory-mapped array: one row per item."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i]))


def _loader_epoch(batches, device: torch.device, non_blocking: bool = False) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for x in batches:
        if isinstance(x, stream.Batch):
            x = x.x
        x = x.to(device, non_blocking=non_blocking)
        n += 1
    _sync(device)
    return time.perf_counter() - t0, n


def bench_loader(ds, device: torch.device, rounds: int, batch: int = 128) -> dict:
    """batches/s of uint8 batches delivered to `device` in random order: fastvae's streamed source vs DataLoaders."""
    array = np.concatenate([np.asarray(s) for s in ds.shards]) if len(ds.shards) > 1 else ds.shards[0]
    source = stream.Streamed(stream.ArrayRows(ds.shards, None, ds.shape), batch, device)
    rows = _Rows(array)
    makers = {
        "fastvae": lambda e: source.batches(e, 0),
        "dataloader-default": lambda e: torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True),
        "dataloader-2-workers-pinned": lambda e: torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, num_workers=2, pin_memory=device.type == "cuda"),
    }
    rates: dict[str, list[float]] = {k: [] for k in makers}
    for r in range(rounds):
        for name, make in makers.items():
            seconds, n = _loader_epoch(make(r), device, non_blocking=name != "dataloader-default")
            rates[name].append(n / seconds)
    best = {k: max(v) for k, v in rates.items()}
    vs_default = best["fastvae"] / best["dataloader-default"]
    vs_workers = best["fastvae"] / best["dataloader-2-workers-pinned"]
    return {"part": "loader", "images": len(ds), "shape": list(ds.shape), "batch": batch, "rounds": rounds, "batches_per_s": rates,
            "vs_default": vs_default, "vs_2_workers_pinned": vs_workers, "target": "vs_default >= 3 and vs_2_workers_pinned >= 1",
            "met": vs_default >= 3 and vs_workers >= 1}


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(path: str, device: str, batch: int, limit: int | None) -> None:
    """In a fresh process: stream one Trainer epoch of the set at `path` (its first `limit` images);
    print peak RssAnon etc. as JSON."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ds = fastvae.data.open(path)
    ds = stream.first(ds, limit) if limit else ds
    start = _status("RssAnon")
    peak = {"RssAnon": start, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for k in peak:
                peak[k] = max(peak[k], _status(k))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    model = fastvae.VAE(input_dim=math.prod(ds.shape), hidden_dims=(32,), latent_dim=8)  # small: the data path is measured
    cfg = fastvae.TrainConfig(epochs=1, batch_size=batch, progress=False, stream=True)
    trainer = fastvae.Trainer(model, ds, cfg, device=device)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    for k in peak:
        peak[k] = max(peak[k], _status(k))
    bound = trainer.source.nbytes_ring() + 16 * len(ds)
    print(json.dumps({"set_bytes": ds.nbytes, "images": len(ds), "rss_anon_start": start, "rss_anon_peak": peak["RssAnon"],
                      "rss_file_peak": peak["RssFile"], "ring_and_order_bound": bound, "seconds": seconds,
                      "steps": trainer.step}))


def bench_memory(workdir: Path, gb: float, device: torch.device, side: int = 64, batch: int = 128) -> dict:
    """Peak RssAnon streaming the whole set and its first 1/16: the difference must stay within the
    bound's part that grows with N (32 bytes per image: the epoch's order, its construction, the labels)."""
    out = Path(tempfile.mkdtemp(prefix="fastvae-bigset-", dir=workdir)) / "set"
    runs = {}
    try:
        t0 = time.perf_counter()
        make_shards.make(out, gb, (3, side, side), progress=False)
        written = time.perf_counter() - t0
        count = len(fastvae.data.open(out))
        for name, limit in (("sixteenth", min(count, max(count // 16, 32 * batch))), ("whole", None)):  # >= 32 steps: a warm allocator
            child = subprocess.run([sys.executable, "-m", "benchmarks.stream", "--memory-child", str(out), "--device", str(device),
                                    "--batch", str(batch), *(["--limit", str(limit)] if limit else [])],
                                   capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            runs[name] = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    whole, small = runs["whole"], runs["sixteenth"]
    growth = whole["rss_anon_peak"] - small["rss_anon_peak"]
    per_n = 32 * (whole["images"] - small["images"])
    return {"part": "memory", "write_s": written, "runs": runs, "set_bytes": whole["set_bytes"], "rss_anon_peak": whole["rss_anon_peak"],
            "growth_whole_vs_sixteenth": growth, "bound_growth": per_n, "target": "rss_anon_peak < 1 GB on a set of >= --gb GB",
            "met": whole["rss_anon_peak"] < 2**30 and whole["set_bytes"] >= gb * 2**30 * 0.999,
            "within_bound": growth <= per_n + 16 * 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    size.add_argument("--quick", action="store_true", help="mid sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="results JSON (default: a new temporary folder)")
    p.add_argument("--workdir", default=None, help="where the shard sets are written (deleted afterwards; default: the temp folder)")
    p.add_argument("--gb", type=float, default=None, help="GiB of the memory part's set (default 4; smoke 0.02)")
    p.add_argument("--conv-images", type=int, default=None, help="images of the conv part on CPU (default 4096; all 60,000 on CUDA)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = fastvae.trainer.resolve_device(args.device)
    if args.memory_child:
        memory_child(args.memory_child, str(device), args.batch, args.limit)
        return 0
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    sz = SIZES[preset]
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    tmp = Path(tempfile.mkdtemp(prefix="fastvae-bench-stream-"))
    workdir = Path(args.workdir) if args.workdir else tmp
    out = Path(args.out) if args.out else tmp / "stream.json"
    results = {"meta": run.module_meta(device, "benchmarks.stream", argv, threads=torch.get_num_threads(), preset=preset), "results": []}
    try:
        if {"train", "loader"} & set(parts):
            images, labels = fashion(max(sz["train"], sz["loader"]))
            ds = fastvae.data.open(shards.write(images, workdir / "fashion", labels=labels.numpy()))
            if "loader" in parts:
                results["results"].append(bench_loader(fastvae.data.open(ds.path) if sz["loader"] >= len(ds) else stream.first(ds, sz["loader"]),
                                                       device, sz["rounds"]))
                print(json.dumps(results["results"][-1]), flush=True)
            if "train" in parts:
                results["results"].append(bench_train(stream.first(ds, sz["train"]), fastvae.VAE, device, sz["rounds"], "train"))
                print(json.dumps(results["results"][-1]), flush=True)
        if "conv" in parts:
            n = (args.conv_images or sz["conv"]) if device.type == "cpu" else 60000
            images, labels = fashion(n)
            side = sz["conv_side"]
            ds = fastvae.data.open(shards.write(rgb(images, labels, side), workdir / "rgb", labels=labels.numpy()))
            conv = lambda: fastvae.models.ConvVAE(image_shape=(3, side, side))  # noqa: E731
            results["results"].append(bench_train(ds, conv, device, sz["conv_rounds"] if device.type == "cpu" else sz["rounds"], "conv"))
            print(json.dumps(results["results"][-1]), flush=True)
        if "memory" in parts:
            results["results"].append(bench_memory(workdir, args.gb or sz["gb"], device))
            print(json.dumps(results["results"][-1]), flush=True)
    finally:
        for name in ("fashion", "rgb"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    run.write_results(out, results["meta"], results["results"])
    met = all(r["met"] for r in results["results"])
    print(f"wrote {out}; targets {'all met' if met else 'NOT all met: ' + ', '.join(r['part'] for r in results['results'] if not r['met'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
