"""Per-op benchmarks: each fused op, forward and forward+backward, on every fastvae backend (on its
default path, value checks on, and with them off) beside the eager baselines and torch.compile
(see benchmarks/common.py for what each implementation is).

An implementation that cannot run a case here (a backend missing on this machine, or a dtype it
reports unsupported, e.g. bfloat16 on backend="cuda") is skipped with its reason; benchmarks.run
records the reasons in the results file.

Run through ``python -m benchmarks.run`` (which writes the results file), or directly:
``python -m pytest benchmarks/test_ops.py --benchmark-only``. Environment: FASTVAE_BENCH_DEVICE,
FASTVAE_BENCH_SIZE (smoke|quick|full), FASTVAE_BENCH_DTYPES, FASTVAE_BENCH_PEAK (see common.peak_mode), FASTVAE_BENCH_COMPILE=0 (skip
the compile baseline), FASTVAE_BENCH_TRITON=1 (Triton's interpreter on CPU).
"""
from __future__ import annotations

import os

import pytest
import torch

from . import common

DEV = common.device()
CASES = [
    (op, backward, shape, dtype)
    for op in common.OPS
    for backward in ((False,) if op == "decode" else (False, True))
    for shape in common.sizes(op, DEV)
    for dtype in common.dtypes(DEV)
]


def _case_id(case) -> str:
    op, backward, shape, dtype = case
    return f"{op}.{'fwd_bwd' if backward else 'fwd'}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"


PARAMS = [pytest.param(case, impl, id=f"{_case_id(case)}-{impl}") for case in CASES for impl in common.impls(case[0])]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_op(benchmark, case, impl):
    op, backward, shape, dtype = case
    if impl == "compile" and os.environ.get("FASTVAE_BENCH_COMPILE", "1") == "0":
        pytest.skip("FASTVAE_BENCH_COMPILE=0")
    torch.manual_seed(0)
    leaves, args = common.inputs(op, shape, dtype, DEV, backward)
    why = common.unsupported(op, impl, args, DEV)
    if why:
        pytest.skip(f"{common.split_impl(impl)[0]}: {why}")
    fn = common.callable_for(op, impl, backward, leaves, args)

    def timed():
        fn()
        common.sync(DEV)

    timed()  # warm-up: compiles, autotunes, loads extensions
    for t in leaves:
        t.grad = None  # so that the gradients count in the peak
    mode = common.peak_mode()
    peak = None if mode == "skip" else common.peak_mem_mb(timed, DEV)
    benchmark.extra_info.update({**common.case_record(op, backward, shape, dtype, impl, DEV),
                                 "bytes": common.bytes_moved(op, shape, dtype, backward), "peak_mem_mb": peak})
    if mode == "only":
        benchmark.pedantic(timed, rounds=1, iterations=1)  # the peak is the result; this time is not reported
    else:
        benchmark(timed)
