"""Per-op benchmarks: each fused op, forward and forward+backward, on every fastvae backend and on
eager PyTorch ("eager": the reference's formulas) and torch.compile of it ("compile").

fastvae's backends run with the data-dependent value checks off (``fastvae.value_checks(False)``),
as in the Trainer's loop: they are a validation pass over the inputs, not part of the op.

Run through ``python -m benchmarks.run`` (which writes the results file), or directly:
``python -m pytest benchmarks/test_ops.py --benchmark-only``. Environment: FASTVAE_BENCH_DEVICE,
FASTVAE_BENCH_SIZE (smoke|quick|full), FASTVAE_BENCH_DTYPES, FASTVAE_BENCH_PEAK (see common.peak_mode), FASTVAE_BENCH_COMPILE=0 (skip
the compile baseline), FASTVAE_BENCH_TRITON=1 (Triton's interpreter on CPU).
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import functional as fv
from fastvae.backends import BACKENDS
from fastvae.model import MLPDecoder

from . import common

DEV = common.device()
IMPLS = (*BACKENDS, "eager", "compile")
CASES = [
    (op, backward, shape, dtype)
    for op in ("loss", "reparam", "decode")
    for backward in ((False,) if op == "decode" else (False, True))
    for shape in common.sizes(op, DEV)
    for dtype in common.dtypes(DEV)
]


def _case_id(case) -> str:
    op, backward, shape, dtype = case
    return f"{op}.{'fwd_bwd' if backward else 'fwd'}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"


def eager_loss(logits, x, mu, logvar):
    """The reference: BCE of the sigmoid output, summed, plus the KL term."""
    bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_reparam(mu, logvar):
    std = torch.exp(0.5 * logvar)
    z = mu + torch.randn_like(std) * std
    return z, -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def eager_decode(decoder, z):
    with torch.no_grad():
        return torch.sigmoid(decoder(z))


def _inputs(op: str, shape, dtype, backward: bool):
    g = dict(device=DEV, dtype=dtype)
    if op == "loss":
        b, d, lat = shape
        logits, mu, logvar = torch.randn(b, d, **g) * 3, torch.randn(b, lat, **g), torch.randn(b, lat, **g) * 0.5
        leaves = [t.requires_grad_(backward) for t in (logits, mu, logvar)]
        return leaves, (logits, torch.rand(b, d, **g), mu, logvar)
    if op == "reparam":
        b, lat = shape
        mu, logvar = torch.randn(b, lat, **g).requires_grad_(backward), (torch.randn(b, lat, **g) * 0.5).requires_grad_(backward)
        return [mu, logvar], (mu, logvar)
    n, lat, h, d = shape
    decoder = MLPDecoder(lat, (h,), d).to(DEV, dtype)
    return [], (decoder, torch.randn(n, lat, **g))


def _callable(op: str, impl: str, backward: bool, leaves, args) -> Callable[[], object]:
    if impl in BACKENDS:
        fused = {"loss": lambda *a: fv.bce_kl_loss(*a, backend=impl),
                 "reparam": lambda *a: fv.reparameterize_kl(*a, backend=impl),
                 "decode": lambda dec, z: fv.decode_latents(dec, z, backend=impl)}[op]
    else:
        fused = {"loss": eager_loss, "reparam": eager_reparam, "decode": eager_decode}[op]
        if impl == "compile":
            fused = torch.compile(fused, dynamic=False)
    if not backward:
        def forward():
            with torch.no_grad():
                return fused(*args)
        return forward
    grads = None

    def step():
        nonlocal grads
        for t in leaves:
            t.grad = None
        out = fused(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        if grads is None:
            grads = [torch.randn_like(o) if o.dim() else None for o in outs]
        torch.autograd.backward(outs, grads)
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op(benchmark, case, impl):
    op, backward, shape, dtype = case
    if impl in BACKENDS:
        why = common.backend_status(op, impl, DEV)
        if why:
            pytest.skip(f"{impl}: {why}")
    if impl == "compile" and os.environ.get("FASTVAE_BENCH_COMPILE", "1") == "0":
        pytest.skip("FASTVAE_BENCH_COMPILE=0")
    torch.manual_seed(0)
    leaves, args = _inputs(op, shape, dtype, backward)
    fn = _callable(op, impl, backward, leaves, args)

    def timed():
        with fastvae.value_checks(False):
            fn()
        common.sync(DEV)

    timed()  # warm-up: compiles, autotunes, loads extensions
    for t in leaves:
        t.grad = None  # so that the gradients count in the peak
    mode = common.peak_mode()
    peak = None if mode == "skip" else common.peak_mem_mb(timed, DEV)
    benchmark.extra_info.update({
        "op": op, "pass": "fwd_bwd" if backward else "fwd", "backend": impl, "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."), "device": DEV.type,
        "bytes": common.bytes_moved(op, shape, dtype, backward), "peak_mem_mb": peak,
    })
    if mode == "only":
        benchmark.pedantic(timed, rounds=1, iterations=1)  # the peak is the result; this time is not reported
    else:
        benchmark(timed)
