"""``fastvae.accelerate(model)``: fused sampling and loss-from-logits for a user's own VAE module.

The parts are found by structure, from one probe forward (training mode, so that the sampling
runs; no grad; buffers such as batch-norm statistics and the caller's RNG state restored) that
records every torch call and every nn.Linear call:

- the forward returns ``(x_hat, mu, logvar, ...)``;
- ``mu`` and ``logvar`` are the direct outputs of two distinct nn.Linear heads fed the same tensor;
- the first nn.Linear after them whose input is computed from both is the decoder's entry: its
  input is the sample z (same shape as mu);
- ``x_hat`` is ``sigmoid`` of the output of a final nn.Linear, possibly reshaped.

Then hooks (module hooks only: parameters, buffers and state_dict are untouched) make each
forward feed the decoder ``fastvae.functional.reparameterize(mu, logvar)`` in place of the
user's z (the user's own sampling still runs, its result is discarded), and attach the final
logits to ``x_hat`` as ``x_hat._fastvae_logits``, which ``fastvae.functional.vae_loss`` then uses
for a fused, stable BCE from logits. Without logits vae_loss keeps torch's clamp of log(p) at
-100; both agree except where a probability saturates to exactly 0 or 1 in float32 (logits
beyond about +-17 for 1, -88 for 0), where the logits form is the exact value.

A model that does not fit gets a ValueError saying what was found, and nothing is changed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .ops.reparam import reparameterize

_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as", "squeeze", "unsqueeze"}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Recorder(TorchFunctionMode):
    """Records (name, input tensors, output tensors) of every torch call, keeping them alive."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.Tensor], list[torch.Tensor]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((getattr(func, "__name__", str(func)), _tensors((args, kwargs or {})), _tensors(out)))
        return out


class _Parts:
    """What the probe found: the mu/logvar heads, the decoder's first and last Linear."""

    def __init__(self, mu: nn.Linear, logvar: nn.Linear, entry: nn.Linear, last: nn.Linear, names: dict[nn.Module, str]) -> None:
        self.mu, self.logvar, self.entry, self.last = mu, logvar, entry, last
        self.names = {key: names[m] for key, m in (("mu", mu), ("logvar", logvar), ("decoder_in", entry), ("decoder_out", last))}


def _probe_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if not isinstance(first, nn.Linear):
        found = type(first).__name__ if first is not None else "no parameters"
        raise ValueError(f"fastvae.accelerate: cannot guess an input for the probe (the first layer is {found}, not nn.Linear); pass example=<one batch of inputs>")
    return torch.rand(2, first.in_features, dtype=first.weight.dtype, device=first.weight.device)


