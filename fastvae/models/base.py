"""LatentModel: what every fastvae model shares (input flattening, decode, loss, sample, reconstruct).

A subclass sets ``input_dim``, ``latent_dim``, ``likelihood`` and ``backend`` and provides two hooks:
``posterior(flat, **condition) -> (mu, logvar)`` and ``decode_logits(z, **condition) -> (B, input_dim)``
logits (Bernoulli) or means (Gaussian). The negative ELBO then runs through the fused ops.
``condition`` is empty for unconditional models and ``labels=...`` for conditional ones.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import _checks
from ..ops import philox
from ..ops.decode import decode_latents, to_image_reference
from ..ops.loss import LIKELIHOODS, LossTerms, loss_terms
from ..ops.reparam import new_seed, reparameterize


def check_settings(likelihood: str, widths: Sequence[int] = (), widths_name: str = "hidden_dims", **sizes: int) -> tuple[int, ...]:
    """Validate the constructor arguments models share (sizes >= 1, layer widths >= 1, likelihood);
    returns the widths as a tuple."""
    for arg, value in sizes.items():
        _checks.positive_int(arg, value)
    widths = tuple(widths)
    for w in widths:
        _checks.positive_int(f"{widths_name} entries", w)
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return widths


class LatentModel(nn.Module):
    """Base of fastvae.VAE and the variants in fastvae.models; see the module docstring."""

    name = "vae"  # the key of fastvae.models.MODELS; stored as config()["model"] by the variants
    conditional = False  # True: loss_terms/sample/reconstruct take labels=..., the Trainer feeds them
    # Every parameter gets a gradient from every training step (tests/test_mlp_step.py checks each model), so FlatAdam's
    # update, which gives a parameter without one a zero gradient, is torch.optim.Adam's; a user's module may not.
    uses_every_parameter = True
    input_dim: int
    latent_dim: int
    likelihood: str
    backend: str | None

    def config(self) -> dict:
        """The constructor arguments (JSON types), as stored in checkpoints."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json (+ README.md) to a folder, atomically (see fastvae.pretrained)."""
        from ..pretrained import save_pretrained

        return save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None, map_location: str | torch.device = "cpu",
                        **hub: Any) -> "LatentModel":
        """The model a save_pretrained folder (or Hub repo id "user/name") holds, in eval mode; a folder
        holding another kind of model is refused (fastvae.models.from_pretrained takes any kind)."""
        from . import from_pretrained  # the registry of kinds

        return from_pretrained(path, None if cls is LatentModel else cls, backend=backend, map_location=map_location, **hub)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """save_pretrained, then upload the folder to the Hugging Face Hub repo `repo_id` (huggingface_hub)."""
        from ..pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def posterior(self, flat: torch.Tensor, **condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x) for flattened float inputs."""
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) logits (Bernoulli) or means (Gaussian)."""
        raise NotImplementedError

    def train_logits(self, z: torch.Tensor, flat: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """The decoder output the loss uses; models with teacher forcing also read the input `flat`."""
        return self.decode_logits(z, **condition)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) with input_dim features per row -> (B, input_dim); uint8 pixels become x / 255."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        per_sample = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()
        if x.dim() == 0 or per_sample != self.input_dim:
            raise ValueError(f"x must be a batch (B, ...) with input_dim={self.input_dim} features per sample, got shape {tuple(x.shape)}")
        weight = next(self.parameters())
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}; move x with x.to({str(weight.device)!r})")
        x = x.reshape(-1, self.input_dim)
        if x.dtype == torch.uint8:
            return x.to(weight.dtype) / 255.0
        _checks.floating("x", x)
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the model's parameters are {weight.dtype}; convert x with x.to({weight.dtype}) (or the model with model.to({x.dtype}))")
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @staticmethod
    def target(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The loss target: uint8 stays uint8 (the fused loss reads it as x / 255, no float copy)."""
        return x.reshape(flat.shape) if x.dtype == torch.uint8 else flat

    def encode(self, x: torch.Tensor, **condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.posterior(self.flatten(x), **condition)

    def code(self, x: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """The deterministic code of x that ``reconstruct`` decodes: the posterior mean."""
        return self.encode(x, **condition)[0]

    def decode(self, z: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """Probabilities (Bernoulli) or the mean (Gaussian), (B, input_dim)."""
        out = self.decode_logits(z, **condition)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def forward(self, x: torch.Tensor, **condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, mu, logvar), as the reference returns them."""
        mu, logvar = self.encode(x, **condition)
        z = reparameterize(mu, logvar, backend=self.backend)
        return self.decode(z, **condition), mu, logvar

    def loss_terms(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum", **condition: torch.Tensor) -> LossTerms:
        """(loss, recon, kl) for a batch, from logits through the fused ops."""
        flat = self.flatten(x)
        mu, logvar = self.posterior(flat, **condition)
        z = reparameterize(mu, logvar, backend=self.backend)
        logits = self.train_logits(z, flat, **condition)
        return loss_terms(logits, self.target(x, flat), mu, logvar, beta=beta, reduction=reduction, likelihood=self.likelihood, backend=self.backend)

    def loss(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum", **condition: torch.Tensor) -> torch.Tensor:
        """Negative ELBO: reconstruction + beta * KL (reduction "sum", "mean" per sample, or "none")."""
        return self.loss_terms(x, beta, reduction, **condition).loss

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n samples decoded from the prior: (n, input_dim) probabilities/means, or uint8 pixels."""
        return decode_latents(self.decoder, n=n, latent_dim=self.latent_dim, seed=seed, out_dtype=out_dtype, backend=self.backend)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """Decode the code (posterior mean) of x: (B, input_dim)."""
        return self.decode(self.code(x, **condition), **condition)

    def prior(self, n: int, dim: int, seed: int | None = None) -> torch.Tensor:
        """(n, dim) draws from N(0, I) on the model's device: torch.randn, or the Philox stream `seed`
        (the stream decode_latents uses, so a seeded sample is the same on every backend)."""
        _checks.positive_int("n", n)
        device = next(self.parameters()).device
        if seed is None:
            return torch.randn(n, dim, device=device, dtype=self.dtype)
        return philox.randn(new_seed(seed), n * dim, device=device).view(n, dim).to(self.dtype)

    @staticmethod
    def to_output(values: torch.Tensor, out_dtype: torch.dtype, from_logits: bool) -> torch.Tensor:
        """Decoder output (B, D) as probabilities/means of out_dtype, or uint8 pixels."""
        out = torch.empty(values.shape[0], math.prod(values.shape[1:]), dtype=out_dtype, device=values.device)
        to_image_reference(values.reshape(out.shape), out, from_logits)
        return out
