"""Input checks shared by the ops: every bad input is refused here, before a kernel runs."""
from __future__ import annotations

import contextlib
import ctypes
import math
import numbers
import os
from typing import Iterator

import torch

MAX_LOGVAR = 88.0  # exp(88.7) is float32's largest finite value

# Value-check flag bits the fused kernels OR into a flag word: the one definition (the Triton kernels read these;
# csrc/flags.h mirrors them in C++, and tests/test_cpp_ops.py checks the extension against them).
FLAG_LOGITS_NONFINITE = 1
FLAG_X_NONFINITE = 2
FLAG_X_RANGE = 4  # Bernoulli likelihood, floating-point target outside [0, 1]
FLAG_MU_NONFINITE = 8
FLAG_LOGVAR_NONFINITE = 16
FLAG_LOGVAR_HIGH = 32  # finite logvar > MAX_LOGVAR
_value_checks = os.environ.get("FASTVAE_VALUE_CHECKS", "1") != "0"
_python_passes = True  # the separate Python value checks (torch backend, labels); the Trainer turns them off


class value_checks:
    """Turn the value checks (NaN/Inf, target range, logvar bound) on or off.

    A plain call sets the mode for the process and returns the previous one (this object is truthy
    iff the checks were on); ``with fastvae.value_checks(False):`` restores the previous mode on exit.
    The fused kernels detect bad values in the pass they already make (a flag word, see
    ``check_values``); the torch backend checks in separate passes that cost a device sync.
    """

    def __init__(self, enabled: bool) -> None:
        global _value_checks
        self.previous, _value_checks = _value_checks, bool(enabled)

    def __enter__(self) -> value_checks:
        return self

    def __exit__(self, *exc: object) -> None:
        global _value_checks
        _value_checks = self.previous

    def __bool__(self) -> bool:
        return self.previous

    def __repr__(self) -> str:
        return f"value_checks(previous={self.previous})"


@contextlib.contextmanager
def python_passes(enabled: bool) -> Iterator[None]:
    """The separate Python value checks on or off (the fused kernels' flags are unaffected).

    The Trainer validates its data set once and runs with them off: no extra pass and no sync per step.
    """
    global _python_passes
    old, _python_passes = _python_passes, enabled
    try:
        yield
    finally:
        _python_passes = old


def values_checked(t: torch.Tensor | None = None) -> bool:
    """Whether a separate Python value check runs now (for tensors like `t`): never during CUDA-graph capture."""
    if not (_value_checks and _python_passes):
        return False
    if t is not None and not t.is_cuda:
        return True
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def finite_message(name: str) -> str:
    return f"{name} contains NaN or Inf; check the data and the learning rate (finite values are required)"


LOGVAR_HIGH_MESSAGE = (f"logvar has values above {MAX_LOGVAR}: exp(logvar) overflows float32; the encoder has diverged "
                       "(lower the learning rate) or logvar is not a log-variance")
X_RANGE_MESSAGE = "x (targets) must lie in [0, 1] for the Bernoulli likelihood; scale the data to [0, 1] or use likelihood='gaussian'"

# The error for each flag bit, in the order of the Python checks: the first set bit is the one reported.
ERRORS_BY_FLAG = (
    (FLAG_MU_NONFINITE, finite_message("mu")),
    (FLAG_LOGVAR_NONFINITE, finite_message("logvar")),
    (FLAG_LOGVAR_HIGH, LOGVAR_HIGH_MESSAGE),
    (FLAG_LOGITS_NONFINITE, finite_message("logits")),
    (FLAG_X_NONFINITE, finite_message("x")),
    (FLAG_X_RANGE, X_RANGE_MESSAGE),
)


class _Word:
    """A device's flag word: an int32 tensor of shape (1,) the fused kernels OR bits into.

    Persistent (allocated once per device, before any CUDA-graph capture that uses it), so that
    captured kernels keep writing the same memory. On the CPU the value is read through a ctypes
    view of its memory: no torch call per read.
    """

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = ctypes.c_int32.from_address(self.tensor.data_ptr()) if device.type == "cpu" else None


