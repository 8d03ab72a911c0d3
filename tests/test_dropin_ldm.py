"""Latent-diffusion KL autoencoders through the drop-in: latents (B, C, H, W), a posterior object with
a clamped log-variance, trained through forward or through encode / posterior.sample() / decode /
posterior.kl() (never forward), the KL answered from the fused sampling pass. A self-written
ldm-style module (tests/user_vaes.py) and diffusers' AutoencoderKL at a small configuration built
from a config dict (optional: skipped with the reason when diffusers is missing; no network)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fastvae
import user_vaes
from fastvae.dropin import explain
from test_dropin_structure import SEED, Calls, InjectEps, philox_eps
from user_vaes import CASES, DIFFUSERS_CONFIG, METHOD_CASES, ldm_loss, ldm_method_step

LDM = next(c for c in CASES if c.name == "ldm_conv")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parity(user, model, step, batch, steps=2):
    """Train both one recorded step (as written, the same eps), then compare one more step's loss and
    gradients; returns (loss rel err, grad rel err, draws of the user's noise in the accelerated step)."""
    for m in (user, model):
        with InjectEps():
            step(m, batch).backward()
        m.zero_grad()
    for _ in range(steps - 1):
        with InjectEps():
            loss_user = step(user, batch)
        loss_user.backward()
        with InjectEps() as spy:
            loss = step(model, batch)
        loss.backward()
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), user.parameters(), strict=True) if q.grad is not None]
    whole = rel_err(torch.cat([a.flatten() for a, _ in grads]), torch.cat([b.flatten() for _, b in grads]))
    return rel_err(loss, loss_user), whole, spy.draws


def test_forward_pattern_kl_answered_from_the_sampling_pass():
    torch.manual_seed(0)
    user = LDM.model()
    model = fastvae.accelerate(copy.deepcopy(user), sampling="fused", seed=SEED)
    batch = LDM.batch(2, torch.Generator().manual_seed(1))
    loss_err, grad_err, draws = parity(user, model, lambda m, b: ldm_loss(m, b, m(*b), kl_weight=1e-2), batch)
    assert draws == 0 and loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err)
    assert "kl: forward()[1].kl() is the KL of that sample: answered from the fused sampling pass" in explain(model)
    dec, posterior = model(*batch)
    with Calls() as calls:
        kl = posterior.kl()
    assert calls.names == []  # no op ran: the rows came from the sampling pass
    expected = 0.5 * torch.sum(posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar, dim=[1, 2, 3])
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)
    assert model._fastvae_dropin.plan.sampling.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda c: c.name)
def test_training_through_encode_sample_decode_kl_is_accelerated(case):
    torch.manual_seed(0)
    user = case.model()
    model = fastvae.accelerate(copy.deepcopy(user), sampling="fused", seed=SEED)
    batch = case.batch(2, torch.Generator().manual_seed(2))
    loss_err, grad_err, draws = parity(user, model, lambda m, b: ldm_loss(m, b, _through_methods(m, b), kl_weight=1e-2), batch)
    assert draws == 0 and loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err, explain(model))
    text = explain(model)
    assert "sample in encode.result.sample(): z = tensor.add" in text and "the whole encode.result.sample() call" in text
    assert "kl: encode().kl() is the KL of that sample" in text
    assert "decoder output of decode(): a layer's raw output" in text
    posterior = model.encode(batch[0])
    z = posterior.sample()
    with Calls() as calls:
        kl = posterior.kl()
    assert calls.names == []
    torch.testing.assert_close(kl, 0.5 * torch.sum(posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar, dim=[1, 2, 3]))
    torch.testing.assert_close(z, posterior.mean + posterior.std * philox_eps(z.shape), rtol=1e-5, atol=1e-6)
    assert [m for m in model._fastvae_dropin.methods] == ["encode"]  # the other wrappers are gone


def _through_methods(model, batch):
    posterior = model.encode(batch[0])
    return model.decode(posterior.sample()), posterior


def test_method_calls_that_differ_from_the_recorded_ones_run_as_written():
    case = METHOD_CASES[0]
    model = fastvae.accelerate(case.model(), sampling="fused")
    batch = case.batch(2)
    ldm_method_step(model, batch).backward()
    ldm_method_step(model, batch).backward()
    posterior = model.encode(batch[0])
    with InjectEps() as spy:
        posterior.sample()
    assert spy.draws == 0
    posterior = model.encode(batch[0])
    posterior.frozen = True  # a plain attribute the recorded object did not have: its own sample() runs
    with InjectEps() as spy:
        posterior.sample()
    assert spy.draws == 1
    model.eval()
    with InjectEps() as spy:
        model(batch[0])[1].sample()
    assert spy.draws == 2  # eval-mode calls are never replaced: the forward's own sample(), then this one


def test_auto_routing_keeps_the_users_sampling_below_the_cpu_threshold():
    case = METHOD_CASES[0]
    model = fastvae.accelerate(case.model())
    batch = case.batch(2)  # 2 x 4 x 16 x 16 latents: below routing.CPU_SAMPLING_MIN
    for _ in range(2):
        ldm_method_step(model, batch).backward()
    with InjectEps() as spy:
        ldm_method_step(model, batch)
    assert spy.draws == 1


# ---- diffusers' AutoencoderKL ---------------------------------------------------------------------------------
def diffusers_vae():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency (pip install diffusers)")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL.from_config(DIFFUSERS_CONFIG)


def diffusers_step(vae, batch):
    return user_vaes.diffusers_step(vae, batch, kl_weight=1e-2)


def test_diffusers_autoencoder_kl_trained_through_encode_decode():
    user = diffusers_vae()
    model = fastvae.accelerate(copy.deepcopy(user), sampling="fused", seed=SEED)
    batch = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1,)
    loss_err, grad_err, draws = parity(user, model, diffusers_step, batch)
    assert draws == 0 and loss_err < 1e-5 and grad_err < 1e-4, (loss_err, grad_err, explain(model))
    text = explain(model)
    assert "sample in encode.latent_dist.sample()" in text and "kl: encode().latent_dist.kl() is the KL of that sample" in text
    assert model._fastvae_dropin.plan.sampling.shape == (2, 4, 32, 32)
    posterior = model.encode(batch[0]).latent_dist
    posterior.sample()
    with Calls() as calls:
        posterior.kl()
    assert calls.names == []


def test_diffusers_forward_with_sample_posterior_keeps_the_users_clamp():
    """The issue's repro on diffusers' own posterior: a first batch where clamp(logvar, -30, 20) changes
    nothing, then a log-variance of 40: |z - mean| stays within exp(10) |eps| as the user's code bounds it."""
    vae = diffusers_vae()
    model = fastvae.accelerate(vae, sampling="fused", seed=SEED)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model(x, sample_posterior=True)
    assert model._fastvae_dropin.plan.sampling.replaceable, explain(model)
    assert "logvar = torch.clamp" in explain(model)
    with torch.no_grad():
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(40.0)  # the log-variance half of the moments
    seen = {}
    hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.update(z=args[0]))
    with InjectEps() as spy:
        model(x, sample_posterior=True)
    hook.remove()
    assert spy.draws == 0
    mean = vae.encode(x).latent_dist.mean
    bound = math.exp(10) * float(philox_eps(mean.shape).abs().max())
    assert float((seen["z"] - mean).detach().abs().max()) <= bound * 1.0001
