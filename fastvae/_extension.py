"""The C++/CUDA backends: torch.ops.fastvae.* from the extension fastvae._C, behind the op interfaces.

The extension is the one built at install (``pip install --no-build-isolation -e .``); where none
is importable it is JIT-built once from csrc/ (cached in TORCH_EXTENSIONS_DIR). Any failure is
remembered and re-raised by every loader, so ``fastvae.backends`` reports it and uses PyTorch.
Fake (meta) implementations let torch.compile trace the ops.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from . import _build

_state: dict[str, Any] = {}
SUPPORTED = (torch.float32, torch.float64)


def _jit_build(cuda: bool) -> ModuleType:
    from torch.utils import cpp_extension

    if not _build.CSRC.is_dir():
        raise RuntimeError(f"fastvae._C is not installed and the sources for a JIT build are missing ({_build.CSRC})")
    flags = _build.CXX_FLAGS + _build.defines(cuda)
    return cpp_extension.load(
        name="fastvae_C_cuda" if cuda else "fastvae_C",
        sources=_build.sources(cuda),
        extra_cflags=flags,
        extra_cuda_cflags=_build.NVCC_FLAGS + _build.defines(cuda),
        verbose=False,
    )


def _import() -> ModuleType:
    try:
        return importlib.import_module("fastvae._C")
    except ImportError:
        from torch.utils.cpp_extension import CUDA_HOME

        return _jit_build(torch.cuda.is_available() and CUDA_HOME is not None)


def library() -> ModuleType:
    """The loaded extension module (raises the first load failure again on every call)."""
    if "error" in _state:
        raise _state["error"]
    if "module" not in _state:
        try:
            module = _import()
            _register_fakes()
        except Exception as exc:  # noqa: BLE001 - remembered; becomes the backend's "unavailable" reason
            _state["error"] = RuntimeError(f"the fastvae C++ extension could not be loaded: {type(exc).__name__}: {exc}")
            raise _state["error"] from exc
        _state["module"] = module
    return _state["module"]


def _register_fakes() -> None:
    """Shapes and dtypes of each op's outputs, for torch.compile / FakeTensor tracing."""
    def lib(name: str):
        return torch.library.register_fake(f"fastvae::{name}")

    @lib("reparam_forward")
    def _(mu, logvar, seed, k):
        return mu.new_empty((k, *mu.shape)), mu.new_empty(mu.shape[:1])

    @lib("reparam_backward")
    def _(grad_z, grad_kl, mu, logvar, z):
        return torch.empty_like(mu), torch.empty_like(logvar)

    @lib("loss_forward")
    def _(logits, x, mu, logvar, beta, gaussian, need_grad):
        rows = logits.shape[:1]

        def grad(like: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(like) if need_grad else like.new_empty((0,))
        return logits.new_empty(rows), logits.new_empty(rows), grad(logits), grad(mu), grad(mu)

    @lib("to_image")
    def _(values, out, from_logits):
        return None


def _dtype_reason(t: torch.Tensor) -> str | None:
    return None if t.dtype in SUPPORTED else f"the C++/CUDA kernels take float32 or float64, got {t.dtype}"


class _Reparam:
    """fastvae.ops.reparam's backend interface."""

    @staticmethod
    def unsupported(mu: torch.Tensor, logvar: torch.Tensor) -> str | None:
        return _dtype_reason(mu)

    @staticmethod
    def reparam_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor, k: int, need_kl: bool = True,
                        flags: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(seed, torch.Tensor):  # interface shim: read on the host until the kernel loads it
            seed = int(seed.item())
        z, kl = torch.ops.fastvae.reparam_forward(mu, logvar, seed, k)
        return z, (kl if need_kl else None)

    @staticmethod
    def reparam_backward(grad_z, grad_kl, mu, logvar, z, seed: int | torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.fastvae.reparam_backward(grad_z, grad_kl, mu, logvar, z)


class _Loss:
    """fastvae.ops.loss's backend interface."""

    @staticmethod
    def unsupported(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> str | None:
        if mu.dtype != logits.dtype:
            return f"logits ({logits.dtype}) and mu/logvar ({mu.dtype}) must share a dtype"
        return _dtype_reason(logits)

    @staticmethod
    def loss_forward(logits, x, mu, logvar, beta: float | torch.Tensor, likelihood: str, need_grad: bool, scale: float = 1.0,
                     flags: torch.Tensor | None = None):
        if isinstance(beta, torch.Tensor):  # interface shim: read on the host until the kernel loads it
            beta = float(beta.item())
        recon, kl, g_logits, g_mu, g_logvar = torch.ops.fastvae.loss_forward(
            logits, x, mu, logvar, float(beta), likelihood == "gaussian", bool(need_grad))
        if not need_grad:
            return recon, kl, None, None, None
        if scale != 1.0:  # interface shim: folded into the kernel later
            for g in (g_logits, g_mu, g_logvar):
                g.mul_(scale)
        return recon, kl, g_logits, g_mu, g_logvar

    @staticmethod
    def scale_grads(grad_out: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """Every tensor of `grads` times grad_out (0-dim, or one factor per row) in place (interface shim)."""
        if grad_out.dim() == 0 and grad_out.device.type == "cpu" and float(grad_out) == 1.0:
            return
        for t in grads:
            t.mul_(grad_out if grad_out.dim() == 0 else grad_out.reshape(-1, *([1] * (t.dim() - 1))))


class _Decode:
    """fastvae.ops.decode's backend interface (the elementwise tail; no fused MLP)."""

    @staticmethod
    def to_image(values: torch.Tensor, out: torch.Tensor, from_logits: bool) -> None:
        if _dtype_reason(values) is not None:
            from .ops.decode import to_image_reference

            to_image_reference(values, out, from_logits)
            return
        torch.ops.fastvae.to_image(values, out, bool(from_logits))


_OPS = {"reparam": _Reparam, "loss": _Loss, "decode": _Decode}


def load_ops(op: str, device: str) -> Any:
    """The implementation of `op` ("reparam", "loss", "decode") for `device` ("cpu" or "cuda")."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {tuple(_OPS)}, got {op!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} has no usable CUDA (torch.cuda.is_available() is False)")
        if not library().with_cuda:
            raise RuntimeError("the fastvae extension was built without CUDA kernels (no nvcc/CUDA_HOME at build time); "
                               "reinstall with CUDA_HOME set: pip install --no-build-isolation -e .")
    elif device == "cpu":
        library()
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return _OPS[op]()
