"""Convolutional VAE for (C, H, W) images, e.g. 28x28x1 digits or 64x64x3 pictures.

Encoder: Conv2d(k=4, stride 2, pad 1) + ReLU per level (each halves H and W), then linear heads
fc_mu and fc_logvar. Decoder: fc + ReLU back to the last feature map, ConvTranspose2d(k=4,
stride 2, pad 1) per level (ReLU between), ending in C channels of logits (Bernoulli) or means
(Gaussian), returned flat (B, C*H*W) so the fused loss and decode_latents apply unchanged.
Inputs are flat or (B, C, H, W) rows in channels-first order.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LatentModel, check_settings


class ConvEncoder(nn.Module):
    """(B, C*H*W) -> conv1 .. convN (stride 2) -> (fc_mu, fc_logvar)."""

    def __init__(self, image_shape: tuple[int, int, int], channels: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.image_shape = image_shape
        widths = [image_shape[0], *channels]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(len(channels)))
        feature_dim = channels[-1] * math.prod(s >> len(channels) for s in image_shape[1:])
        self.fc_mu = nn.Linear(feature_dim, latent_dim)
        self.fc_logvar = nn.Linear(feature_dim, latent_dim)

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = flat.reshape(-1, *self.image_shape)
        for conv in self.convs:
            h = F.relu(conv(h))
        h = h.flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    """z -> ReLU(fc) -> deconv1 .. deconvN (stride 2) -> flat (B, C*H*W) logits or means."""

    def __init__(self, latent_dim: int, channels: Sequence[int], image_shape: tuple[int, int, int], returns_logits: bool) -> None:
        super().__init__()
        levels = len(channels)
        self.start_shape = (channels[-1], *(s >> levels for s in image_shape[1:]))
        self.fc = nn.Linear(latent_dim, math.prod(self.start_shape))
        widths = [*reversed(channels), image_shape[0]]
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(levels))
        self.returns_logits = returns_logits  # decode_latents applies the sigmoid

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).reshape(-1, *self.start_shape)
        for i, deconv in enumerate(self.deconvs):
            h = deconv(h)
            if i < len(self.deconvs) - 1:
                h = F.relu(h)
        return h.flatten(1)


class ConvVAE(LatentModel):
    """image_shape (C, H, W) with H and W divisible by 2 ** len(channels); channels per stride-2 level."""

    name = "conv"

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (32, 64), latent_dim: int = 20,
                 likelihood: str = "bernoulli", *, backend: str | None = None) -> None:
        super().__init__()
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), e.g. (1, 28, 28) or (3, 64, 64), got {image_shape}")
        channels = check_settings(likelihood, channels, "channels", latent_dim=latent_dim, image_channels=image_shape[0], height=image_shape[1], width=image_shape[2])
        if not channels:
            raise ValueError("channels must name at least one level, e.g. (32, 64)")
        scale = 2 ** len(channels)
        if any(s % scale for s in image_shape[1:]):
            raise ValueError(f"height and width {image_shape[1:]} must be divisible by 2**len(channels) = {scale}; use fewer levels or pad the images")
        self.image_shape, self.channels, self.latent_dim = image_shape, channels, latent_dim
        self.input_dim = math.prod(image_shape)
        self.likelihood, self.backend = likelihood, backend
        self.encoder = ConvEncoder(image_shape, channels, latent_dim)
        self.decoder = ConvDecoder(latent_dim, channels, image_shape, likelihood == "bernoulli")

    def config(self) -> dict:
        return {"model": self.name, "image_shape": list(self.image_shape), "channels": list(self.channels), "latent_dim": self.latent_dim,
                "likelihood": self.likelihood}

    def posterior(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(flat)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
