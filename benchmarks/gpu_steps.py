"""The measurements of ``python -m benchmarks.gpu_check``, one function per step, each run in its own
child process (``--child NAME``) so that a crash, a hang or a CUDA error in one step cannot take the
others with it, and a time limit can kill it.

A step reports through `Ctx`: JSON lines in <work>/<step>.jsonl, written as it goes (records,
skips, details, checks), so that a step killed at its time limit still leaves what it measured.
With ``dry`` the same code runs at tiny sizes on the CPU, skipping what needs CUDA with the reason.

Public fastvae API used (other layers own it): fastvae.functional's ops with backend=...,
fastvae.value_checks, fastvae.backends(), fastvae.Trainer/TrainConfig/VAE, fastvae.data.load,
fastvae._extension.library() (builds or loads the C++/CUDA extension). Two private attributes
are read, because the graph engine has no public handle: ``Trainer._graph`` (a
``fastvae.graphs.GraphStep``: ``.graph``, ``.failed``, ``.step(rows)``), each guarded with a
clear "not measured" when absent.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from .common import sync
from .reference_run import load_images

ROOT = Path(__file__).resolve().parent.parent
KERNEL_BUDGET = 80  # kernels per captured training step (the backend contract aims at ~65)


class Ctx:
    """What a step child knows (device, sizes, deadline) and how it reports (JSON lines)."""

    def __init__(self, name: str, work: Path, device: str, dry: bool, data_dir: str | None, deadline: float) -> None:
        self.name, self.work, self.dry, self.data_dir, self.deadline = name, work, dry, data_dir, deadline
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self._file = open(work / f"{name}.jsonl", "a", buffering=1)

    def emit(self, kind: str, **payload: Any) -> None:
        self._file.write(json.dumps({"t": kind, **payload}, default=str) + "\n")
        self._file.flush()

    def detail(self, key: str, value: Any) -> None:
        self.emit("detail", key=key, value=value)

    def check(self, name: str, ok: bool | None, value: Any = None, note: str = "") -> None:
        """A pass/fail fact of this step (ok None: not judged, e.g. in a dry run)."""
        self.emit("check", name=name, ok=ok, value=value, note=note)
        print(f"[{self.name}] {name}: {'-' if ok is None else 'ok' if ok else 'FAILED'} {value if value is not None else ''} {note}", flush=True)

    def record(self, rec: dict) -> None:
        self.emit("record", record=rec)

    def skip(self, rec: dict) -> None:
        self.emit("skip", record=rec)
        print(f"[{self.name}] skipped {rec.get('name', '')} {rec.get('backend', '')}: {rec['reason']}", flush=True)

    def status(self, status: str, reason: str) -> None:
        """An explicit status for the whole step (e.g. skipped: needs CUDA)."""
        self.emit("status", status=status, reason=reason)

    def left(self) -> float:
        return self.deadline - time.time()


def read_lines(path: Path) -> list[dict]:
    """A step's JSON lines (what `Ctx.emit` wrote); a line cut off by a kill is dropped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def time_calls(fn: Callable[[], object], dev: torch.device, reps: int) -> dict:
    """Median/min/mean ms of `reps` calls after warm-up (the first call's seconds reported apart as
    "warmup_s"): CUDA events around each call on a GPU, the host clock with a sync on the CPU."""
    t0 = time.perf_counter()
    fn()
    sync(dev)
    warm = time.perf_counter() - t0
    fn()
    fn()
    sync(dev)
    times = []
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(dev)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times), "rounds": reps,
            "warmup_s": warm, "timer": "cuda-events" if dev.type == "cuda" else "perf_counter"}


