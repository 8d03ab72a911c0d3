"""fastvae.accelerate on the VAEs people write (tests/user_vaes.py): every one accepted, the same loss,
outputs and gradients as the user's own code for the same weights and eps, the user's sampling
replaced (not run twice), state_dict / pickling / torch.save intact, and refusals that name the
blocker and leave the model as it was."""
from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import fastvae
from fastvae.dropin import DecoderOutput, Refused, deaccelerate, explain, routing
from fastvae.dropin.trace import tensors_in
from fastvae.ops import philox
from user_vaes import CASES

SEED = 1234
RANDOM = {"randn", "randn_like", "normal", "normal_"}


def philox_eps(shape, dtype):
    return philox.randn(SEED, math.prod(shape)).view(shape).to(dtype)


class InjectEps(TorchFunctionMode):
    """The user's own sampler, fed the eps the fused path draws for SEED; counts the draws."""

    def __init__(self):
        super().__init__()
        self.draws = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in RANDOM and isinstance(out, torch.Tensor):
            self.draws += 1
            with torch.no_grad():
                out.copy_(philox_eps(out.shape, out.dtype))
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def outputs(out) -> list[torch.Tensor]:
    return [t for _, t in tensors_in(out, objects=True)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hooks_left(model):
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or hasattr(model, "_fastvae_dropin")


@pytest.mark.parametrize("dtype,backend,tol", [(torch.float32, None, 1e-5), (torch.float64, "torch", 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_accepted_with_the_users_loss_outputs_and_gradients(monkeypatch, case, dtype, backend, tol):
    """float32: every fused path forced (sampler and loss kernel); float64: the CPU's routing (torch's BCE-with-logits)."""
    if dtype == torch.float32:
        monkeypatch.setattr(routing, "CPU_FUSED_LOSS_MIN", 0)
    torch.manual_seed(0)
    user = case.model().to(dtype)
    acc = copy.deepcopy(user)
    fastvae.accelerate(acc, sampling="fused", seed=SEED, backend=backend)
    assert list(acc.state_dict()) == list(user.state_dict())
    g = torch.Generator().manual_seed(1)
    first, batch = case.batch(8, g, dtype), case.batch(8, g, dtype)
    with InjectEps():  # the first forward runs as written (it is recorded): same eps, so same batch-norm statistics
        user(*first)
        acc(*first)
    assert acc._fastvae_dropin.plan is not None and acc._fastvae_dropin.plan.sampling.replaceable, explain(acc)

    with InjectEps() as inject:
        out_user = user(*batch)
        loss_user = case.loss(user, batch, out_user)
    loss_user.backward()
    with InjectEps() as spy:
        out_acc = acc(*batch)
        assert spy.draws == 0  # the user's sampling did not run: no noise drawn besides the fused kernel's
        loss_acc = case.loss(acc, batch, out_acc)
    loss_acc.backward()
    assert inject.draws == 1

    assert rel_err(loss_acc, loss_user) <= tol
    for a, u in zip(outputs(out_acc), outputs(out_user), strict=True):
        assert a.shape == u.shape and rel_err(a.detach(), u.detach()) <= 10 * tol
    grads = [(name, q.grad, p.grad) for (name, p), q in zip(user.named_parameters(), acc.parameters(), strict=True)]
    whole = torch.cat([u.flatten() for _, _, u in grads])
    assert rel_err(torch.cat([a.flatten() for _, a, _ in grads]), whole) <= tol
    for name, a, u in grads:  # each parameter too, except those whose true gradient is 0 (a bias before batch-norm: rounding noise)
        assert float(u.norm()) < 1e-4 * float(whole.norm()) or rel_err(a, u) <= tol, name
    before, after = user.state_dict(), acc.state_dict()  # batch-norm statistics of a decoder see z: equal to rounding
    assert list(after) == list(before) and all(rel_err(after[k], before[k]) <= 10 * tol for k in before)


def test_returned_z_is_the_decoded_z_and_fresh_per_forward():
    model = fastvae.accelerate(CASES[1].model(), sampling="fused")  # ChunkMLP: returns (z, mu, logvar, x_hat)
    x = CASES[1].batch(5)[0]
    model(x)
    z, mu, logvar, x_hat = model(x)
    assert isinstance(x_hat, DecoderOutput)
    torch.testing.assert_close(x_hat, model.decoder(z).view(-1, 1, 28, 28), rtol=0, atol=0)
    assert not torch.equal(model(x)[0], z)  # fresh eps each forward


def test_auto_keeps_the_users_sampling_where_fused_does_not_pay(monkeypatch):
    """On this CPU the user's own sampling is faster at these sizes: it runs (once), nothing is skipped."""
    monkeypatch.setattr(routing, "CPU_SAMPLING_MIN", None)
    model = fastvae.accelerate(CASES[0].model())
    x = CASES[0].batch(4)[0]
    model(x)
    with InjectEps() as spy:
        x_hat, mu, logvar = model(x)
    assert spy.draws == 1 and isinstance(x_hat, DecoderOutput)
    monkeypatch.setattr(routing, "CPU_SAMPLING_MIN", 1)
    with InjectEps() as spy:
        model(x)
    assert spy.draws == 0


def test_eval_mode_decoding_of_mu_and_calls_outside_forward_are_left_alone():
    case = next(c for c in CASES if c.name == "loss_in_forward_mlp")
    model = fastvae.accelerate(case.model(), sampling="fused")
    x = case.batch(4)[0]
    model(x)
    model.eval()
    with InjectEps() as spy:
        loss, recon = model(x)
    assert spy.draws == 0  # eval: mu decoded, as the user wrote it
    h = torch.tanh(model.fc2(torch.tanh(model.fc1(x.view(-1, 784)))))
    torch.testing.assert_close(recon, torch.sigmoid(model.fc4(torch.tanh(model.fc3(model.fc_mu(h))))))
    decoded = model.fc4(torch.randn(3, 500))  # a submodule called on its own: plain
    assert type(decoded) is torch.Tensor


class Autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.bn, self.dec = nn.Linear(12, 3), nn.BatchNorm1d(3), nn.Linear(3, 12)

    def forward(self, x):
        z = self.bn(self.enc(x))
        return torch.sigmoid(self.dec(z)), z


class NotReparameterised(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(12, 6), nn.Linear(3, 12)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, 1)
        z = torch.normal(mu, torch.exp(0.5 * logvar))
        return torch.sigmoid(self.dec(z)), mu, logvar


class SeveralSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(12, 6), nn.Linear(3, 12)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, 1)
        z = mu + torch.randn(5, *mu.shape) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.dec(z)), mu, logvar


@pytest.mark.parametrize("cls,message", [
    (Autoencoder, "this forward drew no Gaussian noise"),
    (NotReparameterised, r"torch.normal at test_dropin.py:\d+ does not draw N\(0, 1\) noise \(z = torch.normal\(mu, std\) is not reparameterised"),
    (SeveralSamples, r"no tensor computed from the noise of torch.randn at test_dropin.py:\d+ \(shape \(5, 4, 3\)\) equals mu \+ eps \* std"),
])
@pytest.mark.parametrize("when", ["first forward", "example"])
def test_refusals_name_the_blocker_and_leave_the_model_as_it_was(cls, message, when):
    model = cls()
    before = snapshot(model)
    x = torch.rand(4, 12)
    with pytest.raises(Refused, match=message):
        if when == "example":
            fastvae.accelerate(model, example=x)
        else:
            fastvae.accelerate(model)
            model(x)
    assert isinstance(Refused("x"), ValueError)
    assert not hooks_left(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # batch-norm statistics restored too
    assert type(model(x)[0]) is torch.Tensor


def test_first_forward_runs_as_written_and_eval_forwards_before_it_are_not_recorded():
    model = fastvae.accelerate(CASES[0].model().eval())
    x = CASES[0].batch(4)[0]
    assert type(model(x)[0]) is torch.Tensor and model._fastvae_dropin.plan is None
    assert "found on its first forward in training mode" in explain(model)
    model.train()
    assert type(model(x)[0]) is torch.Tensor and model._fastvae_dropin.plan is not None  # recorded, ran as written
    assert isinstance(model(x)[0], DecoderOutput)
    assert "decoder output: sigmoid(logits), logits = F.linear in fc4" in explain(model)


def test_idempotent_and_undone_by_deaccelerate():
    model = CASES[0].model()
    assert fastvae.accelerate(model) is model and fastvae.accelerate(model) is model
    model(CASES[0].batch(2)[0])
    deaccelerate(model)
    assert not hooks_left(model) and type(model(CASES[0].batch(2)[0])[0]) is torch.Tensor
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastvae.accelerate(lambda x: x)
    with pytest.raises(ValueError, match="sampling must be one of"):
        fastvae.accelerate(CASES[0].model(), sampling="always")


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=lambda c: c.name)
def test_accelerated_model_deepcopies_pickles_and_torch_saves(case):
    model = fastvae.accelerate(case.model(), sampling="fused", seed=3)
    x = case.batch(2)
    model(*x)
    model.eval()
    expected = outputs(model(*x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert other._fastvae_dropin.plan is not None and other._fastvae_dropin.handles
        got = outputs(other(*x))
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    plain = case.model()
    plain.load_state_dict(model.state_dict())  # the checkpoint of an accelerated model is the user's
    torch.save(model.state_dict(), io.BytesIO())


def test_sampling_that_changes_after_the_first_batch_is_an_error_not_a_silent_mix():
    class Switches(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.fused_op = nn.Linear(12, 6), nn.Linear(3, 12), False

        def forward(self, x):
            mu, logvar = self.enc(x).chunk(2, 1)
            std, eps = torch.exp(0.5 * logvar), torch.randn_like(mu)
            z = torch.addcmul(mu, std, eps) if self.fused_op else mu + std * eps
            return torch.sigmoid(self.dec(z)), mu, logvar

    model = fastvae.accelerate(Switches(), sampling="fused")
    x = torch.rand(4, 12)
    model(x)
    model(x)
    model.fused_op = True
    with pytest.raises(RuntimeError, match=r"sampling differed from the first batch's .* ran torch.addcmul where the first batch ran tensor.mul"):
        model(x)
    assert torch._C._len_torch_function_stack() == 0  # nothing left switched on


# ---- the decoder output and the user's loss -------------------------------------------------------------------
def _tagged(shape=(6, 2, 5, 5), scale=4.0):
    logits = (torch.randn(shape, dtype=torch.float64) * scale).requires_grad_()
    from fastvae.dropin.output import wrap
    return logits, torch.sigmoid(wrap(logits, logits, "logits"))


@pytest.mark.parametrize("route", ["torch", "fused"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("view", ["none", "flatten", "crop", "view"])
def test_users_bce_runs_from_the_logits_with_the_same_value_and_gradient(monkeypatch, reduction, view, route):
    """From the logits by torch's BCE-with-logits or fastvae's fused loss (routing picks per device and size)."""
    monkeypatch.setattr(routing, "CPU_FUSED_LOSS_MIN", 0 if route == "fused" else None)
    logits, x_hat = _tagged()
    assert isinstance(x_hat, DecoderOutput) and x_hat._fastvae_kind == "sigmoid"
    shape = {"none": lambda t: t, "flatten": lambda t: t.flatten(1), "crop": lambda t: t[:, :, 1:4, 1:4], "view": lambda t: t.view(-1, 50)}[view]
    p = shape(x_hat)
    assert isinstance(p, DecoderOutput)
    x = torch.rand(p.shape, dtype=torch.float64)
    got = F.binary_cross_entropy(p, x, reduction=reduction)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    expected = F.binary_cross_entropy(shape(torch.sigmoid(logits)), x, reduction=reduction)
    (g_exp,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-9, atol=1e-12)


def test_bce_module_weights_legacy_arguments_and_with_logits_match_torch():
    logits, x_hat = _tagged((4, 7))
    x, w = torch.rand(4, 7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    probs = torch.sigmoid(logits)
    torch.testing.assert_close(nn.BCELoss(weight=w, reduction="sum")(x_hat, x), nn.BCELoss(weight=w, reduction="sum")(probs, x))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):  # torch's own warning
        torch.testing.assert_close(F.binary_cross_entropy(x_hat, x, size_average=False), F.binary_cross_entropy(probs, x, reduction="sum"))
    from fastvae.dropin.output import wrap
    raw = wrap(logits, logits, "logits")
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(raw, x, reduction="sum"), F.binary_cross_entropy_with_logits(logits, x, reduction="sum"))
    with pytest.raises(ValueError, match="size"):  # torch's own refusal of mismatched shapes stays
        F.binary_cross_entropy(x_hat, x[:, :3])


def test_saturated_probabilities_get_the_exact_loss_from_the_logits():
    """torch's BCE clamps log(0) at -100; from the logits it is exact."""
    from fastvae.dropin.output import wrap
    logits = torch.tensor([[-120.0, 3.0]])
    x = torch.tensor([[1.0, 1.0]])
    plain = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    tagged = F.binary_cross_entropy(torch.sigmoid(wrap(logits, logits, "logits")), x, reduction="sum")
    assert float(plain) == pytest.approx(100 + F.softplus(torch.tensor(-3.0)).item(), rel=1e-6)
    assert float(tagged) == pytest.approx(120 + F.softplus(torch.tensor(-3.0)).item(), rel=1e-6)


def test_other_operations_give_plain_tensors_and_in_place_changes_drop_the_logits():
    logits, x_hat = _tagged((3, 4))
    assert type(x_hat * 2) is torch.Tensor and type(torch.cat([x_hat, x_hat])) is torch.Tensor and type(x_hat.detach()) is torch.Tensor
    x = torch.rand(3, 4, dtype=torch.float64)
    clamped = x_hat.detach().as_subclass(DecoderOutput)
    clamped._fastvae_logits, clamped._fastvae_kind = logits.detach(), "sigmoid"
    clamped.clamp_(0.3, 0.7)  # the user changed x_hat in place: its logits no longer describe it
    torch.testing.assert_close(F.binary_cross_entropy(clamped, x), F.binary_cross_entropy(torch.sigmoid(logits.detach()).clamp(0.3, 0.7), x))


def test_vae_loss_from_logits_probabilities_and_reductions():
    from fastvae.functional import vae_loss
    logits, x_hat = _tagged((5, 9))
    x = torch.rand(5, 9, dtype=torch.float64)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    rows = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(1) - 0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
    for reduction, expected in (("sum", rows.sum()), ("mean", rows.mean()), ("none", rows)):
        torch.testing.assert_close(vae_loss(x_hat, x, mu, logvar, reduction=reduction), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(vae_loss(torch.sigmoid(logits), x, mu, logvar, reduction=reduction), expected, rtol=1e-10, atol=1e-10)


def test_vae_loss_refuses_swapped_arguments_and_raw_logits():
    from fastvae.dropin.output import wrap
    from fastvae.functional import vae_loss
    logits, x_hat = _tagged((5, 9))
    x = torch.rand(5, 9, dtype=torch.float64)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x carries the model's decoder logits, so the arguments are swapped"):
        vae_loss(x, x_hat, mu, logvar)
    with pytest.raises(ValueError, match="x requires grad but x_hat does not"):
        vae_loss(x, torch.sigmoid(logits), mu, logvar)
    with pytest.raises(ValueError, match="x_hat is the decoder's raw logits"):
        vae_loss(wrap(logits, logits, "logits"), x, mu, logvar)


def test_vae_loss_on_probabilities_under_autocast():
    from fastvae.functional import vae_loss
    p, x = torch.rand(4, 6), torch.rand(4, 6)
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vae_loss(p.bfloat16(), x, mu, logvar)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, vae_loss(p.bfloat16().float(), x, mu, logvar))


def test_bf16_autocast_trains_a_sigmoid_bce_model_pytorch_refuses(monkeypatch, real_data):
    """On CUDA PyTorch refuses binary_cross_entropy under autocast; CPU autocast lets it through, so the
    refusal is reproduced here. Accelerated, the user's BCE runs from the logits and trains."""
    real = torch._C._nn.binary_cross_entropy

    def refuse_under_autocast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch._C._nn, "binary_cross_entropy", refuse_under_autocast)
    case = CASES[0]
    torch.manual_seed(0)
    user = case.model()
    model = fastvae.accelerate(copy.deepcopy(user))
    batch = (real_data.images[:64].float().div(255).unsqueeze(1),)
    with pytest.raises(RuntimeError, match="unsafe to autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        case.loss(user, batch, user(*batch))
    model(*batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*batch)
            loss = case.loss(model, batch, out)
        assert out[0].dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


# ---- the whole engine -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape,labels", [("examples_mlp", (28, 28), False), ("crop_conv28", (1, 28, 28), False),
                                               ("conditional_mlp", (1, 28, 28), True)])
def test_fit_trains_the_users_module_in_place_with_the_engine(real_data, tmp_path, name, shape, labels):
    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    model = case.model()
    keys, before = list(model.state_dict()), snapshot(model)
    images = real_data.images[:512].reshape(-1, *shape)  # uint8, kept on the device as uint8 by the Trainer
    history = fastvae.fit(model, images, real_data.labels[:512] if labels else None, epochs=2, batch_size=128, device="cpu",
                          progress=False, out_dir=tmp_path)
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"] < 700, history
    assert list(model.state_dict()) == keys and not torch.equal(model.state_dict()[keys[0]], before[keys[0]])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert list(saved["model"]) == keys and saved["config"]["model"] == "dropin"  # the user's own state_dict
    case.model().load_state_dict(saved["model"])
    x = images[:8].float().div(255)
    out = model(x, real_data.labels[:8]) if labels else model(x)
    assert isinstance(out[0], DecoderOutput)  # still the user's module, accelerated


def test_engine_adapter_is_a_latent_model():
    from fastvae.dropin import DropinModel
    case = CASES[0]
    model = case.model()
    adapter = DropinModel(model, (1, 28, 28), example=torch.rand(4, 1, 28, 28))
    assert (adapter.input_dim, adapter.latent_dim, adapter.likelihood) == (784, 20, "bernoulli")
    assert adapter.config() == {"model": "dropin", "module": "user_vaes.ExamplesMLP", "input_shape": [1, 28, 28], "likelihood": "bernoulli"}
    x = torch.randint(0, 256, (6, 784), dtype=torch.uint8)
    torch.manual_seed(1)
    terms = adapter.loss_terms(x, beta=0.5)
    mu, logvar = adapter.posterior(x.float() / 255)
    torch.testing.assert_close(mu, model.fc21(F.relu(model.fc1(x.float() / 255))))
    torch.testing.assert_close(terms.loss, terms.recon + 0.5 * terms.kl)
    z = torch.randn(6, 20)
    torch.testing.assert_close(adapter.decode_logits(z), model.fc4(F.relu(model.fc3(z))))
    assert adapter.sample(3, seed=1, out_dtype=torch.uint8).shape == (3, 784)
    with pytest.raises(ValueError, match="IWAE needs fastvae's own models"):
        fastvae.fit(case.model(), x.view(6, 1, 28, 28), objective="iwae")
    with pytest.raises(Refused, match="likelihood='bernoulli' needs a decoder ending in a sigmoid or raw logits; this one ends in tanh"):
        DropinModel(CASES[6].model(), (3, 64, 64), likelihood="bernoulli", example=torch.rand(2, 3, 64, 64))


# ---- the examples: one added line ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bounds", [("mnist_vae", (150, 700)), ("conv_vae", (150, 700))])
def test_example_after_is_before_plus_one_line_and_runs(real_data, capsys, name, bounds):
    import difflib
    import runpy
    from pathlib import Path
    examples = Path(__file__).resolve().parents[1] / "examples"
    before = (examples / f"{name}_before.py").read_text().splitlines()
    after = (examples / f"{name}_after.py").read_text().splitlines()
    diff = [d for d in difflib.unified_diff(before, after, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    assert diff == ["+    model = fastvae.accelerate(model)"]
    result = runpy.run_path(str(examples / f"{name}_after.py"))["main"](["--epochs", "1", "--limit", "256", "--batch-size", "64"])
    first = result[0][0] if isinstance(result[0], tuple) else result[0]
    assert bounds[0] < first < bounds[1] and "Epoch: 1" in capsys.readouterr().out


def test_keyword_arguments_are_part_of_the_recorded_batch():
    case = next(c for c in CASES if c.name == "conditional_mlp")
    model = fastvae.accelerate(case.model(), sampling="fused", seed=SEED)
    x, labels = case.batch(6)
    model(x, labels=labels)
    x_hat, (mu, logvar), z = model(x, labels=labels)
    assert isinstance(x_hat, DecoderOutput)
    torch.testing.assert_close(z, mu + philox_eps(mu.shape, mu.dtype) * torch.exp(0.5 * logvar), rtol=1e-5, atol=1e-6)


def test_only_the_modules_around_what_pays_here_are_hooked():
    """On CPU (auto): a tanh + MSE model keeps nothing but the forward's own two hooks; a raw-logits
    model (its BCE-with-logits runs fused from routing.CPU_FUSED_LOSS_MIN values) and a sigmoid
    model hook their last layer only; forcing the fused sampling hooks the heads too."""
    def hooked(model):
        return sorted(name for name, m in model.named_modules() if name and (m._forward_hooks or m._forward_pre_hooks))
    for name, expected in (("tanh64_mlp", []), ("distributions_mlp", ["dec.4"])):
        case = next(c for c in CASES if c.name == name)
        model = fastvae.accelerate(case.model())
        model(*case.batch(2))
        model(*case.batch(2))
        assert hooked(model) == expected and len(model._forward_hooks) == len(model._forward_pre_hooks) == 1
    sigmoid = fastvae.accelerate(CASES[0].model())
    for _ in range(2):
        sigmoid(*CASES[0].batch(2))
    assert hooked(sigmoid) == ["fc4"]
    sigmoid._fastvae_dropin.sampling = "fused"
    sigmoid(*CASES[0].batch(2))
    assert hooked(sigmoid) == ["fc21", "fc22", "fc3", "fc4"]


def test_unvalidated_normal_and_a_multi_output_call_in_the_sampling():
    """Normal(..., validate_args=False): broadcast_tensors (two outputs) feeds only the sample; it still runs."""
    class Unvalidated(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(12, 6), nn.Linear(3, 12)

        def forward(self, x):
            mu, log_std = self.enc(x).chunk(2, 1)
            z = Normal(mu, log_std.exp(), validate_args=False).rsample()
            return torch.sigmoid(self.dec(z)), mu, log_std, z

    from torch.distributions import Normal
    model = fastvae.accelerate(Unvalidated(), sampling="fused", seed=SEED)
    x = torch.rand(5, 12)
    model(x)
    with InjectEps() as spy:
        x_hat, mu, log_std, z = model(x)
    assert spy.draws == 0 and "logstd" in explain(model)
    torch.testing.assert_close(z, mu + philox_eps(mu.shape, mu.dtype) * log_std.exp(), rtol=1e-5, atol=1e-6)


def test_torch_compile_of_an_accelerated_model_compiles_the_code_as_written():
    case = CASES[0]
    model = fastvae.accelerate(case.model())
    batch = case.batch(16)
    model(*batch)
    compiled = torch.compile(model)
    out = compiled(*batch)
    case.loss(compiled, batch, out).backward()
    assert type(out[0]) is torch.Tensor and isinstance(model(*batch)[0], DecoderOutput)


def test_calls_that_differ_after_the_sample_run_as_written():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.w = nn.Linear(12, 6), nn.Parameter(torch.randn(12, 3) * 0.1)

        def forward(self, x):
            mu, logvar = self.enc(x).chunk(2, 1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            h = z * 2 if self.training else z + 0  # no module between the sample and the last layer
            return torch.sigmoid(h @ self.w.t()), mu, logvar

    model = fastvae.accelerate(Branchy(), sampling="fused")
    x = torch.rand(300, 12)
    model(x)
    assert isinstance(model(x)[0], DecoderOutput)
    model.eval()
    with InjectEps() as spy:
        x_hat, mu, logvar = model(x)
    assert spy.draws == 0 and type(x_hat) is torch.Tensor


def test_routing_rule_cuda_fused_cpu_measured_and_reported():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert routing.fused_sampling(cuda, 1) and routing.fused_loss(cuda, 1) and routing.loss_from_logits(cuda, 1)
    for rule, limit in ((routing.fused_sampling, routing.CPU_SAMPLING_MIN), (routing.fused_loss, routing.CPU_FUSED_LOSS_MIN)):
        assert rule(cpu, limit) and not rule(cpu, limit - 1)  # benchmarks/dropin_routing.py measures the limits
    assert not routing.fused_sampling(cpu, 128 * 20)  # the reference latents: the user's own sampling is faster on CPU
    assert routing.loss_from_logits(cpu, routing.CPU_LOGITS_MIN) and not routing.loss_from_logits(cpu, routing.CPU_LOGITS_MIN - 1)
    from fastvae.cli import info
    assert info()["dropin"] == routing.describe() and "on CUDA: all fused" in routing.describe()


def test_tagging_stops_when_no_loss_computes_a_bce_from_the_output():
    """dict_batch_mlp ends in a sigmoid but its loss is an MSE: after a few steps nothing is intercepted."""
    from fastvae.dropin.accelerate import UNUSED_TAGS
    mse, bce = (next(c for c in CASES if c.name == n) for n in ("dict_batch_mlp", "examples_mlp"))
    for case, stays in ((mse, False), (bce, True)):
        model = fastvae.accelerate(case.model())
        batch = case.batch(4)
        for _ in range(UNUSED_TAGS + 2):
            case.loss(model, batch, model(*batch)).backward()
        out = outputs(model(*batch))
        assert any(isinstance(t, DecoderOutput) for t in out) == stays, case.name
        assert ("no longer tagged" not in explain(model)) == stays
        hooked = [m for name, m in model.named_modules() if name and (m._forward_hooks or m._forward_pre_hooks)]
        assert bool(hooked) == stays


def test_benchmark_steps_run():
    """benchmarks/test_dropin.py's three steps, once each (the timing runs through benchmarks.run)."""
    from benchmarks import test_dropin as bench
    case = CASES[0]
    for make in (bench._loop_step, bench._engine_step):
        model = case.model()
        before = snapshot(model)
        make(case, model, case.batch(bench.BATCH))()
        assert not torch.equal(model.state_dict()["fc1.weight"], before["fc1.weight"])
