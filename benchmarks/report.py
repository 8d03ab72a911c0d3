"""Results files -> the README performance table and benchmarks/results/chart.png."""
from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
BASELINES = ("eager", "compile")


def load_all(results_dir: Path = RESULTS) -> list[dict]:
    """Every results file, oldest first (by date, then name)."""
    files = sorted(Path(results_dir).glob("*.json"))
    runs = [json.loads(f.read_text()) | {"file": f.name} for f in files]
    return sorted(runs, key=lambda r: (r.get("date", ""), r["file"]))


def latest_per_device(runs: list[dict]) -> list[dict]:
    by_device: dict[str, dict] = {}
    for r in runs:
        by_device[r["device"]] = r
    return list(by_device.values())


def label(backend: str) -> str:
    """Baselines by name, fastvae's backends as fastvae[name]."""
    return backend if backend in BASELINES else f"fastvae[{backend}]"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def ops_table(run: dict) -> str:
    """One row per (op, pass, shape, dtype): median ms (GB/s) per backend, then two ratios side by
    side from the same run: eager / best fastvae, and fastvae[torch] / best fused kernel."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in run["results"]:
        if r["name"] == "reference_run":
            continue
        rows.setdefault((r["name"], tuple(r["shape"]), r["dtype"]), {})[r["backend"]] = r
    impls = [*BASELINES, *sorted({b for cells in rows.values() for b in cells} - set(BASELINES))]
    head = "| op | shape | dtype | " + " | ".join(f"{label(b)} ms (GB/s)" for b in impls) + " | eager / best fastvae | torch / best fused |"
    lines = [head, "|" + " --- |" * (len(impls) + 5)]
    for (name, shape, dtype), cells in rows.items():
        vals = [f"{_fmt_ms(cells[b]['median_ms'])} ({cells[b]['gbps']:.3g})" if b in cells else "-" for b in impls]
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {dtype} | " + " | ".join(vals)
                     + f" | {_ratio(cells, 'eager', set(BASELINES))} | {_ratio(cells, 'torch', {*BASELINES, 'torch'})} |")
    return "\n".join(lines)


def _ratio(cells: dict[str, dict], base: str, exclude: set[str]) -> str:
    """cells[base]'s time over the fastest backend not in `exclude`, or "-"."""
    fast = [c["median_ms"] for b, c in cells.items() if b not in exclude]
    return f"{cells[base]['median_ms'] / min(fast):.2f}x" if fast and base in cells else "-"


def reference_table(run: dict) -> str:
    recs = [r for r in run["results"] if r["name"] == "reference_run"]
    if not recs:
        return ""
    seed = next((r["seconds"] for r in recs if r["backend"] == "seed-loop"), None)
    lines = ["| reference run | samples x epochs | seconds | speed-up over seed-loop | final loss | compile / warm-up s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        extra = r.get("compile_s", r.get("warmup_s"))
        speed = "-" if seed is None else f"{seed / r['seconds']:.2f}x"
        lines.append(f"| {r['backend']} | {r['shape'][0]} x {r['epochs']} | {r['seconds']:.1f} | {speed} | {r['final_loss']:.2f} | {'-' if extra is None else f'{extra:.1f}'} |")
    return "\n".join(lines)


def readme_block(runs: list[dict]) -> str:
    """Markdown for the README: the latest run of each device."""
    parts = []
    for run in latest_per_device(runs):
        parts.append(f"**{run['device_name']}** ({run['date'][:10]}, commit {' + '.join(c[:10] for c in run['git_commit'].split(' + '))}, torch {run['torch']}; "
                     f"`{run['command']}`; median of repeated calls, GB/s = bytes that must move / time)\n")
        parts.append(ops_table(run))
        ref = reference_table(run)
        if ref:
            parts.append("\n" + ref)
        parts.append("")
    return "\n".join(parts).strip() + "\n"


def rewrite_block(path: str | Path, text: str) -> bool:
    """Replace what lies between the bench markers in `path` with `text`; False if the markers are absent."""
    path = Path(path)
    content = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        return False
    path.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", content, count=1))
    return True


def chart(runs: list[dict], out: str | Path) -> Path:
    """Speed-up over eager PyTorch per benchmark and backend, one panel per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if any(x["name"] != "reference_run" for x in r["results"])] or runs
    width_in = max(12, 0.9 * max(len(r["results"]) for r in runs) / 3)
    fig, axes = plt.subplots(len(runs), 1, figsize=(width_in, 4.5 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        eager = {(r["name"], tuple(r["shape"]), r["dtype"]): r["median_ms"] for r in run["results"] if r["backend"] == "eager"}
        keys = list(eager)
        impls = sorted({r["backend"] for r in run["results"] if r["name"] != "reference_run"} - {"eager"})
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            ms = {(r["name"], tuple(r["shape"]), r["dtype"]): r["median_ms"] for r in run["results"] if r["backend"] == impl}
            xs = [i + j * width for i, k in enumerate(keys) if k in ms]
            ax.bar(xs, [eager[k] / ms[k] for k in keys if k in ms], width, label=label(impl))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up over eager")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{n} {'x'.join(map(str, s))} {d}" for n, s, d in keys], fontsize=7, rotation=30, ha="right")
        ax.set_title(f"{run['device_name']} - {run['date'][:10]} ({run['file']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _key(record: dict) -> tuple:
    return record["name"], record["backend"], tuple(record["shape"]), record["dtype"]


def merge(files: list[str | Path]) -> dict:
    """One results document from several runs on one device (later records replace equal keys)."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    if len({d["device_name"] for d in docs}) > 1:
        raise ValueError(f"these files come from different devices: {sorted({d['device_name'] for d in docs})}")
    out = dict(docs[0])
    records: dict[tuple, dict] = {}
    for d in docs:
        records.update({_key(r): r for r in d["results"]})
    out["command"] = " && ".join(dict.fromkeys(d["command"] for d in docs))
    out["git_commit"] = " + ".join(dict.fromkeys(c for d in docs for c in d["git_commit"].split(" + ")))
    out["load_avg_end"] = docs[-1].get("load_avg_end")
    out["results"] = list(records.values())
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description="Merge results files; redraw the chart and the README table from all results files.")
    p.add_argument("--merge", nargs="+", default=None, help="results files of one device to merge into --out")
    p.add_argument("--out", default=None)
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        Path(args.out).write_text(json.dumps(merge(args.merge), indent=1) + "\n")
        print(f"wrote {args.out}")
    runs = load_all(Path(args.results_dir))
    if runs:
        print(f"wrote {chart(runs, Path(args.results_dir) / 'chart.png')}")
        if Path(args.readme).exists() and rewrite_block(args.readme, readme_block(runs)):
            print(f"rewrote the performance table in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
