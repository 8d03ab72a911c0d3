"""Two-level hierarchical VAE: p(z2) p(z1 | z2) p(x | z1), inference q(z1 | x) q(z2 | x).

Generative, top-down: z2 ~ N(0, I); z1 ~ N(prior(z2)); x ~ decoder(z1).
Inference, bottom-up: (mu1, logvar1) = encoder(x); (mu2, logvar2) = encoder2(mu1), a function of
x alone, so q(z1, z2 | x) = q(z1 | x) q(z2 | x) and both KL terms are analytic:

    -ELBO = -log p(x | z1) + KL(q(z2 | x) || N(0, I)) + KL(q(z1 | x) || p(z1 | z2)),  z2 ~ q(z2 | x)

The lower KL is the standard one after standardising by the conditional prior: for diagonal
Gaussians KL(N(m, v) || N(m_p, v_p)) = KL(N((m - m_p) / sqrt(v_p), v / v_p) || N(0, I)).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks
from ..iwae import LogWeights, neg_log_normal, recon_rows, repeat
from ..model import MLPDecoder, MLPEncoder
from ..ops.decode import decode_latents
from ..ops.loss import LossTerms, _reduce, loss_terms
from ..ops.reparam import kl_divergence, kl_rows_reference, reparameterize
from .base import LatentModel, check_settings


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor) -> torch.Tensor:
    """Per-row KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) for diagonal Gaussians."""
    return kl_divergence((mu - prior_mu) * torch.exp(-0.5 * prior_logvar), logvar - prior_logvar, reduction="none")


class HierarchicalVAE(LatentModel):
    """latent_dims = (size of z1, size of z2); hidden_dims for x <-> z1, top_hidden_dims for the z1/z2 networks.

    loss_terms' kl is the sum of both levels' KL; forward returns (x_hat, mu1, logvar1), the lower level.
    """

    name = "hvae"

    def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (400,), latent_dims: Sequence[int] = (20, 10),
                 top_hidden_dims: Sequence[int] = (128,), likelihood: str = "bernoulli", *, backend: str | None = None) -> None:
        super().__init__()
        latent_dims = tuple(latent_dims)
        if len(latent_dims) != 2:
            raise ValueError(f"latent_dims must be (z1 size, z2 size), got {latent_dims}")
        hidden_dims = check_settings(likelihood, hidden_dims, input_dim=input_dim, z1_dim=latent_dims[0], z2_dim=latent_dims[1])
        top_hidden_dims = check_settings(likelihood, top_hidden_dims, "top_hidden_dims")
        self.input_dim, self.hidden_dims, self.latent_dims, self.top_hidden_dims = input_dim, hidden_dims, latent_dims, top_hidden_dims
        self.latent_dim = latent_dims[1]  # the prior's dimension
        self.likelihood, self.backend = likelihood, backend
        z1, z2 = latent_dims
        self.encoder = MLPEncoder(input_dim, hidden_dims, z1)  # q(z1 | x)
        self.encoder2 = MLPEncoder(z1, top_hidden_dims, z2)  # q(z2 | x), from mu1
        self.prior_net = MLPEncoder(z2, top_hidden_dims, z1)  # p(z1 | z2)
        self.decoder = MLPDecoder(z1, tuple(reversed(hidden_dims)), input_dim, likelihood == "bernoulli")  # p(x | z1)

    def config(self) -> dict:
        return {"model": self.name, "input_dim": self.input_dim, "hidden_dims": list(self.hidden_dims), "latent_dims": list(self.latent_dims),
                "top_hidden_dims": list(self.top_hidden_dims), "likelihood": self.likelihood}

    def posterior(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z1 | x): its mean is the code that reconstruct decodes."""
        return self.encoder(flat)

    def decode_logits(self, z1: torch.Tensor) -> torch.Tensor:
        return self.decoder(z1)

    def loss_terms(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum") -> LossTerms:
        """(loss, recon, kl) with kl = KL(q(z2|x) || p(z2)) + KL(q(z1|x) || p(z1|z2)); beta weights both."""
        flat = self.flatten(x)
        mu1, logvar1 = self.encoder(flat)
        mu2, logvar2 = self.encoder2(mu1)
        z1 = reparameterize(mu1, logvar1, backend=self.backend)
        z2 = reparameterize(mu2, logvar2, backend=self.backend)
        prior_mu, prior_logvar = self.prior_net(z2)
        kl1 = gaussian_kl(mu1, logvar1, prior_mu, prior_logvar)
        # The fused loss gives recon + beta * KL(q(z2|x) || N(0, I)) per row; the lower level is added to it.
        top = loss_terms(self.decoder(z1), self.target(x, flat), mu2, logvar2, beta=beta, reduction="none", likelihood=self.likelihood, backend=self.backend)
        return LossTerms(_reduce(top.loss + beta * kl1, reduction), _reduce(top.recon, reduction), _reduce(top.kl + kl1.detach(), reduction))

    def log_weights(self, x: torch.Tensor, k: int, *, beta: float = 1.0, seed: int | None = None) -> LogWeights:
        """The k importance log-weights of each input for both levels (what fastvae.iwae and score use):
        log p(x | z1) + beta * (log p(z1 | z2) + log p(z2) - log q(z1 | x) - log q(z2 | x)), z1 and z2
        drawn from q (Philox streams seed and seed + 1); kl: both levels' analytic KL, the lower one
        averaged over the k draws of z2."""
        flat = self.flatten(x)
        target = self.target(x, flat)
        mu1, logvar1 = self.encoder(flat)
        mu2, logvar2 = self.encoder2(mu1)
        z1 = reparameterize(mu1, logvar1, k=k, seed=seed, backend=self.backend)  # (k, B, z1 size)
        z2 = reparameterize(mu2, logvar2, k=k, seed=None if seed is None else seed + 1, backend=self.backend)
        b = mu1.shape[0]
        prior_mu, prior_logvar = (t.view(k, b, -1) for t in self.prior_net(z2.reshape(k * b, -1)))
        recon = recon_rows(self, self.decoder(z1.reshape(k * b, -1)), repeat(target, k)).view(k, b)
        z1, z2, mu1, logvar1, mu2, logvar2, prior_mu, prior_logvar = map(_checks.accumulate, (z1, z2, mu1, logvar1, mu2, logvar2, prior_mu, prior_logvar))
        log_ratio = neg_log_normal(z1, mu1, logvar1) + neg_log_normal(z2, mu2, logvar2) - neg_log_normal(z1, prior_mu, prior_logvar) - neg_log_normal(z2)
        lower = gaussian_kl(repeat(mu1.detach(), k), repeat(logvar1.detach(), k),
                            prior_mu.detach().reshape(k * b, -1), prior_logvar.detach().reshape(k * b, -1)).view(k, b)
        return LogWeights(-recon + beta * log_ratio, recon, kl_rows_reference(mu2.detach(), logvar2.detach()) + lower.mean(0))

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """z2 ~ N(0, I), z1 ~ p(z1 | z2), decoded; with `seed`, z2 uses Philox stream seed and z1 stream seed + 1."""
        z2 = self.prior(n, self.latent_dims[1], seed)
        prior_mu, prior_logvar = self.prior_net(z2)
        z1 = reparameterize(prior_mu, prior_logvar, seed=None if seed is None else seed + 1, backend=self.backend)
        return decode_latents(self.decoder, z1, out_dtype=out_dtype, backend=self.backend)
