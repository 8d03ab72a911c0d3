"""fastvae: fused-kernel training engine for Variational Autoencoders."""
from . import functional, models, ops, reference
from . import data, prepare, shards
from ._checks import check_values, value_checks
from .dropin import accelerate, fit
from .apps import interpolate, latent_map, score
from .backends import backends
from .iwae import evaluate, iwae_loss
from .pretrained import load_pretrained, save_pretrained
from .model import VAE, MLPDecoder, MLPEncoder
from .runner import train
from .trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = ["TrainConfig", "Trainer", "VAE", "MLPDecoder", "MLPEncoder", "train", "backends", "functional", "models", "reference", "value_checks", "check_values", "__version__",
           "accelerate", "fit", "evaluate", "interpolate", "iwae_loss", "latent_map", "score", "save_pretrained", "load_pretrained"]
