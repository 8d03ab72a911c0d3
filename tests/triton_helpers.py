"""Shared by the tests/test_triton_*.py files: skip without Triton, NaN-poisoned allocations."""
import pytest
import torch

triton = pytest.importorskip("triton")

from fastvae.backends import BackendUnavailable, resolve  # noqa: E402

try:  # the tests run CPU tensors: they need the interpreter (tests/conftest.py turns it on)
    resolve("reparam", "cpu", "triton")
except BackendUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0xAB if t.dtype == torch.uint8 else -7)


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    """A failing kernel raises instead of falling back to PyTorch (and disabling the backend)."""
    monkeypatch.setenv("FASTVAE_STRICT", "1")


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like during the test comes back filled with NaN (ints with junk):
    an output element a kernel forgets to write then shows up as NaN."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


def assert_finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t.double()).all(), "an output element was never written (NaN poison survived) or overflowed"
