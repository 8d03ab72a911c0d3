"""Recurrent VAE for fixed-length sequences (B, T, F), rows stored flat as (B, T*F).

Encoder: GRU over the sequence, its last hidden state -> (fc_mu, fc_logvar).
Decoder: h0 = tanh(fc_init(z)); a GRU reads the previous step (zeros at t = 0) and fc_out gives
step t's logits (Bernoulli) or mean (Gaussian). Training uses teacher forcing (the true previous
step); decode/sample run free, feeding back the previous step's probabilities or means.
An MNIST image read row by row is a (28, 28) sequence.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LatentModel, check_settings


class GRUEncoder(nn.Module):
    def __init__(self, seq_len: int, features: int, hidden_size: int, latent_dim: int) -> None:
        super().__init__()
        self.shape = (seq_len, features)
        self.gru = nn.GRU(features, hidden_size, batch_first=True)
        self.fc_mu = nn.Linear(hidden_size, latent_dim)
        self.fc_logvar = nn.Linear(hidden_size, latent_dim)

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, h = self.gru(flat.reshape(-1, *self.shape))
        return self.fc_mu(h[0]), self.fc_logvar(h[0])


class GRUDecoder(nn.Module):
    """decoder(z) runs free; decoder(z, teacher) reads the true previous steps. Both return (B, T*F)."""

    def __init__(self, latent_dim: int, hidden_size: int, seq_len: int, features: int, returns_logits: bool) -> None:
        super().__init__()
        self.shape = (seq_len, features)
        self.fc_init = nn.Linear(latent_dim, hidden_size)
        self.gru = nn.GRU(features, hidden_size, batch_first=True)
        self.fc_out = nn.Linear(hidden_size, features)
        self.returns_logits = returns_logits  # decode_latents applies the sigmoid

    def forward(self, z: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.fc_init(z)).unsqueeze(0)
        seq_len, features = self.shape
        if teacher is not None:
            steps = teacher.reshape(-1, seq_len, features)
            inputs = torch.cat([steps.new_zeros(steps.shape[0], 1, features), steps[:, :-1]], dim=1)
            out, _ = self.gru(inputs, h)
            return self.fc_out(out).flatten(1)
        step = z.new_zeros(z.shape[0], 1, features)
        outputs = []
        for _ in range(seq_len):
            out, h = self.gru(step, h)
            logits = self.fc_out(out)
            outputs.append(logits)
            step = torch.sigmoid(logits) if self.returns_logits else logits
        return torch.cat(outputs, dim=1).flatten(1)


class RecurrentVAE(LatentModel):
    """Sequences of seq_len steps with `features` values each; likelihood "gaussian" (real values) or "bernoulli" ([0, 1])."""

    name = "rvae"

    def __init__(self, seq_len: int, features: int = 1, hidden_size: int = 128, latent_dim: int = 16, likelihood: str = "gaussian",
                 *, backend: str | None = None) -> None:
        super().__init__()
        check_settings(likelihood, seq_len=seq_len, features=features, hidden_size=hidden_size, latent_dim=latent_dim)
        self.seq_len, self.features, self.hidden_size, self.latent_dim = seq_len, features, hidden_size, latent_dim
        self.input_dim = seq_len * features
        self.likelihood, self.backend = likelihood, backend
        self.encoder = GRUEncoder(seq_len, features, hidden_size, latent_dim)
        self.decoder = GRUDecoder(latent_dim, hidden_size, seq_len, features, likelihood == "bernoulli")

    def config(self) -> dict:
        return {"model": self.name, "seq_len": self.seq_len, "features": self.features, "hidden_size": self.hidden_size,
                "latent_dim": self.latent_dim, "likelihood": self.likelihood}

    def posterior(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(flat)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def train_logits(self, z: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: step t is predicted from z and the true steps before t."""
        return self.decoder(z, flat)
