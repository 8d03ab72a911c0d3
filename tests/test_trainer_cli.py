"""The training engine and the CLI on a small subset of the real Fashion-MNIST."""
import json

import pytest
import torch

import fastvae
from fastvae import checkpoint
from fastvae.cli import main



def test_cli_one_epoch_writes_everything_and_resume_continues(tmp_path, real_data):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--limit", "640", "--batch-size", "64", "--out", str(out), "--no-progress"]) == 0
    for name in ("checkpoint.pt", "metrics.jsonl", "reconstructions.png", "samples.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "latent_map.png").exists()  # only for a 2-D latent space
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 10 and state["config"]["latent_dim"] == 20
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "loss", "recon", "kl", "samples_per_s"} <= set(records[0])
    first = records[-1]["loss"]
    assert 100 < first < 700  # per-sample negative ELBO of 784 pixels after a few steps

    assert main(["train", "--epochs", "3", "--limit", "640", "--batch-size", "64", "--resume", str(out / "checkpoint.pt"), "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 30
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event": "epoch"' in line]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["loss"] < epochs[0]["loss"]


def test_cli_two_dim_latent_space_writes_its_map(tmp_path, real_data):
    out = tmp_path / "run2d"
    assert main(["train", "--epochs", "1", "--limit", "256", "--latent-dim", "2", "--out", str(out), "--no-progress"]) == 0
    png = (out / "latent_map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_resume_equals_uninterrupted_run(tmp_path, real_data):
    images = real_data.images[:256]

    def run(epochs, out, resume=None):
        torch.manual_seed(0)
        model = fastvae.VAE(hidden_dims=(64,), latent_dim=4)
        trainer = fastvae.Trainer(model, images, fastvae.TrainConfig(epochs=epochs, batch_size=32, seed=7, progress=False), device="cpu", out_dir=out)
        if resume:
            trainer.resume(resume)
        trainer.fit()
        return model

    straight = run(3, tmp_path / "a")
    run(1, tmp_path / "b")
    resumed = run(3, tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pt")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_seed_makes_runs_reproducible_and_warmup_ramps(real_data):
    images = real_data.images[:128]
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fastvae.VAE(hidden_dims=(32,), latent_dim=3)
        cfg = fastvae.TrainConfig(epochs=2, batch_size=32, seed=3, warmup=4, progress=False)
        trainer = fastvae.Trainer(model, images, cfg, device="cpu")
        losses.append([h["loss"] for h in trainer.fit()])
        assert trainer.beta_at(0) == 0.0 and trainer.beta_at(2) == 0.5 and trainer.beta_at(4) == 1.0 and trainer.beta_at(9) == 1.0
    assert losses[0] == losses[1]


def test_checkpoint_is_atomic_and_refuses_bad_files(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"x": torch.arange(3)}, path)
    assert torch.equal(checkpoint.load(path)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a fastvae checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_resume_refuses_other_configuration(tmp_path, real_data):
    images = real_data.images[:64]
    trainer = fastvae.Trainer(fastvae.VAE(hidden_dims=(16,), latent_dim=2), images, fastvae.TrainConfig(epochs=1, batch_size=32, progress=False), device="cpu", out_dir=tmp_path)
    trainer.fit()
    other = fastvae.Trainer(fastvae.VAE(hidden_dims=(16,), latent_dim=3), images, fastvae.TrainConfig(epochs=2, progress=False), device="cpu")
    with pytest.raises(ValueError, match="latent_dim: checkpoint 2 vs model 3"):
        other.resume(tmp_path / "checkpoint.pt")


def test_cli_sample_reconstruct_info(tmp_path, real_data, capsys):
    out = tmp_path / "run"
    main(["train", "--epochs", "1", "--limit", "128", "--hidden-dims", "32", "--out", str(out), "--no-progress"])
    assert main(["sample", str(out / "checkpoint.pt"), "-n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", str(out / "checkpoint.pt"), "-n", "8", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__ and "reparam" in report["backends"]


@pytest.mark.parametrize("argv", [["train", "--epochs", "0"], ["train", "--batch-size", "-3"], ["train", "--lr", "0"], ["train", "--beta", "nan"], ["train", "--hidden-dims", "400,x"], ["train", "--backend", "gpu"]])
def test_cli_flags_out_of_range_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_trainer_refuses_bad_data():
    model = fastvae.VAE()
    with pytest.raises(ValueError, match="input_dim=100"):
        fastvae.Trainer(model, torch.zeros(4, 10, 10, dtype=torch.uint8), device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fastvae.Trainer(model, torch.rand(4, 784) * 2, device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        fastvae.Trainer(model, torch.full((4, 784), float("nan")), device="cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        fastvae.Trainer(model, torch.zeros(4, 784, dtype=torch.uint8), device="cuda:3" if not torch.cuda.is_available() else "cuda:99")
