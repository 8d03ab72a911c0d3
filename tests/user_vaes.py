"""VAEs written the ways people write them, for fastvae.accelerate's tests and benchmarks.

Each ``Case`` is a model class as a user would write it, how its batches look (tensors, a dict
batch, labels) and the user's own loss on the forward's output. Between them they cover the
patterns of public PyTorch VAE code: tuple outputs in other orders, lists holding the input,
nested tuples, dicts and dataclasses, torch.distributions; one Linear then chunk / slice /
view+unbind; std or log-std instead of logvar; sampling inline, in a method, in place,
old-style ``.data.new().normal_()``, or ``Normal(mu, std).rsample()``; MLP and convolutional
encoders and decoders (28x28x1 to 64x64x3), sigmoid as a function or a module followed by a
reshape or a crop, tanh, raw logits; BCE-sum + KLD-sum, divided by the batch or not, the
default mean BCE, BCE with logits, MSE sum or mean with kld_weight / beta, a capacity |KL - C|,
KLD averaged over the batch, the loss inside forward and in a model method; legacy
``Variable(std.data.new(size).normal_())`` noise; a latent-diffusion style convolutional KL
autoencoder (latents (B, C, H, W), a posterior object with a clamped log-variance, ``sample()``
and ``kl()``, L1 reconstruction), trained through its forward or through ``encode`` / a
posterior's ``sample()`` / ``decode`` / ``kl()`` as diffusers' training scripts do (``METHOD_CASES``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable
from torch.distributions import Normal, kl_divergence


def kld_sum(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


# 1. pytorch/examples style: two heads, methods, sigmoid function, BCE-sum + KLD-sum ---------------------------
class ExamplesMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def examples_loss(model, batch, out):
    recon_x, mu, logvar = out
    bce = F.binary_cross_entropy(recon_x, batch[0].view(-1, 784), reduction="sum")
    return bce + kld_sum(mu, logvar)


# 2. one Linear then chunk, inline sampling, nn.Sigmoid then view, returns (z, mu, logvar, x_hat), loss / batch --
class ChunkMLP(nn.Module):
    def __init__(self, latent_dim=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                     nn.Linear(256, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(),
                                     nn.Linear(512, 784), nn.Sigmoid())

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        x_hat = self.decoder(z).view(-1, 1, 28, 28)
        return z, mu, logvar, x_hat


def chunk_loss(model, batch, out):
    z, mu, logvar, x_hat = out
    x = batch[0]
    return (F.binary_cross_entropy(x_hat, x, reduction="sum") + kld_sum(mu, logvar)) / x.size(0)


# 3. dict batch in, dict out, slices of one Linear, std from softplus, sampling method with torch.randn(size) ------
class DictBatchMLP(nn.Module):
    def __init__(self, latent_dim=16, beta=4.0):
        super().__init__()
        self.latent_dim, self.beta = latent_dim, beta
        self.body = nn.Sequential(nn.Linear(784, 400), nn.LeakyReLU(0.2), nn.Linear(400, 2 * latent_dim))
        self.head = nn.Sequential(nn.Linear(latent_dim, 400), nn.LeakyReLU(0.2), nn.Linear(400, 784))

    def sample(self, mu, std):
        eps = torch.randn(mu.size(0), mu.size(1), device=mu.device, dtype=mu.dtype)
        return mu + std * eps

    def forward(self, batch):
        x = batch["image"].flatten(1)
        h = self.body(x)
        mu, std = h[:, :self.latent_dim], F.softplus(h[:, self.latent_dim:]) + 1e-4
        z = self.sample(mu, std)
        return {"x_hat": torch.sigmoid(self.head(z)), "mu": mu, "std": std, "z": z}


def dict_loss(model, batch, out):
    x = batch[0]["image"].flatten(1)
    mse = F.mse_loss(out["x_hat"], x, reduction="sum")
    mu, std = out["mu"], out["std"]
    kld = 0.5 * torch.sum(std.pow(2) + mu.pow(2) - 1 - 2 * torch.log(std))
    return mse + model.beta * kld


# 4. torch.distributions, dataclass output, raw logits, BCE with logits -----------------------------------------
@dataclasses.dataclass
class VAEOutput:
    logits: torch.Tensor
    posterior: Normal
    z: torch.Tensor


class DistributionsMLP(nn.Module):
    def __init__(self, latent_dim=20):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 512), nn.ELU(), nn.Linear(512, 256), nn.ELU())
        self.loc = nn.Linear(256, latent_dim)
        self.log_scale = nn.Linear(256, latent_dim)
        self.dec = nn.Sequential(nn.Linear(latent_dim, 256), nn.ELU(), nn.Linear(256, 512), nn.ELU(), nn.Linear(512, 784))

    def forward(self, x):
        h = self.enc(x.reshape(x.shape[0], -1))
        q = Normal(self.loc(h), torch.exp(self.log_scale(h)))
        z = q.rsample()
        return VAEOutput(self.dec(z), q, z)


def distributions_loss(model, batch, out):
    x = batch[0].reshape(out.logits.shape)
    rec = F.binary_cross_entropy_with_logits(out.logits, x, reduction="sum")
    prior = Normal(torch.zeros_like(out.z), torch.ones_like(out.z))
    return rec + kl_divergence(out.posterior, prior).sum()


# 5. labels as an extra argument, in-place sampling, nested (x_hat, (mu, logvar), z), KLD averaged over the batch
class ConditionalMLP(nn.Module):
    def __init__(self, classes=10, latent_dim=20):
        super().__init__()
        self.classes = classes
        self.fc1 = nn.Linear(784 + classes, 512)
        self.fc_mu = nn.Linear(512, latent_dim)
        self.fc_logvar = nn.Linear(512, latent_dim)
        self.fc3 = nn.Linear(latent_dim + classes, 512)
        self.fc4 = nn.Linear(512, 784)

    def reparameterize(self, mu, logvar):
        std = logvar.mul(0.5).exp_()
        eps = torch.randn_like(std)
        return eps.mul(std).add_(mu)

    def forward(self, x, labels):
        y = F.one_hot(labels, self.classes).to(x.dtype)
        h = F.relu(self.fc1(torch.cat([x.view(-1, 784), y], dim=1)))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparameterize(mu, logvar)
        x_hat = torch.sigmoid(self.fc4(F.relu(self.fc3(torch.cat([z, y], dim=1)))))
        return x_hat, (mu, logvar), z


def conditional_loss(model, batch, out):
    x_hat, (mu, logvar), _ = out
    bce = F.binary_cross_entropy(x_hat, batch[0].view(-1, 784), reduction="sum") / x_hat.size(0)
    kld = torch.mean(-0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1), dim=0)
    return bce + kld


# 6. the loss inside forward, old-style .data.new().normal_() sampling, eval mode decodes mu ---------------------
class LossInForwardMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 500)
        self.fc2 = nn.Linear(500, 500)
        self.fc_mu = nn.Linear(500, 30)
        self.fc_logvar = nn.Linear(500, 30)
        self.fc3 = nn.Linear(30, 500)
        self.fc4 = nn.Linear(500, 784)

    def reparametrize(self, mu, logvar):
        if self.training:
            std = logvar.mul(0.5).exp()
            eps = std.data.new(std.size()).normal_()
            return eps.mul(std).add(mu)
        return mu

    def forward(self, x):
        x = x.view(-1, 784)
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparametrize(mu, logvar)
        recon = torch.sigmoid(self.fc4(torch.tanh(self.fc3(z))))
        bce = F.binary_cross_entropy(recon, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld, recon


def in_forward_loss(model, batch, out):
    return out[0]


# 7. 64x64x3 MLP, view + unbind, tanh output, MSE mean + kld_weight * KLD averaged over the batch ----------------
class Tanh64MLP(nn.Module):
    def __init__(self, latent_dim=64, kld_weight=0.00025):
        super().__init__()
        self.latent_dim, self.kld_weight = latent_dim, kld_weight
        self.encoder = nn.Sequential(nn.Linear(64 * 64 * 3, 512), nn.ReLU(), nn.Linear(512, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 512), nn.ReLU(), nn.Linear(512, 64 * 64 * 3), nn.Tanh())

    def forward(self, x):
        stats = self.encoder(x.flatten(1)).view(-1, 2, self.latent_dim)
        mu, log_var = stats.unbind(1)
        std = torch.exp(0.5 * log_var)
        z = torch.randn_like(std) * std + mu
        return self.decoder(z).view_as(x), mu, log_var


def tanh64_loss(model, batch, out):
    recons, mu, log_var = out
    recons_loss = F.mse_loss(recons, batch[0])
    kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
    return recons_loss + model.kld_weight * kld


# 8. PyTorch-VAE style conv 64x64x3: BatchNorm, list [recons, input, mu, log_var], loss_function method ----------
class VanillaConv64(nn.Module):
    def __init__(self, in_channels=3, latent_dim=128, hidden_dims=(32, 64, 128, 256)):
        super().__init__()
        modules, c = [], in_channels
        for h in hidden_dims:
            modules.append(nn.Sequential(nn.Conv2d(c, h, 3, stride=2, padding=1), nn.BatchNorm2d(h), nn.LeakyReLU()))
            c = h
        self.encoder = nn.Sequential(*modules)
        self.fc_mu = nn.Linear(hidden_dims[-1] * 16, latent_dim)
        self.fc_var = nn.Linear(hidden_dims[-1] * 16, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, hidden_dims[-1] * 16)
        rev = list(reversed(hidden_dims))
        self.decoder = nn.Sequential(*[nn.Sequential(nn.ConvTranspose2d(rev[i], rev[i + 1], 3, stride=2, padding=1, output_padding=1),
                                                     nn.BatchNorm2d(rev[i + 1]), nn.LeakyReLU()) for i in range(len(rev) - 1)])
        self.final_layer = nn.Sequential(nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1),
                                         nn.BatchNorm2d(rev[-1]), nn.LeakyReLU(), nn.Conv2d(rev[-1], in_channels, 3, padding=1), nn.Tanh())
        self.hidden = hidden_dims[-1]

    def encode(self, input):
        result = torch.flatten(self.encoder(input), start_dim=1)
        return [self.fc_mu(result), self.fc_var(result)]

    def decode(self, z):
        result = self.decoder_input(z).view(-1, self.hidden, 4, 4)
        return self.final_layer(self.decoder(result))

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return eps * std + mu

    def forward(self, input, **kwargs):
        mu, log_var = self.encode(input)
        z = self.reparameterize(mu, log_var)
        return [self.decode(z), input, mu, log_var]

    def loss_function(self, *args, **kwargs):
        recons, input, mu, log_var = args[0], args[1], args[2], args[3]
        kld_weight = kwargs["M_N"]
        recons_loss = F.mse_loss(recons, input)
        kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
        loss = recons_loss + kld_weight * kld_loss
        return {"loss": loss, "Reconstruction_Loss": recons_loss.detach(), "KLD": -kld_loss.detach()}


def vanilla_loss(model, batch, out):
    return model.loss_function(*out, M_N=0.005)["loss"]


# 9. beta-VAE with a capacity (Burgess et al.): conv 64x64x1, slices of one Linear, raw logits, BCE-with-logits / batch
class CapacityConv64(nn.Module):
    def __init__(self, latent_dim=10, gamma=100.0, capacity=25.0):
        super().__init__()
        self.latent_dim, self.gamma, self.capacity = latent_dim, gamma, capacity
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(True), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(True), nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(True),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(True), nn.Linear(256, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(True), nn.Linear(256, 64 * 4 * 4), nn.ReLU(True), nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(True), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(True), nn.ConvTranspose2d(32, 1, 4, 2, 1))

    def forward(self, x):
        distributions = self.encoder(x)
        mu = distributions[:, :self.latent_dim]
        logvar = distributions[:, self.latent_dim:]
        std = logvar.div(2).exp()
        eps = torch.randn_like(std)
        z = mu + std * eps
        return self.decoder(z), mu, logvar


def capacity_loss(model, batch, out):
    x_logits, mu, logvar = out
    x = batch[0]
    recon = F.binary_cross_entropy_with_logits(x_logits, x, reduction="sum").div(x.size(0))
    total_kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean(0)
    return recon + model.gamma * (total_kld - model.capacity).abs()


# 10. conv 28x28x1: decoder makes 32x32, nn.Sigmoid, then a crop; nn.BCELoss(reduction="sum") --------------------
class CropConv28(nn.Module):
    def __init__(self, latent_dim=16):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU())
        self.fc_mu = nn.Linear(64 * 7 * 7, latent_dim)
        self.fc_logvar = nn.Linear(64 * 7 * 7, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, 64 * 8 * 8)
        self.deconv = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())
        self.bce = nn.BCELoss(reduction="sum")

    def forward(self, x):
        h = self.conv(x).view(x.size(0), -1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        std = torch.exp(logvar / 2)
        z = mu + std * torch.randn_like(std)
        out = self.deconv(self.fc_dec(z).view(-1, 64, 8, 8))
        return out[:, :, 2:30, 2:30], mu, logvar


def crop_loss(model, batch, out):
    x_hat, mu, logvar = out
    return model.bce(x_hat, batch[0]) + kld_sum(mu, logvar)


# 11. conv 32x32x3 with a log-std head (chunk), sigmoid function, default mean BCE scaled by pixels, KLD averaged ----
class LogStdConv32(nn.Module):
    def __init__(self, latent_dim=32):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                                 nn.Conv2d(64, 128, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(128 * 16, 2 * latent_dim))
        self.fc = nn.Linear(latent_dim, 128 * 16)
        self.dec = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(32, 3, 4, 2, 1))

    def forward(self, x):
        mu, log_std = torch.chunk(self.enc(x), 2, dim=1)
        z = mu + torch.exp(log_std) * torch.randn_like(mu)
        return F.sigmoid(self.dec(self.fc(z).view(-1, 128, 4, 4))), mu, log_std


def logstd_loss(model, batch, out):
    x_hat, mu, log_std = out
    rec = F.binary_cross_entropy(x_hat, batch[0]) * 3 * 32 * 32
    kld = (-0.5 * (1 + 2 * log_std - mu.pow(2) - torch.exp(2 * log_std)).sum(dim=1)).mean()
    return rec + kld


# 12. legacy noise: Variable(std.data.new(std.size()).normal_()), eps.mul(std).add_(mu) (old course repositories) ---
class LegacyVariableMLP(nn.Module):
    def __init__(self, latent_dim=20):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, latent_dim)
        self.fc22 = nn.Linear(400, latent_dim)
        self.fc3 = nn.Linear(latent_dim, 400)
        self.fc4 = nn.Linear(400, 784)
        self.sigmoid = nn.Sigmoid()

    def reparametrize(self, mu, logvar):
        std = logvar.mul(0.5).exp_()
        eps = Variable(std.data.new(std.size()).normal_())
        return eps.mul(std).add_(mu)

    def forward(self, x):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = self.reparametrize(mu, logvar)
        return self.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


# 13. latent-diffusion style conv KL autoencoder (CompVis ldm / diffusers layout, small) ---------------------------
class DiagonalGaussian:
    """The posterior as latent-diffusion code writes it: mean / logvar halves of one conv output, the
    log-variance clamped to [-30, 20], std and var computed up front, sample() and kl()."""

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self):
        return self.mean + self.std * torch.randn(self.mean.shape, device=self.parameters.device, dtype=self.parameters.dtype)

    def kl(self):
        return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def mode(self):
        return self.mean


class LDMConv(nn.Module):
    """64x64x3 -> latents 4x16x16 (two stride-2 convs), GroupNorm + SiLU, quant_conv / post_quant_conv 1x1."""

    def __init__(self, channels=(32, 64), latent_channels=4):
        super().__init__()
        c1, c2 = channels
        self.encoder = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.GroupNorm(8, c1), nn.SiLU(),
                                     nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
                                     nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
                                     nn.Conv2d(c2, 2 * latent_channels, 3, padding=1))
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, c2, 3, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
                                     nn.Upsample(scale_factor=2.0), nn.Conv2d(c2, c2, 3, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
                                     nn.Upsample(scale_factor=2.0), nn.Conv2d(c2, c1, 3, padding=1), nn.GroupNorm(8, c1), nn.SiLU(),
                                     nn.Conv2d(c1, 3, 3, padding=1))

    def encode(self, x):
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def ldm_loss(model, batch, out, kl_weight=1e-6):
    """The latent-diffusion autoencoder loss without its GAN and perceptual terms: L1 + kl_weight * KL / batch."""
    dec, posterior = out
    x = batch[0]
    rec = torch.abs(x - dec).sum() / x.shape[0]
    return rec + kl_weight * posterior.kl().sum() / x.shape[0]


@dataclasses.dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    image: tuple[int, int, int]
    kind: str  # "mlp" or "conv"
    loss: Callable[[nn.Module, tuple, Any], torch.Tensor]
    patterns: str
    inputs: str = "image"  # "image", "dict" or "labels"
    signed: bool = False  # data in [-1, 1] (tanh decoders)
    likelihood: str | None = None  # what the user's loss trains, where the decoder's structure leaves it open (raw logits)
    fit: bool = True  # whether fastvae.fit trains the user's objective (not an L1 loss, a dict batch, a step through methods)
    bench_batch: int = 128  # the benchmark's batch
    method_step: Callable[[nn.Module, tuple], torch.Tensor] | None = None  # a step through methods, never forward: the loss

    def step_loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """One training step's loss as the user's loop computes it."""
        return self.method_step(model, batch) if self.method_step is not None else self.loss(model, batch, model(*batch))

    def batch(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple:
        """The forward's positional arguments for a batch of n."""
        x = torch.rand(n, *self.image, generator=generator).to(dtype)
        if self.signed:
            x = x * 2 - 1
        if self.inputs == "dict":
            return ({"image": x, "label": torch.randint(0, 10, (n,), generator=generator)},)
        if self.inputs == "labels":
            return (x, torch.randint(0, 10, (n,), generator=generator))
        return (x,)

    def images(self, args: tuple) -> torch.Tensor:
        return args[0]["image"] if self.inputs == "dict" else args[0]


