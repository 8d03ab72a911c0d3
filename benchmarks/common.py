"""What the op benchmarks measure: sizes, the bytes each op must move, backends, peak memory.

Peak memory ("peak_mem_mb") is what one warm call allocates beyond what existed before it
(inputs and weights excluded): on CUDA torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus memory_allocated() before the call; on CPU the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its resident set before
the call. tracemalloc does not see torch's allocations and torch has no CPU peak counter, so
the RSS high-water mark is used, in a separate pass with MALLOC_MMAP_THRESHOLD_ set so that
freed tensors go back to the OS and earlier calls do not hide a peak (benchmarks.run does it;
the times come from a pass with the normal allocator).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

import fastvae
from fastvae.backends import _supports

MB = 1 << 20


def device() -> torch.device:
    """FASTVAE_BENCH_DEVICE (cpu, cuda), else CUDA when present."""
    name = os.environ.get("FASTVAE_BENCH_DEVICE", "auto")
    return fastvae.trainer.resolve_device(name)


def peak_mode() -> str:
    """FASTVAE_BENCH_PEAK: inline (measure the peak, then time; default), skip (time only) or only
    (measure the peak, one untimed-for-the-report call)."""
    mode = os.environ.get("FASTVAE_BENCH_PEAK", "inline")
    if mode not in ("inline", "skip", "only"):
        raise ValueError(f"FASTVAE_BENCH_PEAK must be inline, skip or only, got {mode!r}")
    return mode


def preset() -> str:
    """FASTVAE_BENCH_SIZE: smoke (CI, seconds), quick, or full (default)."""
    name = os.environ.get("FASTVAE_BENCH_SIZE", "full")
    if name not in ("smoke", "quick", "full"):
        raise ValueError(f"FASTVAE_BENCH_SIZE must be smoke, quick or full, got {name!r}")
    return name


def dtypes(dev: torch.device) -> list[torch.dtype]:
    """fp32 everywhere, bf16 too on CUDA (FASTVAE_BENCH_DTYPES=float32 to restrict)."""
    names = os.environ.get("FASTVAE_BENCH_DTYPES", "float32,bfloat16" if dev.type == "cuda" else "float32")
    return [getattr(torch, n.strip()) for n in names.split(",") if n.strip()]


def sizes(op: str, dev: torch.device) -> list[tuple[int, ...]]:
    """Shapes per op, from the reference model to large ones.

    loss (B, D, L), reparam (B, L), decode (N, L, H, D). D=12288 is a 64x64x3 image; on CPU its
    batch is cut to 4096 rows (65536 x 12288 fp32 is 3.2 GB per tensor).
    """
    p = preset()
    wide = 65536 if dev.type == "cuda" else 4096
    table = {
        "smoke": {"loss": [(64, 96, 8)], "reparam": [(64, 8)], "decode": [(64, 8, 32, 96)]},
        "quick": {"loss": [(128, 784, 20), (16384, 784, 20)], "reparam": [(128, 20), (65536, 256)],
                  "decode": [(128, 20, 400, 784), (16384, 20, 400, 784)]},
        "full": {"loss": [(128, 784, 20), (4096, 784, 20), (65536, 784, 20), (wide, 12288, 256)],
                 "reparam": [(128, 20), (65536, 20), (65536, 256)],
                 "decode": [(128, 20, 400, 784), (65536, 20, 400, 784), (wide, 256, 1024, 12288)]},
    }
    return table[p][op]


def bytes_moved(op: str, shape: tuple[int, ...], dtype: torch.dtype, backward: bool) -> int:
    """The bytes an ideal implementation must read and write (GB/s = this / time).

    loss (B, D, L): forward reads logits and x (B*D each) and mu, logvar (B*L each); backward
      adds writing grad_logits (B*D) and grad_mu, grad_logvar (B*L each).
    reparam (B, L): forward reads mu, logvar and writes z (B*L each) and the float32 KL rows (B);
      backward reads grad_z, mu, logvar, z and writes grad_mu, grad_logvar (B*L each) and
      reads grad_kl (B, float32).
    decode (N, L, H, D): reads z (N*L) and the weights ((L+1)*H + (H+1)*D), writes the output
      (N*D); hidden activations could stay on chip and are not counted.
    """
    s = torch.empty((), dtype=dtype).element_size()
    if op == "loss":
        b, d, lat = shape
        return s * ((2 * b * d + 2 * b * lat) + ((b * d + 2 * b * lat) if backward else 0))
    if op == "reparam":
        b, lat = shape
        return s * 3 * b * lat + 4 * b + ((s * 6 * b * lat + 4 * b) if backward else 0)
    if op == "decode":
        n, lat, h, d = shape
        return s * (n * lat + (lat + 1) * h + (h + 1) * d + n * d)
    raise ValueError(f"unknown op {op!r}")


def backend_status(op: str, backend: str, dev: torch.device) -> str | None:
    """None if fastvae's `backend` can run `op` on `dev` here, else why not (the skip reason)."""
    if backend == "triton" and dev.type == "cpu" and os.environ.get("FASTVAE_BENCH_TRITON") != "1":
        return "triton on CPU is its interpreter, not a speed path (FASTVAE_BENCH_TRITON=1 to include it)"
    why = _supports(backend, dev.type)
    if why is not None:
        return why
    status = fastvae.backends()[op]["backends"][backend]
    return None if status == "available" else status


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mem_mb(fn: Callable[[], object], dev: torch.device) -> float | None:
    """Extra memory at the peak of one call of `fn` (see the module docstring); None if unmeasurable."""
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / MB
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _rss_kb("VmHWM") - before) / 1024
