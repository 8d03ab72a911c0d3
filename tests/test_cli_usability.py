"""A newcomer's first hour with the ``fastvae`` command: what it prints while it works, how it stops,
the errors it gives, the pictures it draws, its --help and the synopsis in docs/cli.md (issue 14)."""
import contextlib
import gzip
import hashlib
import io
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvae
from fastvae import checkpoint, data, plots
from fastvae.backends import resolve
from fastvae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--limit", "256", "--batch-size", "64", "--hidden-dims", "32", "--no-progress"]


def png_info(path: Path) -> tuple[int, int, dict[str, str]]:
    """(width, height, tEXt chunks) of a PNG file."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, size = 8, {}, None
    while pos < len(blob):
        (length,), tag = struct.unpack(">I", blob[pos:pos + 4]), blob[pos + 4:pos + 8]
        body = blob[pos + 8:pos + 8 + length]
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"tEXt":
            key, value = body.split(b"\0", 1)
            text[key.decode()] = value.decode("latin-1")
        elif tag == b"zTXt":
            key, rest = body.split(b"\0", 1)
            text[key.decode()] = zlib.decompress(rest[1:]).decode("latin-1")
        pos += 12 + length
    return size[0], size[1], text


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """--threads changes torch's thread count for the process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, real_data):
    """Two epochs of a small VAE through the CLI: (run folder, stdout)."""
    out = tmp_path_factory.mktemp("vae") / "run"
    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--epochs", "2", *TINY, "--out", str(out), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    return out, buf.getvalue()


def test_startup_line_then_one_line_per_epoch(vae_run):
    out, stdout = vae_run
    lines = stdout.splitlines()
    assert lines[0] == f"fastvae train: fashion-mnist train split, 256 of 60000 images from {data.load('fashion-mnist').source}"
    active = {op: resolve(op, "cpu")[0] for op in ("reparam", "loss", "decode")}
    assert f"device cpu, 1 CPU thread, backends: reparam {active['reparam']}, loss {active['loss']}, decode {active['decode']}" in stdout
    assert f"run folder {out} " in stdout and "model vae, loss -ELBO, 2 epochs of 4 steps (batch 64)" in stdout
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    for line, record in zip(epochs, torch.load(out / "checkpoint.pt", weights_only=True)["history"]):
        loss, recon, kl = map(float, re.search(r"-ELBO ([\d.]+) per sample \(recon ([\d.]+) \+ kl ([\d.]+)\)", line).groups())
        assert loss == pytest.approx(record["loss"], abs=0.006) and loss == pytest.approx(recon + kl, abs=0.02)


