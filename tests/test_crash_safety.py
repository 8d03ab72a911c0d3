"""Crash safety: SIGKILL while training/checkpointing, resume, and get the uninterrupted run bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvae import checkpoint

EPOCHS = 20
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = f"import sys; sys.path.insert(0, {HERE!r}); import test_crash_safety as t; t.train(sys.argv[1], announce=True)"


def train(out, announce=False):
    """A tiny run: resume from out/checkpoint.pt when present, then train to EPOCHS (also the worker's body)."""
    import fastvae

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = torch.randint(0, 256, (72, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = fastvae.VAE(input_dim=36, hidden_dims=(16,), latent_dim=3)
        cfg = fastvae.TrainConfig(epochs=EPOCHS, batch_size=16, lr=3e-3, warmup=1, warmup_unit="epochs", seed=5, log_every=2, progress=False)
        trainer = fastvae.Trainer(model, images, cfg, device="cpu", out_dir=out)
        if (Path(out) / "checkpoint.pt").exists():
            trainer.resume(Path(out) / "checkpoint.pt")
        if announce:
            print("ready", trainer.epoch, flush=True)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)


def _start(out, **env):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, **env})


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_random_moments_and_between_write_and_rename_then_resume_is_bit_identical(tmp_path):
    out, rng = tmp_path / "run", random.Random(1)
    for _ in range(1):  # at a random moment (mostly mid-epoch: the epoch is replayed from its checkpoint)
        proc = _start(out)
        assert proc.stdout.readline().startswith("ready")
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        _kill(proc)
    # deterministically after the new checkpoint is written and fsynced, before its rename (test hook pauses there)
    before = checkpoint.load(out / "checkpoint.pt")["epoch"]
    old = set(out.glob(".checkpoint.pt.*.tmp"))  # the random kill may itself have left one, complete or not
    proc = _start(out, **{checkpoint.TEST_PAUSE_ENV: "0.5"})
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in set(out.glob(".checkpoint.pt.*.tmp")) - old):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.1)  # well inside the 0.5 s pause
    _kill(proc)
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == before  # the last good checkpoint is intact
    (stale,) = set(out.glob(".checkpoint.pt.*.tmp")) - old
    assert checkpoint.load(stale)["epoch"] == before + 1  # the killed one was complete, just not renamed
    proc = _start(out)
    assert proc.stdout.readline().startswith("ready") and proc.wait(timeout=120) == 0
    state = checkpoint.load(out / "checkpoint.pt")

    train(tmp_path / "straight")  # the uninterrupted run, in this process
    want = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    assert state["epoch"] == EPOCHS and state["step"] == want["step"]
    for name, p in want["model"].items():
        assert torch.equal(state["model"][name], p), name
    for a, b in zip(state["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(state["rng"]["torch"], want["rng"]["torch"]) and state["data_seed"] == want["data_seed"] == 5
    assert [h["loss"] for h in state["history"]] == [h["loss"] for h in want["history"]]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == sorted(set(steps)), "metrics.jsonl holds records the killed runs wrote past their checkpoint"
    assert [r["epoch"] for r in records if r.get("event") == "epoch"] == list(range(1, EPOCHS + 1))
    assert not list(out.glob(".checkpoint.pt.*.tmp")), "a stale temp file survived"


class _RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_checkpoint_carrying_pickled_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refused by torch.load\\(weights_only=True\\).*may carry pickled code"):
        checkpoint.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickler runs it
    assert marker.read_text() == "pwned"
