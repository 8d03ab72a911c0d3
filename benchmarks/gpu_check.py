"""One command verifies a GPU: environment, correctness, graph engine, bandwidth, reference run, suite.

    python -m benchmarks.gpu_check [--data-dir DIR] [--out DIR] [--budget-s 360] [--steps a,b] [--dry-run]

Made for a GPU machine lent for a few minutes: it starts from a fresh copy of the repository,
JIT-builds the C++/CUDA extension against the installed torch (never installing torch or triton;
where ``fastvae.kernels`` is not importable it runs ``pip install --no-deps --no-build-isolation
-e .`` without building anything), and runs these steps in order, most valuable first, each in its
own child process with its own time limit inside the whole budget:

1. environment: GPU, driver, versions, tools, which backends load;
2. correctness (FASTVAE_STRICT=1, FASTVAE_TEST_GPU=1): the GPU tests, the GPU cases of the op
   tests, the graph-captured vs eager loss curve, compute-sanitizer memcheck of the CUDA ops;
3. graph-engine: kernels (torch.profiler) and host syncs (set_sync_debug_mode) per captured
   training step, new eps on every replay of a captured reparameterize;
4. bandwidth: the copy bandwidth (1 GiB copy_, measured here, with nothing in the background), then
   fused loss and reparam+KL at sizes that fill the GPU, CUDA events, as a fraction of it, beside
   eager-best, eager-seed and torch.compile;
5. reference-run: 10 epochs, batch 128, 60,000 images, four ways;
6. suite: the rest of the benchmark suite while time remains.

In the background, from the start: the extension build, then (after the environment step) a
warm-up that fills the Triton and torch.compile caches; both end before the timed steps begin.
After every step the results are written (a run cut short keeps what it measured):
benchmarks/results/<gpu>-<date>.json in the suite's schema (benchmarks/report.py draws the
tables of docs/performance.md and the chart from it) with a "gpu_check" section (each step's status, checks and
details, the goals), and <gpu>-<date>.md, a summary that says which goal was met; with --out,
copies of both there, with the log. A rerun on the same day merges into that file: the steps
it runs replace theirs. --dry-run runs every step at tiny sizes on the CPU (what needs CUDA is
skipped with the reason) and writes into a temporary folder, never into benchmarks/results.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 360  # of a lent machine's ~15 minutes: start-up (minutes) and a rerun must fit too
RESERVE_S = 4  # kept back from every step for writing the outputs
# name -> (time limit in s (None: whatever the budget has left), what it does); foreground steps in order
STEPS = {
    "environment": (45, "GPU, driver, versions, tools, backends that load"),
    "correctness": (200, "GPU tests (strict), graph vs eager loss curve, memcheck, GPU cases of the other tests"),
    "graph-engine": (60, "kernels and host syncs per captured training step, new eps per replay"),
    "bandwidth": (90, "copy bandwidth; fused loss and reparam+KL vs eager-best, eager-seed, torch.compile, as a fraction of it"),
    "reference-run": (150, "10 epochs, batch 128, 60,000 images: fastvae, eager on device, compile reduce-overhead, seed loop"),
    "suite": (None, "the rest of the benchmark suite while time remains"),
}
BACKGROUND = {
    "extension-build": (300, "JIT build (or load) of the C++/CUDA extension against the installed torch"),
    "warm-up": (180, "fills the Triton and torch.compile caches the timed steps use"),
}
ORDER = ["environment", "extension-build", "warm-up", *list(STEPS)[1:]]
TIMED = {"bandwidth", "reference-run", "suite"}
NEEDS_CUDA = {"graph-engine": "needs CUDA (graph capture)"}


@dataclass
class Job:
    """A step running in a child process (its own session, so a time-out kills its whole tree)."""

    name: str
    proc: subprocess.Popen
    started: float
    limit: float


@dataclass
class State:
    args: argparse.Namespace
    work: Path
    deadline: float
    device: str
    env: dict
    device_name: str = ""
    steps: dict = field(default_factory=dict)
    jobs: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    results_file: Path | None = None
    argv: list = field(default_factory=list)
    selected: set = field(default_factory=set)
    meta: dict = field(default_factory=dict)  # the results file's head (versions, command, commit, date), made once
    earlier: dict | None = None  # what an earlier run of the day left in results_file, read once before this run writes it


# ---- running the steps ------------------------------------------------------------------------

def child_env(args: argparse.Namespace, cuda: bool) -> dict:
    env = {**os.environ, "FASTVAE_STRICT": "1", "PYTHONUNBUFFERED": "1", "FASTVAE_GPU_CHECK_CHILD": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "fastvae-gpu-check" / "torch_extensions"))
    if args.data_dir:
        env["FASTVAE_DATA"] = str(Path(args.data_dir).resolve())
    if cuda:
        env["FASTVAE_TEST_GPU"] = "1"  # tests/conftest.py: Triton compiles instead of interpreting
        env.pop("TRITON_INTERPRET", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU even on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")  # its numbers mean nothing; one thread keeps it fast on a busy CI machine
    return env


def start(state: State, name: str, cap: float | None) -> Job | None:
    """Start step `name` as a child, limited to `cap` seconds and what the budget has left."""
    limit = (state.deadline - time.time() - RESERVE_S) if cap is None else min(cap, state.deadline - time.time() - RESERVE_S)
    if limit < 5:
        state.steps[name] = entry(name, "not-run", 0, max(limit, 0), "the time budget was spent before this step")
        return None
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--work", str(state.work), "--device", state.device,
           "--deadline", str(time.time() + limit)] + (["--dry-run"] if state.args.dry_run else []) + \
          (["--data-dir", state.args.data_dir] if state.args.data_dir else [])
    log = open(state.work / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=state.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    print(f"[gpu_check] {name}: started (limit {limit:.0f} s)", flush=True)
    job = Job(name, proc, time.time(), limit)
    state.jobs[name] = job
    return job


def _kill(proc: subprocess.Popen) -> None:
    """End the child's process group (its own session: only what this script started)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def finish(state: State, job: Job) -> dict:
    """Wait for `job` until its limit (then kill it) and turn what it reported into its step entry."""
    outputs = [state.work / f"{job.name}{ext}" for ext in (".log", ".jsonl")]
    ended = max((p.stat().st_mtime for p in outputs if p.exists()), default=time.time()) if job.proc.poll() is not None else None
    try:
        code = job.proc.wait(max(0.0, job.started + job.limit - time.time()))
    except subprocess.TimeoutExpired:
        _kill(job.proc)
        code = "timeout"
        if job.name == "extension-build":  # a killed build leaves torch's lock file: later loads would wait forever
            for lock in Path(state.env["TORCH_EXTENSIONS_DIR"]).glob("fastvae_C*/lock"):
                lock.unlink(missing_ok=True)
    (state.work / f"{job.name}.done").touch()
    state.jobs.pop(job.name, None)
    seconds = (ended or time.time()) - job.started  # a background job may have ended long before this collects it
    state.steps[job.name] = collect(state, job.name, code, seconds, job.limit)
    print(f"[gpu_check] {job.name}: {state.steps[job.name]['status']} in {seconds:.0f} s", flush=True)
    return state.steps[job.name]