def test_each_epoch_is_reported_after_its_checkpoint_is_written(tmp_path, real_data):
    seen = []
    trainer = fastvae.Trainer(fastvae.VAE(hidden_dims=(16,), latent_dim=2), real_data.images[:96],
                              fastvae.TrainConfig(epochs=3, batch_size=32, progress=False), device="cpu", out_dir=tmp_path)
    trainer.fit(on_epoch=lambda record: seen.append((record["epoch"], checkpoint.load(tmp_path)["epoch"])))
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_iwae_lines_say_what_each_number_is(tmp_path, real_data, capsys):
    assert main(["train", "--epochs", "1", *TINY, "--objective", "iwae", "--k", "3", "--out", str(tmp_path / "run")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert re.search(r"-IWAE_3 bound [\d.]+ per sample \(diagnostics, not its terms: recon [\d.]+ averaged over the 3 samples, analytic kl [\d.]+\)", line)
    _, _, text = png_info(tmp_path / "run" / "samples.png")
    assert "epoch 1, -IWAE_3 bound" in text["Title"]


def _train_in_subprocess(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastvae", "train", "--out", str(out), "--no-progress", "--threads", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    proc.kill()
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s; got {lines} and {proc.stderr.read()}")


def test_ctrl_c_stops_cleanly_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, real_data):
    out = tmp_path / "run"
    options = ["--limit", "2048", "--batch-size", "32", "--hidden-dims", "32", "--latent-dim", "4", "--epochs", "1000"]
    proc = _train_in_subprocess(out, *options)
    _read_until(proc, "epoch 1/1000")  # printed as the epoch ends, long before the run would
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    state = checkpoint.load(out)  # the run folder's checkpoint.pt, whole
    assert state["epoch"] >= 1 and (out / "metrics.jsonl").stat().st_size > 0
    assert f"holds epoch {state['epoch']}" in err and "Every file written stays" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:4] == ["fastvae", "train", "--resume", str(out)] and command[4:] == ["--out", str(out), "--no-progress", "--threads", "1", *options]
    # the advice works (one more epoch instead of a thousand), and --resume takes the run folder
    command[command.index("--epochs") + 1] = str(state["epoch"] + 1)
    assert main(command[1:]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == state["epoch"] + 1


def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, real_data):
    out = tmp_path / "run"
    proc = _train_in_subprocess(out, "--batch-size", "8", "--epochs", "1")  # 7500 steps: seconds at least
    _read_until(proc, "  run folder")  # the start-up line: training starts next
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted in epoch 1" in err and "Nothing to resume from" in err
    assert not (out / "checkpoint.pt").exists()
    assert not out.exists() or [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # no empty folder; what was written stays


def test_run_folder_is_accepted_as_a_checkpoint_and_outputs_go_next_to_it(vae_run, tmp_path, monkeypatch, capsys):
    out, _ = vae_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(out), "-n", "16", "--seed", "3"]) == 0
    assert main(["reconstruct", str(out), "-n", "8"]) == 0
    assert main(["score", str(out / "checkpoint.pt"), "--split", "test", "--batch-size", "5000"]) == 0
    assert list(tmp_path.iterdir()) == []  # nothing in the current folder
    made = {p.name for p in out.iterdir()} - set(before)
    assert made == {"samples-n16-seed3.png", "reconstructions-test-n8.png", "scores-test-k1.csv"}
    assert all(before[name] == (out / name).read_bytes() for name in before)  # the run's own files untouched
    assert f"wrote {out / 'samples-n16-seed3.png'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sample", str(empty)]) == 2
    assert "is a folder without a checkpoint.pt" in capsys.readouterr().err


def test_a_file_that_is_no_checkpoint_is_named_as_such(capsys):
    assert main(["reconstruct", str(ROOT / "README.md")]) == 2
    err = capsys.readouterr().err
    assert "README.md' is not a fastvae checkpoint" in err
    assert "weights_only=False" not in err and "Weights only load failed" not in err and len(err.splitlines()) == 1


def _serve_mnist(monkeypatch, fail: bool = False) -> list[str]:
    """Replace the network: every fetch fails, or small MNIST files are served with matching MD5s."""
    urls = []
    rng = np.random.default_rng(0)
    served = {}
    for split, n in (("train", 64), ("test", 16)):
        arrays = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for stem, arr in zip(data._FILES[split], arrays):
            header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            served[stem + ".gz"] = gzip.compress(header + arr.tobytes())
            monkeypatch.setitem(data._MD5["mnist"], stem + ".gz", hashlib.md5(served[stem + ".gz"]).hexdigest())

    def fetch(url):
        urls.append(url)
        if fail:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_fetch", fetch)
    return urls


def test_missing_mnist_suggests_download_and_download_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTVAE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    urls = _serve_mnist(monkeypatch, fail=True)
    folder = tmp_path / "mnist"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "CLI --download" in capsys.readouterr().err and urls == []
    assert main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--download", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "could not download mnist train-images-idx3-ubyte.gz; nothing was written" in err and "Traceback" not in err
    assert "Temporary failure in name resolution" in err and "--data-dir" in err
    assert len(urls) == len(data._MIRRORS["mnist"]) and os.listdir(folder) == [] and not (tmp_path / "run").exists()


