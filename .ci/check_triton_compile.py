"""Compile every Triton kernel, as the wrappers launch it on a GPU, for sm_80 and sm_90 without one.

The interpreter accepts shapes and ops a GPU refuses, and says nothing about registers or
shared memory. This runs each wrapper of fastvae.kernels on meta tensors of real shapes
(reference model, B=65536, D=12288, latent 1..256; float32/bfloat16/float16/float64) with its
GPU launch configuration, records every launch (kernels/_common.py `launch`), specialises the
arguments with Triton's own binder (tt.divisibility 16 on pointers and on integers that are
multiples of 16, as a real launch), compiles each distinct kernel down to a cubin and reads
registers and spills from ptxas -v. It fails when shared memory exceeds the architecture's
limit, when any kernel spills registers on a path that runs (the memory-bound ones would
lose their bandwidth, decode its tiles; libdevice sin/cos's huge-argument branch, never taken
by the Box-Muller angle 2 pi u < 6.3, keeps a local array that ptxas counts as spills in a
few variants: reported apart), when a kernel with value checks has other than one atomic (the flag OR,
once per program), or when the reparam kernels call Philox more than once per 4 outputs.

    env -u TRITON_INTERPRET python .ci/check_triton_compile.py [--quick] [--jobs N] [--markdown] [--doc docs/gpu.md]

--quick (CI) compiles the shapes the reference run and the benchmarks use, in float32 and
bfloat16, each variant the training step launches; the full set (a few minutes per core) is
what the compile table of docs/gpu.md reports: --markdown prints it, --doc writes it into a file's
triton-compile block (a full run that passed only).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the check compiles for real GPUs")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fastvae.kernels import _common, bias_grad, decode, loss, reparam  # noqa: E402

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (A100, H100/H200)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor without storage: data_ptr() is 0, so aligned like every CUDA allocation."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _reparam(B: int, L: int, k: int, dt: torch.dtype, training_only: bool) -> None:
    """training_only: what a training step launches (device seed, checks on, no reparam KL); else every variant."""
    mu, lv = meta(B, L, dtype=dt), meta(B, L, dtype=dt)
    flags, seed = meta(1, dtype=torch.int32), meta(dtype=torch.int64)
    for need_kl in (False,) if training_only else (False, True):  # training: the loss computes the KL
        reparam.reparam_forward(mu, lv, seed, k, need_kl, flags)
        if not training_only:
            reparam.reparam_forward(mu, lv, 12345, k, need_kl, None)
    z = meta(k, B, L, dtype=dt)
    for gkl in (None,) if training_only else (None, meta(B, dtype=torch.float64 if dt == torch.float64 else torch.float32)):
        reparam.reparam_backward(z, gkl, mu, lv, z, seed, k)


def _loss(B: int, D: int, L: int, dt: torch.dtype, training_only: bool) -> None:
    logits, mu, lv = meta(B, D, dtype=dt), meta(B, L, dtype=dt), meta(B, L, dtype=dt)
    flags, beta = meta(1, dtype=torch.int32), meta(dtype=torch.float64)
    for x, likelihood in ((meta(B, D, dtype=torch.uint8), "bernoulli"), (meta(B, D, dtype=dt), "bernoulli"), (meta(B, D, dtype=dt), "gaussian")):
        if training_only and x.dtype != torch.uint8:
            continue
        loss.loss_forward(logits, x, mu, lv, beta, likelihood, True, 1.0 / B, flags)
        if not training_only:
            loss.loss_forward(logits, x, mu, lv, 0.5, likelihood, False, 1.0, None)
    grads = [logits, mu, lv]
    loss.scale_grads(meta(dtype=torch.float64 if dt == torch.float64 else torch.float32), grads)
    if not training_only:
        loss.scale_grads(meta(B, dtype=torch.float64 if dt == torch.float64 else torch.float32), grads)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """torch's float32 matmul precision (decode follows it: tf32 or IEEE tl.dot)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old, matmul.fp32_precision = matmul.fp32_precision, "tf32" if enabled else "ieee"
    else:
        old, matmul.allow_tf32 = matmul.allow_tf32, enabled
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old