def find_parts(model: nn.Module, example: torch.Tensor | None = None) -> _Parts:
    """Run one probe forward and locate the parts; ValueError naming what was found otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {m: n or "<model>" for n, m in model.named_modules()}
    with torch.random.fork_rng(devices=[]):  # the probe leaves the caller's RNG as it was
        x = _probe_input(model) if example is None else example
    linear_calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

    def hook(module, args, out):
        linear_calls.append((module, args[0], out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    buffers = [(b, b.clone()) for b in model.buffers()]
    recorder = _Recorder()
    try:
        model.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), recorder:
            out = model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for h in handles:
            h.remove()

    outs = _tensors(out) if isinstance(out, (tuple, list)) else []
    if len(outs) < 3 or not isinstance(out[0], torch.Tensor):
        raise ValueError(f"fastvae.accelerate: the forward must return (x_hat, mu, logvar); it returned {_describe(out)}")
    x_hat, mu, logvar = out[0], out[1], out[2]
    by_output = {id(o): (m, i) for m, i, o in linear_calls}
    if id(mu) not in by_output or id(logvar) not in by_output:
        raise ValueError("fastvae.accelerate: mu and logvar (the forward's 2nd and 3rd outputs) must each be the direct output of an nn.Linear head; "
                         f"found mu from an nn.Linear: {id(mu) in by_output}, logvar: {id(logvar) in by_output} (one Linear producing both, chunked, is not supported)")
    (mu_lin, mu_in), (lv_lin, lv_in) = by_output[id(mu)], by_output[id(logvar)]
    if mu_lin is lv_lin or mu_in is not lv_in or mu.shape != logvar.shape:
        raise ValueError(f"fastvae.accelerate: mu and logvar must come from two nn.Linear heads with one input and one shape; found {names[mu_lin]} and {names[lv_lin]}, shapes {tuple(mu.shape)} and {tuple(logvar.shape)}")

    tags = _provenance(recorder.calls, {id(mu): {"mu"}, id(logvar): {"logvar"}})
    entry = next(((m, i) for m, i, _ in linear_calls if tags.get(id(i), set()) >= {"mu", "logvar"}), None)
    if entry is None or entry[1].shape != mu.shape:
        found = "no nn.Linear" if entry is None else f"{names[entry[0]]} with an input of shape {tuple(entry[1].shape)}"
        raise ValueError(f"fastvae.accelerate: expected the decoder's first nn.Linear to take the sample z of shape {tuple(mu.shape)} computed from mu and logvar; found {found}")

    last = _sigmoid_source(recorder.calls, x_hat)
    last_lin = next((m for m, _, o in linear_calls if o is last), None) if last is not None else None
    if last_lin is None:
        raise ValueError("fastvae.accelerate: x_hat must be sigmoid(nn.Linear(...)) (a decoder ending in a sigmoid); "
                         f"found x_hat produced by {_producer(recorder.calls, x_hat)}")
    return _Parts(mu_lin, lv_lin, entry[0], last_lin, names)


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"one tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(o).__name__ for o in out)})"
    return type(out).__name__


def _provenance(calls, seeds: dict[int, set[str]]) -> dict[int, set[str]]:
    """Tags flowing from the seeded tensors to every output computed from them (in call order)."""
    tags = dict(seeds)
    for _, inputs, outputs in calls:
        union = set().union(*(tags.get(id(t), set()) for t in inputs)) if inputs else set()
        if union:
            for t in outputs:
                tags[id(t)] = tags.get(id(t), set()) | union
    return tags


def _producer(calls, t: torch.Tensor) -> str:
    return next((name for name, _, outputs in reversed(calls) if any(o is t for o in outputs)), "no recorded torch call")


def _sigmoid_source(calls, x_hat: torch.Tensor) -> torch.Tensor | None:
    """The tensor s with x_hat = sigmoid(s) up to reshapes, else None."""
    t = x_hat
    for name, inputs, outputs in reversed(calls):
        if not any(o is t for o in outputs) or not inputs:
            continue
        if name in _RESHAPES:
            t = inputs[0]
            continue
        return inputs[0] if name == "sigmoid" else None
    return None


class _FusedHooks:
    """The per-forward state the hooks share; a plain object, so an accelerated model still pickles."""

    def __init__(self, parts: _Parts, backend: str | None, seed: int | None) -> None:
        self.parts, self.backend, self.seed = parts, backend, seed
        self.handles: list[Any] = []
        self._reset(False)

    def _reset(self, active: bool) -> None:
        self.active, self.mu, self.logvar, self.logits, self.sampled = active, None, None, None, False

    def begin(self, module, args):
        self._reset(True)

    def keep_mu(self, module, args, out):
        if self.active:
            self.mu = out

    def keep_logvar(self, module, args, out):
        if self.active:
            self.logvar = out

    def sample(self, module, args):
        """Replace the decoder's input by the fused sample, once per forward, only for a z of this
        forward (not for mu itself, which some models decode in eval mode)."""
        z = args[0]
        if self.active and not self.sampled and self.mu is not None and self.logvar is not None and z.shape == self.mu.shape and z is not self.mu:
            self.sampled = True
            return (reparameterize(self.mu, self.logvar, seed=self.seed, backend=self.backend), *args[1:])
        return None

    def keep_logits(self, module, args, out):
        if self.active:
            self.logits = out

    def end(self, module, args, output):
        x_hat, logits = (output[0] if isinstance(output, (tuple, list)) and output else None), self.logits
        if isinstance(x_hat, torch.Tensor) and logits is not None and logits.numel() == x_hat.numel():
            x_hat._fastvae_logits = logits.reshape(x_hat.shape)
        self._reset(False)
        return None


def accelerate(model: nn.Module, *, example: torch.Tensor | None = None, backend: str | None = None, seed: int | None = None) -> nn.Module:
    """Make a user's VAE module sample through the fused reparameterization and expose its logits.

    Returns the same module (changed in place through hooks; parameters and state_dict are
    identical). ``example``: one input batch for the probe (default: random rows sized for the
    first nn.Linear). ``backend``: the kernels to use (None: the default). ``seed`` pins eps for
    every forward (for parity tests only: training needs fresh noise, the default).
    Raises ValueError, naming what it found, when the model is not a recognisable VAE.
    """
    if getattr(model, "_fastvae_hooks", None) is not None:
        return model
    parts = find_parts(model, example)
    hooks = _FusedHooks(parts, backend, seed)
    hooks.handles = [
        model.register_forward_pre_hook(hooks.begin),
        parts.mu.register_forward_hook(hooks.keep_mu),
        parts.logvar.register_forward_hook(hooks.keep_logvar),
        parts.entry.register_forward_pre_hook(hooks.sample),
        parts.last.register_forward_hook(hooks.keep_logits),
        model.register_forward_hook(hooks.end),
    ]
    model._fastvae_hooks = hooks
    return model


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: remove its hooks."""
    hooks = getattr(model, "_fastvae_hooks", None)
    if hooks is not None:
        for h in hooks.handles:
            h.remove()
        del model._fastvae_hooks
    return model
