"""fastvae.VAE: MLP encoder -> (mu, logvar) -> fused sampling -> MLP decoder, loss from logits.

Parameter names follow the reference (encoder.fc1 .. fcN, encoder.fc_mu, encoder.fc_logvar,
decoder.fc1 .. fc{N+1}), so state_dicts load both ways with the classic MNIST VAE.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models.base import LatentModel, check_settings


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
        return [self._modules[f"fc{i + 1}"] for i in range(self.depth)]  # type: ignore[misc]  (Module.__getattr__ costs more)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        layers = self.linears()
        h = z
        for layer in layers[:-1]:
            h = F.relu(layer(h))
        return layers[-1](h)


class VAE(LatentModel):
    """A VAE with MLP encoder and decoder; the defaults are the reference MNIST model.

    likelihood: "bernoulli" (data in [0, 1], BCE from logits, sigmoid output) or "gaussian"
    (any real data, squared-error reconstruction, identity output).
    backend: which kernels its ops use (None: FASTVAE_BACKEND or "auto"; see fastvae.backends()).
    flatten, decode, forward, loss_terms, loss, sample and reconstruct come from LatentModel.
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
        hidden_dims = check_settings(likelihood, hidden_dims, input_dim=input_dim, latent_dim=latent_dim)
        self.input_dim, self.hidden_dims, self.latent_dim = input_dim, hidden_dims, latent_dim
        self.likelihood, self.backend = likelihood, backend
        self.encoder = MLPEncoder(input_dim, hidden_dims, latent_dim)
        self.decoder = MLPDecoder(latent_dim, tuple(reversed(hidden_dims)), input_dim, likelihood == "bernoulli")

    def config(self) -> dict:
        """The constructor arguments, as stored in checkpoints."""
        return {"input_dim": self.input_dim, "hidden_dims": list(self.hidden_dims), "latent_dim": self.latent_dim, "likelihood": self.likelihood}

    def posterior(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(flat)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
