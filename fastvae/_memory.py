"""While training on the CPU: the step's large tensors reuse freed memory instead of fresh pages.

glibc's malloc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a
fresh mmap and unmaps it on free, so a step whose tensors are larger (a convolutional VAE at
64x64x3 and batch 128 has 16-64 MiB activations and gradients) faults in and zero-fills every
page of them again, every step: 40% of vanilla_conv64's CPU step in tests/user_vaes.py went to
the kernel's page faults, measured with perf. Within ``heap_reuse`` the heap serves them and
keeps what is freed (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB): the next step reuses the
memory of the last (1.8x faster for that model on one thread; nothing changes for the reference
MLP, whose tensors stay below the threshold anyway). Afterwards mmap serves large blocks again
and the heap gives memory back above 64 MiB (a fixed threshold from then on, the one glibc's
adaptive rule tends to). Nothing happens off glibc.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from typing import Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
MMAP_MAX_DEFAULT = 65536
TRIM_AFTER = 64 << 20


def _libc() -> ctypes.CDLL | None:
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
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
