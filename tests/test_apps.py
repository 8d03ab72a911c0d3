"""Anomaly scores (API and CLI), latent interpolation, the 2-D latent map."""
import csv
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae.apps import latent_grid
from fastvae.cli import main
from fastvae.iwae import per_sample_bounds

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-D latent model trained briefly on real images, with its checkpoint."""
    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data tests")
    torch.manual_seed(0)
    images = fastvae.data.load("fashion-mnist", "train").images[:640]
    model = fastvae.VAE(hidden_dims=(64,), latent_dim=2)
    out = tmp_path_factory.mktemp("run")
    fastvae.Trainer(model, images, fastvae.TrainConfig(epochs=1, batch_size=64, progress=False), device="cpu", out_dir=out).fit()
    return model.eval(), images, out / "checkpoint.pt"


def test_score_is_minus_the_bound_and_flags_noise(run):
    model, images, _ = run
    real = images[:64]
    noise = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    s_real, s_noise = fastvae.score(model, real), fastvae.score(model, noise)
    assert s_real.shape == (64,) and s_real.dtype == torch.float64 and torch.isfinite(s_real).all()
    assert (s_noise[:, None] > s_real[None, :]).double().mean() > 0.95  # noise ranks as anomalous (AUROC)
    assert s_noise.mean() > s_real.mean() + 20
    elbo, iwae = per_sample_bounds(model, real, k=4, batch_size=50, seed=0)
    torch.testing.assert_close(fastvae.score(model, real, k=4, batch_size=50), -iwae)
    torch.testing.assert_close(fastvae.score(model, real, batch_size=50), -per_sample_bounds(model, real, k=1, batch_size=50)[0])
    assert torch.equal(fastvae.score(model, real), s_real)  # seeded: reproducible


def test_cli_score_writes_csv(run, tmp_path):
    _, _, ckpt = run
    out = tmp_path / "scores.csv"
    assert main(["score", str(ckpt), "--split", "test", "--k", "2", "--batch-size", "1000", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10000 and rows[0].keys() == {"index", "label", "score"}
    assert {r["label"] for r in rows} == {str(i) for i in range(10)}
    assert all(100 < float(r["score"]) < 2000 for r in rows[:100])


def test_interpolate_ends_at_the_inputs_reconstructions(run):
    model, images, _ = run
    path = fastvae.interpolate(model, images[0], images[1], steps=5)
    assert path.shape == (5, 784) and torch.isfinite(path).all()
    torch.testing.assert_close(path[0], model.reconstruct(images[:1])[0])
    torch.testing.assert_close(path[-1], model.reconstruct(images[1:2])[0])
    mu, _ = model.encode(images[:2])
    torch.testing.assert_close(path[2], model.decode(mu.mean(0, keepdim=True))[0], rtol=1e-5, atol=1e-6)
    pixels = fastvae.interpolate(model, images[0], images[1], steps=3, out_dtype=torch.uint8)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 784)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        fastvae.interpolate(model, images[0], images[1], steps=1)
    with pytest.raises(ValueError, match="x_b must be one input of 784"):
        fastvae.interpolate(model, images[0], images[1:3])


def test_latent_map_png(run, tmp_path):
    model, _, _ = run
    path = fastvae.latent_map(model, tmp_path / "map.png", n=7)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == height == 7 * 30 + 2
    with pytest.raises(ValueError, match="latent_dim=2"):
        fastvae.latent_map(fastvae.VAE(latent_dim=3), tmp_path / "x.png")


def test_latent_grid_is_the_prior_quantiles():
    z = latent_grid(3, low=0.1, high=0.9)
    q = 1.2815515655446004  # the N(0, 1) 0.9 quantile
    expected = torch.tensor([[-q, q], [0, q], [q, q], [-q, 0], [0, 0], [q, 0], [-q, -q], [0, -q], [q, -q]], dtype=torch.float64)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)
