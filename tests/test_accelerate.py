"""fastvae.accelerate on users' own VAE modules: parts found by structure, same loss and gradients
for the same weights and eps, state_dict untouched, clear refusals, and the before/after example."""
import copy
import difflib
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvae
from fastvae.accelerate import deaccelerate, find_parts
from fastvae.functional import vae_loss
from fastvae.ops import philox

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


class ExamplesVAE(nn.Module):
    """The pytorch/examples VAE, at awkward sizes."""

    def __init__(self, d=37, h=13, latent=5):
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, h)
        self.fc21 = nn.Linear(h, latent)
        self.fc22 = nn.Linear(h, latent)
        self.fc3 = nn.Linear(latent, h)
        self.fc4 = nn.Linear(h, d)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.d))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class SequentialVAE(nn.Module):
    """nn.Sequential encoder and decoder, sampling written inline, image-shaped output."""

    def __init__(self, side=6, h=11, latent=3):
        super().__init__()
        self.side = side
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(side * side, h), nn.Tanh(), nn.Linear(h, h), nn.ReLU())
        self.mean = nn.Linear(h, latent)
        self.log_var = nn.Linear(h, latent)
        self.gen = nn.Sequential(nn.Linear(latent, h), nn.ReLU(), nn.Linear(h, side * side), nn.Sigmoid())

    def forward(self, x):
        h = self.body(x)
        mu, logvar = self.mean(h), self.log_var(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.gen(z).view(-1, 1, self.side, self.side), mu, logvar


def reference_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view_as(recon_x), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


MODELS = [
    (ExamplesVAE, (7, 37), {"mu": "fc21", "logvar": "fc22", "decoder_in": "fc3", "decoder_out": "fc4"}),
    (SequentialVAE, (5, 1, 6, 6), {"mu": "mean", "logvar": "log_var", "decoder_in": "gen.0", "decoder_out": "gen.2"}),
]


@pytest.mark.parametrize("cls,shape,names", MODELS)
def test_parts_found_by_structure_and_state_dict_unchanged(cls, shape, names):
    model = cls()
    before = snapshot(model)
    example = torch.rand(shape) if cls is SequentialVAE else None
    rng = torch.get_rng_state()
    assert fastvae.accelerate(model, example=example) is model
    assert model._fastvae_hooks.parts.names == names
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the caller's RNG alone
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("cls,shape,names", MODELS)
def test_same_loss_and_gradients_for_the_same_weights_and_eps(monkeypatch, cls, shape, names, dtype, rtol):
    seed = 1234
    user = cls().to(dtype)
    fused = copy.deepcopy(user)
    x = torch.rand(shape, dtype=dtype)
    fastvae.accelerate(fused, example=x, seed=seed)

    mu_shape = user(x)[1].shape
    eps = philox.randn(seed, mu_shape.numel()).view(mu_shape).to(dtype)
    with monkeypatch.context() as m:  # the user's own sampler, fed the fused path's eps
        m.setattr(torch, "randn_like", lambda t, **kw: eps.clone())
        x_hat, mu, logvar = user(x)
        expected = reference_loss(x_hat, x, mu, logvar)
    expected.backward()

    x_hat_f, mu_f, logvar_f = fused(x)
    assert x_hat_f.shape == x_hat.shape and hasattr(x_hat_f, "_fastvae_logits")
    torch.testing.assert_close(x_hat_f, x_hat, rtol=rtol, atol=rtol)
    loss = vae_loss(x_hat_f, x, mu_f, logvar_f)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=0)
    for (name, p), q in zip(user.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=max(rtol, 1e-10) * 50, atol=max(rtol, 1e-10) * 50, msg=name)


def test_fresh_noise_per_forward_and_decode_outside_forward_untouched():
    model = ExamplesVAE()
    plain = copy.deepcopy(model)
    fastvae.accelerate(model)
    x = torch.rand(4, 37)
    assert not torch.equal(model(x)[0], model(x)[0])
    z = torch.randn(3, 5)
    assert torch.equal(model.decode(z), plain.decode(z))
    with torch.no_grad():
        x_hat, mu, logvar = model(x)
    torch.testing.assert_close(torch.sigmoid(x_hat._fastvae_logits), x_hat)
    assert fastvae.accelerate(model) is model and len(model._forward_hooks) == 1  # idempotent
    deaccelerate(model)
    assert not model._forward_hooks and not model._forward_pre_hooks and not hasattr(model, "_fastvae_hooks")


