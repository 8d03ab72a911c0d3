"""The fused ops as functions; each takes ``backend=None|"auto"|"torch"|"triton"|"cpp"|"cuda"``."""
from .ops.decode import decode_latents
from .dropin.loss import vae_loss
from .ops.loss import LossTerms, bce_kl_loss, loss_terms, mse_kl_loss
from .ops.reparam import kl_divergence, reparameterize, reparameterize_kl

__all__ = [
    "LossTerms",
    "bce_kl_loss",
    "decode_latents",
    "kl_divergence",
    "loss_terms",
    "mse_kl_loss",
    "reparameterize",
    "reparameterize_kl",
    "vae_loss",
]
