"""A drop-in that can never mislead: its parts are proven by the structure of the recorded step, not
by numbers that happened to agree on the first batch.

Each op the fused sampler does not compute (clamp, relu, abs, where, masked_fill, nan_to_num,
maximum / max with a constant, dropout) is the identity on the first, recorded batch and not on
the second: the accelerated model must give the user's own result there. The decoder output's
kind comes from its ops and its distribution, and ``fastvae.fit`` takes the likelihood that
implies or refuses with the reason. Legacy ``Variable`` noise is accepted."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Normal

import fastvae
from fastvae.dropin import DecoderOutput, DropinModel, Refused, explain
from fastvae.ops import philox
from user_vaes import CASES

SEED = 1234
L = 3


def philox_eps(shape, dtype=torch.float32):
    return philox.randn(SEED, math.prod(shape)).view(shape).to(dtype)


class InjectEps(torch.overrides.TorchFunctionMode):
    """The user's own sampler, fed the eps the fused path draws for SEED; counts the draws."""

    def __init__(self):
        super().__init__()
        self.draws = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("randn", "randn_like", "normal", "normal_") and isinstance(out, torch.Tensor):
            self.draws += 1
            with torch.no_grad():
                out.copy_(philox_eps(out.shape, out.dtype))
        return out


class Calls(torch.overrides.TorchFunctionMode):
    """The names of the torch calls that computed a tensor while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.names.append(getattr(func, "__name__", "?"))
        return out


class Chain(nn.Module):
    """x's 2L columns are mu and the raw log-variance (an elementwise encoder, gains 1), so a batch sets
    them; `lv_op` acts on the log-variance, `std_op` on the std, `eps_op` on the noise, `z_op` on z."""

    def __init__(self, lv_op=None, std_op=None, eps_op=None, z_op=None):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(2 * L))
        self.dec = nn.Linear(L, 12)
        self.lv_op, self.std_op, self.eps_op, self.z_op = lv_op, std_op, eps_op, z_op

    def forward(self, x):
        mu, logvar = (x * self.gain).chunk(2, 1)
        if self.lv_op is not None:
            logvar = self.lv_op(logvar)
        std = torch.exp(0.5 * logvar)
        if self.std_op is not None:
            std = self.std_op(std)
        eps = torch.randn_like(mu)
        if self.eps_op is not None:
            eps = self.eps_op(eps)
        z = mu + std * eps
        if self.z_op is not None:
            z = self.z_op(z)
        return torch.sigmoid(self.dec(z)), mu, logvar, z


def batch(mu, logvar):
    return torch.cat([torch.as_tensor(mu, dtype=torch.float32).expand(4, L), torch.as_tensor(logvar, dtype=torch.float32).expand(4, L)], 1)


# (op on the log-variance, a first batch's log-variance where it is the identity, a second's where it is not)
LOGVAR_OPS = {
    "clamp": (lambda lv: torch.clamp(lv, -30.0, 20.0), [0.5, -1.0, 1.0], [40.0, 100.0, -45.0]),
    "relu": (F.relu, [0.5, 0.2, 1.0], [-3.0, -1.0, 2.0]),
    "abs": (torch.abs, [0.5, 0.2, 1.0], [-3.0, -1.0, 2.0]),
    "where": (lambda lv: torch.where(lv > 5.0, torch.full_like(lv, 5.0), lv), [0.5, -1.0, 1.0], [30.0, 9.0, 0.0]),
    "masked_fill": (lambda lv: lv.masked_fill(lv > 5.0, 5.0), [0.5, -1.0, 1.0], [30.0, 9.0, 0.0]),
    "nan_to_num": (lambda lv: torch.nan_to_num(lv, nan=0.0, posinf=5.0, neginf=-5.0), [0.5, -1.0, 1.0],
                   [float("nan"), float("inf"), 1.0]),
    "maximum": (lambda lv: torch.maximum(lv, torch.tensor(-4.0)), [0.5, -1.0, 1.0], [-20.0, -9.0, 1.0]),
    "max": (lambda lv: torch.max(lv, torch.tensor(-4.0)), [0.5, -1.0, 1.0], [-20.0, -9.0, 1.0]),
    "clamp_min": (lambda lv: lv.clamp_min(-4.0), [0.5, -1.0, 1.0], [-20.0, -9.0, 1.0]),
    "dropout": (nn.Dropout(0.0), [0.5, -1.0, 1.0], [0.5, -1.0, 1.0]),  # p becomes 0.5 before the second batch
}


def _users_result(model, x, seed):
    """The unaccelerated model's output on x with the fused path's eps (and the same dropout masks)."""
    plain = copy.deepcopy(model)
    fastvae.dropin.deaccelerate(plain)
    torch.manual_seed(seed)
    with InjectEps():
        return plain(x)


@pytest.mark.parametrize("name", list(LOGVAR_OPS))
def test_an_op_on_the_log_variance_that_was_the_identity_on_the_first_batch_still_runs(name):
    op, first, second = LOGVAR_OPS[name]
    model = fastvae.accelerate(Chain(lv_op=op), sampling="fused", seed=SEED)
    model(batch([0.1, 0.2, 0.3], first))  # recorded: the op changes nothing here
    s = model._fastvae_dropin.plan.sampling
    assert s.replaceable and s.form == "logvar", explain(model)
    if name == "dropout":
        model.lv_op.p = 0.5
    x = batch([0.1, 0.2, 0.3], second)
    expected = _users_result(model, x, seed=5)
    torch.manual_seed(5)
    with InjectEps() as spy:
        x_hat, mu, logvar, z = model(x)
    assert spy.draws == 0  # the fused sampler ran, not the user's
    torch.testing.assert_close(z, expected[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, expected[0], rtol=1e-5, atol=1e-6)
    if name == "clamp":  # the repro: the user's clamp bounds |z - mu| by exp(10) |eps|, and logvar 100 raises nothing
        assert float((z - mu).detach().abs().max()) <= math.exp(10) * float(philox_eps((4, L)).abs().max()) * 1.0001


def test_explain_names_the_tensor_after_the_op_as_the_log_variance():
    model = fastvae.accelerate(Chain(lv_op=lambda lv: torch.clamp(lv, -30.0, 20.0)), sampling="fused")
    model(batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0]))
    assert "logvar = torch.clamp at test_dropin_structure.py" in explain(model)


def test_a_std_that_can_be_zero_keeps_the_users_sampling_and_says_why():
    """dropout on the std: the fused sampler reads log(std), so the user's sampling runs (and explain says so)."""
    model = fastvae.accelerate(Chain(std_op=nn.Dropout(0.0)), sampling="fused", seed=SEED)
    model(batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0]))
    s = model._fastvae_dropin.plan.sampling
    assert not s.replaceable and "is not positive by its ops" in s.reason, explain(model)
    assert "your own sampling runs" in explain(model)
    model.std_op.p = 0.5
    x = batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0])
    expected = _users_result(model, x, seed=7)
    torch.manual_seed(7)
    with InjectEps():
        z = model(x)[3]
    torch.testing.assert_close(z, expected[3])


