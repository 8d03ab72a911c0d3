"""The benchmark harness: results file, chart, the tables of docs/performance.md and README's headline;
smoke runs never touch committed files."""
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks import common, report, run

ROOT = Path(__file__).resolve().parents[1]


def _committed_state() -> dict[str, str]:
    """Hash of README.md, docs/performance.md and every file under benchmarks/results."""
    files = [ROOT / "README.md", ROOT / report.DOC, *sorted(f for f in (ROOT / "benchmarks" / "results").rglob("*") if f.is_file())]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_smoke_suite_writes_results_chart_and_table_beside_out_only(tmp_path, capsys):
    before = _committed_state()
    out = tmp_path / "cpu-test.json"
    assert run.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    assert _committed_state() == before, "a smoke run changed README.md, docs/performance.md or benchmarks/results"
    doc = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "cuda", "command", "git_commit", "date", "results", "skipped"):
        assert key in doc
    ops = [r for r in doc["results"] if r["name"] not in ("reference_run", "dropin.step", "floor")]
    assert {r["name"] for r in ops} == {"loss.fwd", "loss.fwd_bwd", "reparam.fwd", "reparam.fwd_bwd", "decode.fwd"}
    steps = [r for r in doc["results"] if r["name"] == "dropin.step"]
    assert steps and all(r["median_ms"] > 0 for r in steps)
    impls = {r["backend"] for r in ops}
    assert {"eager-best", "eager-seed", "torch", "torch-nochecks", "cpp", "cpp-nochecks"} <= impls
    for r in ops:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["dtype"] == "float32"
        assert r["gbps"] == pytest.approx(common.bytes_moved(r["op"], tuple(r["shape"]), torch.float32, r["pass"] == "fwd_bwd") / r["median_ms"] / 1e6)
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
        if common.is_fastvae(r["backend"]):
            assert r["value_checks"] is not r["backend"].endswith("-nochecks")
    if os.access("/proc/self/clear_refs", os.W_OK):  # the CPU peak comes from its own pass: it must reach every record
        assert all(r["peak_mem_mb"] is not None for r in ops)
    skipped = {(s.get("name"), s.get("backend")): s["reason"] for s in doc["skipped"]}
    assert "CUDA tensors" in skipped[("loss.fwd_bwd", "cuda")]
    floor = [r for r in doc["results"] if r["name"] == "floor"]  # the Trainer's epoch against its matrix products
    assert len(floor) == 1 and floor[0]["ratio_min"] > 0 and floor[0]["gflops_floor"] > 0 and floor[0]["products_per_step"] == 14
    ref = {r["backend"]: r for r in doc["results"] if r["name"] == "reference_run"}
    assert set(ref) == {"seed-loop", "eager-device", "fastvae"}
    for r in ref.values():
        assert r["seconds"] > 0 and math.isfinite(r["final_loss"]) and 100 < r["final_loss"] < 800
    mine = ref["fastvae"]  # its own floor, timed after each epoch and taken out of its seconds
    assert len(mine["floor_s"]) == len(mine["epoch_s"]) == 1 and mine["floor_s"][0] > 0
    assert mine["floor_ratio"] == pytest.approx(mine["seconds"] / mine["floor_s"][0])
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "cpu-test.md").read_text()
    assert "| loss.fwd_bwd | 64x96x8 | float32 |" in table and "| seed-loop | 512 x 1 |" in table
    assert "| training step vs its GEMM floor |" in table and "| reference run (1 epochs, 4 steps) |" in table and "(whole run)" in table
    assert "docs/performance.md and README.md untouched" in capsys.readouterr().out


def _canned_ops(*_args, **_kwargs):
    rec = {"name": "loss.fwd_bwd", "op": "loss", "pass": "fwd_bwd", "shape": [8, 4, 2], "dtype": "float32", "device": "cpu",
           "bytes": 4000, "peak_mem_mb": None, "gbps": 1.0}
    return ([{**rec, "backend": "eager-best", "median_ms": 2.0}, {**rec, "backend": "eager-seed", "median_ms": 6.0},
             {**rec, "backend": "cpp", "value_checks": True, "median_ms": 1.0}, {**rec, "backend": "cpp-nochecks", "value_checks": False, "median_ms": 0.5}],
            [{"name": "loss.fwd_bwd", "backend": "cuda", "shape": [8, 4, 2], "dtype": "float32", "reason": "cuda: no GPU here"}])


