"""Test helper: stand-in accelerated backends registered through fastvae.backends for one test."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import importlib

backends = importlib.import_module("fastvae.backends")  # the module (fastvae.backends the attribute is the report function)

BACKEND = "cpp"  # the backend "auto" tries first on CPU


def isolate(monkeypatch) -> None:
    """Give this test its own registry and warning state (restored afterwards)."""
    for name in ("_loaders", "_loaded", "_errors", "_failed_at_run"):
        monkeypatch.setattr(backends, name, type(getattr(backends, name))(getattr(backends, name)))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    monkeypatch.delenv("FASTVAE_STRICT", raising=False)


def install(monkeypatch, op: str, impl: Any = None, load_error: Exception | None = None) -> None:
    """Register `impl` (or a loader raising `load_error`) as the "cpp" implementation of `op`."""
    def loader() -> Any:
        if load_error is not None:
            raise load_error
        return impl
    backends.register(op, BACKEND, loader)
    backends._loaded.pop((op, BACKEND), None)
    backends._errors.pop((op, BACKEND), None)


def failing(message: str = "kernel exploded") -> SimpleNamespace:
    """An implementation of every op whose kernels all raise RuntimeError(message)."""
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)
    return SimpleNamespace(reparam_forward=boom, reparam_backward=boom, loss_forward=boom, decode_mlp=boom, to_image=boom)


class Spy(SimpleNamespace):
    """An implementation of every op that records calls and raises: for "no kernel ran" checks."""

    def __init__(self) -> None:
        super().__init__(calls=[])
        for fn in ("reparam_forward", "reparam_backward", "loss_forward", "decode_mlp", "to_image"):
            setattr(self, fn, self._recorder(fn))

    def _recorder(self, fn: str):
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(fn)
            raise AssertionError(f"kernel {fn} ran on bad input")
        return record
