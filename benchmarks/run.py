"""Run the benchmark suite and write a results file, the chart and the performance tables.

    python -m benchmarks.run [--smoke | --quick] [--out FILE] [--parts ops,dropin,reference,floor]
    fastvae bench ...            (the same, from the CLI)

--smoke: tiny sizes, no torch.compile, a 1-epoch reference run on 512 images (CI, < 60 s);
--quick: mid sizes, 1 epoch on 10,000 images; default: the full suite and the 10-epoch run.

Where it writes: a full run without --out is the documented way to publish: it writes
benchmarks/results/<device>-<date>.json, then redraws benchmarks/results/chart.png, the tables of
docs/performance.md and README's headline from every results file there. A --smoke or --quick run
(or any run given --out) touches no committed file: it writes the results file (--out, else a new
temporary folder), and beside it chart.png and <name>.md (the tables of this run). --doc and
--results-dir name a tables file and a results folder to update explicitly.

Parts: "ops" (benchmarks/test_ops.py), "dropin" (benchmarks/test_dropin.py: users' own VAEs per
training step, plain vs fastvae.accelerate vs the engine; skipped with a message where the file
is absent), "reference" (the 10-epoch reference run, benchmarks/reference_run.py), "floor" (the
Trainer's epoch against its GEMM floor, the step's matrix products alone, interleaved round by
round: benchmarks/floor.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import floor, reference_run, report

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("ops", "dropin", "reference", "floor")
DROPIN = ROOT / "benchmarks" / "test_dropin.py"
PYTEST_ARGS = {
    "smoke": ["--benchmark-min-rounds=1", "--benchmark-max-time=0.005", "--benchmark-warmup=off"],
    "quick": ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"],
    "full": ["--benchmark-min-rounds=5", "--benchmark-max-time=1.0"],
}
REFERENCE = {"smoke": (1, 512, ("seed-loop", "eager-device", "fastvae")), "quick": (1, 10000, reference_run.VARIANTS),
             "full": (10, None, reference_run.VARIANTS)}
FLOOR = {"smoke": (1, 512), "quick": (3, 10000), "full": (7, None)}  # (interleaved rounds, training images)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(dev: torch.device) -> str:
    return "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(dev).lower()).strip("-")


def git_commit() -> str:
    """HEAD (with "-dirty" for uncommitted changes to tracked files); FASTVAE_GIT_COMMIT where the
    checkout has no .git (a copy of the working tree sent to a lent GPU machine)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTVAE_GIT_COMMIT", "unknown")


def meta(dev: torch.device, command: list[str]) -> dict:
    """The results file's header: device, versions, the command (argv after `python`), commit, date, load."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": dev.type, "device_name": device_name(dev), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "command": shlex.join(["python", *command]),
            "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_start": os.getloadavg()[0], "cpu_count": os.cpu_count()}


def module_meta(dev: torch.device, module: str, argv: list[str] | None = None, **extra: object) -> dict:
    """``meta`` for ``python -m module argv`` (argv: sys.argv[1:] when None), with `extra` fields added."""
    return meta(dev, ["-m", module, *(argv if argv is not None else sys.argv[1:])]) | extra


def write_results(out: str | Path, header: dict, results: object) -> None:
    """A results file of the standalone benchmarks: {"meta": header, "results": results}, its folder made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": header, "results": results}, indent=1) + "\n")


class BenchFailed(RuntimeError):
    """A pytest-benchmark child failed; `partial` holds what it measured anyway."""

    def __init__(self, message: str, partial: tuple[list[dict], list[dict]]) -> None:
        super().__init__(message)
        self.partial = partial