def copy_gbps(dev: torch.device, nbytes: int) -> float:
    """Device copy bandwidth: dst.copy_(src) of `nbytes`, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    stats = time_calls(lambda: dst.copy_(src), dev, reps=10)
    return 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9


def _backends_module():
    return importlib.import_module("fastvae.backends")  # fastvae.backends the attribute is the report function


def _tool(name: str) -> str | None:
    """An executable on PATH or in the CUDA toolkit torch would build with."""
    found = shutil.which(name)
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    candidate = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / name
    return str(candidate) if candidate.exists() else None


def _run_text(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- 1. environment ---------------------------------------------------------------------------

def environment(ctx: Ctx) -> None:
    """Versions, the GPU, the tools, the copy bandwidth, which backends load (cpp/cuda: see extension-build)."""
    import fastvae

    from . import run

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ctx.detail("versions", {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "triton": triton_version, "fastvae": fastvae.__version__, "git_commit": run.git_commit()})
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.dev)
        ctx.detail("gpu", {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                           "memory_gib": round(p.total_memory / 2**30, 1),
                           "driver": _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])})
    nvcc = _tool("nvcc")
    nvcc_version = (_run_text([nvcc, "--version"]) or "").splitlines()[-1:] if nvcc else None
    ctx.detail("tools", {"nvcc": nvcc, "nvcc_version": nvcc_version, "compute-sanitizer": _tool("compute-sanitizer")})
    try:
        images = load_images(None, ctx.data_dir)
        ctx.check("Fashion-MNIST training images", True, f"{len(images)} from {ctx.data_dir or 'a standard place'}")
    except FileNotFoundError as exc:
        ctx.check("Fashion-MNIST training images", False, note=str(exc)[:1000])
    backends = _backends_module()
    status = {op: {b: "available" if b == "torch" or backends.load(op, b) is not None else backends._errors.get((op, b), "not implemented")
                   for b in ("torch", "triton")} for op in ("loss", "reparam", "decode")}
    ctx.detail("backends", status)
    if ctx.cuda:
        ctx.check("triton backend loads", all(s["triton"] == "available" for s in status.values()), note=json.dumps(status))


# ---- background: the C++/CUDA extension -------------------------------------------------------

def extension_build(ctx: Ctx) -> None:
    """Load the C++/CUDA extension, JIT-building it against the installed torch when needed."""
    import fastvae
    from fastvae import _extension

    t0 = time.perf_counter()
    try:
        lib = _extension.library()
        why = None if getattr(lib, "with_cuda", False) or not ctx.cuda else "the extension was built without its CUDA kernels"
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        why = f"{type(exc).__name__}: {exc}"[-2000:]
    seconds = time.perf_counter() - t0
    ctx.check("extension builds and loads" + (" with CUDA kernels" if ctx.cuda else ""), why is None, f"{seconds:.1f} s", note=why or "")
    ctx.detail("result", {"ok": why is None, "reason": why, "seconds": seconds})
    if why is None:
        ctx.detail("backends", fastvae.backends())


def wait_for_build(ctx: Ctx) -> str | None:
    """None once the background extension build has succeeded; else why the C++/CUDA backends are out."""
    while ctx.left() > 0:
        lines = read_lines(ctx.work / "extension-build.jsonl")
        result = next((line["value"] for line in lines if line["t"] == "detail" and line["key"] == "result"), None)
        if result is not None:
            return None if result["ok"] else f"the extension did not build: {result['reason'][:300]}"
        if (ctx.work / "extension-build.done").exists():
            return "the extension build ended without a result (killed at its time limit? see the log)"
        time.sleep(1)
    return "the extension build did not finish in time"


# ---- background: warm the compile caches ------------------------------------------------------

def warm_up(ctx: Ctx) -> None:
    """Compile what the timed steps run (Triton kernels, torch.compile graphs: both cached on disk),
    so that compile time stays out of their budgets; each item's seconds are reported."""
    from . import reference_run

    times: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], object]) -> None:
        if ctx.left() < 5:
            return
        t0 = time.perf_counter()
        try:
            fn()
            sync(ctx.dev)
        except Exception as exc:  # noqa: BLE001 - a warm-up failure is reported, the step that needs it fails on its own
            print(f"warm-up {label} failed: {type(exc).__name__}: {exc}", flush=True)
        times[label] = round(time.perf_counter() - t0, 2)
        ctx.detail("seconds", times)

    if ctx.cuda:  # the slowest compiles first; nothing here loads the C++/CUDA extension, which is still building
        timed("reference compile-ro", lambda: reference_run.run("compile-ro", epochs=1, samples=128 + 96, device="cuda", data_dir=ctx.data_dir))
        timed("reference fastvae", lambda: reference_run.run("fastvae", epochs=1, samples=128 * 6 + 96, device="cuda", data_dir=ctx.data_dir))
        for case in bandwidth_cases(ctx):
            timed(f"{_case_label(case)} compile", lambda c=case: _bandwidth_fn(ctx, c, "compile", check=False)[0]())
    for case in bandwidth_cases(ctx):
        for impl in ["triton", "triton-nochecks"] if ctx.cuda else ["cpp", "cpp-nochecks"]:
            timed(f"{_case_label(case)} {impl}", lambda c=case, i=impl: _bandwidth_fn(ctx, c, i, check=False)[0]())
    ctx.check("warm-up", True, f"{sum(times.values()):.1f} s")