def _decode(M: int, K: int, hidden: tuple[int, ...], N: int, dt: torch.dtype, out_dt: torch.dtype, training_only: bool) -> None:
    sizes = (K, *hidden, N)
    layers = [(meta(n, k, dtype=dt), meta(n, dtype=dt)) for k, n in zip(sizes, sizes[1:])]
    out = meta(M, N, dtype=out_dt)
    for enabled in (True, False):
        with tf32(enabled):
            decode.decode_mlp(layers, None, meta(dtype=torch.int64), 0, out)
            if not training_only:
                decode.decode_mlp(layers, meta(M, K, dtype=dt), 7, 0, out)
    if not training_only and out_dt == torch.uint8:  # the image tail writes uint8 only
        decode.to_image(meta(M, N, dtype=dt), out, True)


LATENTS = (1, 2, 3, 5, 8, 16, 20, 32, 33, 64, 100, 128, 200, 256)


def _bias_grad(B: int, N: int, dt: torch.dtype) -> None:
    for relu in (True, False):  # the hidden layers' (ReLU folded in) and the output's / the heads'
        bias_grad.bias_grad(meta(B, N, dtype=dt), meta(B, N, dtype=dt) if relu else None, meta(N, dtype=dt))


def workload(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, a call of the wrappers on meta tensors) for every shape the check covers.

    The reference and benchmark shapes launch every variant (checks on/off, int/device seed,
    KL or not, ...); the latent sweeps (1..256) and odd shapes the training-step variants.
    --quick: the reference and benchmark shapes, float32 and bfloat16, training variants."""
    dtypes = ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16", "fp64")
    for name in dtypes:
        dt = DTYPES[name]
        rep = [(128, 20, 1, quick), (65536, 20, 1, quick), (65536, 256, 1, quick), (128, 20, 5, quick)]
        los = [(128, 784, 20, quick), (65536, 784, 20, quick), (4096, 12288, 256, quick)]
        dec = [(128, 20, (400,), 784, quick), (65536, 20, (400,), 784, quick), (4096, 256, (1024,), 12288, quick)]
        if not quick:
            rep += [(4096, L, 1, True) for L in LATENTS] + [(4099, 33, 2, True), (1, 1, 1, True)]
            los += [(128, 784, L, True) for L in LATENTS] + [(1, 1, 1, True), (1031, 12288, 20, True)]
            dec += [(4096, K, (400,), 784, True) for K in LATENTS] + [(4096, 20, (256, 128), 784, True), (4096, 256, (512, 256), 12288, True)]
        for B, L, k, training in rep:
            yield f"reparam {B}x{L} k={k} {name}", lambda B=B, L=L, k=k, dt=dt, t=training: _reparam(B, L, k, dt, t)
        for B, D, L, training in los:
            yield f"loss {B}x{D}x{L} {name}", lambda B=B, D=D, L=L, dt=dt, t=training: _loss(B, D, L, dt, t)
        for B, N in [(128, 400), (128, 784), (128, 40)] + ([] if quick else [(65536, 1024), (4099, 33), (1, 1)]):
            yield f"bias_grad {B}x{N} {name}", lambda B=B, N=N, dt=dt: _bias_grad(B, N, dt)
        if name == "fp64":
            continue  # decode's matmuls take float32/bfloat16/float16 weights
        for out_name in ("fp32", "u8") if not quick else ("u8",):
            out_dt = torch.uint8 if out_name == "u8" else torch.float32
            for M, K, hidden, N, training in dec:
                yield f"decode {M}x{K}x{'x'.join(map(str, hidden))}x{N} {name}->{out_name}", \
                    lambda M=M, K=K, hidden=hidden, N=N, dt=dt, out_dt=out_dt, t=training: _decode(M, K, hidden, N, dt, out_dt, t)


@dataclass
class Job:
    kernel: str  # "module.name"
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    shapes: list[str] = field(default_factory=list)


def specialise(kernel: triton.JITFunction, args: tuple, kwargs: dict, arch: int) -> tuple[dict, dict, dict, dict]:
    """What JITFunction.run compiles for these arguments on `arch` (Triton's binder and _pack_args)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=kernel.debug or False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _describe(kernel: triton.JITFunction, signature: dict, constexprs: dict, options: dict) -> str:
    names = kernel.arg_names
    consts = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in consts.items() if k.startswith("BLOCK_"))
    flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in consts.items()
                     if not k.startswith("BLOCK_") and isinstance(v, (bool, str, triton.language.dtype)) and v is not None)
    ptrs = next((t for t in signature.values() if t.startswith("*")), "")
    return f"{ptrs[1:]} {blocks} w{options['num_warps']}s{options['num_stages']}r{options.get('maxnreg')} {flags}"


