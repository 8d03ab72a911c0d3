"""fastvae.VAE against the plain reference VAE of REFERENCE.md: outputs, loss, gradients."""
import pytest
import torch

import fastvae
from fastvae.functional import bce_kl_loss, kl_divergence, vae_loss
from fastvae.reference import ReferenceVAE, reference_loss


def _pair():
    ref = ReferenceVAE().double()
    model = fastvae.VAE(backend="torch").double()
    model.load_state_dict(ref.state_dict())
    return ref, model


def test_state_dict_keys_and_shapes_equal_reference():
    ref, model = ReferenceVAE(), fastvae.VAE()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert {"encoder.fc1.weight", "encoder.fc_mu.weight", "encoder.fc_logvar.weight", "decoder.fc1.weight", "decoder.fc2.weight"} <= set(model.state_dict())
    ref.load_state_dict(fastvae.VAE().state_dict())  # and back


@pytest.mark.parametrize("batch", [1, 7, 128])
def test_forward_loss_and_gradients_equal_reference(batch):
    ref, model = _pair()
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(3)
    out_ref = ref(x)
    loss_ref = reference_loss(*out_ref[:1], x, *out_ref[1:])
    loss_ref.backward()
    torch.manual_seed(3)
    out = model(x)
    loss = vae_loss(out[0], x, out[1], out[2])
    for a, b in zip(out_ref, out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)
    model.zero_grad()
    torch.manual_seed(3)
    fused = model.loss(x)  # from logits, same eps
    torch.testing.assert_close(fused, loss_ref, rtol=1e-10, atol=0)
    fused.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_bce_kl_loss_equals_reference_loss_for_random_inputs():
    logits = torch.randn(33, 784, dtype=torch.float64) * 4
    x = torch.rand(33, 784, dtype=torch.float64)
    mu, logvar = torch.randn(33, 20, dtype=torch.float64), torch.randn(33, 20, dtype=torch.float64)
    expected = reference_loss(torch.sigmoid(logits), x, mu, logvar)
    torch.testing.assert_close(bce_kl_loss(logits, x, mu, logvar), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(vae_loss(torch.sigmoid(logits), x, mu, logvar), expected, rtol=1e-10, atol=0)
    kl = kl_divergence(mu, logvar)
    torch.testing.assert_close(bce_kl_loss(logits, x, mu, logvar, beta=0.25), expected - 0.75 * kl, rtol=1e-10, atol=0)


def test_extreme_logits_stay_finite_and_exact():
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5]], dtype=torch.float64)
    mu, logvar = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    logits.requires_grad_(True)
    loss = bce_kl_loss(logits, x, mu, logvar)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # BCE from logits is exact: 0 + 0 + 100 + 100 + log 2 (a clamped log-probability would give 100 + 100 too,
    # but from probabilities sigmoid(100) rounds to 1 and the tiny terms are lost)
    bce = loss - kl_divergence(mu, logvar)
    torch.testing.assert_close(bce, torch.tensor(200.0 + torch.log(torch.tensor(2.0, dtype=torch.float64)).item(), dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_uint8_targets_equal_float_targets():
    logits = torch.randn(9, 784, dtype=torch.float64)
    pixels = torch.randint(0, 256, (9, 784), dtype=torch.uint8)
    mu, logvar = torch.randn(9, 20, dtype=torch.float64), torch.randn(9, 20, dtype=torch.float64)
    torch.testing.assert_close(bce_kl_loss(logits, pixels, mu, logvar), bce_kl_loss(logits, pixels.double() / 255, mu, logvar), rtol=1e-12, atol=0)


@pytest.mark.parametrize("hidden", [(), (64,), (128, 64, 32)])
def test_any_number_of_hidden_layers(hidden):
    model = fastvae.VAE(input_dim=30, hidden_dims=hidden, latent_dim=3)
    x = torch.rand(5, 30)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == (5, 30) and mu.shape == (5, 3) and logvar.shape == (5, 3)
    model.loss(x, reduction="mean").backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gaussian_likelihood_is_mse_plus_kl():
    model = fastvae.VAE(input_dim=12, hidden_dims=(16,), latent_dim=2, likelihood="gaussian").double()
    x = torch.randn(6, 12, dtype=torch.float64) * 3  # not in [0, 1]
    torch.manual_seed(5)
    x_hat, mu, logvar = model(x)
    expected = ((x_hat - x) ** 2).sum() + kl_divergence(mu, logvar)
    torch.manual_seed(5)
    torch.testing.assert_close(model.loss(x), expected, rtol=1e-10, atol=0)


def test_reductions():
    model = fastvae.VAE(input_dim=10, hidden_dims=(8,), latent_dim=2).double()
    x = torch.rand(4, 10, dtype=torch.float64)
    torch.manual_seed(1)
    rows = model.loss(x, reduction="none")
    torch.manual_seed(1)
    total = model.loss(x, reduction="sum")
    torch.manual_seed(1)
    mean = model.loss(x, reduction="mean")
    assert rows.shape == (4,)
    torch.testing.assert_close(rows.sum(), total)
    torch.testing.assert_close(mean, total / 4)


def test_sample_and_reconstruct_shapes():
    model = fastvae.VAE()
    imgs = model.sample(10, out_dtype=torch.uint8)
    assert imgs.shape == (10, 784) and imgs.dtype == torch.uint8
    rec = model.reconstruct(torch.rand(3, 1, 28, 28))
    assert rec.shape == (3, 784) and ((rec >= 0) & (rec <= 1)).all()
