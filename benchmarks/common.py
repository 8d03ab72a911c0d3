"""What the op benchmarks measure: sizes, implementations, the bytes each op must move, peak memory.

Implementations ("impl") of each op, timed side by side:
- "eager-best": the best eager formulation a PyTorch user writes (loss: BCE with logits,
  reduction="sum", plus the KL term; reparam: torch.randn_like; decode: the decoder then sigmoid);
- "eager-seed": the seed project's formulation (loss: sigmoid then F.binary_cross_entropy);
  for reparam and decode the seed wrote what eager-best is, so there is no second baseline;
- "compile": torch.compile of eager-best;
- each fastvae backend (torch, triton, cpp, cuda) on its default path, called exactly as a user
  calls ``fastvae.functional.bce_kl_loss(..., backend=name)`` (value checks on), and the same
  inside ``with fastvae.value_checks(False):`` as "<backend>-nochecks".

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

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastvae
from fastvae import functional as fv
from fastvae.backends import BACKENDS, BackendUnavailable, _supports, pick
from fastvae.model import MLPDecoder

MB = 1 << 20
OPS = ("loss", "reparam", "decode")
CHECKED_OPS = ("loss", "reparam")  # ops with data-dependent value checks (a "-nochecks" variant)
NOCHECKS = "-nochecks"


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


def impls(op: str) -> list[str]:
    """What is timed for `op`: the baselines, then every fastvae backend on its default path and,
    for ops with value checks, with them off."""
    baselines = ["eager-best", "eager-seed", "compile"] if op == "loss" else ["eager-best", "compile"]
    fused = list(BACKENDS) + ([b + NOCHECKS for b in BACKENDS] if op in CHECKED_OPS else [])
    return baselines + fused


def split_impl(impl: str) -> tuple[str, bool]:
    """("cpp-nochecks") -> ("cpp", False): the fastvae backend and whether value checks are on."""
    return (impl[: -len(NOCHECKS)], False) if impl.endswith(NOCHECKS) else (impl, True)


def is_fastvae(impl: str) -> bool:
    return split_impl(impl)[0] in BACKENDS


def case_record(op: str, backward: bool, shape: tuple[int, ...], dtype: torch.dtype, impl: str, dev: torch.device,
                x_dtype: torch.dtype | None = None) -> dict:
    """The fields that name one timed case in a results file (the suite's test_ops and the GPU check's
    bandwidth step write the same ones)."""
    rec = {"name": f"{op}.{'fwd_bwd' if backward else 'fwd'}", "op": op, "pass": "fwd_bwd" if backward else "fwd", "backend": impl,
           "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "device": dev.type}
    if x_dtype is not None:
        rec["x_dtype"] = str(x_dtype).removeprefix("torch.")
    if is_fastvae(impl):
        rec["value_checks"] = split_impl(impl)[1]
    if impl == "compile":
        rec["compiled"] = "eager-best"
    return rec


def bytes_moved(op: str, shape: tuple[int, ...], dtype: torch.dtype, backward: bool, x_dtype: torch.dtype | None = None) -> int:
    """The bytes an ideal implementation must read and write (GB/s = this / time).

    loss (B, D, L): forward reads logits and x (B*D each; x in `x_dtype`, default `dtype`) and mu,
      logvar (B*L each); backward adds writing grad_logits (B*D) and grad_mu, grad_logvar (B*L each).
    reparam (B, L): forward reads mu, logvar and writes z (B*L each) and the float32 KL rows (B);
      backward reads grad_z, mu, logvar, z and writes grad_mu, grad_logvar (B*L each) and
      reads grad_kl (B, float32).
    decode (N, L, H, D): reads z (N*L) and the weights ((L+1)*H + (H+1)*D), writes the output
      (N*D); hidden activations could stay on chip and are not counted.
    """
    s = torch.empty((), dtype=dtype).element_size()
    if op == "loss":
        b, d, lat = shape
        sx = torch.empty((), dtype=x_dtype or dtype).element_size()
        return (s + sx) * b * d + s * 2 * b * lat + (s * (b * d + 2 * b * lat) if backward else 0)
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


# ---- the eager baselines ------------------------------------------------------------------------

def _targets(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What a PyTorch user feeds BCE: float targets as they are, uint8 pixels as x / 255."""
    return x.to(like.dtype) / 255 if x.dtype == torch.uint8 else x


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_best_loss(logits, x, mu, logvar):
    """The best eager formulation: BCE with logits, summed, plus the KL term."""
    return F.binary_cross_entropy_with_logits(logits, _targets(x, logits), reduction="sum") + _kl(mu, logvar)


