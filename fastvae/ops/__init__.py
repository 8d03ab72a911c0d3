"""One module per fused op: the PyTorch reference, the autograd.Function and the dispatch.

Accelerated implementations register with ``fastvae.backends`` here, lazily: importing
fastvae compiles and launches nothing.
"""
from functools import partial

from .. import backends
from .._extension import CPU_ONLY, load_ops
from .._triton import OPS, load_kernels

for _op in OPS:
    backends.register(_op, "triton", partial(load_kernels, _op))
for _op in OPS + ("mlp_step",):
    backends.register(_op, "cpp", partial(load_ops, _op, "cpu"))
    if _op not in CPU_ONLY:
        backends.register(_op, "cuda", partial(load_ops, _op, "cuda"))
