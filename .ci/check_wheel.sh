#!/usr/bin/env bash
# The package as users install it, in a fresh venv and outside the source tree:
#  1. the wheel pip builds from this tree, with the compiled extension (the objects of the editable
#     build are reused from build/, so this only relinks);
#  2. a pure-Python wheel built from the sdist (FASTVAE_BUILD_EXT=0), whose extension is then
#     JIT-built from the C++ sources the package ships (fastvae/csrc).
# Run from the CI venv (torch and a recent setuptools installed) after the tests; about 3 min.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/fastvae-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$root"
started=$SECONDS

pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
FASTVAE_BUILD_EXT=0 python -c "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])" "$work/sdist" >/dev/null
mkdir "$work/src" && tar -xzf "$work"/sdist/fastvae-*.tar.gz -C "$work/src"
FASTVAE_BUILD_EXT=0 pip wheel -q --no-build-isolation --no-deps -w "$work/pure" "$work"/src/fastvae-*/
echo "wheels and sdist built at $((SECONDS - started)) s: $(cd "$work" && ls dist pure sdist | tr '\n' ' ')"

python3 -m venv "$work/venv"
venv="$work/venv/bin"
"$venv/pip" install -q --upgrade pip
"$venv/pip" install -q torch==2.13.0
"$venv/pip" install -q "$work"/dist/fastvae-*.whl
cd "$work"  # away from the source tree: only the installed package can be imported
export TORCH_EXTENSIONS_DIR="$work/jit" FASTVAE_STRICT=1

"$venv/python" - <<'PY'
import importlib.util, sys
import fastvae
assert fastvae.__file__.startswith(sys.prefix), f"imported {fastvae.__file__}, not the installed package"
assert importlib.util.find_spec("fastvae._C") is not None, "the wheel has no compiled extension"
active = {op: v["active"]["cpu"] for op, v in fastvae.backends().items()}
assert set(active.values()) == {"cpp"}, active
print("wheel: installed at", fastvae.__file__, "with its compiled extension; backends", active)
PY
"$venv/fastvae" train --limit 512 --epochs 1 --hidden-dims 64 --out run --no-progress
"$venv/fastvae" sample run -n 16
"$venv/fastvae" score run --batch-size 2000
test -s run/samples-n16-seed0.png && test -s run/scores-test-k1.csv
echo "wheel with the compiled extension: OK at $((SECONDS - started)) s"

"$venv/pip" install -q --force-reinstall --no-deps "$work"/pure/fastvae-*.whl
"$venv/python" - <<'PY'
import importlib.util, time
start = time.time()
import fastvae
assert importlib.util.find_spec("fastvae._C") is None, "the pure wheel holds a compiled extension"
active = {op: v["active"]["cpu"] for op, v in fastvae.backends().items()}  # JIT-builds from fastvae/csrc
assert set(active.values()) == {"cpp"}, active
print(f"pure wheel from the sdist: extension JIT-built from the shipped sources in {time.time() - start:.0f} s; backends", active)
PY
"$venv/fastvae" train --limit 256 --epochs 1 --hidden-dims 32 --out run-jit --no-progress
echo "wheel checks done in $((SECONDS - started)) s"