CASES = [
    Case("examples_mlp", ExamplesMLP, (1, 28, 28), "mlp", examples_loss, "two Linear heads, methods, sigmoid function, BCE-sum + KLD-sum"),
    Case("chunk_mlp", ChunkMLP, (1, 28, 28), "mlp", chunk_loss,
         "one Linear + chunk, inline sampling, nn.Sigmoid then view, returns (z, mu, logvar, x_hat), loss / batch"),
    Case("dict_batch_mlp", DictBatchMLP, (1, 28, 28), "mlp", dict_loss,
         "dict batch and dict output, slices, std (softplus) instead of logvar, torch.randn(size), MSE-sum + beta KLD", inputs="dict"),
    Case("distributions_mlp", DistributionsMLP, (1, 28, 28), "mlp", distributions_loss,
         "Normal(mu, exp(log_scale)).rsample(), dataclass output, raw logits, BCE with logits + kl_divergence", likelihood="bernoulli"),
    Case("conditional_mlp", ConditionalMLP, (1, 28, 28), "mlp", conditional_loss,
         "labels argument, in-place sampling, nested (x_hat, (mu, logvar), z), BCE / batch + KLD averaged over the batch", inputs="labels"),
    Case("loss_in_forward_mlp", LossInForwardMLP, (1, 28, 28), "mlp", in_forward_loss,
         "loss computed inside forward, .data.new().normal_() sampling, eval mode decodes mu"),
    Case("tanh64_mlp", Tanh64MLP, (3, 64, 64), "mlp", tanh64_loss,
         "64x64x3 MLP, view + unbind, tanh output, MSE mean + kld_weight * KLD averaged over the batch", signed=True),
    Case("vanilla_conv64", VanillaConv64, (3, 64, 64), "conv", vanilla_loss,
         "PyTorch-VAE style conv 64x64x3 with BatchNorm, list [recons, input, mu, log_var], loss_function method, tanh, MSE mean", signed=True),
    Case("capacity_conv64", CapacityConv64, (1, 64, 64), "conv", capacity_loss,
         "conv 64x64x1, slices of one Linear, logvar.div(2).exp(), raw logits, BCE-with-logits / batch + gamma |KL - C|",
         likelihood="bernoulli"),
    Case("crop_conv28", CropConv28, (1, 28, 28), "conv", crop_loss,
         "conv 28x28x1, 32x32 decoder + nn.Sigmoid + crop, nn.BCELoss(reduction='sum') module"),
    Case("logstd_conv32", LogStdConv32, (3, 32, 32), "conv", logstd_loss,
         "conv 32x32x3, torch.chunk log-std head, F.sigmoid, default mean BCE scaled by pixels, KLD averaged over the batch"),
    Case("legacy_variable_mlp", LegacyVariableMLP, (1, 28, 28), "mlp", examples_loss,
         "Variable(std.data.new(std.size()).normal_()) noise, eps.mul(std).add_(mu), nn.Sigmoid module, BCE-sum + KLD-sum"),
    Case("ldm_conv", LDMConv, (3, 64, 64), "conv", ldm_loss,
         "latent-diffusion conv KL autoencoder: latents 4x16x16, posterior object (clamped logvar, sample(), kl()), "
         "forward returns (dec, posterior), L1 + kl_weight * posterior.kl()", signed=True, bench_batch=8, fit=False),
]


