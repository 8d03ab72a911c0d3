"""One module per fused op: the PyTorch reference, the autograd.Function and the dispatch.

Accelerated implementations register with ``fastvae.backends`` here, lazily: importing
fastvae compiles and launches nothing.
"""
from functools import partial

from .. import backends
from .._extension import load_ops
from .._triton import TRITON_OPS, load_kernels
from ..backends import OPS, STEP_OPS

for _op in TRITON_OPS:
    backends.register(_op, "triton", partial(load_kernels, _op))
for _op in OPS + STEP_OPS:
    backends.register(_op, "cpp", partial(load_ops, _op, "cpu"))
for _op in OPS:
    backends.register(_op, "cuda", partial(load_ops, _op, "cuda"))
