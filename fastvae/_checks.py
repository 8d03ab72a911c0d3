"""Input checks shared by the ops: every bad input is refused here, before a kernel runs."""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Iterator

import torch

MAX_LOGVAR = 88.0  # exp(88.7) is float32's largest finite value

# Value-check flag bits the fused kernels OR into a flag word (csrc/flags.h and kernels/_common.py mirror them).
FLAG_LOGITS_NONFINITE = 1
FLAG_X_NONFINITE = 2
FLAG_X_RANGE = 4  # Bernoulli likelihood, floating-point target outside [0, 1]
FLAG_MU_NONFINITE = 8
FLAG_LOGVAR_NONFINITE = 16
FLAG_LOGVAR_HIGH = 32  # finite logvar > MAX_LOGVAR
_value_checks = os.environ.get("FASTVAE_VALUE_CHECKS", "1") != "0"


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent checks (NaN/Inf, target range) on or off; they cost a device sync.

    The Trainer validates its dataset once and runs its hot loop with them off.
    """
    global _value_checks
    old, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = old


def values_checked() -> bool:
    return _value_checks and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def floating(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}; convert it with {name}.float()")
    return t


def finite(name: str, t: torch.Tensor) -> None:
    if values_checked() and t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; check the data and the learning rate (finite values are required)")


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}; move them with .to(device)")
    return first


def latent_pair(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    floating("mu", mu)
    floating("logvar", logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}")
    if mu.dim() != 2:
        raise ValueError(f"mu and logvar must be (batch, latent_dim), got {tuple(mu.shape)}")
    if mu.dtype != logvar.dtype:
        raise TypeError(f"mu and logvar must share a dtype, got {mu.dtype} and {logvar.dtype}")
    same_device(mu=mu, logvar=logvar)
    finite("mu", mu)
    finite("logvar", logvar)
    if values_checked() and logvar.numel() and logvar.device.type != "meta" and float(logvar.detach().max()) > MAX_LOGVAR:
        raise ValueError(f"logvar has values above {MAX_LOGVAR}: exp(logvar) overflows float32; the encoder has diverged (lower the learning rate) or logvar is not a log-variance")


def beta(value: object) -> float:
    """The KL weight as a float: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"beta (the KL weight) must be a number >= 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"beta (the KL weight) must be a finite number >= 0, got {value!r}; use 1.0 for the plain VAE")
    return float(value)


def reduction(value: str) -> str:
    if value not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' (per sample) or 'none', got {value!r}")
    return value


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def accumulate(t: torch.Tensor) -> torch.Tensor:
    """`t` in its accumulation dtype: float64 stays, everything else is read as float32."""
    return t if t.dtype == torch.float64 else t.float()
