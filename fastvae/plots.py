"""PNG output: image grids (uint8 pixels, no matplotlib needed) and the loss curve (matplotlib)."""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import torch


def write_png(pixels: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an (H, W) uint8 grey image as a PNG with zlib alone."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 2:
        raise ValueError(f"pixels must be an (H, W) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")
    h, w = pixels.shape
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.cpu()], dim=1).numpy().tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def grid(images: torch.Tensor, image_shape: tuple[int, int], columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, H*W) uint8 images into one (rows*(H+pad)+pad, cols*(W+pad)+pad) uint8 picture."""
    h, w = image_shape
    images = images.reshape(-1, h, w)
    n = images.shape[0]
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i].cpu()
    return canvas


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as they are; probabilities in [0, 1] quantised like decode_latents."""
    from .ops.decode import quantize_reference

    return values if values.dtype == torch.uint8 else quantize_reference(values)


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, image_shape: tuple[int, int], columns: int = 8, **condition: torch.Tensor) -> torch.Tensor:
    """Rows of originals, each above the row of their reconstructions (posterior means);
    `condition` (labels=...) goes to a conditional model's reconstruct."""
    device = next(model.parameters()).device
    images = images.to(device)
    originals = to_pixels(images.reshape(images.shape[0], -1)).cpu()
    recon = to_pixels(model.reconstruct(images, **{k: v.to(device) for k, v in condition.items()})).cpu()
    rows = []
    for start in range(0, originals.shape[0], columns):
        pad = torch.zeros(max(0, columns - originals[start:start + columns].shape[0]), originals.shape[1], dtype=torch.uint8)
        rows += [originals[start:start + columns], pad, recon[start:start + columns], pad]
    return grid(torch.cat(rows), image_shape, columns=columns)


def loss_curve(metrics_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Plot loss per sample against step from a metrics.jsonl (intervals and epoch means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("event") != "epoch"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="loss per sample (log interval)")
    ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO per sample")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