def test_a_std_clamped_to_a_positive_minimum_is_fused_from_the_clamped_std():
    model = fastvae.accelerate(Chain(std_op=lambda std: std.clamp(min=1e-3)), sampling="fused", seed=SEED)
    model(batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0]))
    s = model._fastvae_dropin.plan.sampling
    assert s.replaceable and s.form == "std", explain(model)
    x = batch([0.1, 0.2, 0.3], [-30.0, -40.0, 1.0])  # std = exp(-15): the clamp sets it to 1e-3
    expected = _users_result(model, x, seed=0)
    torch.testing.assert_close(model(x)[3], expected[3], rtol=1e-5, atol=1e-6)


def test_noise_changed_on_its_way_to_z_is_refused_naming_the_op():
    """Truncated noise: clamp(eps) is the identity on this first batch's noise (|eps| < 2 here), never a plain N(0, 1)."""
    torch.manual_seed(3)
    assert float(torch.randn(4, L).abs().max()) < 2.0
    model = fastvae.accelerate(Chain(eps_op=lambda e: e.clamp(-2.0, 2.0)))
    torch.manual_seed(3)
    with pytest.raises(Refused, match=r"tensor.clamp at test_dropin_structure.py:\d+ changes the noise on its way to z"):
        model(batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0]))


def test_an_op_after_z_runs_on_the_fused_sample():
    model = fastvae.accelerate(Chain(z_op=lambda z: torch.clamp(z, -1.0, 1.0)), sampling="fused", seed=SEED)
    model(batch([0.1, 0.2, 0.3], [0.5, -1.0, 1.0]))
    x = batch([0.1, 5.0, -7.0], [4.0, 2.0, 1.0])
    expected = _users_result(model, x, seed=0)
    torch.testing.assert_close(model(x)[3], expected[3])
    assert float(model(x)[3].abs().max()) <= 1.0