def jobs(quick: bool) -> list[Job]:
    unique: dict[tuple, Job] = {}
    archs = ARCHS
    for label, call in workload(quick):
        with _common.recording() as calls:
            call()
        for kernel, grid, args, kwargs in calls:
            for arch in archs:
                signature, constexprs, attrs, options = specialise(kernel, args, kwargs, arch)
                key = (kernel.fn.__qualname__, kernel.fn.__module__, arch, repr(signature), repr(constexprs), repr(attrs),
                       options["num_warps"], options["num_stages"])
                job = unique.get(key)
                if job is None:
                    job = unique[key] = Job(f"{kernel.fn.__module__}.{kernel.fn.__name__}", arch, signature, constexprs, attrs, options,
                                            _describe(kernel, signature, constexprs, options))
                job.shapes.append(label)
    return list(unique.values())


TRIG_SLOW = re.compile(r"setp\.ltu\.f32\s+(%p\d+),\s*%r\d+,\s*0f47CE4780;")  # libdevice sinf/cosf: |x| < 105615?


def without_trig_slow_path(ptx: str) -> str:
    """The PTX with libdevice sin/cos's huge-argument branch (|x| >= 105615, Payne-Hanek reduction
    through a local-memory array) made dead: the Box-Muller angle is 2 pi u < 6.3, so only the
    fast path ever runs; ptxas counts that array as spills in some variants."""
    return TRIG_SLOW.sub(lambda m: f"setp.ltu.f32 {m.group(1)}, 0f00000000, 0f47CE4780;", ptx)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],  # as Triton runs it
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    stores = re.search(r"(\d+) bytes spill stores", res.stderr)
    loads = re.search(r"(\d+) bytes spill loads", res.stderr)
    return int(regs.group(1)) if regs else -1, int(stores.group(1)) if stores else 0, int(loads.group(1)) if loads else 0


def run_job(job: Job) -> dict:
    module, name = job.kernel.rsplit(".", 1)
    kernel = getattr(sys.modules[module], name)
    started = time.perf_counter()
    try:
        compiled = compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs), target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # noqa: BLE001 - reported as a failure of this configuration
        return dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}", regs=-1, spill_st=0, spill_ld=0, cold=0, smem=0, philox=0,
                    atomics=0, seconds=time.perf_counter() - started)
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = ptxas_usage(ptx, job.arch)
    cold = 0
    if (spill_st or spill_ld) and TRIG_SLOW.search(ptx):  # spills on paths that run, and those only in the dead one
        regs, hot_st, hot_ld = ptxas_usage(without_trig_slow_path(ptx), job.arch)
        cold, spill_st, spill_ld = spill_st + spill_ld - hot_st - hot_ld, hot_st, hot_ld
    return dict(regs=regs, spill_st=spill_st, spill_ld=spill_ld, cold=cold, smem=compiled.metadata.shared, philox=len(re.findall(r"\bsqrt\.", ptx)) / 2,
                atomics=len(re.findall(r"\batom\.", ptx)),
                seconds=time.perf_counter() - started)


def _constexprs(job: Job) -> dict:
    module, name = job.kernel.rsplit(".", 1)
    names = getattr(sys.modules[module], name).arg_names
    return {names[p[0]]: v for p, v in job.constexprs.items() if len(p) == 1}


