"""One module per fused op: the PyTorch reference, the autograd.Function and the dispatch.

Accelerated implementations register with ``fastvae.backends`` here, lazily: importing
fastvae compiles and launches nothing.
"""
from functools import partial

from .. import backends
from .._triton import OPS, load_kernels

for _op in OPS:
    backends.register(_op, "triton", partial(load_kernels, _op))
