"""Where the drop-in's fused paths pay, per device and size; elsewhere the user's own code runs.

On CUDA every fused path is taken (one kernel instead of five to ten small ones per step). On
CPU the rule is measured (development machine: 2 cores, torch 2.13, default threads, value
checks on as by default; min of 200 interleaved runs, forward + backward, 2026-12):

- sampling inside a model (the user's ``mu + randn_like(std) * exp(0.5 logvar)`` against the
  fused sampler with the user's calls skipped): the user's code is faster at every size
  measured, B*L = 2,560 to 1,048,576 (0.5-0.65x for fused), so the user's sampling runs on CPU.
- ``binary_cross_entropy(sigmoid(l), x, reduction="sum")`` against the same loss from the
  logits: 987 -> 306 us at 128x784, 63 -> 3.8 ms at 128x12288, 269 -> 119 us at 16x784, even
  at 8x256 (94 -> 91 us); below that the Python around it costs more than it saves.
- from the logits, fastvae's fused loss kernel against torch's binary_cross_entropy_with_logits:
  945 vs 306 us at 128x784 and 70 vs 15 ms at 4096x784 (its value checks cost passes over the
  data; without them 410 us and 18 ms), so on CPU the loss from logits is torch's.
"""
from __future__ import annotations

import torch

CPU_SAMPLING_MIN: int | None = None  # B * L from which the fused sampler pays on CPU (None: never)
CPU_LOGITS_MIN = 2048  # values in x_hat from which the loss from logits pays on CPU
CPU_FUSED_LOSS_MIN: int | None = None  # values from which fastvae's fused loss beats torch's BCE-with-logits on CPU


def _from(device: torch.device, numel: int, cpu_min: int | None) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_min is not None and numel >= cpu_min


def fused_sampling(device: torch.device, numel: int) -> bool:
    """Whether z = fused reparameterisation (the user's sampling calls skipped) is faster here."""
    return _from(device, numel, CPU_SAMPLING_MIN)


def loss_from_logits(device: torch.device, numel: int) -> bool:
    """Whether tagging a decoder output with its logits (so that its BCE runs from them) is faster here."""
    return device.type != "cpu" or numel >= CPU_LOGITS_MIN


def fused_loss(device: torch.device, numel: int) -> bool:
    """Whether fastvae's fused loss beats torch's binary_cross_entropy_with_logits here."""
    return _from(device, numel, CPU_FUSED_LOSS_MIN)


def describe() -> str:
    """The rule in one line (``fastvae.dropin.explain``)."""
    def cpu(limit: int | None) -> str:
        return "never" if limit is None else f"from {limit} values"
    return (f"on CPU: fused sampling {cpu(CPU_SAMPLING_MIN)}, BCE from the logits {cpu(CPU_LOGITS_MIN)}, "
            f"fastvae's fused loss kernel {cpu(CPU_FUSED_LOSS_MIN)} (else torch's BCE-with-logits); on CUDA: all fused")
