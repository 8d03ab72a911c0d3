"""Which implementation of each fused op runs, and what happens when one is missing or fails.

Each op module in ``fastvae.ops`` registers, per backend, a loader that imports the
accelerated implementation lazily. ``resolve`` picks one for a device:

- ``backend=None`` reads ``FASTVAE_BACKEND`` and defaults to ``"auto"``;
- ``"auto"`` takes the first available of ``PREFERENCE[device]`` and never fails: a backend
  that fails to load is skipped with one warning and "torch" always remains;
- an explicit name that is unknown is a ValueError, one that is unavailable here a
  RuntimeError that says why;
- ``pick`` honours an implementation's ``unsupported`` and ``slower`` hooks (the latter under "auto" only);
- ``run_fused`` runs an accelerated forward and, if it raises, warns once and runs the
  PyTorch reference instead (``FASTVAE_STRICT=1`` re-raises, for benchmarking; so does a
  failure during CUDA-graph capture).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

OPS = ("reparam", "loss", "decode")  # the fused ops, one module each in fastvae.ops
STEP_OPS = ("bias_grad", "mlp_step")  # the hand-written training step's (fastvae.mlp_step): bias_grad in Triton and C++, the whole CPU step in C++
BACKENDS = ("torch", "triton", "cpp", "cuda")
CHOICES = (None, "auto") + BACKENDS
# Fastest first. Triton on CPU means its interpreter: correct but slow, so never chosen by "auto".
PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_loaders: dict[tuple[str, str], Callable[[], Any]] = {}
_loaded: dict[tuple[str, str], Any] = {}
_errors: dict[tuple[str, str], str] = {}
_warned: set[str] = set()
_failed_at_run: set[tuple[str, str]] = set()  # already warned about by run_fused: "auto" skips them quietly


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def register(op: str, backend: str, loader: Callable[[], Any]) -> None:
    """Declare that `backend` implements `op`; `loader()` imports and returns the implementation.

    The loader raises (any exception) when the backend cannot run on this machine; its message
    becomes the reason shown by ``backends()`` and in errors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _loaders[(op, backend)] = loader


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def strict() -> bool:
    """FASTVAE_STRICT=1: turn every silent fallback into an error."""
    return os.environ.get("FASTVAE_STRICT", "0") not in ("", "0")


def load(op: str, backend: str) -> Any | None:
    """The implementation of `op` on `backend`, or None (reason in ``_errors``)."""
    key = (op, backend)
    if key in _loaded:
        return _loaded[key]
    if key in _errors:
        return None
    loader = _loaders.get(key)
    if loader is None:
        _errors[key] = "not implemented"
        return None
    try:
        impl = loader()
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not available"
        _errors[key] = f"{type(exc).__name__}: {exc}".strip()
        return None
    _loaded[key] = impl
    return impl


def _supports(backend: str, device_type: str) -> str | None:
    """None if `backend` can take tensors on `device_type`, else why not."""
    if backend == "torch":
        return None
    if backend == "cpp" and device_type != "cpu":
        return "the 'cpp' backend takes CPU tensors; use 'cuda' or 'triton' for CUDA tensors"
    if backend == "cuda" and device_type != "cuda":
        return "the 'cuda' backend takes CUDA tensors; use 'cpp' for CPU tensors"
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only through its interpreter (set TRITON_INTERPRET=1 before importing fastvae)"
    if device_type not in ("cpu", "cuda"):
        return f"no fused kernels for {device_type!r} tensors"
    return None


def requested(backend: str | None) -> str:
    """The backend name asked for: the argument, else FASTVAE_BACKEND, else "auto"; validated."""
    if backend is None:
        name = os.environ.get("FASTVAE_BACKEND", "").strip() or "auto"
        if name not in CHOICES:
            raise ValueError(f"FASTVAE_BACKEND={name!r} is unknown; set it to one of 'auto', {', '.join(map(repr, BACKENDS))} or unset it")
        return name
    if backend not in CHOICES:
        raise ValueError(f"backend={backend!r} is unknown; use None, 'auto', {', '.join(map(repr, BACKENDS))}")
    return backend


