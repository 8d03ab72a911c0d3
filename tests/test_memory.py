"""fastvae._memory.heap_reuse (the Trainer's CPU fit): large tensors reuse the heap within, and the
process's allocator is left where glibc's own adaptive rule ends, not frozen at a small threshold."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# A fresh process that has made no large allocation yet (glibc's threshold still at 128 KiB), then
# `before`; prints the minor page faults of 40 allocations of 4 MiB, each written and freed.
CHILD = """
import resource, sys, torch
from fastvae import _memory
{before}
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(1 << 20, dtype=torch.float32).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(before: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD.format(before=before)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_within_heap_reuse_large_tensors_come_back_without_page_faults():
    fresh = _faults("")  # glibc's first 4 MiB block is mapped, the threshold then adapts: few faults after it
    inside = _faults("ctx = _memory.heap_reuse(torch.device('cpu')); ctx.__enter__()")
    assert inside < 40 * 1024 // 4  # 1024 pages each if every block were mapped afresh
    assert fresh < 40 * 1024 // 4


def test_after_heap_reuse_the_allocator_is_not_frozen_at_a_small_threshold():
    """Leaving with glibc's thresholds frozen where a fresh process has them (128 KiB) would map and
    fault in every 4 MiB tensor afterwards (about 40 x 1024 faults here): the user's own loop after fit."""
    after = _faults("with _memory.heap_reuse(torch.device('cpu')):\n    pass")
    assert after < 40 * 1024 // 4, f"{after} page faults: large allocations are mapped afresh after heap_reuse"


def test_heap_reuse_does_nothing_for_cuda_devices():
    import torch

    from fastvae import _memory

    calls = []
    real = _memory._libc
    _memory._libc = lambda: calls.append(1) or real()
    try:
        with _memory.heap_reuse(torch.device("cuda", 0)):
            pass
    finally:
        _memory._libc = real
    assert calls == []


def test_glibc_is_looked_up_once_not_at_every_entry(monkeypatch):
    """find_library runs ldconfig (about 2.6 ms): looked up at every entry, it cost each drop-in benchmark step that much."""
    import ctypes.util

    import torch

    from fastvae import _memory

    _memory._libc.cache_clear()
    calls = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: calls.append(name) or real(name))
    for _ in range(3):
        with _memory.heap_reuse(torch.device("cpu")):
            pass
    assert calls == ["c"]
