"""The benchmark harness end to end at smoke size: results file, chart and README block."""
import json
import math
import os

import pytest
import torch

from benchmarks import common, report, run


def test_smoke_suite_writes_results_chart_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nold table\n{report.END}\n\nrest\n")
    out = tmp_path / "cpu-test.json"
    assert run.main(["--smoke", "--device", "cpu", "--out", str(out), "--results-dir", str(tmp_path), "--readme", str(readme)]) == 0
    doc = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "cuda", "command", "git_commit", "date", "results"):
        assert key in doc
    ops = [r for r in doc["results"] if r["name"] != "reference_run"]
    assert {r["name"] for r in ops} == {"loss.fwd", "loss.fwd_bwd", "reparam.fwd", "reparam.fwd_bwd", "decode.fwd"}
    assert {"torch", "eager"} <= {r["backend"] for r in ops}
    for r in ops:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["dtype"] == "float32"
        assert r["gbps"] == pytest.approx(common.bytes_moved(r["op"], tuple(r["shape"]), torch.float32, r["pass"] == "fwd_bwd") / r["median_ms"] / 1e6)
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
    if os.access("/proc/self/clear_refs", os.W_OK):  # the CPU peak comes from its own pass: it must reach every record
        assert all(r["peak_mem_mb"] is not None for r in ops)
    ref = {r["backend"]: r for r in doc["results"] if r["name"] == "reference_run"}
    assert set(ref) == {"seed-loop", "eager-device", "fastvae"}
    for r in ref.values():
        assert r["seconds"] > 0 and math.isfinite(r["final_loss"]) and 100 < r["final_loss"] < 800
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old table" not in text and "| loss.fwd_bwd | 64x96x8 | float32 |" in text and text.endswith("\n\nrest\n")
    assert "| seed-loop | 512 x 1 |" in text


def test_rewrite_block_needs_markers(tmp_path):
    f = tmp_path / "README.md"
    f.write_text("no markers\n")
    assert report.rewrite_block(f, "table\n") is False
    assert f.read_text() == "no markers\n"


def test_bytes_moved_formulas():
    assert common.bytes_moved("loss", (128, 784, 20), torch.float32, False) == 4 * (2 * 128 * 784 + 2 * 128 * 20)
    assert common.bytes_moved("loss", (128, 784, 20), torch.bfloat16, True) == 2 * (3 * 128 * 784 + 4 * 128 * 20)
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