# ---- 2. correctness ---------------------------------------------------------------------------

GPU_TEST_FILES = ("tests/test_triton_gpu.py", "tests/test_graphs.py")


def junit_summary(path: Path) -> dict:
    """Counts, failing tests and skip reasons from a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skips = [], Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skip = case.find("skipped")
        if skip is not None:
            skips[(skip.get("message") or "")[:200]] += 1
    out["failed"] = failed[:30]
    out["skip_reasons"] = dict(skips)
    return out


def _pytest(ctx: Ctx, label: str, args: list[str], cap: float) -> None:
    timeout = min(cap, ctx.left() - 5)
    if timeout < 10:
        ctx.check(label, None, note="not run: out of time")
        return
    xml = ctx.work / f"junit-{label.replace(' ', '-')}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    print("$", " ".join(cmd), flush=True)
    try:
        code = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    summary = junit_summary(xml) if xml.exists() else {}
    ctx.detail(label, {"exit": code, **summary})
    ok = code in (0, 5) and not summary.get("failures") and not summary.get("errors")  # 5: nothing selected
    ctx.check(label, ok, f"{summary.get('tests', 0)} tests, {summary.get('failures', 0)} failed, {summary.get('errors', 0)} errors, "
                         f"{summary.get('skipped', 0)} skipped", note="" if ok else f"exit {code}; failed: {summary.get('failed')}")


def correctness(ctx: Ctx) -> None:
    """The GPU tests in strict mode, the graph-captured vs eager loss curve, compute-sanitizer memcheck,
    the GPU cases of the other tests (most telling first)."""
    extra = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*cuda*.py"))]
    files = [*GPU_TEST_FILES, *extra]
    _pytest(ctx, "GPU tests", files, cap=110)
    if ctx.cuda:
        loss_curve(ctx)
        memcheck(ctx, _tool("compute-sanitizer"))
    else:
        ctx.check("graph vs eager loss curve", None, note="needs CUDA")
        ctx.check("compute-sanitizer memcheck", None, note="needs CUDA")
        memcheck(ctx, tool=None)  # its target alone, on the C++ CPU ops: keeps it working
    own = [ROOT / "tests" / "test_gpu_check.py", ROOT / "tests" / "test_bench_smoke.py"]  # "-k gpu" matches module names too
    ignore = [f"--ignore={f}" for f in files] + [f"--ignore={p.relative_to(ROOT)}" for p in [*sorted((ROOT / "tests").glob("test_triton_*.py")), *own]]
    _pytest(ctx, "GPU cases of the op tests", ["tests", "-k", "cuda or gpu", *ignore], cap=60)


def _train(ctx: Ctx, images: torch.Tensor, graph: bool, epochs: int, log_every: int) -> tuple[list[dict], list[float], Any]:
    import fastvae

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        cfg = fastvae.TrainConfig(epochs=epochs, batch_size=128, progress=False, seed=0, cuda_graph=graph, log_every=log_every)
        trainer = fastvae.Trainer(fastvae.VAE(), images, cfg, device=ctx.dev, out_dir=d)
        history = trainer.fit()
        windows = [r["loss"] for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    return history, windows, trainer


def loss_curve(ctx: Ctx) -> None:
    """The same training eagerly and as graph replays: per-window and per-epoch losses agree."""
    images = load_images(20000, ctx.data_dir)
    (h_graph, w_graph, trainer), (h_eager, w_eager, _) = (_train(ctx, images, g, 3, 20) for g in (True, False))
    captured = getattr(getattr(trainer, "_graph", None), "graph", None) is not None
    window_diff = max(abs(a - b) / abs(b) for a, b in zip(w_graph, w_eager))
    epoch_diff = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(h_graph, h_eager))
    ctx.detail("loss curve", {"graph": w_graph, "eager": w_eager, "graph_epochs": [h["loss"] for h in h_graph],
                              "eager_epochs": [h["loss"] for h in h_eager], "captured": captured})
    ctx.check("graph vs eager loss curve", captured and epoch_diff < 0.02,
              f"epoch losses within {epoch_diff:.2%}, windows of 20 steps within {window_diff:.2%}",
              note="" if captured else "the training step was not captured as a graph")


def memcheck(ctx: Ctx, tool: str | None) -> None:
    """compute-sanitizer memcheck over the CUDA ops at odd shapes (a separate target process).
    Without CUDA (tool None) the target alone runs the same calls on the C++ CPU ops."""
    name = "compute-sanitizer memcheck" if ctx.cuda else "memcheck target on the CPU ops"
    if ctx.cuda and tool is None:
        ctx.check(name, None, note="compute-sanitizer is not on this machine")
        return
    why = wait_for_build(ctx)
    if why:
        ctx.check(name, None, note=f"not run: {why}")
        return
    timeout = min(90, ctx.left() - 5)
    if timeout < 20:
        ctx.check(name, None, note="not run: out of time")
        return
    sanitizer = [tool, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20"] if tool else []
    cmd = [*sanitizer, sys.executable, "-m", "benchmarks.gpu_check", "--child", "memcheck-target", "--work", str(ctx.work),
           "--device", ctx.dev.type, "--deadline", str(time.time() + timeout)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        text, code = proc.stdout.decode(errors="replace"), proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = (exc.stdout or b"").decode(errors="replace"), "timeout"
    print(text[-6000:], flush=True)
    found = re.search(r"ERROR SUMMARY: (\d+) error", text)
    done = re.search(r"memcheck target done: (\d+) calls", text)
    errors = int(found.group(1)) if found else None
    ctx.detail("memcheck", {"exit": code, "errors": errors, "target_finished": bool(done), "tail": text[-3000:]})
    if not tool:
        ctx.check(name, bool(done) and code == 0, done and f"{done.group(1)} calls", note="" if done else f"exit {code}; see the log")
    elif errors is None or not done:
        ctx.check(name, None if errors is None else False, note=f"the tool did not complete (exit {code}); see the log")
    else:
        ctx.check(name, errors == 0 and code == 0, f"{errors} errors in {done.group(1)} calls")


def memcheck_target(ctx: Ctx) -> None:
    """Every CUDA op (the C++ CPU ones without CUDA), forward and backward, at odd shapes, float32 and
    float64 (run under memcheck)."""
    from fastvae import functional as fv
    from fastvae.model import MLPDecoder

    calls = 0
    dev = ctx.dev
    backend = "cuda" if ctx.cuda else "cpp"
    for b, d, lat in ((1, 1, 1), (7, 13, 3), (1031, 785, 33)):
        for dtype in (torch.float32, torch.float64):
            g = dict(device=dev, dtype=dtype)
            for x in (torch.rand(b, d, **g), torch.randint(0, 256, (b, d), dtype=torch.uint8, device=dev)):
                for loss in (fv.bce_kl_loss, fv.mse_kl_loss):
                    leaves = [(torch.randn(b, d, **g) * 3).requires_grad_(), torch.randn(b, lat, **g).requires_grad_(), torch.randn(b, lat, **g).requires_grad_()]
                    for reduction in ("sum", "none"):
                        out = loss(leaves[0], x, leaves[1], leaves[2], beta=0.5, reduction=reduction, backend=backend)
                        out.sum().backward()
                        calls += 1
            for k in (None, 3):
                mu, logvar = torch.randn(b, lat, **g).requires_grad_(), torch.randn(b, lat, **g).requires_grad_()
                z, kl = fv.reparameterize_kl(mu, logvar, k=k, backend=backend)
                (z.sin().sum() + kl.sum()).backward()
                calls += 1
            decoder = MLPDecoder(lat, (17,), d).to(dev, dtype)
            for out_dtype in (torch.float32, torch.uint8):
                fv.decode_latents(decoder, torch.randn(b, lat, **g), out_dtype=out_dtype, backend=backend)
                calls += 1
    sync(dev)
    print(f"memcheck target done: {calls} calls", flush=True)


# ---- 3. graph engine --------------------------------------------------------------------------

def _kernels(fn: Callable[[], object], reps: int) -> tuple[float, float, Counter]:
    """(kernels per call, memcpy/memset per call, kernel names) seen by torch.profiler over `reps` calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    copies = sum(n for name, n in names.items() if name.startswith(("Memcpy", "Memset")))
    kernels = Counter({name: n for name, n in names.items() if not name.startswith(("Memcpy", "Memset"))})
    return sum(kernels.values()) / reps, copies / reps, kernels


