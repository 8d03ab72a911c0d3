"""fastvae.VAE: MLP encoder -> (mu, logvar) -> fused sampling -> MLP decoder, loss from logits.

Parameter names follow the reference (encoder.fc1 .. fcN, encoder.fc_mu, encoder.fc_logvar,
decoder.fc1 .. fc{N+1}), so state_dicts load both ways with the classic MNIST VAE.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .ops.decode import decode_latents
from .ops.loss import LIKELIHOODS, LossTerms, loss_terms
from .ops.reparam import reparameterize


class MLPEncoder(nn.Module):
    """x -> ReLU(fc1) -> ... -> ReLU(fcN) -> (fc_mu, fc_logvar)."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        dims = [input_dim, *hidden_dims]
        self.depth = len(hidden_dims)
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.fc_mu = nn.Linear(dims[-1], latent_dim)
        self.fc_logvar = nn.Linear(dims[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for i in range(self.depth):
            h = F.relu(getattr(self, f"fc{i + 1}")(h))
        return self.fc_mu(h), self.fc_logvar(h)


class MLPDecoder(nn.Module):
    """z -> ReLU(fc1) -> ... -> fc{N+1}: logits (Bernoulli) or the mean (Gaussian)."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], output_dim: int, returns_logits: bool = True) -> None:
        super().__init__()
        dims = [latent_dim, *hidden_dims, output_dim]
        self.depth = len(dims) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.returns_logits = returns_logits

    def linears(self) -> list[nn.Linear]:
        return [getattr(self, f"fc{i + 1}") for i in range(self.depth)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        layers = self.linears()
        h = z
        for layer in layers[:-1]:
            h = F.relu(layer(h))
        return layers[-1](h)


class VAE(nn.Module):
    """A VAE with MLP encoder and decoder; the defaults are the reference MNIST model.

    likelihood: "bernoulli" (data in [0, 1], BCE from logits, sigmoid output) or "gaussian"
    (any real data, squared-error reconstruction, identity output).
    backend: which kernels its ops use (None: FASTVAE_BACKEND or "auto"; see fastvae.backends()).
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (400,),
        latent_dim: int = 20,
        likelihood: str = "bernoulli",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _checks.positive_int("input_dim", input_dim)
        _checks.positive_int("latent_dim", latent_dim)
        hidden_dims = tuple(hidden_dims)
        for h in hidden_dims:
            _checks.positive_int("hidden_dims entries", h)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.input_dim, self.hidden_dims, self.latent_dim = input_dim, hidden_dims, latent_dim
        self.likelihood, self.backend = likelihood, backend
        self.encoder = MLPEncoder(input_dim, hidden_dims, latent_dim)
        self.decoder = MLPDecoder(latent_dim, tuple(reversed(hidden_dims)), input_dim, likelihood == "bernoulli")

    def config(self) -> dict:
        """The constructor arguments, as stored in checkpoints."""
        return {"input_dim": self.input_dim, "hidden_dims": list(self.hidden_dims), "latent_dim": self.latent_dim, "likelihood": self.likelihood}

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) with input_dim features per row -> (B, input_dim); uint8 pixels become x / 255."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        per_sample = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()
        if x.dim() == 0 or per_sample != self.input_dim:
            raise ValueError(f"x must be a batch (B, ...) with input_dim={self.input_dim} features per sample, got shape {tuple(x.shape)}")
        weight = self.encoder.fc_mu.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}; move x with x.to({str(weight.device)!r})")
        x = x.reshape(-1, self.input_dim)
        if x.dtype == torch.uint8:
            return x.to(weight.dtype) / 255.0
        _checks.floating("x", x)
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the model's parameters are {weight.dtype}; convert x with x.to({weight.dtype}) (or the model with model.to({x.dtype}))")
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(self.flatten(x))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Probabilities (Bernoulli) or the mean (Gaussian)."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, mu, logvar), as the reference returns them."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, backend=self.backend)
        return self.decode(z), mu, logvar

    def loss_terms(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum") -> LossTerms:
        """(loss, recon, kl) for a batch, from logits through the fused ops."""
        flat = self.flatten(x)
        mu, logvar = self.encoder(flat)
        z = reparameterize(mu, logvar, backend=self.backend)
        target = x.reshape(flat.shape) if x.dtype == torch.uint8 else flat
        return loss_terms(self.decoder(z), target, mu, logvar, beta=beta, reduction=reduction, likelihood=self.likelihood, backend=self.backend)

    def loss(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum") -> torch.Tensor:
        """Negative ELBO: reconstruction + beta * KL (reduction "sum", "mean" per sample, or "none")."""
        return self.loss_terms(x, beta, reduction).loss

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n samples decoded from the prior: (n, input_dim) probabilities, or uint8 pixels."""
        return decode_latents(self.decoder, n=n, latent_dim=self.latent_dim, seed=seed, out_dtype=out_dtype, backend=self.backend)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of x: (B, input_dim)."""
        mu, _ = self.encode(x)
        return self.decode(mu)
