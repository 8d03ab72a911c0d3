"""PNG output: image grids (uint8 pixels), drawn enlarged under a title (matplotlib), and the loss curve."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch


def grid(images: torch.Tensor, image_shape: tuple[int, ...], columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, H*W) uint8 images into one (rows*(H+pad)+pad, cols*(W+pad)+pad) uint8 picture; with
    image_shape (C, H, W), channels-first rows (N, C*H*W) of C = 3 (RGB) give an (.., .., 3) picture."""
    channels, h, w = image_shape if len(image_shape) == 3 else (1, *image_shape)
    images = images.reshape(-1, channels, h, w).permute(0, 2, 3, 1)
    if channels == 1:
        images = images[..., 0]
    elif channels != 3:
        raise ValueError(f"pictures are grey (1 channel) or RGB (3 channels), not {channels} channels")
    n = images.shape[0]
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i].cpu()
    return canvas


def tile_centers(count: int, size: int, pad: int = 2) -> list[float]:
    """Pixel coordinates of the centres of `count` tiles of `size` along one side of a ``grid``."""
    return [pad + i * (size + pad) + (size - 1) / 2 for i in range(count)]


def picture(pixels: torch.Tensor, path: str | os.PathLike, title: str, *, scale: int = 3,
            xticks: tuple[Sequence[float], Sequence[str]] | None = None, yticks: tuple[Sequence[float], Sequence[str]] | None = None,
            xlabel: str | None = None, ylabel: str | None = None) -> Path:
    """Write an (H, W) uint8 grey or (H, W, 3) RGB picture (a ``grid``) `scale` times larger, pixel for
    pixel, under `title` (also stored as the PNG's Title text); ticks are (pixel positions, labels)."""
    if pixels.dtype != torch.uint8 or not (pixels.dim() == 2 or (pixels.dim() == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must be an (H, W) or (H, W, 3) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi, (h, w) = 100, pixels.shape[:2]
    framed = xticks is not None or yticks is not None
    left, right, bottom = (0.7, 0.15, 0.6) if framed else (0.1, 0.1, 0.1)  # inches
    top = 0.3 + 0.22 * (title.count("\n") + 1)
    width, height = w * scale / dpi, h * scale / dpi
    fig = plt.figure(figsize=(left + width + right, bottom + height + top), dpi=dpi)
    ax = fig.add_axes((left / fig.get_figwidth(), bottom / fig.get_figheight(), width / fig.get_figwidth(), height / fig.get_figheight()))
    ax.imshow(pixels.cpu().numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(*(xticks or ([], [])))
    ax.set_yticks(*(yticks or ([], [])))
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if not framed:
        ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Title": title})
    plt.close(fig)
    return path


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as they are; probabilities in [0, 1] quantised like decode_latents."""
    from .ops.decode import quantize_reference

    return values if values.dtype == torch.uint8 else quantize_reference(values)


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, image_shape: tuple[int, ...], columns: int = 8, **condition: torch.Tensor) -> torch.Tensor:
    """Rows of originals, each above the row of their reconstructions (posterior means);
    `condition` (labels=...) goes to a conditional model's reconstruct."""
    device = next(model.parameters()).device
    images = images.to(device)
    originals = to_pixels(images.reshape(images.shape[0], -1)).cpu()
    recon = to_pixels(model.reconstruct(images, **{k: v.to(device) for k, v in condition.items()})).cpu()
    return grid(above(originals, recon, columns), image_shape, columns=columns)


def above(originals: torch.Tensor, recon: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, D) rows of `columns` originals, each row followed by the row of their reconstructions
    (a short last row padded with blank images), ready for ``grid(..., columns=columns)``."""
    rows = []
    for start in range(0, originals.shape[0], columns):
        pad = torch.zeros(max(0, columns - originals[start:start + columns].shape[0]), originals.shape[1], dtype=torch.uint8)
        rows += [originals[start:start + columns], pad, recon[start:start + columns], pad]
    return torch.cat(rows)


@torch.no_grad()
def write_samples(model, path: str | os.PathLike, n: int, image_shape: tuple[int, ...], caption: str, *,
                  seed: int = 0, label: int | None = None) -> Path:
    """A titled grid of n decoded prior samples; a conditional model without `label` draws classes
    0, 1, ... in turn, so each of its num_classes columns holds one class."""
    conditional = getattr(model, "conditional", False)
    pixels = model.sample(n, seed=seed, out_dtype=torch.uint8, **({"labels": label} if conditional else {}))
    what, columns, xticks = f"{n} samples from the prior (seed {seed})", None, None
    if conditional and label is None:
        what, columns = f"{n} samples from the prior, one class per column (seed {seed})", model.num_classes
        xticks = (tile_centers(columns, image_shape[-1]), [str(c) for c in range(columns)])
    elif label is not None:
        what = f"{n} samples of class {label} (seed {seed})"
    return picture(grid(pixels, image_shape, columns=columns), path, f"{what}\n{caption}", xticks=xticks,
                   xlabel="class" if xticks else None)


def write_reconstructions(model, images, image_shape: tuple[int, ...], path: str | os.PathLike, caption: str,
                          **condition: torch.Tensor) -> Path:
    """A titled ``reconstruction_grid``: rows of originals, each above its reconstructions. images: a
    tensor, or a data set (``fastvae.data.open``, a Dataset, a DataLoader) whose first 32 are shown."""
    if not isinstance(images, torch.Tensor):
        from .stream import head

        images = head(images, 32)[0]
    return picture(reconstruction_grid(model, images, image_shape, **condition), path,
                   f"{images.shape[0]} inputs, each row above its reconstructions\n{caption}")


def loss_curve(metrics_path: str | os.PathLike, path: str | os.PathLike, ylabel: str = "negative ELBO per sample") -> Path:
    """Plot loss per sample against step from a metrics.jsonl (intervals and epoch means); a line cut
    short by an interrupted run is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    steps = [r for r in records if r.get("event") != "epoch"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="loss per sample (log interval)")
    ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
