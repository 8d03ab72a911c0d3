"""Anomaly scores (API and CLI), latent interpolation, the 2-D latent map."""
import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.apps import latent_grid
from fastvae.cli import main
from fastvae.iwae import log_weights, per_sample_bounds
from fastvae.models import MODELS, HierarchicalVAE
from fastvae.ops import philox
from fastvae.ops.reparam import reparameterize

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
    assert width > 2 * (7 * 30 + 2) and height > 2 * (7 * 30 + 2)  # the grid twice enlarged, with axes and a title
    assert b"the 2-D latent space decoded" in png
    with pytest.raises(ValueError, match="latent_dim=2"):
        fastvae.latent_map(fastvae.VAE(latent_dim=3), tmp_path / "x.png")


def test_latent_grid_is_the_prior_quantiles():
    z = latent_grid(3, low=0.1, high=0.9)
    q = 1.2815515655446004  # the N(0, 1) 0.9 quantile
    expected = torch.tensor([[-q, q], [0, q], [q, q], [-q, 0], [0, 0], [q, 0], [-q, -q], [0, -q], [q, -q]], dtype=torch.float64)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)


LOG2PI = math.log(2 * math.pi)


def _log_normal(z, mu, logvar):
    return (-0.5 * (z - mu).pow(2) / torch.exp(logvar) - 0.5 * logvar - 0.5 * LOG2PI).sum(-1)


def test_hierarchical_log_weights_match_float64_hand_computation():
    """Both levels in the bound: log p(x|z1) + beta (log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|x))."""
    model = HierarchicalVAE(input_dim=37, hidden_dims=(13,), latent_dims=(5, 3), top_hidden_dims=(7,))
    x, k, seed = torch.rand(4, 37), 3, 11
    w = log_weights(model, x, k, seed=seed, beta=0.7)
    m, xd = copy.deepcopy(model).double(), x.double()
    mu1, lv1 = m.encoder(xd)
    mu2, lv2 = m.encoder2(mu1)
    z1 = mu1 + philox.randn(seed, k * mu1.numel()).view(k, *mu1.shape).double() * torch.exp(0.5 * lv1)
    z2 = mu2 + philox.randn(seed + 1, k * mu2.numel()).view(k, *mu2.shape).double() * torch.exp(0.5 * lv2)
    pm, plv = m.prior_net(z2)
    logits = m.decoder(z1)
    log_px = (xd * F.logsigmoid(logits) + (1 - xd) * F.logsigmoid(-logits)).sum(-1)
    zero = torch.zeros_like(z2)
    expected = log_px + 0.7 * (_log_normal(z1, pm, plv) + _log_normal(z2, zero, zero) - _log_normal(z1, mu1, lv1) - _log_normal(z2, mu2, lv2))
    assert w.log_w.shape == (k, 4)
    torch.testing.assert_close(w.log_w.double(), expected, rtol=1e-5, atol=1e-3)
    kl_top = 0.5 * (mu2.pow(2) + lv2.exp() - 1 - lv2).sum(-1)
    kl_low = 0.5 * (plv - lv1 + (lv1.exp() + (mu1 - pm).pow(2)) / plv.exp() - 1).sum(-1).mean(0)
    torch.testing.assert_close(w.kl.double(), (kl_top + kl_low).detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.recon.double(), -log_px.detach(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["rvae", "cvae"])
def test_bounds_use_the_models_own_likelihood(name):
    """rvae: the teacher-forced decoder it trains with; cvae: conditioned on the labels."""
    model = fastvae.models.for_data(name, (28, 28), hidden_dims=(16,), latent_dim=3).eval()
    x, labels = torch.rand(5, 28, 28), torch.tensor([0, 3, 9, 3, 1])
    condition = {"labels": labels} if name == "cvae" else {}
    elbo, _ = per_sample_bounds(model, x, k=1, seed=4, **condition)
    flat = x.reshape(5, -1)
    with torch.no_grad():
        mu, logvar = model.posterior(flat, **condition)
        z = reparameterize(mu, logvar, seed=4)
        logits = model.train_logits(z, flat, **condition)
        recon = F.binary_cross_entropy_with_logits(logits, flat, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
    torch.testing.assert_close(elbo, -(recon + kl).double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_score_takes_every_model_the_cli_trains_or_says_why_not(name):
    model = fastvae.models.for_data(name, (28, 28), hidden_dims=(16,), latent_dim=4).eval()
    x = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6) % 10 if model.conditional else None
    if name == "aae":
        with pytest.raises(ValueError, match=r"adversarial autoencoder \(aae\) has no ELBO or IWAE bound"):
            fastvae.score(model, x)
        return
    s1, s4 = fastvae.score(model, x, labels=labels), fastvae.score(model, x, k=4, labels=labels)
    assert s1.shape == s4.shape == (6,) and torch.isfinite(s1).all() and torch.isfinite(s4).all()
    assert (s1 > 0).all()  # minus a log-likelihood bound of 784 Bernoulli pixels


def test_cli_scores_a_conditional_model_with_the_labels(tmp_path, run, capsys):
    images = fastvae.data.load("fashion-mnist", "train").images[:256]
    out = tmp_path / "cvae"
    labels = fastvae.data.load("fashion-mnist", "train").labels[:256]
    model = fastvae.models.ConditionalVAE(hidden_dims=(32,), latent_dim=4)
    fastvae.Trainer(model, images, fastvae.TrainConfig(epochs=1, batch_size=64, progress=False), device="cpu", out_dir=out, labels=labels).fit()
    assert main(["score", str(out), "--split", "test", "--batch-size", "5000"]) == 0
    rows = list(csv.DictReader((out / "scores-test-k1.csv").open()))
    assert len(rows) == 10000 and all(100 < float(r["score"]) < 2000 for r in rows[:100])