def _auto(op: str, device_type: str, warn: bool = True) -> tuple[str, Any | None]:
    for cand in PREFERENCE.get(device_type, ("torch",)):
        if cand == "torch":
            break
        impl = load(op, cand)
        if impl is not None:
            return cand, impl
        if (op, cand) in _loaders and warn and (op, cand) not in _failed_at_run:
            if strict():
                raise BackendUnavailable(f"FASTVAE_STRICT=1 and the {cand} backend for {op} failed to load: {_errors[(op, cand)]}")
            warn_once(f"load:{cand}", f"fastvae: the {cand} backend is unavailable ({_errors[(op, cand)]}); using PyTorch")
    return "torch", None


def resolve(op: str, device_type: str, backend: str | None = None) -> tuple[str, Any | None]:
    """(name, implementation) to run `op` on `device_type`; implementation None means "torch"."""
    name = requested(backend)
    if name == "auto":
        return _auto(op, device_type)
    if name == "torch":
        return "torch", None
    why = _supports(name, device_type)
    if why is None:
        impl = load(op, name)
        if impl is not None:
            return name, impl
        why = _errors[(op, name)]
    raise BackendUnavailable(f"backend={name!r} cannot run {op} on {device_type} tensors: {why}. Use backend='auto' or 'torch'.")


def pick(op: str, backend: str | None, *tensors: Any) -> tuple[str, Any | None]:
    """Resolve `op` for the device of `tensors[0]`, checking that the chosen kernel takes these tensors.

    Two optional hooks of an implementation, with the op's tensors as arguments:
    ``unsupported(*tensors) -> str | None`` (a dtype it lacks, say): "auto" then quietly uses
    PyTorch, an explicit request gets a TypeError naming the reason; ``slower(*tensors) -> str |
    None`` (a measured fact, e.g. "torch is faster below 4096 elements on this CPU"): "auto" uses
    PyTorch for this call, an explicit request still runs the kernel.
    """
    name = requested(backend)
    chosen, impl = resolve(op, tensors[0].device.type, name)
    if impl is None:
        return chosen, impl
    check = getattr(impl, "unsupported", None)
    why = check(*tensors) if check is not None else None
    if why:
        if name == "auto":
            return "torch", None
        raise TypeError(f"backend={chosen!r} cannot run {op} on these inputs: {why}. Use backend='auto' or 'torch'.")
    if name == "auto":
        slower = getattr(impl, "slower", None)
        if slower is not None and slower(*tensors):
            return "torch", None
    return chosen, impl


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def run_fused(op: str, name: str, fused: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
    """Run `fused`; if it raises, warn once and run `fallback`, and let "auto" skip `name` for `op` from now on.

    Inputs are validated before this runs, so any exception here (a TypeError from a binding
    built for another interface included) is the kernel's failure, not the caller's. During a
    CUDA-graph capture the error is raised instead (the capture fails; the backend stays enabled).
    """
    try:
        return fused()
    except Exception as exc:  # noqa: BLE001
        if strict() or capturing():
            raise
        warn_once(f"run:{op}:{name}", f"fastvae: {name} kernel for {op} failed ({type(exc).__name__}: {exc}); using PyTorch from now on")
        _loaded.pop((op, name), None)
        _errors[(op, name)] = f"failed at run time: {type(exc).__name__}: {exc}"
        _failed_at_run.add((op, name))
        return fallback()


def _active(op: str, device_type: str) -> str:
    """What a call with backend=None would run (honours FASTVAE_BACKEND), without warning."""
    try:
        name = requested(None)
        return _auto(op, device_type, warn=False)[0] if name == "auto" else resolve(op, device_type, name)[0]
    except (ValueError, BackendUnavailable) as exc:
        return f"error: {exc}"


def routing(op: str) -> dict[str, str]:
    """Per loaded backend of `op`: its routing rule (``impl.routing()``), where it has one."""
    rules = {}
    for b in BACKENDS:
        rule = getattr(_loaded.get((op, b)), "routing", None)
        text = rule() if rule is not None else None
        if text:
            rules[b] = text
    return rules


def backends() -> dict[str, dict[str, Any]]:
    """Per op: each backend's status ("available" or why not), what "auto" picks per device here,
    and the routing rules by which "auto" still runs PyTorch for some calls (sizes where it is faster)."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, dict[str, Any]] = {}
    for op in OPS + STEP_OPS:
        status = {b: "available" if b == "torch" or load(op, b) is not None else _errors.get((op, b), "not implemented") for b in BACKENDS}
        report[op] = {"backends": status, "active": {dev: _active(op, dev) for dev in devices}, "routing": routing(op)}
    return report
