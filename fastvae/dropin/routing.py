"""Where the drop-in's fused paths pay, per device and size; elsewhere the user's own code runs.

On CUDA every fused path is taken (one kernel instead of five to ten small ones per step). On
CPU the rule is measured (development machine: 2 cores, torch 2.13, default threads, value
checks on as by default; forward + backward, min of 200-300 interleaved runs, 2026-11-29,
the C++ kernels of round 2):

- sampling inside a model (the user's ``mu + randn_like(std) * std`` against the fused sampler
  with the user's calls skipped): 95 vs 127 us at 128x20 (0.75x), 167 vs 182 us at 16,384
  values (0.91x), 190 vs 171 us at 1024x20 (1.11x), 2.0x from 4096x128 on: fused from 20,000
  values; below that the op's fixed cost (~90 us of autograd and dispatch) outweighs it.
- sampling that also answers a latent-diffusion posterior's ``kl()`` (its ``mean + std * randn``
  and ``0.5 * sum(mean^2 + var - 1 - logvar)`` per row against ``reparameterize_kl``; 2026-12,
  one thread, the machine loaded, min of 300 interleaved runs): even at 2048 to 4096 values
  (0.99-1.03x), 1.01-1.03x at 8192 (batch 8 x 4x16x16), 1.03-1.07x at 16,384, 1.06-1.25x above:
  fused from 8192 values.
- ``binary_cross_entropy(sigmoid(l), x, reduction="sum")`` against the same loss from the
  logits: 987 -> 306 us at 128x784, 63 -> 3.8 ms at 128x12288, 269 -> 119 us at 16x784, even
  at 8x256 (94 -> 91 us); below that the Python around it costs more than it saves.
- from the logits, fastvae's fused loss kernel against torch's binary_cross_entropy_with_logits
  (sum): 0.81x at 32x784, 0.97x at 64x784, 1.08x at 96x784, 1.18x at 128x784, 2.2x at
  4096x784, 1.85x at 128x12288. In a training step the tagged output's hooks eat that gain at
  small sizes (distributions_mlp, interleaved steps: 0.98x at batch 128, 1.02-1.04x at 1024):
  fused from 262,144 values (batch 335 x 784).

``python -m benchmarks.dropin_routing`` repeats the measurement (rerun it when the kernels change).
"""
from __future__ import annotations

import torch

CPU_SAMPLING_MIN: int | None = 20_000  # B * L from which the fused sampler pays on CPU (None: never)
CPU_SAMPLING_KL_MIN: int | None = 8192  # the same when the sampling pass also answers the posterior's kl()
CPU_LOGITS_MIN = 2048  # values in x_hat from which the loss from logits pays on CPU
CPU_FUSED_LOSS_MIN: int | None = 262_144  # values from which fastvae's fused loss beats torch's BCE-with-logits on CPU


def _from(device: torch.device, numel: int, cpu_min: int | None) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_min is not None and numel >= cpu_min


def fused_sampling(device: torch.device, numel: int, with_kl: bool = False) -> bool:
    """Whether z = fused reparameterisation (the user's sampling calls skipped) is faster here;
    `with_kl`: the same pass also answers the posterior's kl()."""
    return _from(device, numel, CPU_SAMPLING_KL_MIN if with_kl else CPU_SAMPLING_MIN)


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
    return (f"on CPU: fused sampling {cpu(CPU_SAMPLING_MIN)} ({cpu(CPU_SAMPLING_KL_MIN)} when it answers kl() too), "
            f"BCE from the logits {cpu(CPU_LOGITS_MIN)}, "
            f"fastvae's fused loss kernel {cpu(CPU_FUSED_LOSS_MIN)} (else torch's BCE-with-logits); on CUDA: all fused")
