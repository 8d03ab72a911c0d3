"""Conditional VAE: a condition c joins the encoder's input, q(z | x, c), and the latent, p(x | z, c).

c is one-hot for integer class labels (B,), or a float vector (B, num_classes) used as given.
Parameter names are fastvae.VAE's (encoder.fc1, encoder.fc_mu, ..., decoder.fc1, ...), with the
first layer of each side num_classes inputs wider.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from ..model import MLPDecoder, MLPEncoder
from ..ops.decode import decode_latents
from .base import LatentModel, check_settings


class ConditionalVAE(LatentModel):
    """q(z | x, c) and p(x | z, c) as MLPs; every call takes ``labels=`` (int64 (B,) or float (B, num_classes))."""

    name = "cvae"
    conditional = True

    def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (400,), latent_dim: int = 20, num_classes: int = 10,
                 likelihood: str = "bernoulli", *, backend: str | None = None) -> None:
        super().__init__()
        hidden_dims = check_settings(likelihood, hidden_dims, input_dim=input_dim, latent_dim=latent_dim, num_classes=num_classes)
        self.input_dim, self.hidden_dims, self.latent_dim, self.num_classes = input_dim, hidden_dims, latent_dim, num_classes
        self.likelihood, self.backend = likelihood, backend
        self.encoder = MLPEncoder(input_dim + num_classes, hidden_dims, latent_dim)
        self.decoder = MLPDecoder(latent_dim + num_classes, tuple(reversed(hidden_dims)), input_dim, likelihood == "bernoulli")

    def config(self) -> dict:
        return {"model": self.name, "input_dim": self.input_dim, "hidden_dims": list(self.hidden_dims), "latent_dim": self.latent_dim,
                "num_classes": self.num_classes, "likelihood": self.likelihood}

    def condition(self, labels: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """The condition vectors (B, num_classes) in the model's dtype: one-hot of int labels, or float rows as given."""
        if labels is None:
            raise ValueError("this model is conditional: pass labels=... (int class labels (B,) or float vectors (B, num_classes))")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if batch is not None and labels.shape[:1] != (batch,):
            raise ValueError(f"labels must have one entry per sample ({batch}), got shape {tuple(labels.shape)}")
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != self.num_classes:
                raise ValueError(f"float labels are condition vectors and must be (B, num_classes={self.num_classes}), got {tuple(labels.shape)}")
            _checks.finite("labels", labels)
            return labels.to(self.dtype)
        if labels.dtype in (torch.bool, torch.uint8) or labels.dim() != 1:
            raise ValueError(f"integer labels must be class indices of shape (B,) (int64), got {tuple(labels.shape)} {labels.dtype}")
        if _checks.values_checked() and labels.numel() and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got values from {int(labels.min())} to {int(labels.max())}")
        return F.one_hot(labels.long(), self.num_classes).to(self.dtype)

    def posterior(self, flat: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(torch.cat([flat, self.condition(labels, flat.shape[0]).to(flat.device)], dim=1))

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(torch.cat([z, self.condition(labels, z.shape[0]).to(z.device)], dim=1))

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | int | None = None, seed: int | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n samples of p(x | z, c), z ~ N(0, I): labels (B,) / (B, num_classes), one int for all, or None
        for classes 0, 1, ..., num_classes - 1, 0, ... in turn."""
        device = next(self.parameters()).device
        if labels is None:
            labels = torch.arange(n, device=device) % self.num_classes
        elif isinstance(labels, int) and not isinstance(labels, bool):
            labels = torch.full((n,), labels, dtype=torch.long, device=device)
        c = self.condition(labels, n).to(device)
        z = torch.cat([self.prior(n, self.latent_dim, seed), c], dim=1)
        return decode_latents(self.decoder, z, out_dtype=out_dtype, backend=self.backend)
