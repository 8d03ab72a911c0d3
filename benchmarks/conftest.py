"""Benchmark set-up: fastvae must not fall back silently while timed (FASTVAE_STRICT=1), and the
Triton interpreter is only switched on for CPU when FASTVAE_BENCH_TRITON=1 asks for it.

FASTVAE_BENCH_SKIPS=FILE: every skipped benchmark is appended there as a JSON line with its
reason (benchmarks.run puts them in the results file, so a skip is never silent)."""
import json
import os

import pytest

os.environ["FASTVAE_STRICT"] = "1"
if os.environ.get("FASTVAE_BENCH_TRITON") == "1":
    import torch

    if not torch.cuda.is_available() or os.environ.get("FASTVAE_BENCH_DEVICE") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def skip_record(nodeid: str, params: dict, reason: str) -> dict:
    """What a skip leaves in the results: the case (op benchmarks: name, backend, shape, dtype) and why."""
    rec: dict = {"test": nodeid, "reason": reason}
    case, impl = params.get("case"), params.get("impl")
    if isinstance(case, tuple) and len(case) == 4 and isinstance(impl, str):
        op, backward, shape, dtype = case
        rec.update(name=f"{op}.{'fwd_bwd' if backward else 'fwd'}", backend=impl, shape=list(shape), dtype=str(dtype).removeprefix("torch."))
    return rec


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("FASTVAE_BENCH_SKIPS")
    if path and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        params = getattr(getattr(item, "callspec", None), "params", {})
        with open(path, "a") as f:
            f.write(json.dumps(skip_record(item.nodeid, params, reason)) + "\n")
