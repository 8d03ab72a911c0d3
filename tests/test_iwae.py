"""IWAE: log-weights against a float64 hand computation (values and gradients), k=1 against the
single-sample ELBO with the same eps, the bound above the ELBO, and the trainer's iwae objective."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.iwae import iwae_bound, log_weights, per_sample_bounds
from fastvae.ops import philox
from fastvae.ops.loss import loss_terms
from fastvae.ops.reparam import reparameterize

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
LOG2PI = math.log(2 * math.pi)


def small_model(likelihood="bernoulli", dtype=torch.float32):
    return fastvae.VAE(input_dim=37, hidden_dims=(13,), latent_dim=5, likelihood=likelihood).to(dtype)


def hand_log_weights(model, x, k, seed, beta=1.0):
    """The textbook log-densities in float64, with the 2*pi constants written out."""
    m = small_model(model.likelihood, torch.float64)
    m.load_state_dict({n: v.double() for n, v in model.state_dict().items()})
    x = x.double()
    mu, logvar = m.encoder(x)
    eps = philox.randn(seed, k * mu.numel()).view(k, *mu.shape).double()
    z = mu + eps * torch.exp(0.5 * logvar)
    out = m.decoder(z)
    if m.likelihood == "bernoulli":
        log_px = (x * F.logsigmoid(out) + (1 - x) * F.logsigmoid(-out)).sum(-1)
    else:
        log_px = -(out - x).pow(2).sum(-1)
    log_pz = (-0.5 * z.pow(2) - 0.5 * LOG2PI).sum(-1)
    log_qz = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * LOG2PI).sum(-1)
    return log_px + beta * (log_pz - log_qz), m


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("k,b", [(1, 1), (3, 7), (17, 2)])
def test_log_weights_match_float64_hand_computation(likelihood, k, b):
    model = small_model(likelihood)
    x = torch.rand(b, 37) if likelihood == "bernoulli" else torch.randn(b, 37) * 3
    w = log_weights(model, x, k, seed=99, beta=0.7)
    expected, _ = hand_log_weights(model, x, k, 99, beta=0.7)
    assert w.log_w.shape == (k, b) and w.log_w.dtype == torch.float32 and torch.isfinite(w.log_w).all()
    torch.testing.assert_close(w.log_w.double(), expected, rtol=1e-5, atol=1e-3)


def test_iwae_loss_value_and_gradients_match_float64():
    model = small_model(dtype=torch.float64)
    model.backend = "torch"  # bit-for-bit eps: the fused kernels draw the same stream to float32 rounding only
    x = torch.rand(6, 37, dtype=torch.float64)
    loss = fastvae.iwae_loss(model, x, 4, seed=5)
    loss.backward()
    expected_w, ref = hand_log_weights(model, x, 4, 5)
    expected = -(torch.logsumexp(expected_w, 0) - math.log(4)).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-9)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=name)


def test_k1_iwae_is_the_single_sample_elbo_with_the_same_eps():
    model = small_model()
    x = torch.rand(9, 37)
    iwae1 = -fastvae.iwae_loss(model, x, 1, seed=3, reduction="none")
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, seed=3)
    terms = loss_terms(model.decoder(z), x, mu, logvar, reduction="none")  # recon + analytic KL, same eps
    eps = (z - mu) * torch.exp(-0.5 * logvar)
    sampled_kl = (0.5 * (z.pow(2) - eps.pow(2) - logvar)).sum(-1)  # log q(z|x) - log p(z)
    torch.testing.assert_close(iwae1, -(terms.recon + sampled_kl), rtol=1e-5, atol=1e-4)
    elbo, iwae = per_sample_bounds(model, x, k=1, seed=3)  # analytic-KL ELBO, same eps
    torch.testing.assert_close(elbo, -terms.loss.detach().double(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(iwae, iwae1.detach().double(), rtol=1e-6, atol=1e-4)


def test_iwae_bound_is_log_mean_exp():
    log_w = torch.tensor([[0.0, -1000.0], [math.log(3.0), -1001.0]], dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(log_w), torch.tensor([math.log(2.0), -1000.0 + math.log((1 + math.exp(-1)) / 2)], dtype=torch.float64))


@pytest.fixture(scope="module")
def trained():
    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data tests")
    torch.manual_seed(0)
    images = fastvae.data.load("fashion-mnist", "train").images[:1088]
    model = fastvae.VAE(hidden_dims=(64,), latent_dim=8)
    fastvae.Trainer(model, images[:960], fastvae.TrainConfig(epochs=1, batch_size=64, progress=False), device="cpu").fit()
    return model, images[960:]


def test_iwae_bound_above_elbo_and_tightens_with_k(trained):
    model, held_out = trained
    e1 = fastvae.evaluate(model, held_out, k=1, batch_size=100)
    e50 = fastvae.evaluate(model, held_out, k=50, batch_size=100)
    assert e50.n == 128 and e50.k == 50
    assert e50.iwae > e50.elbo + 0.5  # a clear gap, nats per sample
    assert e50.iwae > e1.iwae + 0.5
    assert abs(e1.iwae - e1.elbo) < 3.0  # k=1: the same bound in expectation (sampled vs analytic KL)
    assert -700 < e50.elbo < -150  # a sane per-sample figure for 784 pixels after 15 steps
    torch.testing.assert_close(e50.elbo, fastvae.evaluate(model, held_out, k=50, batch_size=37).elbo, rtol=0.02, atol=0)


def test_trainer_iwae_objective_trains(trained):
    _, images = trained
    torch.manual_seed(1)
    model = fastvae.VAE(hidden_dims=(64,), latent_dim=8)
    before = fastvae.evaluate(model, images, k=5).iwae
    fastvae.TrainConfig(objective="iwae", k=3).validate()
    history = fastvae.Trainer(model, images, fastvae.TrainConfig(epochs=3, batch_size=32, objective="iwae", k=3, progress=False), device="cpu").fit()
    after = fastvae.evaluate(model, images, k=5)
    assert after.iwae > before + 20 and after.iwae >= after.elbo
    assert history[-1]["kl"] > 0 and history[-1]["recon"] > 0


@pytest.mark.parametrize("kwargs,message", [({"objective": "iwea"}, "objective"), ({"k": 0}, "k must be >= 1"), ({"cycles": 0}, "cycles")])
def test_trainconfig_refuses_bad_iwae_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastvae.TrainConfig(**kwargs).validate()


def test_evaluate_refuses_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="k must be >= 1"):
        fastvae.evaluate(model, torch.rand(3, 37), k=0)
    with pytest.raises(ValueError, match="non-empty"):
        fastvae.evaluate(model, torch.rand(0, 37))
    with pytest.raises(ValueError, match="input_dim=37"):
        fastvae.evaluate(model, torch.rand(3, 36))


class _Posterior(torch.nn.Module):
    """An encoder that returns given (mu, logvar) leaves."""

    def __init__(self, mu, logvar):
        super().__init__()
        self.mu, self.logvar = mu, logvar

    def forward(self, flat):
        return self.mu, self.logvar


def test_bf16_log_weights_and_grad_logvar_match_float32_with_the_same_eps():
    """A z rounded to bfloat16 would give eps = (z - mu) / std errors of order |mu| 2^-8 / std (here ~100%)."""
    g = torch.Generator().manual_seed(4)
    b, k, lat = 6, 3, 5
    model = fastvae.VAE(input_dim=37, hidden_dims=(13,), latent_dim=lat).to(torch.bfloat16)
    mu = (3 * torch.randn(b, lat, generator=g)).to(torch.bfloat16).requires_grad_()
    logvar = torch.full((b, lat), -9.0, dtype=torch.bfloat16).requires_grad_()  # std ~ 0.011 << |mu|
    model.encoder = _Posterior(mu, logvar)
    x = torch.rand(b, 37, generator=g).to(torch.bfloat16)
    w = log_weights(model, x, k, seed=13)
    prior_ratio = w.log_w + w.recon  # beta (log p(z) - log q(z|x)): the part that depends on eps
    prior_ratio.sum().backward()
    mu32, lv32 = mu.detach().float().requires_grad_(), logvar.detach().float().requires_grad_()
    eps = philox.randn(13, k * mu.numel()).view(k, b, lat)
    z = mu32 + eps * torch.exp(0.5 * lv32)
    want = (0.5 * (eps.pow(2) - z.pow(2) + lv32)).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(prior_ratio.detach(), want.detach(), rtol=1e-3, atol=0.05)
    torch.testing.assert_close(logvar.grad.float(), lv32.grad, rtol=2e-2, atol=1e-2)
