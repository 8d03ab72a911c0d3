"""Results files -> the performance tables (docs/performance.md), README's headline and
benchmarks/results/chart.png.

Results files written before the honest baselines (benchmarks/common.py) are read as what they
measured: their "eager" is the seed's formulation ("eager-seed"), their "compile" compiled it
("compile-seed"), and their fastvae backends ran with value checks off ("<backend>-nochecks").
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"  # the full tables, in docs/performance.md
DOC = Path("docs") / "performance.md"  # the tables, relative to the repository root
HEADLINE = ("<!-- headline:start -->", "<!-- headline:end -->")  # a few numbers on README's front page
# The headline's cells: (column title, op record name, shape), each the fastest fastvae default path vs eager-best.
HEADLINE_OPS = (("fused loss, fwd+bwd, 65536x784", "loss.fwd_bwd", (65536, 784, 20)),
                ("reparam + KL, fwd+bwd, 65536x256", "reparam.fwd_bwd", (65536, 256)))
BASELINES = ("eager-best", "eager-seed", "compile", "compile-seed")
FASTVAE = ("torch", "triton", "cpp", "cuda")
NOCHECKS = "-nochecks"
NOT_OPS = ("reference_run", "dropin.step", "floor")
DATA = RESULTS / "data"  # the data path's and the tools' results (benchmarks.stream, prepare_bench, logger_overhead)
DATA_BLOCK = ("<!-- data:start -->", "<!-- data:end -->")  # in README and docs/performance.md
README_PARTS = ("train", "conv", "loader", "memory", "prepare")
DATA_PARTS = (*README_PARTS, "logger_overhead")  # the table's row order


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


def impl_of(record: dict) -> str:
    """The implementation a record timed, with the legacy names of older files translated."""
    backend = record["backend"]
    if backend == "eager":
        return "eager-seed"
    if backend == "compile" and "compiled" not in record:
        return "compile-seed"
    if backend in FASTVAE and "value_checks" not in record:
        return backend + NOCHECKS  # the suite before the honest baselines timed fastvae with the checks off
    return backend


def label(impl: str) -> str:
    """Baselines by name, fastvae's backends as fastvae[name] (", checks off" for the -nochecks variants)."""
    if impl == "compile-seed":
        return "compile of eager-seed"
    if impl in BASELINES:
        return impl
    if impl.endswith(NOCHECKS):
        return f"fastvae[{impl.removesuffix(NOCHECKS)}] checks off"
    return f"fastvae[{impl}]"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _op_rows(run: dict) -> dict[tuple, dict[str, dict]]:
    """(name, shape, dtype, target dtype) -> {impl: record} for the op benchmarks of a run."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in run["results"]:
        if r["name"] in NOT_OPS or r.get("op") == "dropin":
            continue
        cells = rows.setdefault((r["name"], tuple(r["shape"]), r["dtype"], r.get("x_dtype", r["dtype"])), {})
        old = cells.get(impl_of(r))
        if old is None or old.get("timer") != "cuda-events" or r.get("timer") == "cuda-events":  # CUDA events beat host clocks
            cells[impl_of(r)] = r
    return rows


def _impl_order(impls: set[str]) -> list[str]:
    fused = sorted(i for i in impls if i not in BASELINES and not i.endswith(NOCHECKS))
    return [b for b in BASELINES if b in impls] + fused + sorted(i for i in impls if i.endswith(NOCHECKS))


def _best(cells: dict[str, dict], checked: bool) -> tuple[str, float] | None:
    """The fastest fastvae variant of a row on its default path (checked) or with checks off."""
    times = [(i, c["median_ms"]) for i, c in cells.items() if i not in BASELINES and i.endswith(NOCHECKS) != checked]
    return min(times, key=lambda t: t[1]) if times else None


def _speedup(base: float | None, best: tuple[str, float] | None) -> str:
    """base / best as "1.52x (cpp)", or "-"."""
    if base is None or best is None:
        return "-"
    return f"{base / best[1]:.2f}x ({best[0].removesuffix(NOCHECKS)})"


def ops_table(run: dict) -> str:
    """One row per (op, pass, shape, dtype): median ms (GB/s) per implementation, then speed-ups from
    the same run: the fastest fastvae backend on its default path (value checks on, as users call
    it) over eager-best and over eager-seed, and what turning the checks off gains."""
    rows = _op_rows(run)
    if not rows:
        return ""
    impls = _impl_order({i for cells in rows.values() for i in cells})
    head = ("| op | shape | dtype | " + " | ".join(f"{label(i)} ms (GB/s)" for i in impls)
            + " | fastvae vs eager-best | fastvae vs eager-seed | checks off vs on |")
    lines = [head, "|" + " --- |" * (len(impls) + 6)]
    for (name, shape, dtype, x_dtype), cells in rows.items():
        vals = [f"{_fmt_ms(cells[i]['median_ms'])} ({cells[i]['gbps']:.3g})" if i in cells and cells[i].get("gbps") else
                _fmt_ms(cells[i]["median_ms"]) if i in cells else "-" for i in impls]
        best, off = _best(cells, True), _best(cells, False)
        base = {b: cells[b]["median_ms"] if b in cells else None for b in ("eager-best", "eager-seed")}
        gain = f"{best[1] / off[1]:.2f}x" if best and off else "-"
        dt = dtype if x_dtype == dtype else f"{dtype}, x {x_dtype}"
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {dt} | " + " | ".join(vals)
                     + f" | {_speedup(base['eager-best'], best)} | {_speedup(base['eager-seed'], best)} | {gain} |")
    return "\n".join(lines)


def dropin_table(run: dict) -> str:
    """Users' own VAEs, one training step at their batch size: the plain model ("user"), the same
    model through fastvae.accelerate ("accelerated") and on fastvae's engine ("engine"); the fastest
    backend of each, and the speed-ups over the plain model."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in run["results"]:
        if r.get("op") != "dropin":
            continue
        cells = rows.setdefault((r["model"], tuple(r["shape"]), r["dtype"]), {})
        if r["impl"] not in cells or r["median_ms"] < cells[r["impl"]]["median_ms"]:
            cells[r["impl"]] = r
    if not rows:
        return ""
    lines = ["| your VAE | batch | dtype | user ms | accelerated ms | engine ms | accelerated speed-up | engine speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(c: dict[str, dict], impl: str) -> str:
        if impl not in c:
            return "-"
        backend = c[impl].get("backend")
        return _fmt_ms(c[impl]["median_ms"]) + (f" ({backend})" if impl != "user" and backend else "")

    def ratio(c: dict[str, dict], impl: str) -> str:
        return f"{c['user']['median_ms'] / c[impl]['median_ms']:.2f}x" if "user" in c and impl in c else "-"

    for (model, shape, dtype), c in rows.items():
        lines.append(f"| {model} | {'x'.join(map(str, shape))} | {dtype} | {cell(c, 'user')} | {cell(c, 'accelerated')} | "
                     f"{cell(c, 'engine')} | {ratio(c, 'accelerated')} | {ratio(c, 'engine')} |")
    return "\n".join(lines)


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


def floor_table(run: dict) -> str:
    """The Trainer's step against its GEMM floor (benchmarks/floor.py), and the reference run against the floor
    timed between its own steps (results from before that: divided by the floor part's)."""
    rec = next((r for r in run["results"] if r["name"] == "floor"), None)
    if rec is None:
        return ""
    lines = ["| training step vs its GEMM floor | step ms | floor ms (GFLOP/s) | interleaved rounds | ratio min / median |",
             "| --- | --- | --- | --- | --- |",
             f"| Trainer epoch, {rec['shape'][0]} images, batch {rec['batch_size']}, {rec['threads']} threads | {rec['step_ms']:.2f} | "
             f"{rec['floor_ms']:.2f} ({rec['gflops_floor']:.0f}) | {rec['rounds']} | {rec['ratio_min']:.2f}x / {rec['ratio_median']:.2f}x |"]
    ref = next((r for r in run["results"] if r["name"] == "reference_run" and r["backend"] == "fastvae"), None)
    if ref is not None:
        steps = ref["epochs"] * -(-ref["shape"][0] // ref["batch_size"])
        step_ms = ref["seconds"] / steps * 1e3
        if "floor_ratio" in ref:  # its own floor, timed between its steps
            floor_ms = sum(ref["floor_s"]) / steps * 1e3
            lines.append(f"| reference run ({ref['epochs']} epochs, {steps} steps) | {step_ms:.2f} | {floor_ms:.2f} "
                         f"({rec['gflop_per_step'] / floor_ms * 1e3:.0f}) | {ref['epochs']} | "
                         f"{ref['floor_ratio']:.2f}x (whole run) / {ref['floor_ratio_median']:.2f}x |")
        else:  # older results: divided by the floor part's
            lines.append(f"| reference run ({ref['epochs']} epochs, {steps} steps) | {step_ms:.2f} | {rec['floor_ms']:.2f} | - | "
                         f"{ref['seconds'] / (steps * rec['floor_ms'] / 1e3):.2f}x |")
    return "\n".join(lines)


def skipped_note(run: dict) -> str:
    """One line per distinct reason a benchmark was skipped, with how many it skipped."""
    reasons = Counter(s["reason"] for s in run.get("skipped", []))
    return "\n".join(f"- skipped {n}x: {reason}" for reason, n in reasons.items())


def tables_block(runs: list[dict]) -> str:
    """Markdown for docs/performance.md: every table of the latest run of each device."""
    parts = []
    for run in latest_per_device(runs):
        parts.append(f"**{run['device_name']}** ({run['date'][:10]}, commit {' + '.join(c[:10] for c in run['git_commit'].split(' + '))}, torch {run['torch']}; "
                     f"`{run['command']}`; median of repeated calls, GB/s = bytes that must move / time)\n")
        for table in (ops_table(run), dropin_table(run), reference_table(run), floor_table(run), skipped_note(run)):
            if table:
                parts.append(table + "\n")
    return "\n".join(parts).strip() + "\n"


def headline_block(runs: list[dict]) -> str:
    """Markdown for README's front page: per device (latest run), the fused loss and reparameterisation
    at one large size against eager-best, and the reference run against the classic loop and against its GEMM floor."""
    lines = ["| device | " + " | ".join(title for title, _, _ in HEADLINE_OPS) + " | reference run (10 epochs) vs the classic loop "
             "| reference run vs its GEMM floor |",
             "|" + " --- |" * (len(HEADLINE_OPS) + 3)]
    for run in latest_per_device(runs):
        rows = _op_rows(run)
        cells = []
        for _, name, shape in HEADLINE_OPS:
            row = rows.get((name, shape, "float32", "float32"), {})
            best = _best(row, True)
            base = row.get("eager-best", {}).get("median_ms")
            cells.append("-" if best is None or base is None else f"**{base / best[1]:.2f}x** ({_fmt_ms(best[1])} vs {_fmt_ms(base)} ms)")
        ref = {r["backend"]: r["seconds"] for r in run["results"] if r["name"] == "reference_run"}
        cells.append(f"**{ref['seed-loop'] / ref['fastvae']:.2f}x** ({ref['fastvae']:.1f} vs {ref['seed-loop']:.1f} s)"
                     if {"fastvae", "seed-loop"} <= ref.keys() else "-")
        mine = next((r for r in run["results"] if r["name"] == "reference_run" and r["backend"] == "fastvae"), {})
        cells.append(f"**{mine['floor_ratio']:.2f}x** (1.0 = its matrix products alone)" if "floor_ratio" in mine else "-")
        lines.append(f"| {run['device_name']}, {run['date'][:10]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _data_row(part: str, r: dict) -> tuple[str, str, str]:
    """(what, measured, target) for one record of a data-path results file."""
    if part in ("train", "conv"):
        what = ("reference MLP epoch, streamed from shards vs resident" if part == "train"
                else f"conv VAE epoch ({r['images']} images {r['shape'][-1]}x{r['shape'][-1]}x3), streamed vs resident")
        readers = f" (2 reader threads: {r['speed_ratio_2_readers']:.2f}x)" if "speed_ratio_2_readers" in r else ""
        return (what, f"{r['speed_ratio']:.2f}x{readers}", ">= 0.95x")
    if part == "loader":
        best = {k: max(v) for k, v in r["batches_per_s"].items()}
        return ("loader alone: batches/s vs DataLoader default / 2 workers pinned",
                f"{r['vs_default']:.1f}x / {r['vs_2_workers_pinned']:.1f}x ({best['fastvae']:.0f} batches/s)", ">= 3x / >= 1x")
    if part == "memory":
        return (f"RssAnon streaming a {r['set_bytes'] / 2**30:.1f} GiB set", f"{r['rss_anon_peak'] / 2**20:.0f} MiB", "< 1024 MiB")
    if part == "prepare":
        return (f"`fastvae prepare`, 2 workers vs a 1-process Pillow loop ({r['images']} images)",
                f"{r['ratio_prepare2_vs_loop']:.2f}x", ">= 1.8x")
    assert part == "logger_overhead", part
    return ("reference run with `--logger tensorboard` vs JSONL only", f"{r['ratio_min']:.3f}x", "<= 1.03x")

def data_block(results_dir: Path = DATA, parts: tuple[str, ...] | None = None) -> str:
    """Markdown: the latest record of each data-path part (per device), with its target and the command that measured it."""
    latest: dict[tuple[str, str], tuple[dict, dict]] = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        doc = json.loads(f.read_text())
        for r in doc["results"]:
            key = (doc["meta"]["device_name"], r["part"])
            if r["part"] in DATA_PARTS and (key not in latest or latest[key][0]["date"] <= doc["meta"]["date"]):
                latest[key] = (doc["meta"], r)
    lines = ["| device | measured | result | target | command |", "| --- | --- | --- | --- | --- |"]
    for (device, part), (meta, r) in sorted(latest.items(), key=lambda kv: (kv[0][0], DATA_PARTS.index(kv[0][1]))):
        if parts is None or part in parts:
            row = _data_row(part, r)
            met = "" if r.get("met", True) else " (not met)"
            lines.append(f"| {device}, {meta['date'][:10]} | {row[0]} | **{row[1]}**{met} | {row[2]} | `{meta['command']}` |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def rewrite_block(path: str | Path, text: str, markers: tuple[str, str] = (START, END)) -> bool:
    """Replace what lies between the markers in `path` with `text`; False if the markers are absent."""
    path = Path(path)
    start, end = markers
    content = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        return False
    path.write_text(pattern.sub(lambda _: f"{start}\n{text}{end}", content, count=1))
    return True


def publish(runs: list[dict], doc: str | Path, readme: str | Path | None, data_dir: Path = DATA) -> None:
    """Rewrite the tables in `doc` and, when given, the headline in `readme`, and in both the data path's table
    (benchmarks/results/data/: all parts in `doc`, README_PARTS in `readme`); says what it wrote."""
    data_all, data_front = data_block(data_dir), data_block(data_dir, README_PARTS)
    for path, text, markers, what in ((doc, tables_block(runs), (START, END), "the performance tables"),
                                      (readme, headline_block(runs), HEADLINE, "the headline"),
                                      (doc, data_all, DATA_BLOCK, "the data path's table"),
                                      (readme, data_front, DATA_BLOCK, "the data path's table")):
        if path is None or (not text and markers == DATA_BLOCK):  # no data-path results yet: the block stays as it is
            continue
        if Path(path).exists() and rewrite_block(path, text, markers):
            print(f"rewrote {what} in {path}")
        else:
            print(f"{path} has no {markers[0]} ... {markers[1]} block: {what} not written")


def chart(runs: list[dict], out: str | Path) -> Path:
    """Speed-up over the best eager formulation (the seed's, for older files) per benchmark and
    implementation, one panel per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if _op_rows(r)] or runs
    width_in = max(12, 0.9 * max(len(r["results"]) for r in runs) / 3)
    fig, axes = plt.subplots(len(runs), 1, figsize=(width_in, 4.5 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        rows = _op_rows(run)
        base = "eager-best" if any("eager-best" in c for c in rows.values()) else "eager-seed"
        keys = [k for k, c in rows.items() if base in c]
        impls = [i for i in _impl_order({i for c in rows.values() for i in c}) if i != base]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs = [i + j * width for i, k in enumerate(keys) if impl in rows[k]]
            ax.bar(xs, [rows[k][base]["median_ms"] / rows[k][impl]["median_ms"] for k in keys if impl in rows[k]], width, label=label(impl))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"speed-up over {base}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{n} {'x'.join(map(str, s))} {d}" + ("" if x == d else f" x:{x}") for n, s, d, x in keys], fontsize=7, rotation=30, ha="right")
        ax.set_title(f"{run['device_name']} - {run['date'][:10]} ({run.get('file', '')})", fontsize=9)
        if impls:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _key(record: dict) -> tuple:
    return (record["name"], record["backend"], tuple(record["shape"]), record["dtype"], record.get("x_dtype"),
            record.get("model"), record.get("impl"))


def merge_docs(old: dict, new: dict) -> dict:
    """`new` with the records (and skips) of `old` that it does not replace; commands and commits joined."""
    if old.get("device_name") != new.get("device_name"):
        raise ValueError(f"these results come from different devices: {sorted({old.get('device_name'), new.get('device_name')})}")
    records = {_key(r): r for r in old["results"]}
    records.update({_key(r): r for r in new["results"]})
    skips = {json.dumps(s, sort_keys=True): s for s in [*old.get("skipped", []), *new.get("skipped", [])]}
    return {**old, **new, "results": list(records.values()), "skipped": list(skips.values()),
            "command": " && ".join(dict.fromkeys([*old["command"].split(" && "), *new["command"].split(" && ")])),
            "git_commit": " + ".join(dict.fromkeys([*old["git_commit"].split(" + "), *new["git_commit"].split(" + ")]))}


def merge(files: list[str | Path]) -> dict:
    """One results document from several runs on one device (later records replace equal keys)."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    out = docs[0]
    for d in docs[1:]:
        out = merge_docs(out, d)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Merge results files; redraw the chart, the tables of docs/performance.md and "
                                            "README's headline from all results files.")
    p.add_argument("--merge", nargs="+", default=None, help="results files of one device to merge into --out")
    p.add_argument("--out", default=None)
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--doc", default=str(ROOT / DOC), help="the file whose bench block gets the tables")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="the file whose headline block gets the headline")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        Path(args.out).write_text(json.dumps(merge(args.merge), indent=1) + "\n")
        print(f"wrote {args.out}")
    runs = load_all(Path(args.results_dir))
    if runs:
        print(f"wrote {chart(runs, Path(args.results_dir) / 'chart.png')}")
        publish(runs, args.doc, args.readme, Path(args.results_dir) / "data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
