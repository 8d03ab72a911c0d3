"""Where the drop-in's fused paths pay, per device and size; elsewhere the user's own code runs.

Measured on the development CPU (2 cores, torch 2.13, default threads; benchmarks/test_dropin.py
and the numbers in the README's "Your own VAE, faster"). On CUDA every fused path is taken: one
kernel instead of five to ten small ones per step, and no host sync.

- sampling: the user's z = mu + eps * std (5 to 8 small ops forward and backward) against the
  fused reparameterisation plus the TorchFunctionMode that skips the user's ops; on this CPU the
  fused sampler does not win at any latent size measured, so the user's sampling runs on CPU.
- loss from logits: replacing binary_cross_entropy(sigmoid(l), x) by the same loss from the
  logits always wins once the tensor is larger than a few thousand values (the probability-space
  backward is a slow kernel); below that the Python around it costs more than it saves.
- fused loss kernel vs torch's binary_cross_entropy_with_logits, both from the logits.
"""
from __future__ import annotations

import torch

CPU_SAMPLING_MIN: int | None = None  # B * L from which the fused sampler pays on CPU (None: never)
CPU_LOGITS_MIN = 2048  # values in x_hat from which the loss from logits pays on CPU
CPU_FUSED_LOSS_MIN = 0  # values from which fastvae's fused loss beats torch's BCE-with-logits on CPU


def fused_sampling(device: torch.device, numel: int) -> bool:
    """Whether z = fused reparameterisation (the user's sampling skipped) is faster here."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and CPU_SAMPLING_MIN is not None and numel >= CPU_SAMPLING_MIN


def loss_from_logits(device: torch.device, numel: int) -> bool:
    """Whether tagging a decoder output with its logits (so its BCE runs from them) is faster here."""
    return device.type == "cuda" or numel >= CPU_LOGITS_MIN


def fused_loss(device: torch.device, numel: int) -> bool:
    """Whether fastvae's fused loss beats torch's binary_cross_entropy_with_logits here."""
    return device.type == "cuda" or (device.type == "cpu" and numel >= CPU_FUSED_LOSS_MIN)


def describe() -> str:
    cpu_sampling = "never" if CPU_SAMPLING_MIN is None else f"from B*L >= {CPU_SAMPLING_MIN}"
    return (f"drop-in on CPU: fused sampling {cpu_sampling}; loss from logits from {CPU_LOGITS_MIN} values, "
            f"fused loss kernel from {CPU_FUSED_LOSS_MIN}; on CUDA: all fused")