def test_saturated_probability_logits_give_the_exact_value():
    """vae_loss from probabilities clamps log(0) at -100; from logits it is exact."""
    logits = torch.tensor([[-120.0, 3.0]])
    x = torch.tensor([[1.0, 1.0]])
    mu = logvar = torch.zeros(1, 2)
    probs = torch.sigmoid(logits)
    assert float(vae_loss(probs, x, mu, logvar)) == pytest.approx(100 + F.softplus(torch.tensor(-3.0)).item(), rel=1e-6)
    probs._fastvae_logits = logits
    assert float(vae_loss(probs, x, mu, logvar)) == pytest.approx(120 + F.softplus(torch.tensor(-3.0)).item(), rel=1e-6)


class OnlyXHat(ExamplesVAE):
    def forward(self, x):
        return super().forward(x)[0]


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 6)
        self.dec = nn.Linear(3, 8)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return torch.sigmoid(self.dec(z)), mu, logvar


class NoSigmoid(ExamplesVAE):
    def decode(self, z):
        return self.fc4(F.relu(self.fc3(z)))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("cls,message", [
    (OnlyXHat, "must return (x_hat, mu, logvar); it returned one tensor of shape (2, 37)"),
    (Chunked, "must each be the direct output of an nn.Linear head"),
    (NoSigmoid, "x_hat must be sigmoid(nn.Linear(...))"),
    (Conv, "pass example="),
])
def test_models_that_do_not_fit_are_refused_and_left_unchanged(cls, message):
    model = cls()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        fastvae.accelerate(model)
    assert message in str(info.value)
    assert not model._forward_hooks and not model._forward_pre_hooks and not hasattr(model, "_fastvae_hooks")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_find_parts_refuses_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_parts(lambda x: x)


@pytest.fixture(scope="module")
def fashion():
    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data tests")
    return fastvae.data.load("fashion-mnist", "train").images[:1024]


def test_user_loop_trains_on_real_data(fashion):
    ns = runpy.run_path(str(EXAMPLES / "mnist_vae_before.py"))
    torch.manual_seed(0)
    model = fastvae.accelerate(ns["VAE"]())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = fashion.float().div(255).unsqueeze(1)
    losses = []
    for step in range(16):
        batch = data[step * 64:(step + 1) * 64]
        opt.zero_grad()
        x_hat, mu, logvar = model(batch)
        loss = vae_loss(x_hat, batch, mu, logvar)
        loss.backward()
        opt.step()
        losses.append(loss.item() / batch.shape[0])
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:2]) / 2, losses


def test_example_after_is_before_plus_two_lines_and_runs(fashion, monkeypatch, capsys):
    before = (EXAMPLES / "mnist_vae_before.py").read_text().splitlines()
    after = (EXAMPLES / "mnist_vae_after.py").read_text().splitlines()
    diff = [d for d in difflib.unified_diff(before, after, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    added = [d[1:].strip() for d in diff if d.startswith("+")]
    removed = [d[1:].strip() for d in diff if d.startswith("-") and d[1:].strip()]
    assert added == ["from fastvae.functional import vae_loss as loss_function", "model = fastvae.accelerate(model)"]
    assert removed[0] == "def loss_function(recon_x, x, mu, logvar):" and len(removed) == 4
    history = runpy.run_path(str(EXAMPLES / "mnist_vae_after.py"))["main"](["--epochs", "1", "--limit", "256", "--batch-size", "64"])
    assert 150 < history[0][0] < 700 and "Epoch: 1" in capsys.readouterr().out


class BatchNormEvalMean(nn.Module):
    """Batch-norm in the encoder and the common 'decode mu in eval mode' sampler."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.fc_mu, self.fc_lv = nn.Linear(8, 2), nn.Linear(8, 2)
        self.dec = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 10))

    def reparameterize(self, mu, logvar):
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.fc_mu(h), self.fc_lv(h)
        return torch.sigmoid(self.dec(self.reparameterize(mu, logvar))), mu, logvar


def test_probe_restores_buffers_and_eval_mode_decoding_of_mu_is_kept():
    model = BatchNormEvalMean().eval()
    before = snapshot(model)
    fastvae.accelerate(model)
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.rand(4, 10)
    x_hat, mu, _ = model(x)
    torch.testing.assert_close(x_hat, torch.sigmoid(model.dec(mu)))  # eval: mu decoded, as the user wrote it
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])  # train: sampled


def test_accelerated_model_deepcopies_and_pickles():
    import io

    model = fastvae.accelerate(ExamplesVAE(), seed=3)
    x = torch.rand(2, 37)
    for other in (copy.deepcopy(model), _pickled(model, io.BytesIO())):
        assert other._fastvae_hooks.parts.mu is other.fc21  # the copy's hooks point at the copy
        x_hat = other(x)[0]
        assert torch.equal(x_hat, model(x)[0]) and hasattr(x_hat, "_fastvae_logits")


def _pickled(model, buf):
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
