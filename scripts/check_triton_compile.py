"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter accepts shapes and ops a GPU refuses; this runs Triton's full pipeline down to
a cubin (no driver needed) and prints registers and spills from ptxas. Run without
TRITON_INTERPRET:  python scripts/check_triton_compile.py [--quick]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the check compiles for real GPUs")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from fastvae.kernels import decode, loss, reparam  # noqa: E402

F32 = tl.float32


def variants(quick: bool):
    for dt in ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16", "fp64"):
        acc = tl.float64 if dt == "fp64" else F32
        rows = "fp64" if dt == "fp64" else "fp32"
        yield reparam._forward, dict(mu_ptr=f"*{dt}", lv_ptr=f"*{dt}", z_ptr=f"*{dt}", kl_ptr=f"*{rows}", seed="i64", B="i32", L="i32", K="i32"), \
            dict(ACC=acc, BLOCK_R=32, BLOCK_L=32)
        yield reparam._backward, dict(gz_ptr=f"*{dt}", gkl_ptr=f"*{rows}", mu_ptr=f"*{dt}", lv_ptr=f"*{dt}", z_ptr=f"*{dt}", gmu_ptr=f"*{dt}",
                                      glv_ptr=f"*{dt}", B="i32", L="i32", K="i32"), dict(HAS_GKL=True, ACC=acc, BLOCK_R=32, BLOCK_L=32)
        for x, gaussian in (("u8", False), (dt, True)):
            yield loss._loss, dict(l_ptr=f"*{dt}", x_ptr=f"*{x}", mu_ptr=f"*{dt}", lv_ptr=f"*{dt}", recon_ptr=f"*{rows}", kl_ptr=f"*{rows}",
                                   gl_ptr=f"*{dt}", gmu_ptr=f"*{dt}", glv_ptr=f"*{dt}", B="i32", D="i32", L="i32", beta_hi="fp32", beta_lo="fp32"), \
                dict(X_U8=x == "u8", GAUSSIAN=gaussian, NEED_GRAD=True, ACC=acc, ACC_KL=acc, BLOCK_R=2, BLOCK_D=1024, BLOCK_L=32)
    for out, prior, precision in (("u8", True, "tf32"), ("fp32", False, "ieee")) if quick else \
            (("u8", True, "tf32"), ("u8", True, "ieee"), ("fp32", False, "tf32"), ("fp32", False, "ieee")):
        sig = dict(z_ptr="*fp32", w1_ptr="*fp32", b1_ptr="*fp32", w2_ptr="*fp32", b2_ptr="*fp32", out_ptr=f"*{out}", seed="i64", start="i64",
                   M="i32", K="i32", H="i32", N="i32")
        yield decode._mlp2, sig, dict(PRIOR=prior, U8=out == "u8", PRECISION=precision, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, BLOCK_H=64)
        sig = dict(in_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr=f"*{out}", seed="i64", start="i64", M="i32", K="i32", N="i32")
        yield decode._linear, sig, dict(PRIOR=prior, SIGMOID=True, U8=out == "u8", PRECISION=precision, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
        yield decode._to_image, dict(v_ptr="*fp32", out_ptr=f"*{out}", n="i64"), dict(FROM_LOGITS=True, U8=out == "u8", ACC=F32, BLOCK=1024)


def ptxas_usage(ptx: str, arch: int) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}B"


def main() -> None:
    quick = "--quick" in sys.argv
    for arch in (90,) if quick else (80, 90):
        for fn, sig, consts in variants(quick):
            warps = decode.NUM_WARPS if fn in (decode._mlp2, decode._linear) else 4
            kernel = compile(ASTSource(fn, {n: sig.get(n, "constexpr") for n in fn.arg_names}, consts), target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": warps})
            flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in consts.items() if not k.startswith("BLOCK"))
            print(f"sm_{arch} {fn.__name__:10s} {ptxas_usage(kernel.asm['ptx'], arch):28s} {sig[next(iter(sig))]:6s} {flags}", flush=True)


if __name__ == "__main__":
    main()
