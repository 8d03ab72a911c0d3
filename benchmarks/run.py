"""Run the benchmark suite and write benchmarks/results/<device>-<date>.json, the chart and the
README table.

    python -m benchmarks.run [--smoke | --quick] [--out FILE] [--parts ops,reference]
    fastvae bench ...            (the same, from the CLI)

--smoke: tiny sizes, no torch.compile, a 1-epoch reference run on 512 images (CI, < 60 s);
--quick: mid sizes, 1 epoch on 10,000 images; default: the full suite and the 10-epoch run.
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

from . import reference_run, report

ROOT = Path(__file__).resolve().parent.parent
PYTEST_ARGS = {
    "smoke": ["--benchmark-min-rounds=1", "--benchmark-max-time=0.005", "--benchmark-warmup=off"],
    "quick": ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"],
    "full": ["--benchmark-min-rounds=5", "--benchmark-max-time=1.0"],
}
REFERENCE = {"smoke": (1, 512, ("seed-loop", "eager-device", "fastvae")), "quick": (1, 10000, reference_run.VARIANTS),
             "full": (10, None, reference_run.VARIANTS)}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(dev: torch.device) -> str:
    return "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(dev).lower()).strip("-")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(dev: torch.device, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": dev.type, "device_name": device_name(dev), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "command": shlex.join(["python", "-m", "benchmarks.run", *argv]),
            "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_start": os.getloadavg()[0], "cpu_count": os.cpu_count()}


def _pytest_ops(preset: str, dev: torch.device, compile_: bool, extra: list[str], peak: str) -> list[dict]:
    """benchmarks/test_ops.py under pytest-benchmark in a child process (FASTVAE_BENCH_PEAK=peak); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "FASTVAE_BENCH_SIZE": preset, "FASTVAE_BENCH_DEVICE": dev.type,
               "FASTVAE_BENCH_COMPILE": "1" if compile_ else "0", "FASTVAE_BENCH_PEAK": peak}
        if peak == "only":  # freed tensors go back to the OS, so an earlier call cannot hide a peak
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(ROOT / "benchmarks" / "test_ops.py"),
               f"--benchmark-json={out}", "--benchmark-columns=median,rounds", *PYTEST_ARGS[preset], *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"the op benchmarks failed (exit {proc.returncode}): {shlex.join(cmd)}")
        return json.loads(out.read_text())["benchmarks"]


def run_ops(preset: str, dev: torch.device, compile_: bool, extra: list[str]) -> list[dict]:
    """The op benchmarks as records. On CPU two passes: times with the process's normal allocator,
    then peak memory alone with MALLOC_MMAP_THRESHOLD_ set (which would slow every large
    allocation down with page faults if it were on while timing). On CUDA one pass does both."""
    if dev.type == "cuda":
        timed, peaks = _pytest_ops(preset, dev, compile_, extra, "inline"), {}
    else:
        timed = _pytest_ops(preset, dev, compile_, extra, "skip")
        peaks = {b["name"]: b["extra_info"]["peak_mem_mb"] for b in _pytest_ops(preset, dev, compile_, extra, "only")}
    records = []
    for b in timed:
        info, st = b["extra_info"], b["stats"]
        if b["name"] in peaks:
            info["peak_mem_mb"] = peaks[b["name"]]
        records.append({"name": f"{info['op']}.{info['pass']}", **info, "median_ms": st["median"] * 1e3, "mean_ms": st["mean"] * 1e3,
                        "min_ms": st["min"] * 1e3, "stddev_ms": st["stddev"] * 1e3, "rounds": st["rounds"],
                        "gbps": info["bytes"] / st["median"] / 1e9})
    return records


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes for CI (< 60 s)")
    size.add_argument("--quick", action="store_true", help="mid sizes, 1-epoch reference run on 10,000 images")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>-<date>.json)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--parts", default="ops,reference", help="comma-separated: ops, reference")
    p.add_argument("--merge", action="store_true", help="keep the records of an existing --out file that this run does not replace")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--epochs", type=int, default=None, help="reference run epochs (default 10; smoke/quick 1)")
    p.add_argument("--samples", type=int, default=None, help="reference run: first N training images (default all)")
    p.add_argument("--variants", default=None, help=f"reference run variants, comma-separated from {','.join(reference_run.VARIANTS)}")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="file whose bench block is rewritten (if it has the markers)")
    p.add_argument("--results-dir", default=str(report.RESULTS), help="folder of results files for the chart and table")
    p.add_argument("--pytest-args", default="", help="extra arguments for pytest, e.g. \"-k loss\"")
    args = p.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts <= {"ops", "reference"}:
        p.error(f"--parts takes ops and/or reference, got {args.parts!r}")
    out = Path(args.out) if args.out else Path(args.results_dir) / f"{slug(dev)}-{dt.date.today().isoformat()}.json"

    doc = meta(dev, argv)
    results: list[dict] = []
    if "ops" in parts:
        results += run_ops(preset, dev, not (args.no_compile or preset == "smoke"), shlex.split(args.pytest_args))
    if "reference" in parts:
        epochs, samples, variants = REFERENCE[preset]
        variants = args.variants.split(",") if args.variants else variants
        for v in variants:
            load = os.getloadavg()[0]
            rec = reference_run.run(v, epochs=args.epochs or epochs, samples=args.samples or samples, device=dev.type)
            rec["load_avg"] = [load, os.getloadavg()[0]]  # 1-minute load before and after: others share the machine
            print(f"reference_run {v}: {rec['seconds']:.1f} s, final loss {rec['final_loss']:.2f}", flush=True)
            results.append(rec)
    doc["load_avg_end"] = os.getloadavg()[0]
    for r in results:
        r["git_commit"] = doc["git_commit"]  # records merged from other runs keep their own
    if args.merge and out.exists():
        new = {report._key(r) for r in results}
        old = json.loads(out.read_text())
        results = [r for r in old["results"] if report._key(r) not in new] + results
        doc["command"] = " && ".join(dict.fromkeys([old["command"], doc["command"]]))
        doc["git_commit"] = " + ".join(dict.fromkeys([*old["git_commit"].split(" + "), doc["git_commit"]]))
    doc["results"] = results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")

    runs = report.load_all(Path(args.results_dir))
    if runs:
        print(f"wrote {report.chart(runs, Path(args.results_dir) / 'chart.png')}")
        readme = Path(args.readme)
        if readme.exists() and report.rewrite_block(readme, report.readme_block(runs)):
            print(f"rewrote the performance table in {readme}")
        else:
            print(f"{readme} has no {report.START} ... {report.END} block: table not written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
