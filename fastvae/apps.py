"""Uses of a trained VAE: anomaly scores, latent interpolation, the 2-D latent map."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import _checks, plots
from .iwae import per_sample_bounds
from .ops.decode import decode_latents


def score(model, images: torch.Tensor, k: int = 1, *, batch_size: int = 256, seed: int | None = 0,
          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Anomaly score per sample, (N,) float64 on the CPU: minus the ELBO (k=1) or minus the IWAE_k
    bound (k>1), in nats; higher means less likely under the model. A conditional model needs the
    `labels`; an adversarial autoencoder has no such bound and is refused."""
    elbo, iwae = per_sample_bounds(model, images, k, batch_size=batch_size, seed=seed, labels=labels)
    return -(elbo if k == 1 else iwae)


def _one(model, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() != model.input_dim:
        raise ValueError(f"{name} must be one input of {model.input_dim} values, got shape {tuple(x.shape)}")
    return x.reshape(1, model.input_dim)


@torch.no_grad()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode `steps` points on the line between the posterior means of x_a and x_b (both ends
    included): (steps, input_dim) probabilities, or uint8 pixels with out_dtype=torch.uint8."""
    _checks.positive_int("steps", steps, minimum=2)
    device = next(model.parameters()).device
    mu, _ = model.encode(torch.cat([_one(model, x_a, "x_a"), _one(model, x_b, "x_b")]).to(device))
    t = torch.linspace(0, 1, steps, device=device, dtype=mu.dtype).unsqueeze(1)
    return decode_latents(model, (1 - t) * mu[0] + t * mu[1], out_dtype=out_dtype)


def latent_grid(n: int, *, low: float = 0.05, high: float = 0.95) -> torch.Tensor:
    """(n*n, 2) latents at the N(0, 1) quantiles linspace(low, high, n) in each axis; row-major,
    z2 decreasing down the rows so the picture has the usual orientation."""
    q = torch.special.ndtri(torch.linspace(low, high, n, dtype=torch.float64))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


def latent_map(model, path: str | os.PathLike, n: int = 20, *, title: str = "the 2-D latent space decoded") -> Path:
    """Write an n x n PNG of decodings over the prior's quantiles, with z1/z2 axes; needs latent_dim == 2 and square images."""
    _checks.positive_int("n", n)
    if model.latent_dim != 2:
        raise ValueError(f"latent_map needs a model with latent_dim=2, this one has latent_dim={model.latent_dim}; train with --latent-dim 2")
    side = math.isqrt(model.input_dim)
    if side * side != model.input_dim:
        raise ValueError(f"latent_map draws square images; input_dim={model.input_dim} is not a square")
    param = next(model.parameters())
    z = latent_grid(n)
    pixels = decode_latents(model, z.to(device=param.device, dtype=param.dtype), out_dtype=torch.uint8)
    every = max(1, n // 5)
    centers = plots.tile_centers(n, side)[::every]
    z1, z2 = z[:n, 0].tolist()[::every], z[::n, 1].tolist()[::every]  # first row: z1 left to right; first column: z2 top down
    return plots.picture(plots.grid(pixels.cpu(), (side, side), columns=n), path, title, scale=2,
                         xticks=(centers, [f"{v:.1f}" for v in z1]), yticks=(centers, [f"{v:.1f}" for v in z2]),
                         xlabel="z1 (prior quantiles 5% to 95%)", ylabel="z2")


def write_scores(model, images: torch.Tensor, labels: torch.Tensor | None, path: str | os.PathLike, *, k: int = 1, batch_size: int = 256) -> Path:
    """CSV of index,label,score (score as in ``score``), one row per sample."""
    condition = {"labels": labels} if getattr(model, "conditional", False) else {}
    scores = score(model, images, k, batch_size=batch_size, **condition).tolist()
    labels = labels.tolist() if labels is not None else [""] * len(scores)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("index,label,score\n")
        f.writelines(f"{i},{label},{s:.6f}\n" for i, (label, s) in enumerate(zip(labels, scores)))
    return path
