"""Write a large shard set quickly, shard by shard, from Fashion-MNIST pixels (for streaming and memory benchmarks).

    python -m benchmarks.make_shards OUT --gb 4 [--shape 3,64,64] [--labels]

The images are real Fashion-MNIST garments, upscaled to HxW (nearest, so it is fast) and tinted per
image (C = 3), tiled over the set with a different tint per repetition: N = ceil(gb * 2^30 / (C*H*W)).
Only one chunk and one shard are ever in memory (fastvae.shards.ShardWriter), so a set many times
larger than RAM is written at the disk's speed (plus sha256). OUT must be new or empty.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from fastvae import data, shards

CHUNK = 1024


def upscale(images: np.ndarray, h: int, w: int) -> np.ndarray:
    """(k, 28, 28) -> (k, 1, h, w) uint8, nearest neighbour (an index gather: fast, and only one chunk at a time)."""
    rows, cols = np.arange(h) * 28 // h, np.arange(w) * 28 // w
    return images[:, rows][:, :, cols][:, None]


def chunks(n: int, shape: tuple[int, int, int], seed: int = 0):
    """(images (k, C, H, W) uint8, labels (k,)) chunks adding up to n images; each repetition of the base set tinted anew."""
    split = data.load("fashion-mnist", "train")
    base, labels = split.images.numpy(), split.labels.numpy()
    rng = np.random.default_rng(seed)
    c, h, w = shape
    done = 0
    while done < n:
        start = done % len(base)
        k = min(CHUNK, n - done, len(base) - start)
        gray = upscale(base[start:start + k], h, w).astype(np.uint16)
        if c == 1:
            images = gray.astype(np.uint8)
        else:
            tint = rng.integers(64, 256, size=(k, c, 1, 1), dtype=np.uint16)
            images = (gray * tint >> 8).astype(np.uint8)
        yield images, labels[start:start + k]
        done += k


def make(out: str | Path, gb: float, shape: tuple[int, int, int] = (3, 64, 64), labels: bool = False,
         progress: bool = True, shard_bytes: int = shards.DEFAULT_SHARD_BYTES) -> Path:
    """Write a shard set of about `gb` GiB of pixels into the new folder `out`; its path."""
    n = math.ceil(gb * 2**30 / math.prod(shape))
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    started = time.perf_counter()
    with shards.ShardWriter(out, shape, labels=labels, label_names=names if labels else None, shard_bytes=shard_bytes,
                            source={"kind": "synthetic", "maker": "benchmarks.make_shards", "from": "fashion-mnist train, "
                                    "upscaled (nearest) and tinted per image"}) as writer:
        for i, (images, lab) in enumerate(chunks(n, shape)):
            writer.add(images, lab if labels else None)
            if progress and i % 256 == 0:
                print(f"\r{min(n, (i + 1) * CHUNK)}/{n} images ", end="", file=sys.stderr, flush=True)
    if progress:
        seconds = time.perf_counter() - started
        print(f"\nwrote {out}: {n} images {'x'.join(map(str, shape))} ({n * math.prod(shape) / 2**30:.2f} GiB) "
              f"in {seconds:.1f} s", file=sys.stderr)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a new or empty folder")
    p.add_argument("--gb", type=float, default=4.0, help="GiB of pixels (default 4)")
    p.add_argument("--shape", default="3,64,64", help="C,H,W of each image (default 3,64,64)")
    p.add_argument("--labels", action="store_true", help="also write the labels")
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3 or shape[0] not in (1, 3):
        p.error(f"--shape must be C,H,W with C 1 or 3, got {args.shape}")
    make(args.out, args.gb, shape, args.labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
