"""fastvae: fused-kernel training engine for Variational Autoencoders."""
from . import functional, ops, reference
from . import data
from ._checks import value_checks
from .backends import backends
from .model import VAE, MLPDecoder, MLPEncoder

__version__ = "0.1.0"

__all__ = ["VAE", "MLPDecoder", "MLPEncoder", "backends", "functional", "reference", "value_checks", "__version__"]
