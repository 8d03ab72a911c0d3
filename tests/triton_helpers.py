"""Shared by the tests/test_triton_*.py files: skip without Triton, NaN-poisoned allocations."""
import pytest
import torch

import numpy  # noqa: E402

triton = pytest.importorskip("triton")

from fastvae.backends import BackendUnavailable, resolve  # noqa: E402
from fastvae.kernels._common import INTERPRETED  # noqa: E402


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])


if INTERPRETED and _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop under numpy {numpy.__version__} (a size-1 array no longer "
                "converts to int); pip install 'numpy<2.4' or 'triton>=3.7' to run the interpreted Triton tests", allow_module_level=True)

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


def snan_like(t: torch.Tensor) -> torch.Tensor:
    """`t` filled with signalling NaNs (quiet bit clear): any arithmetic on one, even * 1, quiets it,
    so unchanged bits prove a kernel wrote nothing there."""
    bits = {torch.float32: (torch.int32, 0x7F800001), torch.float64: (torch.int64, 0x7FF0000000000001),
            torch.bfloat16: (torch.int16, 0x7F81), torch.float16: (torch.int16, 0x7C01)}[t.dtype]
    return t.view(bits[0]).fill_(bits[1]).view(t.dtype)


def nan_tailed(t: torch.Tensor, tail: int = 4096) -> torch.Tensor:
    """A contiguous copy of `t` followed in memory by NaNs (Inf for ints): a kernel that reads a
    masked-off (padding) lane without its mask sees them."""
    buf = torch.full((t.numel() + tail,), float("nan") if t.is_floating_point() else 255, dtype=t.dtype)
    buf[: t.numel()] = t.flatten()
    return buf[: t.numel()].view(t.shape)


def flag_word(value: int = 0) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32)


def launches(call, *args, **kwargs) -> list:
    """The launches a kernel wrapper makes (kernel, grid, args, kwargs), recorded instead of run."""
    from fastvae.kernels import _common

    with _common.recording() as calls:
        call(*args, **kwargs)
    return calls


def specialization(kernel, args: tuple, kwargs: dict, respect_do_not_specialize: bool = True) -> str:
    """Triton's launch-cache key for these arguments on an sm_90 GPU, computed without one (its own
    binder): a kernel is compiled again exactly when this changes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as exc:  # Triton internals: present in 3.6 through 3.9
        pytest.skip(f"this Triton has no create_function_from_signature: {exc}")
    if isinstance(kernel, JITFunction):
        options = dict(do_not_specialize=kernel.do_not_specialize)
    else:
        options = dict(kernel.kwargs)  # an InterpretedFunction keeps its jit() arguments
    if not respect_do_not_specialize:
        options["do_not_specialize"] = []
    fn = JITFunction(getattr(kernel, "fn", kernel), **options)
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, spec, _ = binder(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    return repr(spec)
