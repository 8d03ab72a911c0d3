"""What the C++/CUDA extension is built from; shared by setup.py (AOT) and fastvae._extension (JIT).

Imports nothing but the standard library, so setup.py can read it without torch.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# A wheel or sdist install ships the sources inside the package (fastvae/csrc, for the JIT build);
# a source checkout (editable install included) has them at the top of the tree.
CSRC = _PACKAGE / "csrc" if (_PACKAGE / "csrc").is_dir() else _PACKAGE.parent / "csrc"
# avx2.cpp recompiles the kernels with AVX2; it comes last so the linker keeps the baseline copies
# of inline code both translation units emit.
CPU_SOURCES = ("ops.cpp", "checks.cpp", "cpu/reparam.cpp", "cpu/loss.cpp", "cpu/decode.cpp", "cpu/mlp_step.cpp", "cpu/avx2.cpp")
CUDA_SOURCES = ("cuda/reparam.cu", "cuda/loss.cu", "cuda/decode.cu",
                "cuda/reparam_glue.cpp", "cuda/loss_glue.cpp", "cuda/decode_glue.cpp")
# -fopenmp: at::parallel_for is an OpenMP pragma inlined from ATen's headers; without the flag the
# kernels silently run on one thread (GOMP_* then resolve to torch's own libgomp at load time).
# psabi: a GCC note about 32-byte vector arguments.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
NVCC_FLAGS = ["-O3"]  # no --use_fast_math: NaN/Inf must behave as in torch


def sources(cuda: bool, root: Path = CSRC) -> list[str]:
    """Source paths (CUDA ones first when `cuda`, the AVX2 recompilation last)."""
    names = (CUDA_SOURCES if cuda else ()) + CPU_SOURCES
    return [str(root / name) for name in names]


def defines(cuda: bool) -> list[str]:
    return ["-DFASTVAE_WITH_CUDA"] if cuda else []