def eager_seed_loss(logits, x, mu, logvar):
    """The seed's formulation: BCE of the sigmoid output, summed, plus the KL term."""
    return F.binary_cross_entropy(torch.sigmoid(logits), _targets(x, logits), reduction="sum") + _kl(mu, logvar)


def eager_reparam(mu, logvar):
    std = torch.exp(0.5 * logvar)
    z = mu + torch.randn_like(std) * std
    return z, -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def eager_decode(decoder, z):
    with torch.no_grad():
        return torch.sigmoid(decoder(z))


EAGER = {"loss": {"eager-best": eager_best_loss, "eager-seed": eager_seed_loss},
         "reparam": {"eager-best": eager_reparam}, "decode": {"eager-best": eager_decode}}


# ---- one timed case -----------------------------------------------------------------------------

def inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device, backward: bool,
           x_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], tuple]:
    """(leaves whose .grad a backward fills, the op's arguments): fresh random data, never zeros."""
    g = dict(device=dev, dtype=dtype)
    if op == "loss":
        b, d, lat = shape
        logits, mu, logvar = torch.randn(b, d, **g) * 3, torch.randn(b, lat, **g), torch.randn(b, lat, **g) * 0.5
        leaves = [t.requires_grad_(backward) for t in (logits, mu, logvar)]
        x = torch.randint(0, 256, (b, d), dtype=torch.uint8, device=dev) if x_dtype == torch.uint8 else torch.rand(b, d, **g)
        return leaves, (logits, x, mu, logvar)
    if op == "reparam":
        b, lat = shape
        mu, logvar = torch.randn(b, lat, **g).requires_grad_(backward), (torch.randn(b, lat, **g) * 0.5).requires_grad_(backward)
        return [mu, logvar], (mu, logvar)
    n, lat, h, d = shape
    decoder = MLPDecoder(lat, (h,), d).to(dev, dtype)
    return [], (decoder, torch.randn(n, lat, **g))


def unsupported(op: str, impl: str, args: tuple, dev: torch.device) -> str | None:
    """Why `impl` cannot run `op` on these arguments (a backend missing here, or a dtype it lacks,
    as its ``unsupported`` hook says), else None."""
    if not is_fastvae(impl):
        return None
    backend = split_impl(impl)[0]
    why = backend_status(op, backend, dev)
    if why is not None:
        return why
    tensors = {"loss": lambda: args, "reparam": lambda: args, "decode": lambda: (next(args[0].parameters()),)}[op]()
    try:
        pick(op, backend, *tensors)
    except (TypeError, BackendUnavailable) as exc:
        return str(exc)
    return None


def callable_for(op: str, impl: str, backward: bool, leaves: list[torch.Tensor], args: tuple) -> Callable[[], object]:
    """One call of `impl` on `args` (forward, or forward and backward into `leaves`' .grad)."""
    if is_fastvae(impl):
        backend, checked = split_impl(impl)
        call = {"loss": lambda *a: fv.bce_kl_loss(*a, backend=backend),
                "reparam": lambda *a: fv.reparameterize_kl(*a, backend=backend),
                "decode": lambda dec, z: fv.decode_latents(dec, z, backend=backend)}[op]

        def fused(*a):
            with contextlib.nullcontext() if checked else fastvae.value_checks(False):
                return call(*a)
    elif impl == "compile":
        torch._dynamo.reset()  # one compile per case: dynamo stops recompiling (and runs eager) past its per-function cache limit
        fused = torch.compile(EAGER[op]["eager-best"], dynamic=False)
    else:
        fused = EAGER[op][impl]
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
        if grads is None:  # a scalar loss is backpropagated with the implicit 1, as loss.backward() does
            grads = [torch.randn_like(o) if o.dim() else None for o in outs]
        torch.autograd.backward(outs, grads)
    return step


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
