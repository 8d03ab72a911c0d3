"""``fastvae.train``: data set -> model -> Trainer -> checkpoint, metrics and PNGs in one call."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import data as datasets
from . import distributed, models, plots
from .apps import latent_map
from .model import VAE
from .trainer import CHECKPOINT, METRICS, TrainConfig, Trainer


def default_out(dataset: str) -> Path:
    """runs/<dataset>-<date>-<time>: a new folder per run, so no earlier run is overwritten."""
    return Path("runs") / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    dataset: str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    resume: str | os.PathLike | None = None,
    limit: int | None = None,
    model: str = "vae",
    hidden_dims: Sequence[int] | None = None,
    latent_dim: int = 20,
    likelihood: str = "bernoulli",
    backend: str | None = None,
    **config: Any,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a VAE on a named data set and write checkpoint.pt, metrics.jsonl and PNGs to `out`.

    `limit` keeps the first N training images (quick runs); `model` is a name of fastvae.models.MODELS
    (cvae trains on the labels; hidden_dims=None: the model's default, (400,) for vae); other
    keywords are TrainConfig's.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of images, got {limit!r}")
    train_set = datasets.load(dataset, "train", root=data_dir)
    images = train_set.images[:limit] if limit else train_set.images
    labels = train_set.labels[:limit] if limit else train_set.labels
    out_dir = Path(out) if out is not None else (Path(resume).parent if resume else default_out(dataset))
    cfg = TrainConfig(**config)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)  # the initial weights too
    net = models.for_data(model, images.shape[1:], hidden_dims=hidden_dims, latent_dim=latent_dim, likelihood=likelihood,
                          num_classes=int(train_set.labels.max()) + 1, backend=backend)
    cfg.extra = {**cfg.extra, "dataset": dataset, "limit": limit}
    labels = labels if net.conditional else None
    trainer = Trainer(net, images, cfg, device=device, out_dir=out_dir, labels=labels)
    if resume:
        trainer.resume(resume)
    history = trainer.fit()
    if distributed.is_main():
        write_pictures(net, images, out_dir, image_shape=tuple(images.shape[1:3]) if images.dim() == 3 else None, labels=labels)
        print(f"wrote {out_dir / CHECKPOINT}, {out_dir / METRICS} and PNGs to {out_dir}")
    return net, history


def write_pictures(model: nn.Module, images: torch.Tensor, out_dir: Path, image_shape: tuple[int, int] | None,
                   labels: torch.Tensor | None = None) -> None:
    """reconstructions.png (originals above their reconstructions), samples.png, loss.png, and
    latent_map.png for an unconditional MLP VAE with a 2-D latent space."""
    if image_shape is None:
        return
    condition = {"labels": labels[:32]} if labels is not None else {}
    plots.write_png(plots.reconstruction_grid(model, images[:32], image_shape, **condition), out_dir / "reconstructions.png")
    plots.write_png(plots.grid(model.sample(64, seed=0, out_dtype=torch.uint8), image_shape, columns=8), out_dir / "samples.png")
    if (out_dir / METRICS).exists():
        plots.loss_curve(out_dir / METRICS, out_dir / "loss.png")
    if isinstance(model, VAE) and model.latent_dim == 2 and image_shape[0] * image_shape[1] == model.input_dim and image_shape[0] == image_shape[1]:
        latent_map(model, out_dir / "latent_map.png")
