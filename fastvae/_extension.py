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
    def _(mu, logvar, seed_t, seed, k, need_kl, flags):
        return mu.new_empty((k, *mu.shape)), mu.new_empty(mu.shape[:1] if need_kl else (0,))

    @lib("reparam_backward")
    def _(grad_z, grad_kl, mu, logvar, z, seed_t, seed, k):
        return torch.empty_like(mu), torch.empty_like(logvar)

    @lib("loss_forward")
    def _(logits, x, mu, logvar, beta_t, beta, gaussian, need_grad, scale, flags):
        rows = logits.shape[:1]

        def grad(like: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(like) if need_grad else like.new_empty((0,))
        return logits.new_empty(rows), logits.new_empty(rows), grad(logits), grad(mu), grad(mu)

    @lib("scale_grads")
    def _(grad_out, grads):
        return None

    @lib("to_image")
    def _(values, out, from_logits):
        return None


def _dtype_reason(t: torch.Tensor) -> str | None:
    return None if t.dtype in SUPPORTED else f"the C++/CUDA kernels take float32 or float64, got {t.dtype}"


def _seed_args(seed: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(seed_t, seed) of the op schemas: a 0-dim int64 tensor is read by the kernel, an int passed as is."""
    return (seed, 0) if isinstance(seed, torch.Tensor) else (None, int(seed))


class _Reparam:
    """fastvae.ops.reparam's backend interface. The CPU backward uses z - mu = eps * std (float32/float64;
    drawing eps again would cost more than the whole backward there); the CUDA backward draws eps again
    from (seed, index) and does not read z."""

    tensor_seed = True  # a 0-dim int64 seed tensor is read by the kernel (CUDA: from device memory)

    @staticmethod
    def unsupported(mu: torch.Tensor, logvar: torch.Tensor) -> str | None:
        return _dtype_reason(mu)

    @staticmethod
    def routing() -> str:
        # No `slower` hook: on this project's 2-core CPU the fused op (forward + backward) beat torch at
        # every size measured, B = 1 .. 65536 and L = 2 .. 256, the op alone by 2.7-14x and fastvae's
        # call by 1.2-3x over its torch path.
        return "cpp/cuda reparam: the fused kernel at every size (CPU: measured faster than torch from B=1, L=2 up)"

    @staticmethod
    def reparam_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor, k: int, need_kl: bool = True,
                        flags: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, kl = torch.ops.fastvae.reparam_forward(mu, logvar, *_seed_args(seed), k, bool(need_kl), flags)
        return z, (kl if need_kl else None)

    @staticmethod
    def reparam_backward(grad_z, grad_kl, mu, logvar, z, seed: int | torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.fastvae.reparam_backward(grad_z, grad_kl, mu, logvar, z, *_seed_args(seed), k)


class _Loss:
    """fastvae.ops.loss's backend interface."""

    @staticmethod
    def unsupported(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> str | None:
        if mu.dtype != logits.dtype:
            return f"logits ({logits.dtype}) and mu/logvar ({mu.dtype}) must share a dtype"
        return _dtype_reason(logits)

    @staticmethod
    def routing() -> str:
        # No `slower` hook: measured on the project's 2-core CPU, the fused loss (forward + backward) beat
        # torch at every size, B = 1 .. 4096 and D = 16 .. 12288, the op alone by 2.5-10x.
        return "cpp/cuda loss: the fused kernel at every size (CPU: measured faster than torch from B=1, D=16 up)"

    @staticmethod
    def loss_forward(logits, x, mu, logvar, beta: float | torch.Tensor, likelihood: str, need_grad: bool, scale: float = 1.0,
                     flags: torch.Tensor | None = None):
        if isinstance(beta, torch.Tensor):  # read by the kernel (CUDA: from device memory)
            beta_t, beta = beta.to(torch.float64), 0.0
        else:
            beta_t, beta = None, float(beta)
        recon, kl, g_logits, g_mu, g_logvar = torch.ops.fastvae.loss_forward(
            logits, x, mu, logvar, beta_t, beta, likelihood == "gaussian", bool(need_grad), float(scale), flags)
        if not need_grad:
            return recon, kl, None, None, None
        return recon, kl, g_logits, g_mu, g_logvar

    @staticmethod
    def scale_grads(grad_out: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """Every tensor of `grads` times grad_out (0-dim, or one factor per row) in place; a 0-dim 1 touches
        nothing (CUDA: checked on the device, no sync)."""
        torch.ops.fastvae.scale_grads(grad_out, list(grads))


class _Decode:
    """fastvae.ops.decode's backend interface (the elementwise tail; no fused MLP)."""

    @staticmethod
    def to_image(values: torch.Tensor, out: torch.Tensor, from_logits: bool) -> None:
        if _dtype_reason(values) is not None:
            from .ops.decode import to_image_reference

            to_image_reference(values, out, from_logits)
            return
        torch.ops.fastvae.to_image(values, out, bool(from_logits))


class _BiasGrad:
    """fastvae.ops.bias_grad's backend interface (CPU kernel)."""

    @staticmethod
    def unsupported(grad: torch.Tensor) -> str | None:
        return _dtype_reason(grad)

    @staticmethod
    def bias_grad(grad: torch.Tensor, relu_out: torch.Tensor | None, out: torch.Tensor) -> None:
        torch.ops.fastvae.bias_grad(grad, relu_out, out)


class _MLPStep:
    """fastvae.mlp_step's whole step on the CPU: forward, fused loss, backward and Adam in one call."""

    @staticmethod
    def unsupported(x: torch.Tensor) -> str | None:
        return _dtype_reason(x)

    @staticmethod
    def mlp_step(x: torch.Tensor, rows: torch.Tensor | None, buffers: tuple[torch.Tensor, ...], step: torch.Tensor,
                 layout: list[int], encoder_layers: int, seed: int, beta: float, likelihood: str, adam: tuple[float, ...] | None,
                 flags: torch.Tensor | None, stats: torch.Tensor, window: torch.Tensor | None) -> None:
        """[loss, recon, kl] summed over the batch (x, or x's rows `rows`) into `stats`, added to `window` (float64)
        if given. buffers: FlatAdam's flat parameters, gradients, exp_avg and exp_avg_sq; layout: (out, in, weight
        offset, bias offset) per layer; seed < 0: drawn from torch's generator; adam: (lr, beta1, beta2, eps,
        weight_decay) to update (advancing `step`), None for the gradients alone."""
        hyper = adam if adam is not None else (0.0, 0.0, 0.0, 0.0, 0.0)
        torch.ops.fastvae.mlp_step(x, rows, *buffers, step, layout, encoder_layers, seed, float(beta), likelihood == "gaussian",
                                   adam is not None, *hyper, flags, stats, window)


_OPS = {"reparam": _Reparam, "loss": _Loss, "decode": _Decode, "bias_grad": _BiasGrad, "mlp_step": _MLPStep}
CPU_ONLY = ("bias_grad", "mlp_step")  # the training step's: CUDA runs it as PyTorch calls and Triton kernels


def load_ops(op: str, device: str) -> Any:
    """The implementation of `op` (a key of ``_OPS``) for `device` ("cpu" or "cuda")."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {tuple(_OPS)}, got {op!r}")
    if device == "cuda" and op in CPU_ONLY:
        raise RuntimeError(f"the CUDA kernels do not implement {op}")
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