def test_download_flag_fetches_checksummed_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    urls = _serve_mnist(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--download", "--epochs", "1", "--hidden-dims", "16", "--out", str(run), "--no-progress"]) == 0
    cache = tmp_path / "home" / ".cache" / "fastvae" / "mnist"
    assert f"mnist train split, 64 of 64 images from {cache}" in capsys.readouterr().out
    assert main(["reconstruct", str(run), "--dataset", "mnist", "--download", "-n", "4"]) == 0
    assert sorted(os.listdir(cache)) == sorted(f + ".gz" for pair in data._FILES.values() for f in pair) and len(urls) == 4


def test_unusable_backend_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, real_data):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU tensors needs its interpreter
    out = tmp_path / "run"
    assert main(["train", "--backend", "triton", "--device", "cpu", "--limit", "64", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fastvae train: error: backend='triton' cannot run reparam on cpu tensors: Triton runs CPU tensors only through its interpreter")
    assert "epoch" not in captured.err + captured.out and "Traceback" not in captured.err  # no progress bar, no start-up line
    assert not out.exists()


def test_score_refuses_an_adversarial_autoencoder_with_the_reason(tmp_path, real_data, capsys):
    run = tmp_path / "aae"
    assert main(["train", "--model", "aae", "--epochs", "1", *TINY, "--out", str(run)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert re.search(r"recon \+ adversarial loss [\d.]+ per sample \(recon [\d.]+ \+ adversarial [\d.]+\)", line)
    assert main(["score", str(run)]) == 2
    err = capsys.readouterr().err
    assert "adversarial autoencoder (aae) has no ELBO or IWAE bound" in err and "reconstruction error" in err
    assert not list(run.glob("scores*"))


def test_pictures_are_large_and_titled(vae_run):
    out, _ = vae_run
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    for name, what, columns in (("samples.png", "64 samples from the prior (seed 0)", 8), ("reconstructions.png", "32 inputs, each row above its reconstructions", 8)):
        width, height, text = png_info(out / name)
        assert width >= 3 * (columns * 30 + 2), name  # 3x the 242-px grid
        assert text["Title"] == f"{what}\nepoch 2, -ELBO {history[-1]['loss']:.2f} per sample"


def test_conditional_samples_put_one_class_per_column(tmp_path, real_data, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "picture", lambda pixels, path, title, **kw: drawn.setdefault(Path(path).name, (pixels, title, kw)))
    assert main(["train", "--model", "cvae", "--epochs", "1", *TINY, "--out", str(tmp_path / "run")]) == 0
    canvas, title, kw = drawn["samples.png"]
    assert canvas.shape == (8 * 30 + 2, 10 * 30 + 2) and "one class per column" in title
    assert kw["xticks"][1] == [str(c) for c in range(10)] and kw["xlabel"] == "class"
    model = fastvae.models.from_config(checkpoint.load(tmp_path / "run")["config"])
    model.load_state_dict(checkpoint.load(tmp_path / "run")["model"])
    for c in (0, 3, 9):  # column c holds the samples of class c (the same latents, so the same pixels)
        column = torch.stack([canvas[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28] for r in range(8)])
        expected = model.sample(80, seed=0, labels=c, out_dtype=torch.uint8)[c::10].reshape(8, 28, 28)
        assert torch.equal(column, expected), c


def test_latent_map_has_axes(tmp_path, real_data, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "picture", lambda pixels, path, title, **kw: drawn.setdefault(Path(path).name, (pixels, title, kw)))
    assert main(["train", "--epochs", "1", *TINY, "--latent-dim", "2", "--out", str(tmp_path / "run")]) == 0
    _, title, kw = drawn["latent_map.png"]
    assert title.startswith("the 2-D latent space decoded\nepoch 1, -ELBO")
    assert kw["xlabel"].startswith("z1") and kw["ylabel"] == "z2"
    z1 = [float(v) for v in kw["xticks"][1]]
    z2 = [float(v) for v in kw["yticks"][1]]
    assert z1 == sorted(z1) and z2 == sorted(z2, reverse=True) and z1[0] == pytest.approx(-1.6, abs=0.05)  # the 5% quantile


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["train", "sample", "reconstruct", "score"])
def test_help_explains_every_option_and_shows_its_default(command):
    p = _subparsers()[command]
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.default is not None and not isinstance(action.default, bool):
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings}"


def test_docs_synopsis_lists_every_option():
    doc = (ROOT / "docs" / "cli.md").read_text()
    block = doc.split("## Synopsis", 1)[1].split("```", 2)[1]
    synopsis: dict[str, str] = {}
    for line in block.splitlines():
        words = line.split()
        if words[:1] == ["fastvae"]:
            current = words[1]
            synopsis[current] = line
        elif words:
            synopsis[current] += line
    for command in ("train", "sample", "reconstruct", "score"):
        for action in _subparsers()[command]._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert re.search(rf"\[{re.escape(flag)}[\] ]", synopsis[command]), f"docs/cli.md's `fastvae {command}` misses {flag}"


def test_threads_option_sets_torch_threads(vae_run):
    _, stdout = vae_run
    assert "device cpu, 1 CPU thread," in stdout
    with pytest.raises(SystemExit):
        main(["train", "--threads", "0"])
