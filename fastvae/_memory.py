"""While training on the CPU: the step's large tensors reuse freed memory instead of fresh pages.

glibc's malloc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a
fresh mmap and unmaps it on free, so a step whose tensors are larger (a convolutional VAE at
64x64x3 and batch 128 has 16-64 MiB activations and gradients) faults in and zero-fills every
page of them again, every step: 40% of vanilla_conv64's CPU step in tests/user_vaes.py went to
the kernel's page faults, measured with perf. Within ``heap_reuse`` the heap serves them and
keeps what is freed (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB): the next step reuses the
memory of the last (1.8x faster for that model on one thread; nothing changes for the reference
MLP, whose tensors stay below the threshold anyway). Any mallopt call freezes glibc's adaptive
thresholds for the rest of the process, so on leaving, both are set where that rule ends for a
process that frees large tensors: blocks above 32 MiB mmapped, the heap trimmed above 64 MiB.
Leaving them frozen where they stood would map every later allocation above them afresh (the
user's own loop after ``fit`` ran 2-3x slower on a conv VAE; tests/test_memory.py). Nothing
happens off glibc.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from typing import Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
MMAP_MAX_DEFAULT = 65536
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the adaptive threshold stops
TRIM_AFTER = 2 * MMAP_THRESHOLD_MAX  # the adaptive rule keeps the trim threshold at twice the mmap threshold


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig: milliseconds)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def heap_reuse(device: torch.device) -> Iterator[None]:
    """Within: large CPU allocations come from the heap and freed ones stay there for the next step."""
    libc = _libc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
