"""The model variants of fastvae.models: interface, ELBO pieces against hand computations, training
through fastvae.Trainer, checkpoints and the CLI (tiny sizes, CPU)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import checkpoint, models
from fastvae.cli import main
from fastvae.models import AdversarialAE, ConditionalVAE, ConvVAE, HierarchicalVAE, RecurrentVAE
from fastvae.models.hierarchical import gaussian_kl


TINY = {
    "vae": lambda: fastvae.VAE(784, (16,), 3),
    "cvae": lambda: ConditionalVAE(784, (16,), 3, num_classes=10),
    "conv": lambda: ConvVAE((1, 28, 28), (4, 8), 3),
    "conv-64x64x3": lambda: ConvVAE((3, 64, 64), (4, 4, 8, 8), 3),
    "hvae": lambda: HierarchicalVAE(784, (16,), (4, 2), (8,)),
    "rvae": lambda: RecurrentVAE(28, 28, hidden_size=16, latent_dim=3, likelihood="bernoulli"),
    "aae": lambda: AdversarialAE(784, (16,), 2, (8,)),
    "aae-gaussian": lambda: AdversarialAE(784, (16,), 2, (8,), gaussian=True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a loaded 2-core machine spin-wait
    (the GRU tests took 10x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _condition(model, batch):
    return {"labels": torch.randint(0, model.num_classes, (batch,))} if model.conditional else {}


def _bce_rows(logits, x):
    """BCE from logits per row, written out: softplus(l) - l x."""
    return (F.softplus(logits) - logits * x).sum(-1)


def _kl_rows(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


@pytest.mark.parametrize("name", list(TINY))
def test_interface_config_roundtrip_and_gradients(name):
    model = TINY[name]()
    cfg = model.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg.get("model", "vae") == name.split("-")[0]
    x = torch.rand(5, model.input_dim)
    cond = _condition(model, 5)
    torch.manual_seed(1)
    terms = model.loss_terms(x, beta=0.5, reduction="none", **cond)
    torch.manual_seed(1)
    total = model.loss_terms(x, beta=0.5, reduction="sum", **cond)
    assert terms.loss.shape == (5,) and bool(torch.isfinite(terms.loss).all())
    torch.testing.assert_close(terms.loss, terms.recon + 0.5 * terms.kl)
    torch.testing.assert_close(total.loss, terms.loss.sum())
    total.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, pname

    rebuilt = models.from_config(cfg)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    checkpoint.check_config(cfg, rebuilt.config(), "x")
    torch.testing.assert_close(rebuilt.reconstruct(x, **cond), model.reconstruct(x, **cond))
    recon = model.reconstruct(x, **cond)
    assert recon.shape == (5, model.input_dim) and bool(torch.isfinite(recon).all())

    pixels = model.sample(7, seed=3, out_dtype=torch.uint8)
    assert pixels.shape == (7, model.input_dim) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, rebuilt.sample(7, seed=3, out_dtype=torch.uint8))  # seeded: reproducible
    probs = model.sample(7, seed=3)
    assert probs.dtype == torch.float32 and bool(((probs >= 0) & (probs <= 1)).all())


def test_registry_refuses_unknown_names_and_reads_old_vae_configs():
    with pytest.raises(ValueError, match="model must be one of"):
        models.get("gan")
    vae = models.from_config(fastvae.VAE(hidden_dims=(8,), latent_dim=2).config())  # no "model" key
    assert type(vae) is fastvae.VAE and vae.hidden_dims == (8,)


# --- conditional VAE ---------------------------------------------------------------------------

def test_cvae_loss_equals_hand_computation_and_labels_condition_both_sides():
    model = ConditionalVAE(13, (7,), 3, num_classes=4, backend="torch").double()
    x = torch.rand(6, 13, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 3, 0])
    torch.manual_seed(2)
    terms = model.loss_terms(x, beta=0.3, reduction="none", labels=labels)
    torch.manual_seed(2)
    eps = torch.randn(6, 3, dtype=torch.float64)
    onehot = F.one_hot(labels, 4).double()
    mu, logvar = model.encoder(torch.cat([x, onehot], 1))
    logits = model.decoder(torch.cat([mu + eps * torch.exp(0.5 * logvar), onehot], 1))
    torch.testing.assert_close(terms.recon, _bce_rows(logits, x), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.kl, _kl_rows(mu, logvar), rtol=1e-10, atol=0)
    # A float condition vector is used as given: the one-hot rows give the same loss.
    torch.manual_seed(2)
    torch.testing.assert_close(model.loss_terms(x, beta=0.3, reduction="none", labels=onehot).loss, terms.loss, rtol=1e-12, atol=0)
    z = torch.randn(2, 3, dtype=torch.float64)
    assert not torch.allclose(model.decode(z, labels=torch.tensor([0, 0])), model.decode(z, labels=torch.tensor([1, 1])))
    assert not torch.allclose(model.encode(x[:2], labels=labels[:2])[0], model.encode(x[:2], labels=labels[:2].flip(0))[0])


def test_cvae_sample_by_label_and_refuses_bad_labels():
    model = ConditionalVAE(20, (8,), 2, num_classes=5)
    threes = model.sample(4, labels=3, seed=0)
    assert torch.equal(threes, model.sample(4, labels=torch.full((4,), 3), seed=0))
    assert not torch.equal(threes, model.sample(4, labels=1, seed=0))
    assert torch.equal(model.sample(7, seed=0), model.sample(7, labels=torch.tensor([0, 1, 2, 3, 4, 0, 1]), seed=0))  # classes in turn
    x = torch.rand(3, 20)
    with pytest.raises(ValueError, match="conditional: pass labels"):
        model.loss_terms(x)
    with pytest.raises(ValueError, match=r"\[0, num_classes=5\)"):
        model.loss_terms(x, labels=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="one entry per sample"):
        model.loss_terms(x, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes=5"):
        model.loss_terms(x, labels=torch.rand(3, 4))
    with pytest.raises(ValueError, match="is conditional"):
        fastvae.Trainer(model, x, device="cpu")
    with pytest.raises(ValueError, match="not conditional"):
        fastvae.Trainer(fastvae.VAE(20, (8,), 2), x, device="cpu", labels=torch.zeros(3, dtype=torch.long))


def test_trainer_feeds_each_image_its_own_label():
    """Pixel 0 of image i holds 20 * label i; the batches the model sees must keep the pairs."""

    class Spy(ConditionalVAE):
        def loss_terms(self, x, beta=1.0, reduction="sum", labels=None):
            assert torch.equal(x[:, 0].long(), 20 * labels), "labels and images were shuffled apart"
            self.batches += 1
            return super().loss_terms(x, beta, reduction, labels=labels)

    labels = torch.randint(0, 10, (50,))
    images = torch.randint(0, 256, (50, 16), dtype=torch.uint8)
    images[:, 0] = (20 * labels).to(torch.uint8)
    spy = Spy(16, (8,), 2, num_classes=10)
    spy.batches = 0
    fastvae.Trainer(spy, images, fastvae.TrainConfig(epochs=2, batch_size=8, progress=False), device="cpu", labels=labels).fit()
    assert spy.batches == 14


# --- convolutional VAE -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channels", [((1, 28, 28), (3, 5)), ((3, 64, 64), (2, 3, 4, 4))])
def test_conv_vae_loss_equals_hand_computation(shape, channels):
    model = ConvVAE(shape, channels, 3, backend="torch").double()
    x = torch.rand(2, *shape, dtype=torch.float64)
    torch.manual_seed(4)
    terms = model.loss_terms(x, reduction="none")
    torch.manual_seed(4)
    eps = torch.randn(2, 3, dtype=torch.float64)
    h = x
    for conv in model.encoder.convs:
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1))
    assert h.shape[2:] == tuple(s // 2 ** len(channels) for s in shape[1:])
    mu, logvar = model.encoder.fc_mu(h.flatten(1)), model.encoder.fc_logvar(h.flatten(1))
    out = model.decoder(mu + eps * torch.exp(0.5 * logvar))
    assert out.shape == (2, math.prod(shape))
    torch.testing.assert_close(terms.recon, _bce_rows(out, x.flatten(1)), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.kl, _kl_rows(mu, logvar), rtol=1e-10, atol=0)


def test_conv_vae_refuses_shapes_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*len\\(channels\\) = 8"):
        ConvVAE((1, 28, 28), (4, 8, 16))
    with pytest.raises(ValueError, match="channels, height, width"):
        ConvVAE((28, 28))
    with pytest.raises(TypeError, match="channels entries"):
        ConvVAE((1, 28, 28), (4, 2.5))


# --- hierarchical VAE --------------------------------------------------------------------------

def _linear(layer, h):
    return h @ layer.weight.T + layer.bias


def _gaussian_head(net, h):
    h = torch.relu(_linear(net.fc1, h))
    return _linear(net.fc_mu, h), _linear(net.fc_logvar, h)


def test_hierarchical_elbo_pieces_equal_float64_hand_computation():
    model = HierarchicalVAE(13, (7,), (3, 2), (5,), backend="torch").double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # larger weights: prior log-variances far from 0, so a wrong KL formula shows
    x = torch.rand(6, 13, dtype=torch.float64)
    torch.manual_seed(5)
    terms = model.loss_terms(x, beta=0.7, reduction="none")
    torch.manual_seed(5)
    eps1, eps2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    mu1, lv1 = _gaussian_head(model.encoder, x)
    mu2, lv2 = _gaussian_head(model.encoder2, mu1)
    z1, z2 = mu1 + eps1 * torch.exp(0.5 * lv1), mu2 + eps2 * torch.exp(0.5 * lv2)
    mup, lvp = _gaussian_head(model.prior_net, z2)
    logits = _linear(model.decoder.fc2, torch.relu(_linear(model.decoder.fc1, z1)))
    recon = _bce_rows(logits, x)
    kl2 = 0.5 * (mu2 ** 2 + lv2.exp() - 1 - lv2).sum(-1)
    kl1 = 0.5 * (lvp - lv1 + (lv1.exp() + (mu1 - mup) ** 2) / lvp.exp() - 1).sum(-1)
    assert float(lvp.detach().abs().max()) > 0.1
    torch.testing.assert_close(terms.recon, recon, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.kl, kl1 + kl2, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.loss, recon + 0.7 * (kl1 + kl2), rtol=1e-10, atol=0)

    # Gradients of the model's loss equal those of the hand-written ELBO.
    hand = (recon + 0.7 * (kl1 + kl2)).sum()
    hand_grads = torch.autograd.grad(hand, list(model.parameters()))
    torch.manual_seed(5)
    model_grads = torch.autograd.grad(model.loss_terms(x, beta=0.7).loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), model_grads, hand_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_gaussian_kl_matches_closed_form_and_vanishes_on_equal_gaussians():
    mu, lv, mp, lp = (torch.randn(9, 4, dtype=torch.float64) for _ in range(4))
    expected = 0.5 * (lp - lv + (lv.exp() + (mu - mp) ** 2) / lp.exp() - 1).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, lv, mp, lp), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(gaussian_kl(mu, lv, mu, lv), torch.zeros(9, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((gaussian_kl(mu, lv, mp, lp) > 0).all())


# --- recurrent VAE -----------------------------------------------------------------------------

def _sine_waves(n, steps):
    t = torch.arange(steps, dtype=torch.float32)
    phase, freq = torch.rand(n, 1) * 2 * math.pi, 0.3 + 0.4 * torch.rand(n, 1)
    return torch.stack([torch.sin(freq * t + phase), torch.cos(freq * t + phase)], dim=-1)  # (n, steps, 2)


def test_recurrent_vae_learns_sine_waves():
    waves = _sine_waves(128, 16)
    model = RecurrentVAE(16, 2, hidden_size=16, latent_dim=3, likelihood="gaussian")
    history = fastvae.Trainer(model, waves, fastvae.TrainConfig(epochs=6, batch_size=32, lr=1e-2, progress=False), device="cpu").fit()
    assert history[-1]["loss"] < 0.4 * history[0]["loss"], [h["loss"] for h in history]
    assert model.reconstruct(waves[:4]).shape == (4, 32)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_recurrent_decoder_is_causal_and_free_running_feeds_back_its_output(likelihood):
    model = RecurrentVAE(7, 3, hidden_size=8, latent_dim=2, likelihood=likelihood).double()
    z, x = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, 21, dtype=torch.float64)
    base = model.train_logits(z, x).view(4, 7, 3)
    bumped = x.clone().view(4, 7, 3)
    bumped[:, 3] += 0.5
    moved = model.train_logits(z, bumped.view(4, 21)).view(4, 7, 3)
    torch.testing.assert_close(moved[:, :4], base[:, :4], rtol=0, atol=0)  # steps 0..3 never see step 3
    assert (moved[:, 4] - base[:, 4]).abs().max() > 1e-6
    free = model.decode_logits(z)
    fed_back = model.decode(z)  # probabilities / means: what free running feeds back
    torch.testing.assert_close(model.train_logits(z, fed_back), free, rtol=1e-12, atol=1e-12)


# --- adversarial autoencoder -------------------------------------------------------------------

def test_aae_trains_with_trainer_reconstruction_improves_and_discriminator_moves(real_data, tmp_path):
    images = real_data.images[:256]
    model = AdversarialAE(hidden_dims=(32,), latent_dim=2, discriminator_dims=(16,))
    trainer = fastvae.Trainer(model, images, fastvae.TrainConfig(epochs=3, batch_size=64, lr=5e-3, progress=False), device="cpu", out_dir=tmp_path)
    history = trainer.fit()
    assert history[-1]["recon"] < history[0]["recon"] - 20, [h["recon"] for h in history]
    # The discriminator learns to tell the codes from prior draws ...
    opt = model.make_optimizer(1e-2)
    before = model.discriminator_accuracy(images)
    codes = model.code(images).detach()
    for _ in range(30):
        model._update(opt.discriminator, model.discriminator_loss(codes))
    learned = model.discriminator_accuracy(images)
    assert learned > max(before + 0.1, 0.7), (before, learned)
    # ... and the generator update alone makes the codes look more like prior draws to it.
    fooled = model._fooled_rows(codes).mean()
    for _ in range(10):
        model._update(opt.generator, model._fooled_rows(model.code(images)).sum())
    assert model._fooled_rows(model.code(images)).mean() < fooled - 0.05
    # Checkpoints carry all three Adam states; resume continues.
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert set(state["optimizer"]) == {"autoencoder", "discriminator", "generator"} and state["config"]["model"] == "aae"
    again = fastvae.Trainer(AdversarialAE(hidden_dims=(32,), latent_dim=2, discriminator_dims=(16,)), images,
                            fastvae.TrainConfig(epochs=4, batch_size=64, progress=False), device="cpu")
    again.resume(tmp_path / "checkpoint.pt")
    assert len(again.fit()) == 4


def test_aae_generator_update_leaves_the_discriminator_alone(monkeypatch):
    model = AdversarialAE(30, (8,), 2, (8,))
    monkeypatch.setattr(model, "discriminator_loss", lambda codes: 0.0 * model.discriminator(codes).sum())
    before = [p.clone() for p in model.discriminator.parameters()]
    encoder = [p.clone() for p in model.encoder.parameters()]
    model.training_step(torch.rand(16, 30), model.make_optimizer(1e-2))
    for a, b in zip(before, model.discriminator.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(encoder, model.encoder.parameters()))
    with pytest.raises(TypeError, match="AAEOptimizer"):
        model.training_step(torch.rand(4, 30), torch.optim.Adam(model.parameters()))


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_cvae_trains_on_labels_resumes_and_samples_by_class(tmp_path, real_data, capsys):
    out = tmp_path / "cvae"
    args = ["train", "--model", "cvae", "--limit", "128", "--batch-size", "64", "--hidden-dims", "32", "--latent-dim", "4", "--out", str(out), "--no-progress"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume", str(out / "checkpoint.pt")]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["config"] == {"model": "cvae", "input_dim": 784, "hidden_dims": [32], "latent_dim": 4, "num_classes": 10, "likelihood": "bernoulli"}
    assert state["epoch"] == 2
    assert main(["sample", str(out / "checkpoint.pt"), "--label", "3", "-n", "9", "--out", str(tmp_path / "threes.png")]) == 0
    assert main(["reconstruct", str(out / "checkpoint.pt"), "-n", "8", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "threes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "r.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--label", "10", "--out", str(tmp_path / "x.png")]) == 2
    assert "num_classes (10)" in capsys.readouterr().err


@pytest.mark.parametrize("name,dims", [("conv", "4,8"), ("hvae", "32"), ("rvae", "16"), ("aae", "32")])
def test_cli_trains_and_samples_each_variant(tmp_path, real_data, capsys, name, dims):
    out = tmp_path / name
    assert main(["train", "--model", name, "--epochs", "1", "--limit", "64", "--batch-size", "32", "--hidden-dims", dims,
                 "--latent-dim", "4", "--out", str(out), "--no-progress"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["config"]["model"] == name
    for png in ("samples.png", "reconstructions.png"):
        assert (out / png).stat().st_size > 0
    assert main(["sample", str(out / "checkpoint.pt"), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--label", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert "--label needs a conditional model" in capsys.readouterr().err
