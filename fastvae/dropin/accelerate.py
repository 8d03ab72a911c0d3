"""``fastvae.accelerate(model)``: the fused path for a user's own VAE module, found on its first batch.

How it works:

1. Hooks only (parameters, buffers and state_dict untouched). The first forward in training mode
   (the user's real first batch, whatever its arguments) runs as written while ``trace`` records
   it; ``plan`` finds the sample and the decoder output in that data flow. A model that does not
   fit raises ``Refused`` there (or at ``accelerate`` when ``example=`` is given), naming what
   blocks it, and is left as it was (hooks removed, buffers restored).
2. Every later forward: for each run of calls the plan acts on (between two module events) a
   small TorchFunctionMode is switched on and checks that the calls are the recorded ones. It
   captures mu and the scale, skips the user's sampling calls and returns the fused sample in
   place of z (``routing`` decides where that pays; elsewhere the user's sampling runs), and tags
   the decoder's logits so that their sigmoid is a ``DecoderOutput`` whose BCE runs from them.
   Outside these runs nothing is intercepted.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..ops.reparam import reparameterize
from . import routing
from .output import wrap
from .plan import Plan, Refused, Window, analyse
from .trace import Recording, func_key, short, tensors_in

SAMPLING = ("auto", "fused", "user")
UNUSED_TAGS = 8  # forwards whose tagged output no loss computed a BCE from, before tagging stops


class _Run(TorchFunctionMode):
    """Active for one window: matches calls to the recorded ones and applies the plan's actions."""

    def __init__(self, state: Dropin, window: Window) -> None:
        super().__init__()
        self.state, self.window, self.i, self.off = state, window, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        i, w = self.i, self.window
        self.i += 1
        sampling = "sample" in w.serves
        if self.off or i >= len(w.keys) or (sampling and self.state.diverged):
            return func(*args, **kwargs)
        if func_key(func) != w.keys[i]:
            if sampling:
                self.state.diverge(f"{short(func_key(func))} where the first batch ran {short(w.keys[i])}")
            self.off = True  # this run of calls differs from the first batch's: it runs as written
            return func(*args, **kwargs)
        steps = w.actions.get(i)
        return func(*args, **kwargs) if steps is None else self.state.act(steps, func, args, kwargs)


