"""KL-weight schedules: beta-VAE with linear or cyclical warm-up (Fu et al. 2019, "Cyclical Annealing")."""
from __future__ import annotations

import math

SCHEDULES = ("linear", "cyclical")
CYCLE_RAMP = 0.5  # fraction of each cycle spent ramping 0 -> beta (Fu et al.'s R = 0.5)


def kl_weight(step: int, beta: float, length: int, schedule: str = "linear", cycles: int = 1) -> float:
    """The KL weight at `step` (0-based) of a warm-up lasting `length` steps, then `beta`.

    linear: beta * step / length. cyclical: `cycles` equal cycles over `length`, each ramping
    linearly from 0 to beta over its first half and holding beta for the second.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"warmup_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if length <= 0 or step >= length:
        return float(beta)
    if schedule == "linear":
        return beta * step / length
    t = step * cycles / length
    return beta * min(1.0, (t - math.floor(t)) / CYCLE_RAMP)
