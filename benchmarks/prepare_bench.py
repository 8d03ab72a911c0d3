"""`fastvae prepare` images/s against the single-process Pillow loop a user would write, on the same folder.

    python -m benchmarks.prepare_bench [--quick] [--images N] [--rounds R] [--out FILE]

Makes its own folder (in a temporary directory): N Fashion-MNIST garments upscaled to 64x64 and
tinted RGB, half JPEG (quality 90) and half PNG, in one sub-folder per class. Then, interleaved for
R rounds (page cache warm), it times to 32x32 RGB uint8 shards:
  - loop:      sorted files, `Image.open(f).convert("RGB")`, centre square resized to 32x32, into one
               array, `np.save` (what a user writes without fastvae);
  - prepare-1: `fastvae.prepare.prepare(..., workers=1)`;
  - prepare-2: `fastvae.prepare.prepare(..., workers=2)`.
It prints images/s (best round), the ratios, and the CPU time per image of each (all processes:
the work done, which the load of other processes does not change). The target is prepare-2 >=
1.8x loop, on a machine whose 2 cores are free. --quick (200 images, 1 round) shows that it runs.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 32


def make_folder(root: Path, n: int) -> list[Path]:
    """n tinted 64x64 RGB images of Fashion-MNIST, alternately JPEG and PNG, under root/<class>/."""
    from PIL import Image

    from fastvae import data

    split = data.load("fashion-mnist", "train")
    images, labels = split.images[:n].numpy(), split.labels[:n].numpy()
    tints = np.random.default_rng(0).integers(60, 256, size=(n, 3)).astype(np.float32) / 255
    files = []
    for i in range(n):
        rgb = (images[i][..., None] * tints[i]).round().astype(np.uint8)
        img = Image.fromarray(rgb, "RGB").resize((64, 64), Image.Resampling.BICUBIC)
        path = root / f"class{labels[i]}" / f"{i:06d}.{'jpg' if i % 2 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90) if i % 2 == 0 else img.save(path)
        files.append(path)
    return files


def pillow_loop(src: Path, out: Path) -> int:
    """The single-process loop: decode, convert, centre-crop + resize each file, stack, save."""
    from PIL import Image

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    array = np.empty((len(files), SIZE, SIZE, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
            array[i] = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
    out.mkdir(parents=True)
    np.save(out / "images.npy", array.transpose(0, 3, 1, 2))
    return len(files)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the workers): the work done, whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(n: int, rounds: int) -> dict:
    from fastvae.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="fastvae-prepare-bench-"))
    try:
        src = tmp / "src"
        started = time.perf_counter()
        make_folder(src, n)
        made_s = time.perf_counter() - started
        variants = {
            "loop": lambda out: pillow_loop(src, out),
            "prepare-1": lambda out: prepare(src, out, image_size=SIZE, channels=3, workers=1, progress=False),
            "prepare-2": lambda out: prepare(src, out, image_size=SIZE, channels=3, workers=2, progress=False),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            for name, fn in variants.items():  # interleaved: each round runs every variant once
                out = tmp / f"out-{name}-{r}"
                c, t = _cpu(), time.perf_counter()
                fn(out)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(_cpu() - c)
                shutil.rmtree(out)
        best = {k: min(v) for k, v in times.items()}
        ratio = best["loop"] / best["prepare-2"]
        return {"name": "prepare", "part": "prepare", "images": n, "from": "64x64 RGB, half JPEG q90 / half PNG", "to": f"3x{SIZE}x{SIZE}",
                "rounds": rounds, "seconds_to_make_folder": round(made_s, 2),
                "images_per_s": {k: round(n / v, 1) for k, v in best.items()},
                "seconds_all_rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
                "cpu_ms_per_image": {k: round(1000 * min(v) / n, 4) for k, v in cpu.items()},
                "ratio_prepare2_vs_loop": round(best["loop"] / best["prepare-2"], 3),
                "ratio_prepare1_vs_loop": round(best["loop"] / best["prepare-1"], 3),
                "target": "ratio_prepare2_vs_loop >= 1.8", "met": ratio >= 1.8}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prepare_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 images, 1 round: shows that it runs (CI)")
    p.add_argument("--images", type=int, default=None, help="images in the folder (default 6000)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--out", default=None, help="also write the result as JSON here (with the run's device, versions and command)")
    args = p.parse_args(argv)
    n = args.images or (200 if args.quick else 6000)
    rounds = args.rounds or (1 if args.quick else 5)
    result = run(n, rounds)
    for name, rate in result["images_per_s"].items():
        print(f"{name:>10}: {rate:10.1f} images/s")
    print("CPU ms per image (all processes): " + ", ".join(f"{k} {v:.3f}" for k, v in result["cpu_ms_per_image"].items()))
    print(f"prepare with 2 workers: {result['ratio_prepare2_vs_loop']:.2f}x the single-process Pillow loop (target >= 1.8); "
          f"1 worker: {result['ratio_prepare1_vs_loop']:.2f}x")
    if args.out:
        import torch

        from . import run as bench_run

        bench_run.write_results(args.out, bench_run.module_meta(torch.device("cpu"), "benchmarks.prepare_bench", argv), [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
