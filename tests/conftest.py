"""Test set-up: Triton's interpreter must be on before any @triton.jit decoration runs, so that
backend="triton" runs the real kernels on CPU tensors (how CI checks them without a GPU)."""
import os

if os.environ.get("FASTVAE_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastvae  # noqa: E402
from pathlib import Path  # noqa: E402

POISON = float("nan")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def real_data():
    """The real Fashion-MNIST training set (Debian's dataset-fashion-mnist); CI must have it."""
    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST is missing: .ci/run must `apt-get install dataset-fashion-mnist`")
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data tests")
    return fastvae.data.load("fashion-mnist", "train")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices() -> list[str]:
    """CPU always; CUDA too when a GPU is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