def test_legacy_variable_noise_is_accepted_and_replaced():
    case = next(c for c in CASES if c.name == "legacy_variable_mlp")
    model = fastvae.accelerate(case.model(), sampling="fused", seed=SEED)
    x = case.batch(4)
    model(*x)
    s = model._fastvae_dropin.plan.sampling
    assert s.replaceable and "tensor.normal_" in s.eps and s.form == "logvar", explain(model)
    with InjectEps() as spy:
        x_hat, mu, logvar = model(*x)
    assert spy.draws == 0 and isinstance(x_hat, DecoderOutput)


# ---- the decoder output's kind, and the likelihood fastvae.fit takes ------------------------------------------
class Decoded(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(12, 2 * L), nn.Linear(L, 12), head

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.head(self, z, x), mu, logvar


HEADS = {  # (decoder head, what DropinModel must do without likelihood=)
    "sigmoid": (lambda m, z, x: torch.sigmoid(m.dec(z)), "bernoulli"),
    "tanh": (lambda m, z, x: torch.tanh(m.dec(z)), "gaussian"),
    "clamped_probabilities": (lambda m, z, x: torch.sigmoid(m.dec(z)).clamp(1e-6, 1 - 1e-6), r"ends in tensor.clamp"),
    "relu_mean": (lambda m, z, x: F.relu(m.dec(z)), r"ends in F.relu"),
    "raw_layer": (lambda m, z, x: m.dec(z), r"a layer's raw output, which may be Bernoulli logits or a Gaussian mean"),
    "tanh_normal": (lambda m, z, x: Normal(0.5 * torch.tanh(m.dec(z)), 0.1), "gaussian"),
    "learned_scale_normal": (lambda m, z, x: Normal(m.dec(z), F.softplus(m.dec(z)) + 1e-3), r"Normal whose scale is learned"),
    "bernoulli_logits": (lambda m, z, x: Bernoulli(logits=m.dec(z)), "bernoulli"),
    "mse_in_forward": (lambda m, z, x: (lambda y: (y, F.mse_loss(y, x)))(m.dec(z)), "gaussian"),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_fit_takes_the_likelihood_the_decoder_structure_implies_or_refuses_with_the_reason(name):
    head, expected = HEADS[name]
    model = Decoded(head)
    example = torch.rand(4, 12)
    if expected in ("bernoulli", "gaussian"):
        assert DropinModel(model, (12,), example=example).likelihood == expected
        assert f"likelihood={expected!r}" in explain(model)
    else:
        with pytest.raises(Refused, match=expected):
            DropinModel(model, (12,), example=example)
        assert "fastvae.fit needs likelihood=" in explain(model)


def test_a_clamped_output_is_not_taken_for_logits():
    model = Decoded(HEADS["clamped_probabilities"][0])
    model = fastvae.accelerate(model)
    model(torch.rand(4, 12))
    assert "decoder output: tensor.clamp(...)" in explain(model)
    with pytest.raises(Refused, match="likelihood='bernoulli' needs a decoder ending in a sigmoid or raw logits; this one ends in tensor.clamp"):
        DropinModel(model, (12,), likelihood="bernoulli")
    assert DropinModel(model, (12,), likelihood="gaussian").likelihood == "gaussian"


def test_fit_trains_a_tanh_normal_decoder_on_data_in_its_range(tmp_path):
    """The issue's 3b: a Normal whose mean is 0.5 * tanh(...) on data in [-0.5, 0.5] trains a Gaussian, not a Bernoulli."""
    torch.manual_seed(0)
    model = Decoded(HEADS["tanh_normal"][0])
    images = torch.rand(256, 12) - 0.5
    history = fastvae.fit(model, images, epochs=3, batch_size=64, device="cpu", progress=False, out_dir=tmp_path)
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["loss"] < history[0]["loss"], history


# ---- training through methods, and the warning when nothing can be seen ----------------------------------------
class LoopSamples(nn.Module):
    """encode returns (mu, logvar) and the user's loop draws the noise itself: nothing the drop-in can see."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(12, 2 * L), nn.Linear(L, 12)

    def encode(self, x):
        return self.enc(x).chunk(2, 1)

    def decode(self, z):
        return torch.sigmoid(self.dec(z))


def _loop_step(model, x):
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    return F.binary_cross_entropy(model.decode(z), x, reduction="sum") - 0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())


def runtime_warnings(steps: int, step) -> list[str]:
    """The RuntimeWarnings of `steps` training steps (each `step()` runs a backward)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            step()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_loop_that_samples_outside_the_model_gets_one_warning_naming_what_it_saw():
    model = fastvae.accelerate(LoopSamples())
    x = torch.rand(4, 12)
    messages = runtime_warnings(4, lambda: _loop_step(model, x).backward())
    assert len(messages) == 1, messages
    assert "ran through encode(), decode()" in messages[0] and "drew no Gaussian noise" in messages[0]
    assert "move that into a model method" in messages[0]
    assert explain(model).startswith("nothing is accelerated")


def test_gradients_into_a_model_whose_calls_it_never_sees_warn_once():
    model = fastvae.accelerate(LoopSamples())
    x = torch.rand(4, 12)
    submodules = lambda: F.binary_cross_entropy(torch.sigmoid(model.dec(model.enc(x)[:, :L])), x).backward()  # noqa: E731
    messages = runtime_warnings(5, submodules)
    assert len(messages) == 1 and "gradients reached LoopSamples 3 times" in messages[0], messages
    assert "nothing is accelerated" in messages[0]


def test_no_warning_for_a_model_it_accelerates():
    case = CASES[0]
    model = fastvae.accelerate(case.model())
    x = case.batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            case.loss(model, x, model(*x)).backward()


def test_a_model_method_that_is_the_whole_sampling_is_answered_by_the_fused_sampler():
    """pytorch/examples' model trained through its methods: encode, reparameterize, decode (never forward)."""
    case = CASES[0]
    torch.manual_seed(0)
    user = case.model()
    model = fastvae.accelerate(copy.deepcopy(user), sampling="fused", seed=SEED)
    x = case.batch(6)[0].view(-1, 784)

    def step(m):
        mu, logvar = m.encode(x)
        z = m.reparameterize(mu, logvar)
        return F.binary_cross_entropy(m.decode(z), x, reduction="sum") - 0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())
    with InjectEps():
        step(model).backward()  # the first step runs as written (recorded)
    model.zero_grad()
    with InjectEps():
        loss_user = step(user)
    loss_user.backward()
    with InjectEps() as spy:
        loss = step(model)
    loss.backward()
    assert spy.draws == 0, explain(model)
    assert "the whole reparameterize() call" in explain(model)
    torch.testing.assert_close(loss, loss_user, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), user.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_an_op_after_the_decoders_sigmoid_stays_in_the_users_loss(monkeypatch):
    """The decoder side: clamp(sigmoid(logits), 1e-6, 1 - 1e-6) is the identity on the first batch and not on a
    saturated second one; the user's BCE on it keeps the clamp (it is never computed from the logits)."""
    from fastvae.dropin import routing
    monkeypatch.setattr(routing, "CPU_LOGITS_MIN", 0)
    monkeypatch.setattr(routing, "CPU_FUSED_LOSS_MIN", 0)
    torch.manual_seed(0)
    user = Decoded(HEADS["clamped_probabilities"][0])
    model = fastvae.accelerate(copy.deepcopy(user), sampling="fused", seed=SEED)
    x = torch.rand(4, 12)
    model(x)
    for m in (user, model):
        with torch.no_grad():
            m.dec.bias.fill_(-40.0)  # sigmoid underflows below 1e-6: the clamp bites
    with InjectEps():
        expected = F.binary_cross_entropy(user(x)[0], x, reduction="sum")
    out = model(x)[0]
    assert type(out) is torch.Tensor
    torch.testing.assert_close(F.binary_cross_entropy(out, x, reduction="sum"), expected)


def test_a_forward_called_by_a_wrapped_method_is_still_recorded_and_accelerated():
    """A Lightning-style training_step(batch) that calls self(x): the forward is its own top-level call."""
    case = CASES[0]

    class WithTrainingStep(type(case.model())):
        def training_step(self, x):
            return case.loss(self, (x,), self(x))

    model = fastvae.accelerate(WithTrainingStep(), sampling="fused")
    x = case.batch(4)[0]
    model.training_step(x).backward()
    assert model._fastvae_dropin.plan.sampling.replaceable, explain(model)
    with InjectEps() as spy:
        model.training_step(x).backward()
    assert spy.draws == 0 and "training_step" not in model.__dict__
