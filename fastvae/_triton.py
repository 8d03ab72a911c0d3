"""Loader of the Triton backend: ``fastvae.kernels.<op>``, imported only when first used."""
from __future__ import annotations

import importlib
from types import ModuleType

from .backends import OPS

TRITON_OPS = OPS + ("bias_grad",)  # kernels/<op>.py


def load_kernels(op: str) -> ModuleType:
    """The Triton implementation of `op`; ImportError saying why when Triton is missing."""
    if op not in TRITON_OPS:
        raise ValueError(f"op must be one of {TRITON_OPS}, got {op!r}")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the triton backend needs the triton package (pip install 'fastvae[triton]'): {exc}") from exc
    return importlib.import_module(f"fastvae.kernels.{op}")
