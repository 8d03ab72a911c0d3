#!/usr/bin/env bash
# Compile-only check of the CUDA kernels on a machine without a GPU: builds the whole extension
# (CPU + CUDA sources, as setup.py would with nvcc) against torch's CUDA build in its own venv,
# then checks that the ops have CUDA kernels registered. Nothing runs on a GPU.
#   .ci/check_cuda_compile.sh            # venv at $CUVENV (default /tmp/cuvenv), made if missing
# Needs nvcc at $CUDA_HOME (default /usr/local/cuda). About 1 min for the venv (local wheel), then
# the build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUVENV:-/tmp/cuvenv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, ninja" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.14.1 ninja setuptools
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}  # no GPU to detect the arch from
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fastvae-cuda-check}
export PATH="$CUDA_HOME/bin:$venv/bin:$PATH"
"$venv/bin/python" - "$root" <<'PY'
import runpy, sys, time

import torch
from torch.utils.cpp_extension import load

build = runpy.run_path(f"{sys.argv[1]}/fastvae/_build.py")
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
start = time.time()
module = load(name="fastvae_C_cuda_check", sources=build["sources"](True),
              extra_cflags=build["CXX_FLAGS"] + build["defines"](True),
              extra_cuda_cflags=build["NVCC_FLAGS"] + build["defines"](True), verbose=True)
assert module.with_cuda, "built without FASTVAE_WITH_CUDA"
for op in ("reparam_forward", "reparam_backward", "loss_forward", "to_image"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", key), f"fastvae::{op} has no {key} kernel"
print(f"OK: CUDA extension built in {time.time() - start:.0f} s (torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"arch {__import__('os').environ['TORCH_CUDA_ARCH_LIST']}); all ops have CPU and CUDA kernels")
PY