def philox_per_output(job: Job, philox: float) -> tuple[float, float] | None:
    """(Philox calls per output element in one step of a reparam kernel, the most allowed).

    Each Philox call feeds two Box-Muller pairs, one sqrt each: calls = sqrt instructions / 2
    in the PTX (one step of the loop, fully unrolled per thread). Allowed: 1 per 4 outputs;
    2 per 4 when the samples' flat ranges do not start on a counter (k > 1, B * L % 4 != 0)."""
    if not job.kernel.endswith(("reparam._forward", "reparam._backward")):
        return None
    consts = _constexprs(job)
    outputs_per_thread = 4 * consts["BLOCK_G"] / (32 * job.options["num_warps"])
    return philox / outputs_per_thread, 0.25 if consts["ALIGNED"] else 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI subset: the reference and benchmark shapes, fp32/bf16, training variants")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--markdown", action="store_true", help="also print the summary table of docs/gpu.md (its triton-compile block)")
    parser.add_argument("--doc", default=None, help="rewrite this file's triton-compile block with the summary table (e.g. docs/gpu.md; "
                                                    "full set only, and only when everything passed)")
    opts = parser.parse_args()
    if opts.doc and opts.quick:
        parser.error("--doc writes the full set's table: run it without --quick")
    started = time.perf_counter()
    todo = jobs(opts.quick)
    print(f"triton {triton.__version__}: {len(todo)} distinct kernel compilations ({'quick' if opts.quick else 'full'} set)", flush=True)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(opts.jobs, mp_context=ctx) as pool:
        results = list(pool.map(run_job, todo))
    failures = []
    print(f"{'kernel':22s} {'arch':5s} {'regs':>4s} {'spill':>9s} {'smem':>7s} {'philox/out':>10s}  config  [shapes]")
    for job, res in sorted(zip(todo, results), key=lambda jr: (jr[0].kernel, jr[0].arch, jr[0].config)):
        name = job.kernel.rsplit(".", 2)[-2] + "." + job.kernel.rsplit(".", 1)[1]
        if "error" in res:
            print(f"{name:22s} sm_{job.arch} does not compile: {res['error']}  {job.config}  [{'; '.join(job.shapes[:3])}]")
            failures.append(f"{name} sm_{job.arch} {job.config}: {res['error']}")
            continue
        ppo = philox_per_output(job, res["philox"])
        print(f"{name:22s} sm_{job.arch} {res['regs']:4d} {res['spill_st']:4d}/{res['spill_ld']:<4d} {res['smem']:7d} "
              f"{'' if ppo is None else f'{ppo[0]:.2f}':>10s}  {job.config}  [{'; '.join(job.shapes[:3])}{' ...' if len(job.shapes) > 3 else ''}]"
              + (f"  (+{res['cold']} B spilled in sin/cos's never-taken huge-argument path)" if res["cold"] else ""))
        if res["smem"] > SMEM_LIMIT[job.arch]:
            failures.append(f"{name} sm_{job.arch} {job.config}: {res['smem']} B of shared memory > {SMEM_LIMIT[job.arch]}")
        if res["spill_st"] or res["spill_ld"]:
            failures.append(f"{name} sm_{job.arch} {job.config}: spills {res['spill_st']}/{res['spill_ld']} B")
        check = _constexprs(job).get("CHECK")
        if check is not None and res["atomics"] != int(check):
            failures.append(f"{name} sm_{job.arch} {job.config}: {res['atomics']} atomics in the PTX (value checks: one per program)")
        if ppo is not None and ppo[0] > ppo[1]:
            failures.append(f"{name} sm_{job.arch} {job.config}: {ppo[0]:.2f} Philox calls per output (at most {ppo[1]})")
    if opts.markdown:
        print(markdown(todo, results))
    print(f"compiled {len(todo)} in {time.perf_counter() - started:.0f} s")
    if failures:
        sys.exit("FAILED:\n  " + "\n  ".join(failures))
    if opts.doc:
        from benchmarks.report import rewrite_block

        if not rewrite_block(opts.doc, markdown(todo, results) + "\n", MARKERS):
            sys.exit(f"{opts.doc} has no {MARKERS[0]} ... {MARKERS[1]} block")
        print(f"rewrote the compile table in {opts.doc}")


MARKERS = ("<!-- triton-compile:start -->", "<!-- triton-compile:end -->")  # the table's place in docs/gpu.md


def markdown(todo: list[Job], results: list[dict]) -> str:
    """The summary table of docs/gpu.md: per kernel, the configurations compiled and the worst registers / spills /
    shared memory on sm_80 and sm_90."""
    rows: dict[str, dict[int, list[dict]]] = {}
    for job, res in zip(todo, results):
        rows.setdefault(job.kernel.rsplit(".", 2)[-2] + "." + job.kernel.rsplit(".", 1)[1], {}).setdefault(job.arch, []).append(res)
    lines = ["| kernel | configs | registers sm_80 / sm_90 | spills (B) | shared memory max sm_80 / sm_90 (limits 163 / 227 KB) |",
             "| --- | --- | --- | --- | --- |"]
    for name, archs in sorted(rows.items()):
        regs = " / ".join(f"{min(r['regs'] for r in archs[a])}-{max(r['regs'] for r in archs[a])}" for a in ARCHS)
        spills = max(r["spill_st"] + r["spill_ld"] for a in ARCHS for r in archs[a])
        cold = max(r["cold"] for a in ARCHS for r in archs[a])
        smem = " / ".join(f"{max(r['smem'] for r in archs[a]) / 1024:.1f} KB" for a in ARCHS)
        lines.append(f"| `{name}` | {len(archs[ARCHS[0]])} | {regs} | {spills}{f' (+{cold} in sin/cos dead path)' if cold else ''} | {smem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
