"""Test set-up: Triton's interpreter must be on before any @triton.jit decoration runs, so that
backend="triton" runs the real kernels on CPU tensors (how CI checks them without a GPU)."""
import os

if os.environ.get("FASTVAE_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastvae  # noqa: E402,F401

POISON = float("nan")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices() -> list[str]:
    """CPU always; CUDA too when a GPU is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
