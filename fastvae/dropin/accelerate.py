"""``fastvae.accelerate(model)``: the fused path for a user's own VAE module, found on its first training step.

How it works:

1. Hooks and wrappers only (parameters, buffers and state_dict untouched): the root's forward
   hooks, and an instance-level wrapper of each public method the model's class defines
   (``encode``, ``decode``, ...). The first training step runs as written while ``trace`` records
   it, one top-level call at a time: the forward, or the methods a loop calls instead (diffusers'
   ``vae.encode(x).latent_dist.sample()`` then ``vae.decode(z)``), and the methods of the objects
   they return (the posterior's ``sample()`` and ``kl()``). ``plan`` finds the parts in that data
   flow, by structure: at the end of the first forward (a model that does not fit raises
   ``Refused`` there, or at ``accelerate`` when ``example=`` is given, and is left as it was), or,
   for a step through methods, when the next step begins after a backward (what cannot be
   accelerated is then a warning, never an error in the middle of training).
2. Every later forward: for each run of calls the plan acts on (between two module events) a
   small TorchFunctionMode is switched on and checks that the calls are the recorded ones. It
   captures mu and the scale, skips the user's sampling calls and returns the fused sample in
   place of z (``routing`` decides where that pays; elsewhere the user's sampling runs), and tags
   the decoder's logits so that their sigmoid is a ``DecoderOutput`` whose BCE runs from them.
   Outside these runs nothing is intercepted.
3. Whole calls: a posterior's ``sample()`` (or a model method such as ``reparameterize``) whose
   every op serves z is answered by the fused sampler on the same attributes / arguments, and a
   posterior's ``kl()`` that is the KL of that sample by its ops is answered from the same pass.
   They are replaced on the objects the recorded calls return (same class, same plain arguments).
4. Gradients are watched until the parts are found: after a few backward passes with nothing
   found (or nothing the drop-in could see), one warning says what it saw and what to do.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..ops.reparam import reparameterize, reparameterize_kl
from . import routing
from .output import wrap
from .plan import Plan, Refused, Replacement, Window, analyse
from .trace import Recording, at, func_key, objects_in, plain_args, plain_state, short, tensors_in

SAMPLING = ("auto", "fused", "user")
UNUSED_TAGS = 8  # forwards whose tagged output no loss computed a BCE from, before tagging stops
IDLE_BACKWARDS = 3  # backward passes into the model with nothing found, before the one warning
MAX_SEGMENTS = 32  # top-level calls recorded into one step at most (a loop that never calls backward)


def _public_methods(cls: type, stop: tuple[type, ...]) -> list[str]:
    """Names of the public plain functions `cls` defines (its MRO up to the `stop` classes)."""
    names: dict[str, None] = {}
    excluded = set(dir(nn.Module)) | {"forward"}
    for klass in cls.__mro__:
        if klass in stop or klass is object or klass.__module__.startswith(("torch.", "builtins")):
            continue
        for name, attr in vars(klass).items():
            if not name.startswith("_") and name not in excluded and inspect.isfunction(attr):
                names.setdefault(name, None)
    return list(names)


class _Method:
    """A model's public method, wrapped at instance level: a top-level call in training mode is a
    segment of the recorded step (before the plan) or may be answered by the fused sampler (after)."""

    def __init__(self, state: Dropin, model: nn.Module, name: str) -> None:
        self.state, self.model, self.name = state, model, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = getattr(type(self.model), self.name).__get__(self.model)
        return self.state.call(self.model, self.name, original, args, kwargs)


class _ObjectMethod:
    """A method of an object a top-level call returned (a posterior's sample() or kl()), wrapped on
    that object: recorded on the first step, answered by the fused op on later ones."""

    def __init__(self, state: Dropin, obj: Any, name: str, segment: str, owner: tuple[int, tuple] | None,
                 rep: Replacement | None = None) -> None:
        self.state, self.obj, self.name, self.segment, self.owner, self.rep = state, obj, name, segment, owner, rep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = getattr(type(self.obj), self.name).__get__(self.obj)
        if self.rep is not None:
            return self.state.replace(self.rep, self.obj, original, args, kwargs)
        return self.state.record_object_call(self, original, args, kwargs)


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

    A plain object referenced by the model's hooks and method wrappers (so the model deep-copies,
    pickles and torch.saves with it); the per-step state is not pickled. Submodule hooks exist
    only for the windows that can act under the current conditions (none at all where nothing pays).
    """

    def __init__(self, sampling: str, backend: str | None, seed: int | None) -> None:
        self.sampling, self.backend, self.seed = sampling, backend, seed
        self.plan: Plan | None = None
        self.handles: list[Any] = []  # the root hooks
        self.methods: list[str] = []  # the model's public methods wrapped at instance level
        self.hooked: tuple[frozenset[str], list[Any]] = (frozenset(), [])  # (window kinds served, submodule hooks)
        self.collect = False  # the engine adapter reads mu, logvar and the logits of every forward
        self.z_override: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.tagging, self.loss_seen, self.unused = True, False, 0
        self.failure: str | None = None  # why nothing is accelerated, once that is known
        self.seen: list[str] = []  # the top-level calls seen in training mode before the plan
        self.backwards, self.warned = 0, False
        self.grad_handles: list[Any] = []
        self._clear()

    def _clear(self) -> None:
        self.recording: Recording | None = None
        self.recorded_backwards = 0
        self.saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.depth = 0  # nesting of the root's forward
        self.method_depth = 0  # nesting of the wrapped public methods
        self.counts: dict[tuple[str, str], int] = {}
        self.live: list[Window] = []
        self.runs: list[_Run] = []
        self.slots: dict[str, torch.Tensor] = {}
        self.kl_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.replacing = self.skipped = self.diverged = self.tagged = self.pending = False

    def __getstate__(self) -> dict:
        keep = ("sampling", "backend", "seed", "plan", "handles", "methods", "hooked", "tagging", "loss_seen", "unused",
                "failure", "seen", "backwards", "warned")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.collect, self.z_override, self.grad_handles = False, None, []
        self._clear()
        if self.plan is not None:
            self.live = [w for w in self.plan.windows if w.serves & self.hooked[0]]

    # ---- top-level calls: the forward (root hooks) and the public methods (wrappers) -----------
    def begin(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The root's pre-hook. A forward is a top-level call of its own also where a wrapped method
        (a Lightning training_step, say) calls it: that method's recording stops there."""
        self.depth += 1
        if self.depth > 1 or torch.compiler.is_compiling():  # torch.compile traces the model as written
            return
        self._pop_runs()  # left over by a forward that raised before its hooks could clean up
        if self.recording is not None and self.recording.active:
            self.recording.exit(None)
        self._top(model, "forward", args, kwargs)
        if self.plan is None:
            return
        first = next((t for _, t in tensors_in((args, kwargs))), None)
        device = first.device if first is not None else next(model.parameters()).device
        s = self.plan.sampling
        self.kl_cache = None
        self.replacing = s.replaceable and s.segment == "forward" and (
            self.sampling == "fused" or self.z_override is not None
            or (self.sampling == "auto" and routing.fused_sampling(device, math.prod(s.shape), self.plan.kl_from_sample)))
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
        if self._recorded(model, "forward", output):
            return
        if self.plan is None:
            return
        if self.live:
            self._event(("", "root", 1))
            self._pop_runs()
            if output is not None and self.skipped and "z" not in self.slots:
                self._fail("the fused sample was never used")
        if model.training and output is not None:
            self._install("forward", output)

    def call(self, model: nn.Module, name: str, original: Callable, args: tuple, kwargs: dict) -> Any:
        """A public method of the model, called by the user (a top-level call) or from its own code."""
        if self.depth or self.method_depth or torch.compiler.is_compiling():
            return original(*args, **kwargs)
        rep = self._model_replacement(name) if self.plan is not None else None
        if rep is not None and model.training:
            return self.replace(rep, model, original, args, kwargs)
        self.method_depth += 1
        try:
            self._top(model, name, args, kwargs)
            output = original(*args, **kwargs)
        except BaseException:
            if self.recording is not None and self.recording.active and self.recording.trace.segments[-1].name == name:
                self.recording.exit(None)
            raise
        finally:
            self.method_depth -= 1
        if not self._recorded(model, name, output) and self.plan is not None and model.training and output is not None:
            self._install(name, output)
        return output

    def _model_replacement(self, name: str) -> Replacement | None:
        return next((r for r in self.plan.replacements if r.owner is None and r.method == name), None)

    def _top(self, model: nn.Module, name: str, args: tuple, kwargs: dict) -> None:
        """A top-level call begins: end the recorded step if it is over, and record this call while there is no plan."""
        if self.recording is not None and not self.recording.active and self._step_over():
            self._finish(model)
        if self.plan is None and model.training and self.failure is None:
            self.seen.append(name)
            if self.recording is None:
                self.recording, self.recorded_backwards = Recording(model), self.backwards
                self.saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
            self.recording.enter(name, name, args, kwargs)

    def _step_over(self) -> bool:
        """Whether the recorded step is complete when a top-level call begins."""
        if self.plan is not None:  # the forward was analysed; only the calls on its results were still recorded
            return True
        return self.backwards > self.recorded_backwards or len(self.recording.trace.segments) >= MAX_SEGMENTS

    def _recorded(self, model: nn.Module, name: str, output: Any) -> bool:
        """A top-level call ends: if it was being recorded, note its result (a forward's is analysed now); whether it was."""
        rec = self.recording
        if rec is None or not rec.active or rec.trace.segments[-1].name != name:
            return False
        seg = rec.exit(output)
        wrapped = self._wrap_objects(output, len(rec.trace.segments) - 1, seg.name)
        if name == "forward" and output is not None:
            try:
                self.plan = analyse(rec.trace)
            except Refused:
                with torch.no_grad():
                    for b, saved in self.saved_buffers:
                        b.copy_(saved)
                rec.finish().drop()
                self.recording = None
                deaccelerate(model)
                raise
            finally:
                self.saved_buffers = []
            self._planned(model)
            if not wrapped:  # no object whose methods (a posterior's kl()) could still be recorded: release the trace now
                self._finish(model)
        return True

    def _finish(self, model: nn.Module) -> None:
        """The recorded step is over: analyse it (a step through methods) or complete the forward's plan
        with the calls made on its results (a posterior's kl())."""
        recording, self.recording = self.recording, None
        trace = recording.finish()
        self.saved_buffers = []
        try:
            if self.plan is not None:
                if len(trace.segments) > 1:
                    with contextlib.suppress(Refused):
                        self.plan = analyse(trace)
            else:
                try:
                    self.plan = analyse(trace)
                except Refused as e:
                    self.failure = _method_failure(model, trace, str(e))
                    self._warn(self.failure)
        finally:
            trace.drop()
        if self.plan is not None:
            self._planned(model)

    def _planned(self, model: nn.Module) -> None:
        """Keep the wrappers the plan needs, remove the rest and the gradient watch."""
        for h in self.grad_handles:
            h.remove()
        self.grad_handles = []
        needed = {r.method for r in self.plan.replacements if r.owner is None}
        needed |= {r.owner[0] for r in self.plan.replacements if r.owner is not None}
        for name in [m for m in self.methods if m not in needed]:
            model.__dict__.pop(name, None)
            self.methods.remove(name)

    # ---- the first step's calls on returned objects ------------------------------------------
    def _wrap_objects(self, output: Any, index: int, segment: str) -> int:
        """Record the methods of the objects a recorded call returned (a posterior's sample(), kl()); how many were wrapped."""
        n = 0
        for path, obj in objects_in(output):
            for name in _public_methods(type(obj), (object,)) + _distribution_methods(obj):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(obj, name, _ObjectMethod(self, obj, name, f"{segment}.{_dotted(path)}.{name}", (index, path)))
                    n += 1
        return n

    def record_object_call(self, wrapper: _ObjectMethod, original: Callable, args: tuple, kwargs: dict) -> Any:
        recording = self.recording
        if recording is None or recording.active or self.depth or self.failure is not None:
            return original(*args, **kwargs)
        recording.enter(wrapper.segment, wrapper.name, args, kwargs, wrapper.owner, wrapper.obj)
        try:
            output = original(*args, **kwargs)
        except BaseException:
            recording.exit(None)
            raise
        recording.exit(output)
        return output

    # ---- whole calls answered by the fused op ------------------------------------------------
    def _install(self, name: str, output: Any) -> None:
        """Replace the methods the plan answers on the objects this top-level call returned."""
        for rep in self.plan.replacements:
            if rep.owner is None or rep.owner[0] != name:
                continue
            try:
                obj = at(output, rep.owner[1])
            except (KeyError, IndexError, AttributeError, TypeError):
                continue
            if type(obj) is rep.cls:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(obj, rep.method, _ObjectMethod(self, obj, rep.method, "", None, rep))

    def replace(self, rep: Replacement, owner: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        """`rep`'s call on `owner` answered by the fused op, or run as written where it does not apply."""
        if plain_args(args, kwargs) != rep.plain or (rep.owner is not None and plain_state(owner) != rep.state):
            return original(*args, **kwargs)
        try:
            mu, scale = _read(rep.mu, owner, args, kwargs), _read(rep.scale, owner, args, kwargs)
        except (KeyError, IndexError, AttributeError, TypeError):
            return original(*args, **kwargs)
        if not (isinstance(mu, torch.Tensor) and isinstance(scale, torch.Tensor) and mu.shape == scale.shape
                and mu.dim() >= 1 and mu.is_floating_point()):
            return original(*args, **kwargs)
        if rep.kind == "kl":
            cache = self.kl_cache
            if cache is not None and cache[0] is mu and cache[1] is scale:
                return cache[2] if cache[2].dtype == mu.dtype else cache[2].to(mu.dtype)
            return original(*args, **kwargs)
        fused = self.sampling == "fused" or (self.sampling == "auto" and routing.fused_sampling(mu.device, mu.numel(), self.plan.kl_from_sample))
        if not fused:
            return original(*args, **kwargs)
        return self._fused(mu, scale, rep.form)

    def _fused(self, mu: torch.Tensor, scale: torch.Tensor, form: str) -> torch.Tensor:
        """z from the fused sampler (and the KL rows of the same pass, kept for kl(), when the plan answers it)."""
        logvar = _logvar(scale, form)
        flat_mu, flat_lv = mu.reshape(mu.shape[0], -1), logvar.reshape(mu.shape[0], -1).to(mu.dtype)
        if self.plan.kl_from_sample:
            z, kl = reparameterize_kl(flat_mu, flat_lv, seed=self.seed, backend=self.backend)
            self.kl_cache = (mu, scale, kl)
        else:
            z = reparameterize(flat_mu, flat_lv, seed=self.seed, backend=self.backend)
        return z.view(mu.shape)

    # ---- gradients: the one warning when nothing is found ------------------------------------
    def watch(self, model: nn.Module) -> None:
        """Count the backward passes that reach the model's parameters (until the plan is found)."""
        self.grad_handles = [p.register_post_accumulate_grad_hook(self._grad) for p in model.parameters() if p.requires_grad]
        self.owner_name = type(model).__name__

    def _grad(self, param: torch.Tensor) -> None:
        if not self.pending:
            self.pending = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self.pending = False
        self.backwards += 1
        if self.plan is None and self.failure is None and self.recording is None and self.backwards >= IDLE_BACKWARDS:
            seen = ", ".join(f"{n}()" for n in dict.fromkeys(self.seen))
            self._warn(f"gradients reached {getattr(self, 'owner_name', 'the model')} {self.backwards} times, but "
                       + (f"only {seen} ran in training mode and no training step was recorded" if seen else
                          "neither its forward nor one of its public methods ran in training mode (submodules called "
                          "directly, or the model in eval mode?)")
                       + ": nothing is accelerated. Call the model (or its encode/decode methods) in training mode, "
                       "and see fastvae.dropin.explain(model)")

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn("fastvae.accelerate: " + message, RuntimeWarning, stacklevel=3)

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

    def unhook(self, model: nn.Module) -> None:
        for h in self.handles + self.hooked[1] + self.grad_handles:
            h.remove()
        for name in self.methods:
            model.__dict__.pop(name, None)
        if self.recording is not None:
            self.recording.finish().drop()
            self.recording = None

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
        return _logvar(self._slot("scale"), self.plan.sampling.form)

    def _sample(self) -> torch.Tensor:
        mu = self._slot("mu")
        if self.z_override is not None:
            z = self.z_override(mu, self.logvar())
        else:
            z = self._fused(mu, self._slot("scale"), self.plan.sampling.form)
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


def _logvar(scale: torch.Tensor, form: str) -> torch.Tensor:
    if form == "logvar":
        return scale
    return 2 * scale if form == "logstd" else 2 * torch.log(scale)


def _read(where: tuple, owner: Any, args: tuple, kwargs: dict) -> Any:
    if where[0] == "attr":
        return owner.__dict__[where[1]]
    return at((args, kwargs), where[1])


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path) or "result"


def _distribution_methods(obj: Any) -> list[str]:
    """A torch.distributions object's sampling methods (its class is torch's own, so _public_methods skips it)."""
    return ["rsample", "sample"] if isinstance(obj, torch.distributions.Distribution) else []


def _method_failure(model: nn.Module, trace: Any, reason: str) -> str:
    """The warning for a first step through methods that cannot be accelerated: what was seen, what to do."""
    calls = ", ".join(f"{n}()" for n in dict.fromkeys(s.name for s in trace.segments))
    reason = reason.removeprefix("fastvae.accelerate: ")
    advice = ("if your loop draws the noise itself (z = mu + std * torch.randn_like(std)), move that into a model method "
              "(def reparameterize(self, mu, logvar)) or a posterior object's sample(), or call the model's forward")
    return (f"the first training step of {type(model).__name__} ran through {calls}, and nothing in it can be accelerated: "
            f"{reason}. Nothing runs fused; {advice}")


def accelerate(model: nn.Module, example: Any = None, *, sampling: str = "auto", backend: str | None = None, seed: int | None = None) -> nn.Module:
    """Make a user's VAE module run its sampling, its KL and its BCE through fastvae's fused ops.

    Returns the same module, changed through hooks and instance-level method wrappers only
    (parameters, buffers and state_dict are untouched). Its parts are found in the data flow of
    its first training step: its first forward in training mode (the real batch, whatever the
    forward's arguments), or the public methods a loop calls instead (``encode``, a posterior's
    ``sample()`` and ``kl()``, ``decode``), analysed when the next step begins after a backward;
    or right away on ``example`` (one batch: the forward's single argument, or a tuple of its
    positional arguments), run without grad, with the RNG and buffers restored. A forward that
    does not fit raises ``Refused`` (a ValueError) naming what blocks it, and the model is left
    unchanged; a step through methods that does not fit gets one warning.

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
    for name in _public_methods(type(model), (nn.Module,)):
        if name not in model.__dict__:
            setattr(model, name, _Method(state, model, name))
            state.methods.append(name)
    state.watch(model)
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
        if state.recording is not None and state.plan is not None:  # nothing will call methods on this forward's result
            state._finish(model)
    return state.plan


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: remove its hooks and method wrappers."""
    state = getattr(model, "_fastvae_dropin", None)
    if state is not None:
        state.unhook(model)
        del model._fastvae_dropin
    return model


def explain(model: nn.Module) -> str:
    """What ``accelerate`` found in `model` and what runs fused (after its first training step)."""
    state = getattr(model, "_fastvae_dropin", None)
    if state is None:
        return "not accelerated"
    if state.failure is not None:
        return "nothing is accelerated: " + state.failure
    if state.plan is None:
        seen = ", ".join(f"{n}()" for n in dict.fromkeys(state.seen))
        return ("nothing runs fused yet: its parts are found on its first forward in training mode, or on its first training "
                "step through its methods (encode, a posterior's sample() and kl(), decode) once a backward has run"
                + (f"; seen so far: {seen}" if seen else ""))
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