def _syncs(fn: Callable[[], object], reps: int) -> int:
    """Host syncs torch reports (set_sync_debug_mode) over `reps` calls of `fn`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(reps):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def _debug_graphs():
    """Every torch.cuda.CUDAGraph made meanwhile keeps its graph for debug_dump (a node count that
    does not depend on the profiler seeing kernels inside graph replays)."""
    real = torch.cuda.CUDAGraph

    def debug_graph(*args: Any, **kwargs: Any):
        graph = real(*args, **kwargs)
        graph.enable_debug_mode()
        return graph

    torch.cuda.CUDAGraph = debug_graph
    try:
        yield
    finally:
        torch.cuda.CUDAGraph = real


def _graph_nodes(graph: Any, work: Path) -> dict:
    """Node types of a captured graph, read from its debug_dump (Graphviz text); {} if unavailable."""
    path = work / "training-step.dot"
    try:
        graph.debug_dump(str(path))
        text = path.read_text(errors="replace")
    except Exception as exc:  # noqa: BLE001 - a second opinion only
        return {"error": f"{type(exc).__name__}: {exc}"}
    kinds = Counter(m.group(1).upper() for m in re.finditer(r'label="\{?\s*([A-Za-z_]+)', text))
    return dict(kinds) or {"unparsed": text[:1500]}


def graph_engine(ctx: Ctx) -> None:
    """Kernels and host syncs per captured training step; every replay draws new eps."""
    import fastvae

    if not ctx.cuda:
        ctx.status("skipped", "needs CUDA (graph capture)")
        return
    images = load_images(128 * 8, ctx.data_dir)
    cfg = fastvae.TrainConfig(epochs=2, batch_size=128, progress=False, seed=0, log_every=10**9)
    trainer = fastvae.Trainer(fastvae.VAE(), images, cfg, device=ctx.dev)
    with warnings.catch_warnings(record=True) as caught, _debug_graphs():
        warnings.simplefilter("always")
        fit_syncs = _syncs(trainer.fit, 1)
    ctx.detail("warnings during fit", [str(w.message)[:300] for w in caught if "synchroniz" not in str(w.message)])
    steps = trainer.step
    ctx.check("host syncs per step over a whole fit (logging included)", None, f"{fit_syncs / steps:.2f} ({fit_syncs} in {steps} steps)")
    engine = getattr(trainer, "_graph", None)
    if engine is None or getattr(engine, "graph", None) is None or getattr(engine, "failed", False):
        from fastvae import graphs

        ctx.check("training step captured as a CUDA graph", False, note=f"not captured: {graphs.unsupported(trainer) or 'capture failed (see warnings)'}")
    else:
        rows = torch.arange(128, device=ctx.dev)
        per_step, copies, names = _kernels(lambda: engine.step(rows), reps=10)
        nodes = _graph_nodes(engine.graph, ctx.work)
        ctx.detail("kernels in a replay", dict(names.most_common()))
        ctx.detail("kernels per step", per_step)
        ctx.detail("graph nodes (debug_dump)", nodes)
        if per_step:  # the profiler saw the kernels inside the replays
            ctx.check("kernels per captured training step", per_step <= KERNEL_BUDGET, f"{per_step:.0f} (+ {copies:.0f} copies)",
                      note=f"torch.profiler; budget {KERNEL_BUDGET}, contract ~65; graph nodes {nodes}")
        elif nodes.get("KERNEL"):
            ctx.check("kernels per captured training step", nodes["KERNEL"] <= KERNEL_BUDGET, str(nodes["KERNEL"]),
                      note=f"kernel nodes of the graph (the profiler saw none inside replays); budget {KERNEL_BUDGET}, contract ~65")
        else:
            ctx.check("kernels per captured training step", None, note=f"neither the profiler nor debug_dump showed the kernels: {nodes}")
        syncs = _syncs(lambda: engine.step(rows), reps=20) / 20
        ctx.detail("syncs per step", syncs)
        ctx.check("host syncs per replayed step", syncs == 0, f"{syncs:g}")
    check = getattr(fastvae, "check_values", None)
    if check is not None:
        try:
            check(ctx.dev)
            ctx.check("fastvae.check_values after training", True, "no flags")
        except ValueError as exc:
            ctx.check("fastvae.check_values after training", False, note=str(exc))
    new_eps(ctx)


def new_eps(ctx: Ctx) -> None:
    """reparameterize captured in a CUDA graph: two replays draw different eps, in a few kernels."""
    from fastvae.ops.reparam import reparameterize

    report = {}
    for backend in ("auto", "triton", "cuda"):
        if backend == "cuda" and (why := wait_for_build(ctx)):
            ctx.check(f"new eps per replay [{backend}]", None, note=why)
            continue
        if backend != "auto" and (status := fastvae_backend_status("reparam", backend)) != "available":
            ctx.check(f"new eps per replay [{backend}]", None, note=status)
            continue
        mu, logvar = torch.randn(64, 20, device=ctx.dev), torch.randn(64, 20, device=ctx.dev)
        reparameterize(mu, logvar, backend=backend)  # compile / load outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            z = reparameterize(mu, logvar, backend=backend)
        graph.replay()
        first = z.clone()
        per_replay, _, names = _kernels(graph.replay, reps=3)
        differs = not torch.equal(first, z) and bool(torch.isfinite(z).all())
        report[backend] = {"differs": differs, "kernels_per_replay": per_replay, "kernels": dict(names)}
        ctx.check(f"new eps per replay [{backend}]", differs, f"{per_replay:.0f} kernels per replay" if per_replay else None)
    ctx.detail("captured reparameterize", report)


def fastvae_backend_status(op: str, backend: str) -> str:
    import fastvae

    return fastvae.backends()[op]["backends"][backend]


# ---- 4. bandwidth -----------------------------------------------------------------------------

def bandwidth_cases(ctx: Ctx) -> list[tuple]:
    """(op, backward, shape, dtype, x_dtype), the most telling first."""
    b = 65536 if ctx.cuda else 512
    loss, rep = (b, 784, 20), (b, 256 if ctx.cuda else 32)
    f32, u8 = torch.float32, torch.uint8
    return [("loss", True, loss, f32, f32), ("loss", True, loss, f32, u8), ("reparam", True, rep, f32, None),
            ("loss", False, loss, f32, f32), ("loss", False, loss, f32, u8), ("reparam", False, rep, f32, None)]


def _case_label(case: tuple) -> str:
    op, backward, shape, dtype, x_dtype = case
    x = f" x {str(x_dtype).removeprefix('torch.')}" if x_dtype is not None else ""
    return f"{op}.{'fwd_bwd' if backward else 'fwd'} {'x'.join(map(str, shape))}{x}"


def _bandwidth_fn(ctx: Ctx, case: tuple, impl: str, check: bool = True) -> tuple[Callable[[], object] | None, str | None]:
    """(one call, None) or (None, why it cannot run here); `check=False` skips that question (it loads
    every backend, so it would wait for the extension build)."""
    from . import common

    op, backward, shape, dtype, x_dtype = case
    torch.manual_seed(0)
    leaves, args = common.inputs(op, shape, dtype, ctx.dev, backward, x_dtype)
    why = common.unsupported(op, impl, args, ctx.dev) if check else None
    return (None, why) if why else (common.callable_for(op, impl, backward, leaves, args), None)


def bandwidth(ctx: Ctx) -> None:
    """Each fused backend (default path and checks off) beside eager-best, eager-seed and
    torch.compile, at sizes that fill the GPU, as a fraction of the copy bandwidth."""
    from . import common

    nbytes = (1 << 30) if ctx.cuda else (64 << 20)
    copy = copy_gbps(ctx.dev, nbytes)  # measured here, where no background build competes for memory bandwidth
    ctx.detail("copy_gbps", copy)
    ctx.check(f"copy bandwidth ({nbytes >> 20} MiB copy_)", True, f"{copy:.0f} GB/s")
    fused = ["triton", "cuda", "cpp"]  # what cannot run here is skipped with its reason
    rounds = [fused + [b + common.NOCHECKS for b in fused] + ["eager-best", "eager-seed"], ["compile"]]  # compile last: it compiles first
    for impls in rounds:
        for case in bandwidth_cases(ctx):
            op, backward, shape, dtype, x_dtype = case
            for impl in impls:
                if impl == "eager-seed" and op != "loss":
                    continue
                rec = common.case_record(op, backward, shape, dtype, impl, ctx.dev, x_dtype)
                if impl == "compile" and not ctx.cuda:
                    ctx.skip({**rec, "reason": "dry run: torch.compile left out (its cold compile takes ~15 s per graph on a CPU)"})
                    continue
                if ctx.left() < (40 if impl == "compile" else 8):
                    ctx.skip({**rec, "reason": "out of time"})
                    continue
                fn, why = _bandwidth_fn(ctx, case, impl)
                if why:
                    ctx.skip({**rec, "reason": why})
                    continue
                stats = time_calls(fn, ctx.dev, reps=20 if ctx.cuda else 5)
                nbytes = common.bytes_moved(op, shape, dtype, backward, x_dtype)
                gbps = nbytes / (stats["median_ms"] * 1e-3) / 1e9
                ctx.record({**rec, "bytes": nbytes, **stats, "gbps": gbps, "copy_fraction": gbps / copy, "peak_mem_mb": None})
                print(f"[bandwidth] {_case_label(case)} {impl}: {stats['median_ms']:.3f} ms, {gbps:.0f} GB/s = {gbps / copy:.0%} of copy", flush=True)
                del fn
                if ctx.cuda:
                    torch.cuda.empty_cache()


# ---- 5. the reference run ---------------------------------------------------------------------

def reference(ctx: Ctx) -> None:
    """10 epochs, batch 128, 60,000 images: the fastvae Trainer, eager on device-resident data,
    torch.compile reduce-overhead, the seed-style DataLoader loop (fastest first). The seed loop
    runs one epoch instead (scaled by 10, marked) when the time left cannot hold ten."""
    from . import reference_run

    epochs, samples = (10, None) if ctx.cuda else (1, 512)
    seconds: dict[str, float] = {}
    for variant in ("fastvae", "eager-device", "compile-ro", "seed-loop"):
        base = {"name": "reference_run", "backend": variant, "shape": [samples or 60000, 784, 20], "dtype": "float32", "device": ctx.dev.type}
        if variant == "compile-ro" and not ctx.cuda:
            ctx.skip({**base, "reason": "dry run: torch.compile left out"})
            continue
        n_epochs = epochs
        if variant == "seed-loop" and "eager-device" in seconds and ctx.left() < 4 * seconds["eager-device"] + 20 and epochs > 1:
            n_epochs = 1  # the seed loop is several times slower than eager on the device
        if ctx.left() < 10:
            ctx.skip({**base, "reason": "out of time"})
            continue
        rec = reference_run.run(variant, epochs=n_epochs, samples=samples, device=ctx.dev.type, data_dir=ctx.data_dir)
        if n_epochs != epochs:
            rec["notes"] = f"{n_epochs} epoch of {epochs} (time); seconds_{epochs}_epochs is scaled"
            rec[f"seconds_{epochs}_epochs"] = rec["seconds"] * epochs / n_epochs
        seconds[variant] = rec["seconds"]
        ctx.record(rec)
        print(f"[reference-run] {variant}: {rec['seconds']:.2f} s, final loss {rec['final_loss']:.2f}", flush=True)


# ---- 6. the rest of the suite -----------------------------------------------------------------

def suite(ctx: Ctx) -> None:
    """benchmarks/test_ops.py (full sizes, shorter rounds) in chunks, most telling first, then the
    drop-in part, then the compile baselines; each chunk's results are kept as soon as it ends."""
    from . import run

    dev = ctx.dev
    chunks = ["loss.fwd_bwd and not compile", "reparam.fwd_bwd and not compile", "loss.fwd- and not compile",
              "reparam.fwd- and not compile", "decode and not compile", "dropin", "compile"]
    if ctx.dry:
        chunks = ["loss.fwd_bwd and not compile", "dropin"]
    preset = "full" if ctx.cuda else "smoke"
    for chunk in chunks:
        if ctx.left() < 15:
            ctx.skip({"part": chunk, "reason": "out of time"})
            continue
        file = run.DROPIN if chunk == "dropin" else ROOT / "benchmarks" / "test_ops.py"
        if not file.exists():
            ctx.skip({"part": chunk, "reason": f"benchmarks/{file.name} does not exist"})
            continue
        extra = [] if chunk == "dropin" else ["-k", chunk]
        try:
            benches, skips = run.pytest_bench(file, preset, dev, compile_=chunk == "compile", peak="inline" if ctx.cuda else "skip",
                                              extra=extra, timeout=ctx.left() - 5, timing="quick" if ctx.cuda else "smoke")
            ok = True
        except run.BenchFailed as exc:
            (benches, skips), ok = exc.partial, False
            print(f"[suite] {exc}", flush=True)
        for rec in run.to_records(benches):
            ctx.record(rec)
        for s in skips:
            ctx.skip(s)
        ctx.check(f"suite part '{chunk}'", ok, f"{len(benches)} benchmarks, {len(skips)} skipped")


STEPS: dict[str, Callable[[Ctx], None]] = {
    "environment": environment, "extension-build": extension_build, "warm-up": warm_up, "correctness": correctness,
    "graph-engine": graph_engine, "bandwidth": bandwidth, "reference-run": reference, "suite": suite,
    "memcheck-target": memcheck_target,
}


def _watchdog(deadline: float) -> None:
    """End this step (and what it started) once it is well past its deadline or gpu_check itself is
    gone (killed by a lease's time-out): a step in its own session would otherwise run on."""
    parent = os.getppid()

    def watch() -> None:
        while time.time() < deadline + 20 and os.getppid() == parent:
            time.sleep(2)
        print("[gpu_check] step stopped by its watchdog (past its deadline, or gpu_check is gone)", flush=True)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(124)

    threading.Thread(target=watch, daemon=True).start()


def child_main(name: str, work: str, device: str, dry: bool, data_dir: str | None, deadline: float) -> int:
    """Run one step in this process (``python -m benchmarks.gpu_check --child NAME``)."""
    _watchdog(deadline)
    STEPS[name](Ctx(name, Path(work), device, dry, data_dir, deadline))
    return 0
