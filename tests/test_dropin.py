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
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def outputs(out) -> list[torch.Tensor]:
    return [t for _, t in tensors_in(out, objects=True)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hooks_left(model):
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or hasattr(model, "_fastvae_dropin")


@pytest.mark.parametrize("dtype,backend,tol", [(torch.float32, None, 1e-5), (torch.float64, "torch", 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_accepted_with_the_users_loss_outputs_and_gradients(case, dtype, backend, tol):
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