_words: dict[torch.device, _Word] = {}
DEFERRED = {"cuda"}  # device types whose flags wait for check_values (tests add "cpu" to exercise that path)


def flag_word(device: torch.device) -> torch.Tensor | None:
    """The flag word to pass to a fused kernel on `device`, or None while value checks are off."""
    if not _value_checks:
        return None
    word = _words.get(device)
    if word is None:
        word = _words[device] = _Word(device)
    return word.tensor


def _error(bits: int, suffix: str = "") -> ValueError:
    for bit, message in ERRORS_BY_FLAG:
        if bits & bit:
            return ValueError(message + suffix)
    return ValueError(f"a fused kernel set unknown value-check flags {bits:#x}{suffix}")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: fused kernels' flags on the CPU too wait for ``check_values`` (the Trainer reads them at its
    logging steps). Bits still set on exit (a run stopped by another error) are cleared: they must not be
    raised by the next, unrelated CPU call."""
    global DEFERRED
    old, DEFERRED = DEFERRED, DEFERRED | {"cpu"}
    try:
        yield
    finally:
        DEFERRED = old
        if "cpu" not in DEFERRED:
            clear_flags(torch.device("cpu"))


def _word_key(device: torch.device | str) -> torch.device:
    """`device` as flag words are keyed: tensors' devices ("cuda" means the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def clear_flags(device: torch.device | str) -> None:
    """Forget what the kernels flagged on `device` (the Trainer starts a run with a clean word)."""
    word = _words.get(_word_key(device))
    if word is not None:
        word.tensor.zero_()


def raise_flags(flags: torch.Tensor | None) -> None:
    """After a fused call on the CPU: raise the ValueError for the first bit set in `flags`, and clear them.

    On CUDA this does nothing (reading the word would cost a sync per call): ``check_values`` reports
    what the kernels flagged.
    """
    if flags is None or flags.device.type in DEFERRED:
        return
    word = _words[flags.device]
    bits = word.host.value
    if bits:
        word.host.value = 0
        raise _error(bits)


def check_values(device: torch.device | str | None = None, *, where: str = "since the last check") -> None:
    """Raise the ValueError for bad values a fused kernel flagged on `device` since the last check, and clear them.

    On CUDA the fused kernels record bad inputs (NaN/Inf, targets outside [0, 1], logvar above
    the overflow bound) in a device flag word instead of syncing per call; this syncs, reads and
    clears it. `device=None`: every device with a flag word; `where` goes into the message. The
    Trainer calls it at every logging step (the last step of each epoch is one). Fused calls on the
    CPU raise at once (outside the Trainer) and leave nothing to report here.
    """
    if device is None:
        targets = list(_words.values())
    else:
        word = _words.get(_word_key(device))
        targets = [word] if word is not None else []
    for word in targets:
        bits = int(word.tensor.item())
        if bits:
            word.tensor.zero_()
            raise _error(bits, f" (detected by a fused kernel {where})")


def floating(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}; convert it with {name}.float()")
    return t


def finite(name: str, t: torch.Tensor) -> None:
    """Python value check (the torch backend's): `t` holds no NaN/Inf."""
    if values_checked(t) and t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(finite_message(name))


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = [t.device for t in tensors.values()]
    first = devices[0]
    for d in devices:
        if d != first:
            listing = ", ".join(f"{n} on {d}" for n, d in zip(tensors, devices))
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
    if mu.device != logvar.device:
        same_device(mu=mu, logvar=logvar)


def latent_values(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    """Python value checks of (mu, logvar) (the torch backend's; fused kernels flag the same bits)."""
    finite("mu", mu)
    finite("logvar", logvar)
    if values_checked(logvar) and logvar.numel() and logvar.device.type != "meta" and float(logvar.detach().max()) > MAX_LOGVAR:
        raise ValueError(LOGVAR_HIGH_MESSAGE)


def beta(value: object) -> float:
    """The KL weight as a float: a finite number >= 0."""
    if type(value) is float and 0.0 <= value < math.inf:
        return value
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
