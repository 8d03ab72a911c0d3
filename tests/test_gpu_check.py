"""benchmarks.gpu_check: its dry run end to end (schema, every step's status, nothing written into
benchmarks/results), and the pieces that keep a short GPU lease safe (time limits, budget, reruns)."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, report

ROOT = Path(__file__).resolve().parents[1]
HEAD = ("device", "device_name", "torch", "triton", "cuda", "python", "command", "git_commit", "date", "results", "skipped", "gpu_check")


@pytest.mark.skipif(os.environ.get("FASTVAE_GPU_CHECK_CHILD") == "1", reason="inside gpu_check itself: no recursion")
def test_dry_run_reports_every_step_in_the_suites_schema(tmp_path, real_data):
    before = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir()) == before, "a dry run wrote into benchmarks/results"
    (json_file,) = out.glob("*.json")
    assert json_file.with_suffix(".md").exists() and (out / "gpu_check.log").exists()
    assert str(Path(json_file.name)) in proc.stdout and "/benchmarks/results/" not in proc.stdout

    doc = json.loads(json_file.read_text())
    assert set(HEAD) <= set(doc) and doc["device"] == "cpu"
    g = doc["gpu_check"]
    assert g["dry_run"] is True and g["budget_s"] == gpu_check.DEFAULT_BUDGET_S and 0 < g["elapsed_s"] < g["budget_s"]
    steps = {s["name"]: s for s in g["steps"]}
    assert list(steps) == gpu_check.ORDER
    for s in steps.values():
        assert s["status"] in ("passed", "skipped"), s
        assert isinstance(s["checks"], list) and isinstance(s["details"], dict) and s["seconds"] >= 0
    assert steps["graph-engine"]["status"] == "skipped" and "CUDA" in steps["graph-engine"]["reason"]
    assert {c["name"]: c["note"] for c in steps["correctness"]["checks"]}["compute-sanitizer memcheck"] == "needs CUDA"
    assert "setup" in steps["environment"]["details"]
    assert g["copy_gbps"] == steps["bandwidth"]["details"]["copy_gbps"] > 0  # measured once, in the bandwidth step

    by_step = {}
    for r in doc["results"]:
        assert {"name", "backend", "shape", "dtype", "device", "median_ms", "step"} <= set(r) and r["median_ms"] > 0
        by_step.setdefault(r["step"], set()).add(r["backend"])
    assert {"cpp", "cpp-nochecks", "eager-best", "eager-seed"} <= by_step["bandwidth"]
    assert {"fastvae", "eager-device", "seed-loop"} <= by_step["reference-run"]
    assert by_step["suite"]
    assert all("reason" in s and "step" in s for s in doc["skipped"])
    assert all(x["met"] is None for x in g["goals"])  # tiny CPU sizes judge nothing
    assert "| loss.fwd_bwd |" in report.tables_block([doc])  # the tables of docs/performance.md draw from it
    assert "dry run on the CPU" in json_file.with_suffix(".md").read_text()


def _state(tmp_path, budget=60.0) -> gpu_check.State:
    args = argparse.Namespace(dry_run=True, data_dir=None, out=None, budget_s=budget, steps="environment")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    return gpu_check.State(args, tmp_path, time.time() + budget, "cpu", env, selected={"environment"})


def test_a_step_past_its_limit_is_killed_and_keeps_what_it_reported(tmp_path):
    state = _state(tmp_path)
    (tmp_path / "slow.jsonl").write_text(json.dumps({"t": "record", "record": {"name": "x", "median_ms": 1.0}}) + "\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    t0 = time.time()
    e = gpu_check.finish(state, gpu_check.Job("slow", proc, time.time(), 1.0))
    assert time.time() - t0 < 20 and proc.poll() is not None
    assert e["status"] == "timeout" and "1 s limit" in e["reason"] and e["records"] == [{"name": "x", "median_ms": 1.0, "step": "slow"}]


def test_a_crashed_step_is_an_error_with_its_log_and_a_spent_budget_runs_nothing(tmp_path):
    state = _state(tmp_path)
    (tmp_path / "boom.log").write_text("Traceback ...\nRuntimeError: CUDA error: an illegal memory access\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
    e = gpu_check.finish(state, gpu_check.Job("boom", proc, time.time(), 30.0))
    assert e["status"] == "error" and "exit 3" in e["reason"] and "illegal memory access" in e["reason"]
    state.deadline = time.time() + 2
    assert gpu_check.start(state, "bandwidth", 90) is None
    assert state.steps["bandwidth"]["status"] == "not-run"


def _doc(steps, results, dry=False):
    return {"results": results, "gpu_check": {"dry_run": dry, "steps": steps}}


def test_goals_read_the_measurements():
    ref = {"name": "reference_run", "shape": [60000, 784, 20], "epochs": 10}
    bw = {"name": "loss.fwd_bwd", "step": "bandwidth", "shape": [65536, 784, 20], "x_dtype": "float32", "median_ms": 0.2}
    results = [{**ref, "backend": "fastvae", "seconds": 0.8, "final_loss": 242.0}, {**ref, "backend": "compile-ro", "seconds": 1.0, "final_loss": 242.5},
               {**ref, "backend": "seed-loop", "epochs": 1, "seconds": 6.0, "seconds_10_epochs": 60.0, "final_loss": 300.0},
               {**bw, "backend": "triton", "value_checks": True, "copy_fraction": 0.9}, {**bw, "backend": "cuda", "value_checks": True, "copy_fraction": 0.7},
               {**bw, "backend": "triton-nochecks", "value_checks": False, "copy_fraction": 0.95}]
    checks = [{"name": "kernels per captured training step", "ok": True, "value": "64", "note": ""},
              {"name": "host syncs per replayed step", "ok": False, "value": "1", "note": ""}]
    goals = {x["goal"]: x for x in gpu_check.goals(_doc([{"name": "graph-engine", "checks": checks}], results))}
    assert goals["reference run with the fastvae Trainer"]["met"] is True
    assert goals["... vs torch.compile reduce-overhead"] == {**goals["... vs torch.compile reduce-overhead"], "value": "1.2x", "met": False}
    assert goals["... vs the seed-style DataLoader loop"]["value"] == "75x (1 epoch, scaled)" and goals["... vs the seed-style DataLoader loop"]["met"]
    assert goals["final losses of the 10-epoch variants agree"]["value"].startswith("0.21% (2 variants)")  # the 1-epoch seed loop is left out
    loss = goals["bandwidth: loss.fwd_bwd (x float32), default path"]
    assert loss["met"] is True and loss["value"].startswith("90% (triton, 65536x784x20")  # the default path, not the checks-off 95%
    assert goals["bandwidth: reparam.fwd, default path"] == {**goals["bandwidth: reparam.fwd, default path"], "value": "not measured", "met": None}
    assert goals["kernels per captured training step"]["met"] is True and goals["host syncs per replayed step"]["met"] is False
    assert all(x["met"] is None for x in gpu_check.goals(_doc([{"name": "graph-engine", "checks": checks}], results, dry=True)))


def test_a_rerun_keeps_the_earlier_runs_other_steps():
    step = lambda name, status="passed": {"name": name, "status": status, "reason": "", "checks": []}  # noqa: E731
    ref = {"name": "reference_run", "backend": "fastvae", "shape": [60000, 784, 20], "epochs": 10, "seconds": 0.9, "final_loss": 242.0, "step": "reference-run"}
    bw = {"name": "loss.fwd", "backend": "eager-best", "shape": [8, 8, 2], "step": "bandwidth"}
    old = {"device_name": "GPU", "command": "a", "date": "2026-12-01T10:00:00+00:00", "results": [ref, {**bw, "old": True}],
           "skipped": [], "gpu_check": {"dry_run": False, "steps": [step("bandwidth"), step("reference-run")]}}
    new = {"device_name": "GPU", "command": "b", "results": [bw], "skipped": [],
           "gpu_check": {"dry_run": False, "steps": [step("bandwidth"), step("reference-run", "not-run")]}}
    doc = gpu_check.judge(gpu_check.merge_earlier(new, old, ran={"bandwidth"}))
    assert doc["results"] == [ref, bw]
    assert doc["gpu_check"]["goals"][0]["value"] == "0.90 s"  # the goals see the kept records
    assert [s["status"] for s in doc["gpu_check"]["steps"]] == ["passed", "passed"] and "2026-12-01" in doc["gpu_check"]["steps"][1]["reason"]
    assert doc["command"] == "a && b"
    assert gpu_check.merge_earlier({**new, "device_name": "other"}, old, ran={"bandwidth"})["results"] == [bw]


def test_kept_steps_keep_the_date_of_the_run_that_ran_them(tmp_path, monkeypatch):
    """A run writes its results file after every step: the steps it keeps from an earlier run of the
    day are read from that run's file as it was before this run began, so they are never labelled
    with this run's date, and each write judges the goals once."""
    path = tmp_path / "gpu.json"
    earlier = {"device_name": "GPU", "command": "first", "date": "2026-12-01T08:00:00+00:00", "git_commit": "c0",
               "results": [{"name": "reference_run", "backend": "fastvae", "shape": [60000, 784, 20], "epochs": 10, "seconds": 0.9,
                            "final_loss": 242.0, "step": "reference-run"}], "skipped": [],
               "gpu_check": {"dry_run": False, "steps": [gpu_check.entry("reference-run", "passed", 50, 150) | {"records": 1, "ran": "2026-12-01T08:00:00+00:00"}]}}
    path.write_text(json.dumps(earlier))
    state = _state(tmp_path)
    state.args.dry_run = False
    state.device_name, state.results_file, state.selected = "GPU", path, {"bandwidth"}
    state.earlier = gpu_check.read_earlier(path)
    state.meta = {"device_name": "GPU", "command": "second", "date": "2026-12-01T14:00:00+00:00", "git_commit": "c1", "torch": "2.11", "cuda": "13.0",
                  "triton": "3.6"}
    judged = []
    real_goals = gpu_check.goals
    monkeypatch.setattr(gpu_check, "goals", lambda doc: judged.append(1) or real_goals(doc))
    for _ in range(3):  # one write per step of this run
        state.steps["bandwidth"] = gpu_check.entry("bandwidth", "passed", 10, 90) | {"details": {"copy_gbps": 2000.0}}
        doc = gpu_check.write(state)
    assert len(judged) == 3  # once per write
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(doc, default=str))
    steps = {s["name"]: s for s in on_disk["gpu_check"]["steps"]}
    assert steps["reference-run"]["status"] == "passed" and steps["reference-run"]["reason"] == "from the run of 2026-12-01T08:00:00+00:00"
    assert steps["bandwidth"]["ran"] == "2026-12-01T14:00:00+00:00" and on_disk["gpu_check"]["copy_gbps"] == 2000.0
    assert on_disk["command"] == "first && second" and on_disk["results"][0]["seconds"] == 0.9
    # a third run of the day keeps the first run's date for the step neither later run ran
    state.earlier, state.meta = gpu_check.read_earlier(path), {**state.meta, "command": "third", "date": "2026-12-01T20:00:00+00:00"}
    steps = {s["name"]: s for s in gpu_check.write(state)["gpu_check"]["steps"]}
    assert steps["reference-run"]["reason"] == "from the run of 2026-12-01T08:00:00+00:00"
    assert steps["bandwidth"]["ran"] == "2026-12-01T20:00:00+00:00"


@pytest.mark.parametrize("steps,ok", [("bandwidth,reference-run", True), ("bandwidth,nope", False)])
def test_steps_option(steps, ok, capsys):
    if ok:
        assert gpu_check.parse(["--steps", steps]).steps == steps
    else:
        with pytest.raises(SystemExit):
            gpu_check.parse(["--steps", steps])
        assert "unknown: nope" in capsys.readouterr().err