def test_smoke_without_out_writes_a_temporary_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run, "run_ops", _canned_ops)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where tempfile.mkdtemp puts the run's folder
    monkeypatch.setattr(run.tempfile, "tempdir", None)
    before = _committed_state()
    assert run.main(["--smoke", "--device", "cpu", "--parts", "ops"]) == 0
    assert _committed_state() == before
    (folder,) = tmp_path.glob("fastvae-bench-*")
    assert {p.suffix for p in folder.iterdir()} == {".json", ".png", ".md"}
    assert "| 2.00x (cpp) | 6.00x (cpp) | 2.00x |" in next(folder.glob("*.md")).read_text()
    assert str(folder) in capsys.readouterr().out


def test_full_run_publishes_results_chart_tables_and_headline(monkeypatch, tmp_path):
    """The documented job of a full run without --out: results file, chart, the tables in
    docs/performance.md and README's headline."""
    monkeypatch.setattr(run, "run_ops", _canned_ops)
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    (tmp_path / "docs").mkdir()
    (tmp_path / report.DOC).write_text(f"# x\n\n{report.START}\nold table\n{report.END}\n\nrest\n")
    (tmp_path / "README.md").write_text(f"# y\n\n{report.HEADLINE[0]}\nold headline\n{report.HEADLINE[1]}\n\nmore\n")
    assert run.main(["--device", "cpu", "--parts", "ops"]) == 0
    (published,) = (tmp_path / "results").glob("cpu-*.json")
    assert json.loads(published.read_text())["skipped"][0]["reason"] == "cuda: no GPU here"
    assert (tmp_path / "results" / "chart.png").exists()
    text = (tmp_path / report.DOC).read_text()
    assert "old table" not in text and text.endswith("\n\nrest\n")
    assert "| loss.fwd_bwd | 8x4x2 | float32 |" in text and "- skipped 1x: cuda: no GPU here" in text
    readme = (tmp_path / "README.md").read_text()
    assert "old headline" not in readme and readme.endswith("\n\nmore\n")
    assert "| device |" in readme and "| loss.fwd_bwd |" not in readme


def test_headline_names_the_device_and_the_speedups():
    rec = {"shape": [65536, 784, 20], "dtype": "float32", "gbps": 1.0, "name": "loss.fwd_bwd"}
    ref = {"name": "reference_run", "shape": [60000, 784, 20], "dtype": "float32", "epochs": 10, "final_loss": 242.0}
    run_doc = {"device": "cuda", "device_name": "GPU X", "date": "2030-01-02T03:04", "results": [
        {**rec, "backend": "eager-best", "median_ms": 9.0}, {**rec, "backend": "cuda", "value_checks": True, "median_ms": 3.0},
        {**rec, "backend": "cuda-nochecks", "value_checks": False, "median_ms": 1.0},  # checks off is not the headline
        {**ref, "backend": "seed-loop", "seconds": 50.0}, {**ref, "backend": "fastvae", "seconds": 0.5, "floor_ratio": 1.125}]}
    row = report.headline_block([run_doc]).splitlines()[-1]
    assert row == "| GPU X, 2030-01-02 | **3.00x** (3 vs 9 ms) | - | **100.00x** (0.5 vs 50.0 s) | **1.12x** (1.0 = its matrix products alone) |"


def test_smoke_updates_a_tables_file_and_results_folder_named_explicitly(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "run_ops", _canned_ops)
    tables = tmp_path / "performance.md"
    tables.write_text(f"{report.START}\nold\n{report.END}\n")
    before = _committed_state()
    assert run.main(["--smoke", "--device", "cpu", "--parts", "ops", "--results-dir", str(tmp_path), "--doc", str(tables)]) == 0
    assert _committed_state() == before
    assert len(list(tmp_path.glob("cpu-*.json"))) == 1 and (tmp_path / "chart.png").exists()
    assert "| loss.fwd_bwd | 8x4x2 | float32 |" in tables.read_text()


def test_unsupported_dtype_is_skipped_with_its_reason(monkeypatch, tmp_path):
    """The C++ kernels take float32/float64: at bfloat16 the run goes on and the results say why."""
    monkeypatch.setenv("FASTVAE_BENCH_DTYPES", "bfloat16")
    out = tmp_path / "bf16.json"
    assert run.main(["--smoke", "--device", "cpu", "--parts", "ops", "--out", str(out), "--pytest-args", "-k loss.fwd-"]) == 0
    doc = json.loads(out.read_text())
    assert {r["backend"] for r in doc["results"]} >= {"eager-best", "eager-seed", "torch"}
    reasons = {s["backend"]: s["reason"] for s in doc["skipped"] if s.get("dtype") == "bfloat16"}
    assert "float32 or float64" in reasons["cpp"] and "float32 or float64" in reasons["cpp-nochecks"]


