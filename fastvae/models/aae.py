"""Adversarial autoencoder (Makhzani et al. 2015): a discriminator on z replaces the KL term.

Encoder: an MLP to the code z (deterministic), or to (mu, logvar) with z sampled (gaussian=True).
Discriminator: an MLP from z to one logit, "drawn from the prior N(0, I)" against "a code".
``training_step`` makes the three updates of one batch, each with its own Adam (``AAEOptimizer``,
which the Trainer gets from ``make_optimizer``): reconstruction (encoder + decoder), discriminator,
generator (the encoder learns to fool the discriminator). Separate Adam states keep the summed
pixel reconstruction loss from drowning the adversarial gradients in a shared second moment.
In LossTerms, ``kl`` holds the generator's adversarial loss, the term that plays the KL's part;
beta weights it (Adam normalises the generator step, so beta=0 switches the prior matching off
and any beta > 0 acts alike).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..model import MLPDecoder, MLPEncoder
from ..ops.loss import LossTerms, _reduce, loss_terms
from ..ops.reparam import reparameterize
from .base import LatentModel, check_settings


class AAEOptimizer:
    """One Adam per phase: autoencoder (encoder + decoder), discriminator, generator (encoder);
    state_dict/load_state_dict make it checkpoint like one optimizer."""

    PHASES = ("autoencoder", "discriminator", "generator")

    def __init__(self, model: "AdversarialAE", lr: float) -> None:
        self.autoencoder = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], lr=lr)
        self.discriminator = torch.optim.Adam(model.discriminator.parameters(), lr=lr)
        self.generator = torch.optim.Adam(model.encoder.parameters(), lr=lr)

    def state_dict(self) -> dict:
        return {phase: getattr(self, phase).state_dict() for phase in self.PHASES}

    def load_state_dict(self, state: dict) -> None:
        for phase in self.PHASES:
            getattr(self, phase).load_state_dict(state[phase])


class AdversarialAE(LatentModel):
    """MLP encoder/decoder as fastvae.VAE's (encoder.fc1 .., decoder.fc1 ..) and discriminator.fc1 .. fcN."""

    name = "aae"

    def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (400,), latent_dim: int = 8,
                 discriminator_dims: Sequence[int] = (256, 256), gaussian: bool = False, likelihood: str = "bernoulli",
                 *, backend: str | None = None) -> None:
        super().__init__()
        hidden_dims = check_settings(likelihood, hidden_dims, input_dim=input_dim, latent_dim=latent_dim)
        discriminator_dims = check_settings(likelihood, discriminator_dims, "discriminator_dims")
        if not isinstance(gaussian, bool):
            raise TypeError(f"gaussian must be a bool, got {gaussian!r}")
        self.input_dim, self.hidden_dims, self.latent_dim, self.discriminator_dims = input_dim, hidden_dims, latent_dim, discriminator_dims
        self.gaussian, self.likelihood, self.backend = gaussian, likelihood, backend
        # A deterministic encoder is a plain MLP to z: MLPDecoder's layer stack (ReLU between, linear out).
        self.encoder = MLPEncoder(input_dim, hidden_dims, latent_dim) if gaussian else MLPDecoder(input_dim, hidden_dims, latent_dim)
        self.decoder = MLPDecoder(latent_dim, tuple(reversed(hidden_dims)), input_dim, likelihood == "bernoulli")
        self.discriminator = MLPDecoder(latent_dim, discriminator_dims, 1)

    def config(self) -> dict:
        return {"model": self.name, "input_dim": self.input_dim, "hidden_dims": list(self.hidden_dims), "latent_dim": self.latent_dim,
                "discriminator_dims": list(self.discriminator_dims), "gaussian": self.gaussian, "likelihood": self.likelihood}

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic code of x (the encoder's mean when gaussian)."""
        out = self.encoder(self.flatten(x))
        return out[0] if self.gaussian else out

    def encode_sample(self, flat: torch.Tensor) -> torch.Tensor:
        """z for training: the code, or a draw from N(mu, exp(logvar)) when gaussian."""
        if not self.gaussian:
            return self.encoder(flat)
        return reparameterize(*self.encoder(flat), backend=self.backend)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, z)."""
        z = self.encode_sample(self.flatten(x))
        return self.decode(z), z

    def _recon_rows(self, z: torch.Tensor, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Per-row reconstruction loss through the fused loss (with beta=0 its KL term drops out)."""
        none = z.new_zeros(z.shape[0], 1)
        return loss_terms(self.decoder(z), self.target(x, flat), none, none, beta=0.0, reduction="none", likelihood=self.likelihood, backend=self.backend).loss

    def _fooled_rows(self, z: torch.Tensor) -> torch.Tensor:
        """Generator loss per row: -log D(z), the discriminator taking the code for a prior draw."""
        logits = self.discriminator(z)[:, 0]
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")

    def discriminator_loss(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed BCE of the discriminator: prior draws are real (1), codes fake (0)."""
        real = self.discriminator(torch.randn_like(codes))[:, 0]
        fake = self.discriminator(codes)[:, 0]
        return F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction="sum") + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction="sum")

    def loss_terms(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum") -> LossTerms:
        """(recon + beta * adversarial, recon, adversarial): the encoder/decoder's objective for a batch."""
        flat = self.flatten(x)
        z = self.encode_sample(flat)
        recon, fooled = self._recon_rows(z, x, flat), self._fooled_rows(z)
        return LossTerms(_reduce(recon + beta * fooled, reduction), _reduce(recon.detach(), reduction), _reduce(fooled.detach(), reduction))

    def log_weights(self, x: torch.Tensor, k: int, *, beta: float = 1.0, seed: int | None = None):
        """Refused: there is no likelihood bound (ELBO, IWAE) for fastvae.score or objective="iwae"."""
        raise ValueError("an adversarial autoencoder (aae) has no ELBO or IWAE bound to score or train on: a discriminator, "
                         "not a KL term, matches its codes to the prior. Score a VAE-family model (vae, cvae, conv, hvae, rvae), "
                         "or rank inputs by reconstruction error: model.loss_terms(x, beta=0, reduction='none').recon")

    def make_optimizer(self, lr: float) -> AAEOptimizer:
        """The optimizer training_step expects (the Trainer calls this instead of building its Adam)."""
        return AAEOptimizer(self, lr)

    def training_step(self, x: torch.Tensor, optimizer: AAEOptimizer, *, beta: float = 1.0) -> LossTerms:
        """One batch: reconstruction, discriminator and generator updates; returns the summed, detached terms."""
        if not isinstance(optimizer, AAEOptimizer):
            raise TypeError(f"optimizer must be the AAEOptimizer of model.make_optimizer(lr), got {type(optimizer).__name__}")
        flat = self.flatten(x)
        recon = self._recon_rows(self.encode_sample(flat), x, flat).sum()
        self._update(optimizer.autoencoder, recon)
        self._update(optimizer.discriminator, self.discriminator_loss(self.encode_sample(flat).detach()))
        fooled = self._fooled_rows(self.encode_sample(flat)).sum()
        self._update(optimizer.generator, beta * fooled)  # steps the encoder only; the discriminator's grads are cleared next time
        recon, fooled = recon.detach(), fooled.detach()
        return LossTerms(recon + beta * fooled, recon, fooled)

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        self.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def discriminator_accuracy(self, x: torch.Tensor) -> float:
        """Fraction of prior draws and codes of x (as many of each) that the discriminator labels right."""
        codes = self.code(x)
        real = self.discriminator(torch.randn_like(codes))[:, 0] > 0
        fake = self.discriminator(codes)[:, 0] <= 0
        return float(torch.cat([real, fake]).float().mean())