def ldm_method_step(model, batch):
    """The latent-diffusion training loop's step through methods (never forward): encode, the posterior's
    sample(), decode, and its kl() in the loss."""
    posterior = model.encode(batch[0])
    z = posterior.sample()
    return ldm_loss(model, batch, (model.decode(z), posterior))


METHOD_CASES = [
    Case("ldm_conv_methods", LDMConv, (3, 64, 64), "conv", ldm_loss,
         "the ldm_conv model trained through encode / posterior.sample() / decode / posterior.kl()", signed=True, bench_batch=8,
         method_step=ldm_method_step, fit=False),
]

# diffusers' AutoencoderKL at a small configuration, built from a config dict (never from the Hub): latents 4x32x32 at 64x64
DIFFUSERS_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [32, 64],
                    "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64}


def diffusers_vae() -> nn.Module:
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_config(DIFFUSERS_CONFIG)


def diffusers_step(vae, batch, kl_weight=1e-6):
    """diffusers' VAE fine-tuning step: encode(x).latent_dist, its sample(), decode(z).sample, MSE + kl_weight * kl()."""
    x = batch[0]
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    pred = vae.decode(z).sample
    return F.mse_loss(pred, x, reduction="mean") + kl_weight * posterior.kl().mean()


def diffusers_cases() -> list[Case]:
    """The diffusers model as a step through methods, where diffusers is installed (an optional test dependency)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return []
    return [Case("diffusers_autoencoder_kl", diffusers_vae, (3, 64, 64), "conv", lambda model, batch, out: out,
                 "diffusers' AutoencoderKL (small config): encode(x).latent_dist.sample(), decode(z).sample, MSE + kl()",
                 signed=True, bench_batch=8, method_step=diffusers_step, fit=False)]