DROPIN_STAND_IN = '''
import time
import pytest

MS = {("mlp", "user"): 40.0, ("mlp", "accelerated"): 20.0, ("mlp", "engine"): 10.0, ("conv", "user"): 60.0, ("conv", "accelerated"): 30.0}


@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize("impl", ["user", "accelerated", "engine"])
def test_step(benchmark, model, impl):
    if (model, impl) not in MS:
        pytest.skip("no engine path for this model")
    benchmark.extra_info.update({"op": "dropin", "pass": "step", "model": model, "impl": impl,
                                 "backend": "torch" if impl == "user" else "cpp", "shape": [128], "dtype": "float32", "device": "cpu"})
    benchmark.pedantic(time.sleep, args=(MS[(model, impl)] / 1e3,), rounds=3, iterations=1)
'''


def test_dropin_part_runs_the_file_when_it_exists_and_renders_its_table(monkeypatch, tmp_path, capsys):
    out = tmp_path / "dropin.json"
    monkeypatch.setattr(run, "DROPIN", tmp_path / "absent.py")
    assert run.main(["--smoke", "--device", "cpu", "--parts", "dropin", "--out", str(out)]) == 0
    assert "absent.py does not exist; part skipped" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"] == []

    stand_in = tmp_path / "test_dropin.py"
    stand_in.write_text(DROPIN_STAND_IN)
    monkeypatch.setattr(run, "DROPIN", stand_in)
    assert run.main(["--smoke", "--device", "cpu", "--parts", "dropin", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["model"], r["impl"]) for r in doc["results"]} == {("mlp", "user"), ("mlp", "accelerated"), ("mlp", "engine"),
                                                                  ("conv", "user"), ("conv", "accelerated")}
    assert all(r["name"] == "dropin.step" and r["gbps"] is None for r in doc["results"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.dropin_table(doc).splitlines()[2:]}
    mlp, conv = rows["mlp"], rows["conv"]
    assert mlp[1:3] == ["128", "float32"] and mlp[4].endswith("(cpp)") and conv[5] == "-"
    assert 1.2 < float(mlp[6].removesuffix("x")) < 2.8 and 2.2 < float(mlp[7].removesuffix("x |")) < 5  # sleeps of 40, 20, 10 ms
    assert "| your VAE |" in (tmp_path / "dropin.md").read_text()


def test_ops_table_reads_older_files_as_what_they_measured():
    """Before the honest baselines "eager" was the seed's formulation (and "compile" compiled it) and
    fastvae ran with checks off."""
    rec = {"name": "loss.fwd", "shape": [1, 2, 3], "dtype": "float32", "gbps": 1.0}
    old = {"results": [{**rec, "backend": "eager", "median_ms": 3.0}, {**rec, "backend": "cpp", "median_ms": 1.0},
                       {**rec, "backend": "compile", "median_ms": 2.0}]}
    table = report.ops_table(old)
    assert "eager-seed ms" in table and "fastvae[cpp] checks off ms" in table and "compile of eager-seed ms" in table
    assert table.splitlines()[-1].endswith("| - | - | - |")  # no default-path fastvae, no eager-best: no speed-up claimed
    new = {"results": [{**rec, "backend": "cuda", "value_checks": True, "median_ms": 1.0, "x_dtype": "uint8"},
                       {**rec, "backend": "eager-best", "median_ms": 4.0, "x_dtype": "uint8"}]}
    assert "| loss.fwd | 1x2x3 | float32, x uint8 | 4 (1) | 1 (1) | 4.00x (cuda) | - | - |" in report.ops_table(new)


def test_rewrite_block_needs_markers(tmp_path):
    f = tmp_path / "README.md"
    f.write_text("no markers\n")
    assert report.rewrite_block(f, "table\n") is False
    assert f.read_text() == "no markers\n"


def test_bytes_moved_formulas():
    assert common.bytes_moved("loss", (128, 784, 20), torch.float32, False) == 4 * (2 * 128 * 784 + 2 * 128 * 20)
    assert common.bytes_moved("loss", (128, 784, 20), torch.bfloat16, True) == 2 * (3 * 128 * 784 + 4 * 128 * 20)
    assert common.bytes_moved("loss", (128, 784, 20), torch.float32, True, torch.uint8) == 5 * 128 * 784 + 4 * (128 * 784 + 4 * 128 * 20)
    assert common.bytes_moved("reparam", (10, 3), torch.float32, True) == 4 * 9 * 30 + 8 * 10
    assert common.bytes_moved("decode", (5, 2, 4, 6), torch.float32, False) == 4 * (10 + 12 + 30 + 30)
    with pytest.raises(ValueError, match="unknown op"):
        common.bytes_moved("nope", (1,), torch.float32, False)


def test_merge_replaces_equal_records_and_refuses_mixed_devices(tmp_path):
    rec = {"name": "loss.fwd", "backend": "eager", "shape": [1, 2, 3], "dtype": "float32", "median_ms": 1.0}
    head = {"device_name": "X", "command": "a", "git_commit": "c1", "results": [rec, {**rec, "backend": "torch"}]}
    (tmp_path / "a.json").write_text(json.dumps(head))
    (tmp_path / "b.json").write_text(json.dumps({**head, "command": "b", "git_commit": "c2", "results": [{**rec, "median_ms": 2.0}]}))
    merged = report.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert merged["command"] == "a && b" and merged["git_commit"] == "c1 + c2"
    assert sorted((r["backend"], r["median_ms"]) for r in merged["results"]) == [("eager", 2.0), ("torch", 1.0)]
    (tmp_path / "c.json").write_text(json.dumps({**head, "device_name": "Y"}))
    with pytest.raises(ValueError, match="different devices"):
        report.merge([tmp_path / "a.json", tmp_path / "c.json"])


def test_data_path_table_takes_the_latest_record_of_each_part_with_its_command(tmp_path):
    """benchmarks/results/data/ (benchmarks.stream, prepare_bench, logger_overhead) -> the data table of README and docs."""
    def write(name, date, command, results):
        meta = {"device_name": "CPU X (2 threads)", "date": date, "command": command}
        (tmp_path / name).write_text(json.dumps({"meta": meta, "results": results}))

    write("stream-old.json", "2030-01-01T00:00", "python -m benchmarks.stream", [{"part": "train", "speed_ratio": 0.5, "met": False}])
    write("stream-new.json", "2030-01-02T00:00", "python -m benchmarks.stream --parts train,memory",
          [{"part": "train", "speed_ratio": 0.97, "met": True},
           {"part": "memory", "set_bytes": 4 * 2**30, "rss_anon_peak": 300 * 2**20, "met": True}])
    write("prepare.json", "2030-01-01T00:00", "python -m benchmarks.prepare_bench",
          [{"part": "prepare", "images": 6000, "ratio_prepare2_vs_loop": 1.5, "met": False}])
    write("logger.json", "2030-01-01T00:00", "python -m benchmarks.logger_overhead",
          [{"part": "logger_overhead", "ratio_min": 1.01, "met": True}])
    rows = report.data_block(tmp_path).splitlines()[2:]
    assert len(rows) == 4 and not any("0.50x" in r for r in rows)
    assert "| **0.97x** | >= 0.95x | `python -m benchmarks.stream --parts train,memory` |" in rows[0]
    assert "4.0 GiB set | **300 MiB** | < 1024 MiB |" in rows[1]
    assert "**1.50x** (not met) | >= 1.8x |" in rows[2] and "**1.010x**" in rows[3]
    front = report.data_block(tmp_path, report.README_PARTS)
    assert "logger" not in front and len(front.splitlines()) == 5
    assert report.data_block(tmp_path / "none") == ""


def test_readme_and_docs_numbers_are_what_the_committed_results_give():
    """README's headline and data table, and docs/performance.md's tables, are the report of benchmarks/results/ as committed."""
    readme, doc = (ROOT / "README.md").read_text(), (ROOT / report.DOC).read_text()
    runs = report.load_all()
    assert f"{report.HEADLINE[0]}\n{report.headline_block(runs)}{report.HEADLINE[1]}" in readme
    assert f"{report.START}\n{report.tables_block(runs)}{report.END}" in doc
    data = report.data_block()
    assert data, "no data-path results committed under benchmarks/results/data/"
    assert f"{report.DATA_BLOCK[0]}\n{report.data_block(parts=report.README_PARTS)}{report.DATA_BLOCK[1]}" in readme
    assert f"{report.DATA_BLOCK[0]}\n{data}{report.DATA_BLOCK[1]}" in doc


def test_step_split_times_the_step_with_and_without_adam_against_its_floor():
    from benchmarks import step_profile

    table = step_profile.split(rounds=1, window=2)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    names = [r[0].lstrip("| ") for r in rows]
    assert names == ["the step's products alone (the floor)", "the step (Adam included)", "the step without Adam's update",
                     "Adam alone, its buffers in cache", "Adam alone after a 64 MiB sweep", "Adam alone after a step's time idle"]
    assert all(float(r[1]) > 0 for r in rows)
    assert rows[0][2] == "1.00x |"