class Dropin:
    """The accelerated state of one model: options, the plan, and the hooks' per-forward state.

    A plain object referenced by the model's hooks (so the model deep-copies, pickles and
    torch.saves with it); the per-forward state is not pickled. Submodule hooks exist only for
    the windows that can act under the current conditions (none at all where nothing pays).
    """

    def __init__(self, sampling: str, backend: str | None, seed: int | None) -> None:
        self.sampling, self.backend, self.seed = sampling, backend, seed
        self.plan: Plan | None = None
        self.handles: list[Any] = []  # the root hooks
        self.hooked: tuple[frozenset[str], list[Any]] = (frozenset(), [])  # (window kinds served, submodule hooks)
        self.collect = False  # the engine adapter reads mu, logvar and the logits of every forward
        self.z_override: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.tagging, self.loss_seen, self.unused = True, False, 0
        self._clear()

    def _clear(self) -> None:
        self.recording: Recording | None = None
        self.saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.depth = 0
        self.counts: dict[tuple[str, str], int] = {}
        self.live: list[Window] = []
        self.runs: list[_Run] = []
        self.slots: dict[str, torch.Tensor] = {}
        self.replacing = self.skipped = self.diverged = self.tagged = False

    def __getstate__(self) -> dict:
        keep = ("sampling", "backend", "seed", "plan", "handles", "hooked", "tagging", "loss_seen", "unused")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.collect, self.z_override = False, None
        self._clear()
        if self.plan is not None:
            self.live = [w for w in self.plan.windows if w.serves & self.hooked[0]]

    # ---- root hooks -------------------------------------------------------------------------
    def begin(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.depth += 1
        if self.depth > 1 or torch.compiler.is_compiling():  # torch.compile traces the model as written
            return
        self._pop_runs()  # left over by a forward that raised before its hooks could clean up
        if self.plan is None:
            if model.training:
                self.saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
                self.recording = Recording(model, args, kwargs)
            return
        first = next((t for _, t in tensors_in((args, kwargs))), None)
        device = first.device if first is not None else next(model.parameters()).device
        s = self.plan.sampling
        self.replacing = s.replaceable and (self.sampling == "fused" or self.z_override is not None or
                                            (self.sampling == "auto" and routing.fused_sampling(device, math.prod(s.shape))))
        if self.tagged and not self.loss_seen:  # the last forward's tagged output fed no BCE (an MSE loss, say)
            self.unused += 1
            self.tagging = self.unused < UNUSED_TAGS
        self.tagged = False
        kinds = set()
        if self.tagging or self.collect:
            kinds.add("sigmoid")
            if self.collect or routing.fused_loss(device, sys.maxsize):  # raw logits: tagged only where the fused loss can pay
                kinds.add("logits")
        if self.replacing or self.collect:
            kinds.add("sample")
        if kinds != self.hooked[0]:
            self._hook(model, frozenset(kinds))
        if not self.live:
            return
        self.counts.clear()
        self.slots = {}
        self.skipped = self.diverged = False
        self._event(("", "root", 0))

    def end(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.depth -= 1
        if self.depth > 0 or torch.compiler.is_compiling():
            return
        if self.recording is not None:
            recording, self.recording = self.recording, None
            trace = recording.finish(output)
            try:
                if output is not None:
                    self.plan = analyse(trace)
            except Refused:
                with torch.no_grad():
                    for b, saved in self.saved_buffers:
                        b.copy_(saved)
                deaccelerate(model)
                raise
            finally:
                trace.drop()
                self.saved_buffers = []
            return
        if not self.live:
            return
        self._event(("", "root", 1))
        self._pop_runs()
        if output is not None and self.skipped and "z" not in self.slots:
            self._fail("the fused sample was never used")

    # ---- windows ----------------------------------------------------------------------------
    def _hook(self, model: nn.Module, kinds: frozenset[str]) -> None:
        """Hook the submodules that bound the windows serving `kinds` (and no others)."""
        for h in self.hooked[1]:
            h.remove()
        self.live = [w for w in self.plan.windows if w.serves & kinds]
        modules, handles, seen = dict(model.named_modules()), [], set()
        for w in self.live:
            for name, kind, _ in (w.start, w.end):
                if kind == "root" or (name, kind) in seen:
                    continue
                seen.add((name, kind))
                hook = functools.partial(self._module_event, name, kind)
                handles.append(modules[name].register_forward_pre_hook(hook) if kind == "enter" else
                               modules[name].register_forward_hook(hook, always_call=True))
        self.hooked = (kinds, handles)

    def unhook(self) -> None:
        for h in self.handles + self.hooked[1]:
            h.remove()

    def _module_event(self, name: str, kind: str, module: nn.Module, *rest: Any) -> None:
        if self.depth != 1:
            return
        n = self.counts.get((name, kind), 0)
        self.counts[(name, kind)] = n + 1
        self._event((name, kind, n))

    def _event(self, event: tuple[str, str, int]) -> None:
        while self.runs and self.runs[-1].window.end == event:
            self._pop()
        for w in self.live:
            if w.start == event:
                run = _Run(self, w)
                run.__enter__()
                self.runs.append(run)

    def _pop(self) -> None:
        run = self.runs.pop()
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is run:
            run.__exit__(None, None, None)

    def _pop_runs(self) -> None:
        while self.runs:
            self._pop()

    # ---- actions ----------------------------------------------------------------------------
    def diverge(self, what: str) -> None:
        if self.skipped and "z" not in self.slots:
            self._fail(f"it ran {what}")
        self.diverged = True  # nothing replaced, or the sample is complete: the rest runs as written

    def _fail(self, what: str) -> None:
        raise RuntimeError(f"fastvae.accelerate: this forward's sampling differed from the first batch's while its calls were being "
                           f"replaced by the fused sample ({what}); use fastvae.accelerate(model, sampling='user') to keep your own sampling")

    def act(self, steps: tuple, func: Any, args: tuple, kwargs: dict) -> Any:
        kind = steps[0][0]
        if kind in ("skip", "buffer", "z") and self.replacing:
            self.skipped = True
            if kind == "skip":  # a stand-in: only other skipped calls would read it
                if args and isinstance(args[0], torch.Tensor):
                    return args[0]
                return self.slots["mu"] if "mu" in self.slots else torch.empty(0)
            if kind == "buffer":
                return torch.empty_like(self._slot("mu"))
            z = self._sample()
            if steps[0][1]:  # the user's z is written in place into the buffer
                return args[0].copy_(z)
            return z
        out = func(*args, **kwargs)
        for step in steps:
            if step[0] == "capture":
                self.slots[step[1]] = list(tensors_in(out))[step[2]][1]
            elif step[0] == "wrap":
                out = self._wrap(out, step[1], step[2])
        return out

    def _slot(self, name: str) -> torch.Tensor:
        if name not in self.slots:
            self._fail(f"{name} was not computed before the sample")
        return self.slots[name]

    def logvar(self) -> torch.Tensor:
        """This forward's log-variance, from the captured scale."""
        scale, form = self._slot("scale"), self.plan.sampling.form
        if form == "logvar":
            return scale
        return 2 * scale if form == "logstd" else 2 * torch.log(scale)

    def _sample(self) -> torch.Tensor:
        mu, logvar = self._slot("mu"), self.logvar()
        if self.z_override is not None:
            z = self.z_override(mu, logvar)
        else:
            flat_mu, flat_lv = mu.reshape(mu.shape[0], -1), logvar.reshape(mu.shape[0], -1).to(mu.dtype)
            z = reparameterize(flat_mu, flat_lv, seed=self.seed, backend=self.backend).view(mu.shape)
        self.slots["z"] = z
        return z

    def _wrap(self, out: Any, pos: int, kind: str) -> Any:
        """Tag the logits `out` (or its tensor at `pos`) where that pays: a BCE on their sigmoid runs from
        them; a BCE-with-logits on them (already from the logits) only gains where the fused kernel is faster."""
        t = out if isinstance(out, torch.Tensor) else list(tensors_in(out))[pos][1]
        pays = routing.loss_from_logits if kind == "sigmoid" else routing.fused_loss
        if not (self.collect or pays(t.device, t.numel())):
            return out
        tagged = wrap(t, t, "logits", self)
        self.tagged = not self.collect  # the engine reads the logits itself
        if isinstance(out, torch.Tensor):
            return tagged
        if isinstance(out, (tuple, list)) and any(item is t for item in out):
            return type(out)(tagged if item is t else item for item in out)
        return out


def accelerate(model: nn.Module, example: Any = None, *, sampling: str = "auto", backend: str | None = None, seed: int | None = None) -> nn.Module:
    """Make a user's VAE module run its sampling and its BCE through fastvae's fused ops.

    Returns the same module, changed through hooks only (parameters, buffers and state_dict are
    untouched). Its parts are found in the data flow of its first forward in training mode, on
    the real batch, whatever the forward's arguments; or right away on ``example`` (one batch:
    the forward's single argument, or a tuple of its positional arguments), run without grad,
    with the RNG and buffers restored. A model that does not fit raises ``Refused`` (a
    ValueError) naming what blocks it, and is left unchanged.

    sampling: "auto" (fused where it pays on the device, see ``fastvae.dropin.routing``),
    "fused" or "user". backend: the fused kernels to use (None: the default). seed: pins eps
    for every forward (parity tests only: training needs fresh noise).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if getattr(model, "_fastvae_dropin", None) is not None:
        return model
    state = Dropin(sampling, backend, seed)
    state.handles = [model.register_forward_pre_hook(state.begin, with_kwargs=True),
                     model.register_forward_hook(state.end, with_kwargs=True, always_call=True)]
    model._fastvae_dropin = state
    if example is not None:
        analyse_now(model, example)
    return model


def analyse_now(model: nn.Module, example: Any) -> Plan:
    """Run one forward on `example` to find the parts now (no grad; RNG, buffers and mode restored)."""
    state: Dropin = model._fastvae_dropin
    args = example if isinstance(example, tuple) else (example,)
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        model.train()
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model(*args)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return state.plan


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: remove its hooks."""
    state = getattr(model, "_fastvae_dropin", None)
    if state is not None:
        state.unhook()
        del model._fastvae_dropin
    return model


def explain(model: nn.Module) -> str:
    """What ``accelerate`` found in `model` and what runs fused (after its first forward)."""
    state = getattr(model, "_fastvae_dropin", None)
    if state is None:
        return "not accelerated"
    if state.plan is None:
        return "accelerated; its parts are found on its first forward in training mode"
    note = "" if state.tagging else f"\nno BCE was computed from the decoder output in {UNUSED_TAGS} forwards: it is no longer tagged"
    return state.plan.describe() + note + "\n" + routing.describe()


@contextlib.contextmanager
def collecting(model: nn.Module) -> Iterator[Dropin]:
    """While active, each forward of the accelerated `model` captures mu and the scale (``state.slots``,
    ``state.logvar()``) and tags its decoder output with the logits at any size."""
    state: Dropin = model._fastvae_dropin
    old, state.collect = state.collect, True
    try:
        yield state
    finally:
        state.collect = old