def collect(state: State, name: str, code: int | str, seconds: float, limit: float) -> dict:
    """The step entry from a child's JSON lines: status, checks, details, records, skips."""
    from .gpu_steps import read_lines

    e = entry(name, "passed", seconds, limit)
    lines = read_lines(state.work / f"{name}.jsonl")
    for line in lines:
        kind = line.pop("t")
        if kind == "detail":
            e["details"][line["key"]] = line["value"]
        elif kind == "check":
            e["checks"].append(line)
        elif kind == "record":
            e["records"].append({**line["record"], "step": name})
        elif kind == "skip":
            e["skipped"].append({**line["record"], "step": name})
        elif kind == "status":
            e["status"], e["reason"] = line["status"], line["reason"]
    failed = [c["name"] for c in e["checks"] if c["ok"] is False]
    if code == "timeout":
        e["status"], e["reason"] = "timeout", f"stopped at its {limit:.0f} s limit; what it measured before is kept"
    elif code != 0:
        e["status"], e["reason"] = "error", f"exit {code}: " + _tail(state.work / f"{name}.log", 600)
    elif failed and e["status"] == "passed":
        e["status"], e["reason"] = "failed", "failed: " + "; ".join(failed)
    return e


def entry(name: str, status: str, seconds: float, limit: float, reason: str = "") -> dict:
    return {"name": name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit), "reason": reason,
            "checks": [], "details": {}, "records": [], "skipped": []}


