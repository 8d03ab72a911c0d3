#!/usr/bin/env bash
# Compile-only check of the CUDA kernels on a machine without a GPU: builds the whole extension
# (CPU + CUDA sources, as setup.py would with nvcc) against torch's CUDA build in its own venv,
# checks that every op has a CUDA kernel registered, and prints ptxas's resource table (registers,
# spills, stack, shared memory per kernel and architecture); it fails when a hot kernel spills.
# Nothing runs on a GPU.
#   .ci/check_cuda_compile.sh            # venv at $CUVENV (default /tmp/cuvenv), made if missing
# Needs nvcc at $CUDA_HOME (default /usr/local/cuda). About 1 min for the venv (local wheel), then
# the build (in a fresh directory, so that ptxas reports every kernel).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUVENV:-/tmp/cuvenv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, ninja" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.14.1 ninja setuptools
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}  # no GPU to detect the arch from
build_dir=$(mktemp -d "${TMPDIR:-/tmp}/fastvae-cuda-check.XXXXXX")
log="$build_dir/build.log"
trap 'rm -rf "$build_dir"' EXIT
export TORCH_EXTENSIONS_DIR="$build_dir"
export PATH="$CUDA_HOME/bin:$venv/bin:$PATH"
"$venv/bin/python" - "$root" <<'PY' 2>&1 | tee "$log"
import os, runpy, sys, time

import torch
from torch.utils.cpp_extension import load

build = runpy.run_path(f"{sys.argv[1]}/fastvae/_build.py")
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
start = time.time()
module = load(name="fastvae_C_cuda_check", sources=build["sources"](True),
              extra_cflags=build["CXX_FLAGS"] + build["defines"](True),
              extra_cuda_cflags=build["NVCC_FLAGS"] + build["defines"](True) + ["-Xptxas=-v"], verbose=True)
assert module.with_cuda, "built without FASTVAE_WITH_CUDA"
for op in ("reparam_forward", "reparam_backward", "loss_forward", "scale_grads", "to_image"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", key), f"fastvae::{op} has no {key} kernel"
print(f"OK: CUDA extension built in {time.time() - start:.0f} s (torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"arch {os.environ['TORCH_CUDA_ARCH_LIST']}); all ops have CPU and CUDA kernels")
PY
# ptxas -v's report per kernel and architecture -> a table; spills in a hot kernel fail the check.
python3 - "$log" <<'PY'
import re, subprocess, sys

HOT = ("loss_forward_kernel", "reparam_forward_kernel", "reparam_backward_kernel", "scale_grads_kernel")
rows, current = {}, None
for line in open(sys.argv[1], errors="replace"):
    if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
        current = (m.group(1), m.group(2))
        rows[current] = {}
    elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        rows[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    elif current and (m := re.search(r"Used (\d+) registers", line)):
        rows[current]["regs"] = int(m.group(1))
        smem = re.search(r"(\d+) bytes smem", line)
        rows[current]["smem"] = int(smem.group(1)) if smem else 0
kernels = [(n, a) for n, a in rows if "fastvae" in n]
assert kernels, "ptxas reported no fastvae kernel (was the build cached? the check builds in a fresh directory)"
names = subprocess.run(["c++filt"], input="\n".join(n for n, _ in kernels), capture_output=True, text=True).stdout.split("\n")
short = {}
for (mangled, _), name in zip(kernels, names):
    name = re.sub(r"fastvae::cuda::\(anonymous namespace\)::", "", name)
    short[mangled] = re.sub(r"\(.*\)$", "", name).replace("unsigned char", "uint8").removeprefix("void ")
print(f"\n{'kernel':<52} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>5}")
bad = []
for key in sorted(kernels, key=lambda k: (short[k[0]], k[1])):
    r = rows[key]
    print(f"{short[key[0]]:<52} {key[1]:<6} {r.get('regs', 0):>4} {r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<5} "
          f"{r.get('stack', 0):>5} {r.get('smem', 0):>5}")
    if any(h in key[0] for h in HOT) and (r.get("spill_st", 0) or r.get("spill_ld", 0)):
        bad.append(f"{short[key[0]]} ({key[1]})")
if bad:
    sys.exit("FAIL: hot kernels spill registers: " + ", ".join(bad))
print(f"OK: {len(kernels)} kernel builds, no spills in the hot kernels ({', '.join(HOT)})")
PY