def pytest_bench(file: Path, preset: str, dev: torch.device, *, compile_: bool = True, peak: str = "skip",
                 extra: list[str] = (), timeout: float | None = None, timing: str | None = None) -> tuple[list[dict], list[dict]]:
    """Run a pytest-benchmark file in a child process; (its benchmark entries, its skips with reasons).

    `preset` sets the sizes, `timing` (default: the same preset) how long each is timed.
    Raises BenchFailed (with the partial results) if a benchmark failed or the child timed out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, skips_file = Path(tmp) / "bench.json", Path(tmp) / "skips.jsonl"
        env = {**os.environ, "FASTVAE_BENCH_SIZE": preset, "FASTVAE_BENCH_DEVICE": dev.type, "FASTVAE_BENCH_SKIPS": str(skips_file),
               "FASTVAE_BENCH_COMPILE": "1" if compile_ else "0", "FASTVAE_BENCH_PEAK": peak}
        if peak == "only":  # freed tensors go back to the OS, so an earlier call cannot hide a peak
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(file), f"--benchmark-json={out}",
               "--benchmark-columns=median,rounds", *PYTEST_ARGS[timing or preset], *extra]
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        benches = json.loads(out.read_text())["benchmarks"] if out.exists() else []
        skips = [json.loads(line) for line in skips_file.read_text().splitlines()] if skips_file.exists() else []
        if code != 0:
            raise BenchFailed(f"{file.name} failed (exit {code}): {shlex.join(cmd)}", (benches, skips))
        return benches, skips


def to_records(benches: list[dict]) -> list[dict]:
    """pytest-benchmark entries -> results records (times in ms; GB/s where the bytes are known)."""
    records = []
    for b in benches:
        info, st = b["extra_info"], b["stats"]
        records.append({"name": f"{info['op']}.{info['pass']}", **info, "median_ms": st["median"] * 1e3, "mean_ms": st["mean"] * 1e3,
                        "min_ms": st["min"] * 1e3, "stddev_ms": st["stddev"] * 1e3, "rounds": st["rounds"],
                        "gbps": info["bytes"] / st["median"] / 1e9 if info.get("bytes") else None})
    return records


def run_ops(preset: str, dev: torch.device, compile_: bool, extra: list[str]) -> tuple[list[dict], list[dict]]:
    """The op benchmarks as (records, skips). On CPU two passes: times with the process's normal
    allocator, then peak memory alone with MALLOC_MMAP_THRESHOLD_ set (which would slow every large
    allocation down with page faults if it were on while timing). On CUDA one pass does both."""
    file = ROOT / "benchmarks" / "test_ops.py"
    if dev.type == "cuda":
        timed, skips = pytest_bench(file, preset, dev, compile_=compile_, peak="inline", extra=extra)
        peaks = {}
    else:
        timed, skips = pytest_bench(file, preset, dev, compile_=compile_, peak="skip", extra=extra)
        only, _ = pytest_bench(file, preset, dev, compile_=compile_, peak="only", extra=extra)
        peaks = {b["name"]: b["extra_info"]["peak_mem_mb"] for b in only}
    for b in timed:
        if b["name"] in peaks:
            b["extra_info"]["peak_mem_mb"] = peaks[b["name"]]
    return to_records(timed), skips


def run_dropin(preset: str, dev: torch.device, extra: list[str]) -> tuple[list[dict], list[dict]] | None:
    """benchmarks/test_dropin.py (per-training-step time of users' own VAEs) as (records, skips);
    None when the file does not exist."""
    if not DROPIN.exists():
        return None
    benches, skips = pytest_bench(DROPIN, preset, dev, peak="skip", extra=extra)
    return to_records(benches), skips


def outputs(args: argparse.Namespace, preset: str, dev: torch.device) -> tuple[Path, bool]:
    """(results file, publish?): a full run without --out publishes into benchmarks/results,
    docs/performance.md and README.md's headline; anything else writes to --out, an explicit --results-dir, or a new temporary folder."""
    name = f"{slug(dev)}-{dt.date.today().isoformat()}.json"
    publish = preset == "full" and args.out is None
    if args.out:
        return Path(args.out), publish
    if publish or args.results_dir:
        return Path(args.results_dir or report.RESULTS) / name, publish
    return Path(tempfile.mkdtemp(prefix="fastvae-bench-")) / name, publish


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes for CI (< 60 s); writes to a temporary folder")
    size.add_argument("--quick", action="store_true", help="mid sizes, 1-epoch reference run on 10,000 images; writes to a temporary folder")
    p.add_argument("--out", default=None, help="results file (default: a full run publishes benchmarks/results/<device>-<date>.json, "
                                               "smoke/quick a new temporary folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {', '.join(PARTS)}")
    p.add_argument("--merge", action="store_true", help="keep the records of an existing --out file that this run does not replace")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--epochs", type=int, default=None, help="reference run epochs (default 10; smoke/quick 1)")
    p.add_argument("--samples", type=int, default=None, help="reference run: first N training images (default all)")
    p.add_argument("--variants", default=None, help=f"reference run variants, comma-separated from {','.join(reference_run.VARIANTS)}")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: the standard places)")
    p.add_argument("--doc", "--readme", dest="doc", default=None,
                   help="rewrite this file's bench block (default: docs/performance.md, and README.md's headline, on a full run "
                        "without --out; --readme is its old name)")
    p.add_argument("--results-dir", default=None, help="folder of results files for the chart and table (default: benchmarks/results "
                                                       "on a full run without --out, else this run alone)")
    p.add_argument("--pytest-args", default="", help="extra arguments for pytest, e.g. \"-k loss\"")
    args = p.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not set(parts) <= set(PARTS):
        p.error(f"--parts takes {', '.join(PARTS)}, got {args.parts!r}")
    out, publish = outputs(args, preset, dev)

    doc = meta(dev, ["-m", "benchmarks.run", *argv])
    results: list[dict] = []
    skipped: list[dict] = []
    failures: list[str] = []
    extra = shlex.split(args.pytest_args)

    def collect(run) -> None:
        try:
            got = run()
        except BenchFailed as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failures.append(str(exc))
            got = (to_records(exc.partial[0]), exc.partial[1])
        if got is not None:
            results.extend(got[0])
            skipped.extend(got[1])

    if "ops" in parts:
        collect(lambda: run_ops(preset, dev, not (args.no_compile or preset == "smoke"), extra))
    if "dropin" in parts:
        if not DROPIN.exists():
            print(f"dropin: {DROPIN.name} does not exist; part skipped", flush=True)
            skipped.append({"part": "dropin", "reason": f"benchmarks/{DROPIN.name} does not exist"})
        collect(lambda: run_dropin(preset, dev, extra))
    if "reference" in parts:
        epochs, samples, variants = REFERENCE[preset]
        variants = args.variants.split(",") if args.variants else variants
        for v in variants:
            load = os.getloadavg()[0]
            rec = reference_run.run(v, epochs=args.epochs or epochs, samples=args.samples or samples, device=dev.type, data_dir=args.data_dir)
            rec["load_avg"] = [load, os.getloadavg()[0]]  # 1-minute load before and after: others share the machine
            print(f"reference_run {v}: {rec['seconds']:.1f} s, final loss {rec['final_loss']:.2f}", flush=True)
            results.append(rec)
    if "floor" in parts:
        rounds, samples = FLOOR[preset]
        load = os.getloadavg()[0]
        rec = floor.run(rounds, samples=args.samples or samples, device=dev.type, data_dir=args.data_dir)
        rec["load_avg"] = [load, os.getloadavg()[0]]
        print(f"floor: a Trainer epoch is {rec['ratio_min']:.2f}x (median {rec['ratio_median']:.2f}x) its GEMM floor "
              f"({rec['gflops_floor']:.0f} GFLOP/s, {rec['threads']} threads)", flush=True)
        results.append(rec)
    doc["load_avg_end"] = os.getloadavg()[0]
    for r in results:
        r["git_commit"] = doc["git_commit"]  # records merged from other runs keep their own
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        doc = report.merge_docs(old, doc | {"results": results, "skipped": skipped})
    else:
        doc |= {"results": results, "skipped": skipped}
    if failures:
        doc["failures"] = failures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    for s in skipped:
        print(f"skipped {s.get('test', s.get('part'))}: {s['reason']}")

    results_dir = Path(args.results_dir) if args.results_dir else (Path(report.RESULTS) if publish else None)
    runs = report.load_all(results_dir) if results_dir else [doc | {"file": out.name}]
    chart_dir = results_dir or out.parent
    if runs:
        print(f"wrote {report.chart(runs, chart_dir / 'chart.png')}")
        if publish or args.doc:
            report.publish(runs, args.doc or ROOT / report.DOC, ROOT / "README.md" if publish else None,
                           (results_dir or Path(report.RESULTS)) / "data")
        else:
            table = out.with_suffix(".md")
            table.write_text(report.tables_block(runs))
            print(f"wrote {table} (the tables of this run; docs/performance.md and README.md untouched)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