def _tail(path: Path, chars: int) -> str:
    return path.read_text(errors="replace")[-chars:].strip() if path.exists() else ""


# ---- set-up ---------------------------------------------------------------------------------

def find_data(data_dir: str | None) -> tuple[str | None, list[str]]:
    """The folder holding Fashion-MNIST's training images: --data-dir, else shared/ in or beside the
    checkout, else None (fastvae.data's standard places then); and where it looked."""
    name = "train-images-idx3-ubyte"
    candidates = [Path(data_dir)] if data_dir else []
    candidates += [ROOT / "shared/data/fashion-mnist", ROOT.parent / "shared/data/fashion-mnist"]
    for c in candidates:
        if (c / name).exists() or (c / f"{name}.gz").exists():
            return str(c.resolve()), [str(c) for c in candidates]
    return None, [str(c) for c in candidates]


def ensure_kernels_importable(state: State) -> dict:
    """`fastvae.kernels` (kernels/ mapped by the package install) must import: on a fresh copy run an
    editable install that builds nothing and installs no dependency."""
    if importlib.util.find_spec("fastvae.kernels") is not None:
        return {"fastvae.kernels": "importable"}
    if state.args.dry_run:
        return {"fastvae.kernels": "not importable (dry run: nothing installed; the triton backend will say so)"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**state.env, "FASTVAE_BUILD_EXT": "0"}, capture_output=True, text=True, timeout=120)
        ok, out = proc.returncode == 0, (proc.stdout + proc.stderr)[-1500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, out = False, str(exc)
    return {"fastvae.kernels": "installed" if ok else "install failed", "install": shlex.join(cmd) + " (FASTVAE_BUILD_EXT=0)",
            "install_s": round(time.time() - t0, 1), **({} if ok else {"install_output": out})}


# ---- outputs ----------------------------------------------------------------------------------

def _records(state: State) -> tuple[list[dict], list[dict]]:
    recs, skips = [], []
    for name in ORDER:
        e = state.steps.get(name)
        if e:
            recs += e["records"]
            skips += e["skipped"]
    return recs, skips


def goals(doc: dict) -> list[dict]:
    """Each goal of the GPU check with its measured value and whether it was met (None: not measured
    or, in a dry run, not judged)."""
    steps = {s["name"]: s for s in doc["gpu_check"]["steps"]}
    dry = doc["gpu_check"]["dry_run"]
    out: list[dict] = []

    def goal(name: str, target: str, value: str | None, met: bool | None) -> None:
        out.append({"goal": name, "target": target, "value": value if value is not None else "not measured",
                    "met": None if dry or value is None else met})

    ref = {r["backend"]: r for r in doc["results"] if r["name"] == "reference_run"}
    full = {k: r for k, r in ref.items() if r.get("epochs") == 10 and r["shape"][0] == 60000}
    fv = full.get("fastvae", {}).get("seconds")
    goal("reference run with the fastvae Trainer", "< 1 s", fv and f"{fv:.2f} s", fv is not None and fv < 1)
    ro = full.get("compile-ro", {}).get("seconds")
    goal("... vs torch.compile reduce-overhead", ">= 1.5x", fv and ro and f"{ro / fv:.1f}x", bool(fv and ro and ro / fv >= 1.5))
    seed = ref.get("seed-loop", {})
    seed_s = seed.get("seconds_10_epochs", seed.get("seconds")) if seed.get("shape", [0])[0] == 60000 else None
    goal("... vs the seed-style DataLoader loop", ">= 50x", fv and seed_s and f"{seed_s / fv:.0f}x" + (" (1 epoch, scaled)" if "seconds_10_epochs" in seed else ""),
         bool(fv and seed_s and seed_s / fv >= 50))
    losses = {k: r["final_loss"] for k, r in full.items()}
    spread = (max(losses.values()) / min(losses.values()) - 1) if len(losses) > 1 else None
    goal("final losses of the 10-epoch variants agree", "within 1%", None if spread is None else f"{spread:.2%} ({len(losses)} variants)",
         spread is not None and spread <= 0.01)
    for name, x in (("loss.fwd_bwd", "float32"), ("loss.fwd_bwd", "uint8"), ("loss.fwd", "float32"), ("loss.fwd", "uint8"),
                    ("reparam.fwd_bwd", None), ("reparam.fwd", None)):
        cands = [r for r in doc["results"] if r.get("step") == "bandwidth" and r["name"] == name and r.get("x_dtype") == x
                 and r.get("value_checks") is True]
        best = max(cands, key=lambda r: r["copy_fraction"], default=None)
        value = best and f"{best['copy_fraction']:.0%} ({best['backend']}, {'x'.join(map(str, best['shape']))}, {best['median_ms']:.3f} ms)"
        goal(f"bandwidth: {name}{f' (x {x})' if x else ''}, default path", ">= 85% of copy", value, bool(best and best["copy_fraction"] >= 0.85))
    checks = {c["name"]: c for s in steps.values() for c in s["checks"]}
    for key, target in (("kernels per captured training step", "<= 80 (contract ~65)"), ("host syncs per replayed step", "0")):
        c = checks.get(key)
        goal(key, target, str(c["value"]) if c and c["ok"] is not None else None, c and c["ok"])
    eps = [c for n, c in checks.items() if n.startswith("new eps per replay") and c["ok"] is not None]
    goal("every graph replay draws new eps", "all fused backends", ", ".join(f"{c['name'][19:]} {'yes' if c['ok'] else 'NO'}" for c in eps) or None,
         bool(eps) and all(c["ok"] for c in eps))
    for key in ("GPU tests", "GPU cases of the op tests", "graph vs eager loss curve", "compute-sanitizer memcheck"):
        c = checks.get(key)
        value = None if c is None or c["ok"] is None else str(c["value"] or "") + (f" ({c['note']})" if c["note"] else "")
        goal(f"correctness: {key}", "pass", value, c and c["ok"])
    return out


def document(state: State) -> dict:
    """This run's results document as it stands (its goals are judged by `write`, after merging)."""
    doc = dict(state.meta)
    doc["device"], doc["device_name"] = state.device, state.device_name or doc["device_name"]
    env = state.steps.get("environment", {}).get("details", {})
    if "versions" in env:
        doc["git_commit"] = env["versions"]["git_commit"]
    doc["results"], doc["skipped"] = _records(state)
    for r in doc["results"]:
        r.setdefault("git_commit", doc["git_commit"])
    steps = []
    for name in ORDER:
        e = state.steps.get(name) or (entry(name, "running", time.time() - state.jobs[name].started, state.jobs[name].limit) if name in state.jobs else
                                      entry(name, "not-run", 0, 0, "not selected (--steps)" if name in STEPS and name not in state.selected else "not reached"))
        ran = {"ran": doc["date"]} if e["status"] not in ("not-run", "running") else {}
        steps.append({k: v for k, v in e.items() if k not in ("records", "skipped")} | {"records": len(e["records"])} | ran)
    doc["gpu_check"] = {"budget_s": state.args.budget_s, "dry_run": state.args.dry_run, "elapsed_s": round(time.time() - state.started, 1),
                        "steps": steps}
    return doc


def read_earlier(path: Path) -> dict | None:
    """The GPU check's results an earlier run of the day wrote into `path`, or None."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return old if "gpu_check" in old else None


def merge_earlier(doc: dict, old: dict | None, ran: set[str]) -> dict:
    """Keep what an earlier run (`old`, see read_earlier) measured in the steps this run did not run;
    each kept step says the date of the run that ran it."""
    if old is None or old.get("device_name") != doc["device_name"]:
        return doc
    keep = {s["name"]: s for s in old["gpu_check"]["steps"] if s["name"] not in ran and s["status"] != "not-run"}
    doc = {**doc, "gpu_check": dict(doc["gpu_check"])}
    doc["results"] = [r for r in old["results"] if r.get("step") in keep] + doc["results"]
    doc["skipped"] = [s for s in old.get("skipped", []) if s.get("step") in keep] + doc["skipped"]
    doc["gpu_check"]["steps"] = [keep[s["name"]] | {"reason": f"from the run of {keep[s['name']].get('ran', old['date'])}"} if s["name"] in keep else s
                                 for s in doc["gpu_check"]["steps"]]
    doc["command"] = " && ".join(dict.fromkeys([*old["command"].split(" && "), doc["command"]]))
    return doc


def judge(doc: dict) -> dict:
    """The document with its copy bandwidth (the bandwidth step's) and its goals filled in."""
    bandwidth = next((s for s in doc["gpu_check"]["steps"] if s["name"] == "bandwidth"), {})
    doc["gpu_check"]["copy_gbps"] = bandwidth.get("details", {}).get("copy_gbps")
    doc["gpu_check"]["goals"] = goals(doc)
    return doc


def summary(doc: dict) -> str:
    """The human summary: goals met or not, each step's status, the bandwidth and reference tables."""
    from . import report

    g = doc["gpu_check"]
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = [f"# GPU check: {doc['device_name']}", "",
             f"{doc['date'][:16].replace('T', ' ')} UTC, commit {doc['git_commit'][:12]}, torch {doc['torch']} (CUDA {doc['cuda']}), "
             f"triton {doc['triton']}; `{doc['command']}`; {g['elapsed_s']:.0f} s of a {g['budget_s']} s budget"
             + (" -- **dry run on the CPU at tiny sizes: nothing here says anything about a GPU**" if g["dry_run"] else ""), "",
             "## Goals", "", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {x['goal']} | {x['target']} | {x['value']} | {mark[x['met']]} |" for x in g["goals"]]
    lines += ["", "## Steps", "", "| step | status | seconds (limit) | checks | notes |", "| --- | --- | --- | --- | --- |"]
    for s in g["steps"]:
        checks = "; ".join(f"{c['name']}: {mark[c['ok']]}" + (f" {c['value']}" if c.get("value") is not None else "") for c in s["checks"])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} ({s['limit_s']}) | {checks or '-'} | {s['reason'][:300].replace('|', '/').replace(chr(10), ' ')} |")
    bw = [r for r in doc["results"] if r.get("step") == "bandwidth"]
    if bw:
        lines += ["", f"## Bandwidth (copy: {g['copy_gbps'] or 0:.0f} GB/s; CUDA events, median)" if not g["dry_run"] else "## Bandwidth (dry run)", "",
                  "| case | implementation | ms | GB/s | of copy | first call s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in bw:
            x = f" x {r['x_dtype']}" if r.get("x_dtype") else ""
            lines.append(f"| {r['name']} {'x'.join(map(str, r['shape']))}{x} | {report.label(r['backend'])} | {r['median_ms']:.3f} | {r['gbps']:.0f} | "
                         f"{r['copy_fraction']:.0%} | {r['warmup_s']:.1f} |")
    ref = report.reference_table(doc)
    if ref:
        lines += ["", "## Reference run", "", ref]
    skipped = Counter(f"{s.get('backend', s.get('part', ''))}: {s['reason']}" for s in doc["skipped"])
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {reason} ({n}x)" for reason, n in skipped.items()]
    return "\n".join(lines) + "\n"


def write(state: State) -> dict:
    """Results JSON, summary markdown, and (with --out) copies of both and the log; returns the document."""
    doc = judge(merge_earlier(document(state), state.earlier, {n for n, e in state.steps.items() if e["status"] != "not-run"}))
    state.results_file.parent.mkdir(parents=True, exist_ok=True)
    text, md = json.dumps(doc, indent=1, default=str) + "\n", summary(doc)
    state.results_file.write_text(text)
    state.results_file.with_suffix(".md").write_text(md)
    if state.args.out:
        out = Path(state.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / state.results_file.name).write_text(text)
        (out / state.results_file.with_suffix(".md").name).write_text(md)
        logs = [f"===== {p.stem} =====\n{_tail(p, 200_000)}\n" for p in sorted(state.work.glob("*.log"))]
        (out / "gpu_check.log").write_text("".join(logs))
    return doc


# ---- main -------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: shared/data/fashion-mnist in or "
                                                    "beside the checkout, else fastvae's standard places)")
    p.add_argument("--out", default=None, help="also copy the results, the summary and the log here (a lent machine's $OUT)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help=f"whole run, seconds (default {DEFAULT_BUDGET_S})")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} (reruns)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the results file goes (a dry run: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU; outputs to a temporary folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"--steps takes {', '.join(STEPS)}; unknown: {', '.join(sorted(unknown))}")
    return args


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        from . import gpu_steps

        return gpu_steps.child_main(args.child, args.work, args.device, args.dry_run, args.data_dir, args.deadline)
    import torch

    from . import run

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA GPU is visible to torch; on a CPU use --dry-run", file=sys.stderr)
        return 2
    args.data_dir, looked = find_data(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="fastvae-gpu-check-"))
    state = State(args, work, time.time() + args.budget_s, "cuda" if cuda else "cpu", child_env(args, cuda), argv=argv,
                  selected=set(args.steps.split(",")))
    state.device_name = torch.cuda.get_device_name(0) if cuda else f"dry run: {run.device_name(torch.device('cpu'))}"
    slug = run.slug(torch.device("cuda")) if cuda else "dry-run-cpu"
    folder = Path(tempfile.mkdtemp(prefix="fastvae-gpu-check-out-")) if args.dry_run else Path(args.results_dir)
    state.results_file = folder / f"{slug}-{dt.date.today().isoformat()}.json"
    state.earlier = read_earlier(state.results_file)
    state.meta = run.meta(torch.device("cpu"), ["-m", "benchmarks.gpu_check", *argv])
    signal.signal(signal.SIGTERM, _interrupted)
    setup = {"data_dir": args.data_dir or f"not found in {looked}: fastvae.data's standard places", **ensure_kernels_importable(state)}
    print(f"[gpu_check] {state.device_name}; budget {args.budget_s:.0f} s; data {setup['data_dir']}; work {work}", flush=True)
    try:
        start(state, "extension-build", BACKGROUND["extension-build"][0])
        for name, (cap, _) in STEPS.items():
            if name in TIMED:  # timed steps run alone: the background work ends (or is stopped) first
                for job in list(state.jobs.values()):
                    finish(state, job)
            if name not in state.selected:
                pass
            elif name in NEEDS_CUDA and not cuda:
                state.steps[name] = entry(name, "skipped", 0, 0, NEEDS_CUDA[name])
            elif job := start(state, name, cap):
                finish(state, job)
            if name == "environment":
                state.steps.setdefault(name, entry(name, "not-run", 0, 0, "not selected (--steps)"))["details"]["setup"] = setup
                if state.selected & TIMED:
                    start(state, "warm-up", BACKGROUND["warm-up"][0])
            write(state)
        for job in list(state.jobs.values()):
            finish(state, job)
    except KeyboardInterrupt:
        for job in list(state.jobs.values()):
            _kill(job.proc)
            state.steps[job.name] = collect(state, job.name, "timeout", time.time() - job.started, job.limit) | {
                "status": "error", "reason": "gpu_check was interrupted"}
        write(state)
        raise
    doc = write(state)
    print(summary(doc).split("## Bandwidth")[0].split("## Reference run")[0], flush=True)
    print(f"[gpu_check] wrote {state.results_file} and {state.results_file.with_suffix('.md')}" + (f" (copies in {args.out})" if args.out else ""))
    bad = [s["name"] for s in doc["gpu_check"]["steps"] if s["status"] in ("failed", "error", "timeout")]
    if bad:
        print(f"[gpu_check] not clean: {', '.join(bad)} (see the summary and the log)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
