"""Find a VAE's parts in the data flow of one recorded forward (``trace.Trace``).

- The sample: a standard normal draw eps (torch.randn/randn_like/normal_/normal, which is also
  what ``Normal(mu, std).rsample()`` runs) and the first tensor z computed from it that equals,
  on the recorded numbers, ``mu + eps * exp(0.5 * logvar)``, ``mu + eps * exp(log_std)`` or
  ``mu + eps * std`` for tensors mu, logvar/log_std/std computed before it (same shape). Which
  output position or variable name they have does not matter.
- The user's sampling: the calls that only serve to compute z from eps, mu and the scale (the
  noise itself, std = exp(0.5 logvar), the products and sums). They are skipped at run time
  and z is the fused sample, so nothing is computed twice and every later use of z (the
  decoder, a returned z) sees the same tensor.
- The decoder output: a tensor computed from z that the forward returns (or feeds to a loss
  inside the forward) with as many values per row as an input, reached from a layer's output
  ("logits") through reshapes, crops and at most one sigmoid or tanh.

The plan holds names and call positions only (no tensors), so an accelerated model pickles.
Each action sits in the run of calls between two module events (a submodule's entry or exit,
or the forward's start and end): the runtime switches a TorchFunctionMode on for that run only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .trace import Call, Trace, short

RANDOM = {"randn", "randn_like", "normal", "normal_"}
ALLOCATIONS = {"empty", "empty_like", "new", "new_empty", "empty_strided"}  # uninitialised memory: never mu or a scale
VIEWS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "permute", "transpose",
         "contiguous", "__getitem__", "narrow", "expand", "expand_as", "clone", "movedim", "t"}
ACTIVATIONS = {"sigmoid": "sigmoid", "expit": "sigmoid", "tanh": "tanh"}
LOSSES = {"binary_cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "smooth_l1_loss", "gaussian_nll_loss"}
FORMS = ("logvar", "logstd", "std")  # preferred first: the fused sampler takes logvar


class Refused(ValueError):
    """fastvae.accelerate cannot use this model; the message names what blocks it."""


def last(key: str) -> str:
    return key.rsplit(".", 1)[-1]


Event = tuple[str, str, int]  # (module name, "enter" | "exit" | "root", occurrence in the forward)


@dataclasses.dataclass
class Window:
    """Actions on the calls between two adjacent module events; ``keys`` are the calls expected there."""

    start: Event
    end: Event
    keys: list[str]
    actions: dict[int, tuple]
    serves: frozenset[str] = frozenset()  # "sample", and the kinds of decoder output it tags: "sigmoid", "logits"


@dataclasses.dataclass
class Sampling:
    form: str  # "logvar", "logstd" or "std": what the scale tensor is
    mu: str
    scale: str
    z: str
    eps: str
    shape: tuple[int, ...]  # mu's shape on the recorded batch
    replaceable: bool
    reason: str  # why the user's sampling has to run, when not replaceable
    skipped: list[str]


@dataclasses.dataclass
class Output:
    kind: str  # "sigmoid", "tanh" or "logits" (none)
    logits: str
    path: tuple | None  # where the forward returns it (None: only fed to a loss in the forward)
    wrapped: bool


@dataclasses.dataclass
class Plan:
    sampling: Sampling
    outputs: list[Output]
    windows: list[Window]

    def describe(self) -> str:
        """What was found and what runs fused, in words."""
        s = self.sampling
        lines = [f"sample: z = {s.z} from mu = {s.mu}, {s.form} = {s.scale}, eps = {s.eps}"]
        if s.replaceable:
            lines.append(f"  where the fused sampler pays, it replaces these calls: {', '.join(s.skipped)}")
        else:
            lines.append(f"  your own sampling runs: {s.reason}")
        for o in self.outputs:
            what = {"sigmoid": "sigmoid(logits)", "tanh": "tanh(logits)", "logits": "the logits"}[o.kind]
            use = ("binary_cross_entropy on it runs from the logits" if o.kind == "sigmoid" else
                   "binary_cross_entropy_with_logits on it runs fused where that pays" if o.kind == "logits" else
                   "its loss runs as written")
            lines.append(f"decoder output: {what}, logits = {o.logits}; {use}")
        if not self.outputs:
            lines.append("decoder output: none found among the returned tensors; the loss runs as written")
        return "\n".join(lines)


class _Graph:
    """Read-only helpers over a Trace."""

    def __init__(self, trace: Trace) -> None:
        self.t = trace
        self.position = {}
        for pos, (kind, item) in enumerate(trace.events):
            if kind == "call":
                self.position[item] = pos

    def call(self, vid: int) -> Call | None:
        p = self.t.values[vid].producer
        return None if p is None else self.t.calls[p]

    def describe(self, vid: int) -> str:
        call = self.call(vid)
        if call is None:
            return f"a {self.t.values[vid].origin} tensor"
        where = f" in {call.module}" if call.module else ""
        return f"{short(call.key)}{where} at {call.where}"

    def descendants(self, vid: int, same_shape: bool = False) -> list[int]:
        shape = self.t.values[vid].tensor.shape
        seen, order, stack = {vid}, [], [vid]
        while stack:
            for c in self.t.values[stack.pop()].consumers:
                for out in self.t.calls[c].outputs:
                    if out not in seen and (not same_shape or self.t.values[out].tensor.shape == shape):
                        seen.add(out)
                        order.append(out)
                        stack.append(out)
        return sorted(order)

    def ancestors(self, vid: int, shape: torch.Size, exclude: set[int]) -> list[int]:
        """Values of `shape` that `vid` is computed from (through values of that shape), not in `exclude`."""
        seen, found, stack = {vid}, [], [vid]
        while stack:
            call = self.call(stack.pop())
            if call is None:
                continue
            for v in call.inputs:
                value = self.t.values[v]
                if v in seen or value.tensor.shape != shape or not value.tensor.is_floating_point():
                    continue
                seen.add(v)
                if v not in exclude:
                    found.append(v)
                stack.append(v)
        return sorted(found)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 2e-2)


def _standard(call: Call) -> bool:
    """Whether a random call draws N(0, 1) noise."""
    name = last(call.key)
    if name in ("randn", "randn_like"):
        return True
    if name == "normal_":
        mean = call.args[1] if len(call.args) > 1 else call.kwargs.get("mean", 0.0)
        std = call.args[2] if len(call.args) > 2 else call.kwargs.get("std", 1.0)
    else:
        mean = call.args[0] if call.args else call.kwargs.get("mean")
        std = call.args[1] if len(call.args) > 1 else call.kwargs.get("std")

    def equals(v: Any, c: float) -> bool:
        return bool((v.detach() == c).all()) if isinstance(v, torch.Tensor) else v == c
    return equals(mean, 0.0) and equals(std, 1.0)


def _fits(z: torch.Tensor, mu: torch.Tensor, eps: torch.Tensor, scale: torch.Tensor, form: str) -> bool:
    s = scale.double()
    factor = {"logvar": lambda: torch.exp(0.5 * s), "logstd": lambda: torch.exp(s), "std": lambda: s}[form]()
    want = mu.double() + eps.double() * factor
    got = z.double()
    if not bool(torch.isfinite(want).all()):
        return False
    tol = _tolerance(z.dtype)
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * (1.0 + float(want.abs().max()))))


@dataclasses.dataclass
class _Site:
    eps: int
    z: int
    mu: int
    scale: int
    form: str


def _find_site(g: _Graph, random_call: Call) -> tuple[_Site | None, str]:
    """The sample drawn with this call's noise, or None and why not."""
    t = g.t
    if not random_call.outputs:
        return None, "it returned no tensor"
    eps = random_call.outputs[0]
    e = t.values[eps]
    if not _standard(random_call):
        return None, (f"{short(random_call.key)} at {random_call.where} does not draw N(0, 1) noise "
                      "(z = torch.normal(mu, std) is not reparameterised: no gradient reaches mu and std; write z = mu + std * torch.randn_like(std))")
    from_eps = set(g.descendants(eps)) | {eps}
    from_eps |= {v.vid for v in t.values if v.producer is not None and last(t.calls[v.producer].key) in ALLOCATIONS}
    for z in g.descendants(eps, same_shape=True):
        zt = t.values[z]
        if not zt.tensor.is_floating_point():
            continue
        cands = g.ancestors(z, e.tensor.shape, from_eps)
        for form in FORMS:
            for s in cands:
                for m in cands:
                    if m != s and _fits(zt.data(), t.values[m].data(), e.data(), t.values[s].data(), form):
                        return _Site(eps, z, m, s, form), ""
    return None, (f"no tensor computed from the noise of {short(random_call.key)} at {random_call.where} (shape {tuple(e.tensor.shape)}) "
                  "equals mu + eps * std, mu + eps * exp(0.5 * logvar) or mu + eps * exp(log_std) for tensors mu and std of that shape "
                  "(several samples per input, a learned prior or a flow after the sample are not supported)")


def _skip_set(g: _Graph, site: _Site) -> tuple[set[int], str]:
    """The calls that only serve to compute z from eps, mu and the scale (skipped at run time), or why none can be."""
    t = g.t
    zcall = t.values[site.z].producer
    keep = {site.mu, site.scale}
    chain: set[int] = set()
    stack = [zcall]
    while stack:
        for v in t.calls[stack.pop()].inputs:
            p = t.values[v].producer
            if v in keep or p is None or p in chain:
                continue
            chain.add(p)
            stack.append(p)
    returned = {vid for _, vid in t.outputs}
    skip = {c for c in chain if len(t.calls[c].outputs) == 1}  # a skipped call returns one stand-in tensor
    changed = True
    while changed:
        changed = False
        for c in sorted(skip):
            outs = t.calls[c].outputs
            if any(v in returned or any(k not in skip and k != zcall for k in t.values[v].consumers) for v in outs):
                skip.discard(c)
                changed = True
    noise = t.values[site.eps].producer
    if noise not in skip:
        users = sorted({k for v in t.calls[noise].outputs for k in t.values[v].consumers} - skip - {zcall})
        used = f"by {short(t.calls[users[0]].key)} at {t.calls[users[0]].where}" if users else "as a returned tensor"
        return set(), f"the noise eps is also used outside z = mu + eps * std ({used}); fusing would change it"
    if any(t.calls[k].mutates == site.z for k in t.values[site.z].consumers):
        return set(), f"z is modified in place after sampling ({g.describe(site.z)})"
    return skip, ""


def _windows(g: _Graph, actions: dict[int, list[tuple]]) -> list[Window]:
    """Group call actions by the run of calls between two adjacent module events."""
    t = g.t
    counts: dict[tuple[str, str], int] = {}
    bounds: list[tuple[int, Event]] = [(-1, ("", "root", 0))]
    for pos, (kind, item) in enumerate(t.events):
        if kind != "call":
            n = counts.get((item, kind), 0)
            counts[(item, kind)] = n + 1
            bounds.append((pos, (item, kind, n)))
    bounds.append((len(t.events), ("", "root", 1)))
    runs: dict[int, tuple[list[int], dict[int, tuple]]] = {}
    for index, steps in sorted(actions.items()):
        pos = g.position[index]
        b = max(i for i, (p, _) in enumerate(bounds) if p < pos)
        if b not in runs:
            lo, hi = bounds[b][0], bounds[b + 1][0]
            runs[b] = ([item for kind, item in t.events[lo + 1:hi] if kind == "call"], {})
        calls, acts = runs[b]
        acts[calls.index(index)] = tuple(steps)
    return [Window(bounds[b][1], bounds[b + 1][1], [t.calls[c].key for c in calls[:max(acts) + 1]], acts,
                   frozenset(step[2] if step[0] == "wrap" else "sample" for steps in acts.values() for step in steps))
            for b, (calls, acts) in sorted(runs.items())]


def _per_row(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _outputs(g: _Graph, site: _Site) -> list[tuple[int, str, tuple | None, int]]:
    """(logits value, kind, returned path, output position) of each decoder output."""
    t = g.t
    below = set(g.descendants(site.z))
    sizes = {_per_row(t.values[v].tensor.shape) for _, v in t.inputs}
    candidates: list[tuple[int, tuple | None]] = [(v, path) for path, v in t.outputs if v in below and _per_row(t.values[v].tensor.shape) in sizes]
    for call in t.calls:
        if last(call.key) in LOSSES and call.inputs and call.inputs[0] in below:
            candidates.append((call.inputs[0], None))
    found: dict[int, tuple[int, str, tuple | None, int]] = {}
    for vid, path in candidates:
        v, kind = vid, "logits"
        while True:
            call = g.call(v)
            if call is None or not call.inputs:
                break
            name = last(call.key)
            if name in VIEWS:
                v = call.inputs[0]
            elif name in ACTIVATIONS and kind == "logits":
                kind, v = ACTIVATIONS[name], call.inputs[0]
            else:
                break
        call = g.call(v)
        if call is None or v not in below or v == site.z:
            continue
        if v not in found or (found[v][2] is None and path is not None):
            found[v] = (v, kind, path, call.outputs.index(v))
    return list(found.values())


def analyse(trace: Trace) -> Plan:
    """The plan for the recorded forward; Refused naming the blocker when no sample is found."""
    g = _Graph(trace)
    randoms = [c for c in trace.calls if last(c.key) in RANDOM]
    if not randoms:
        raise Refused("fastvae.accelerate: this forward drew no Gaussian noise (torch.randn, randn_like, normal_, Normal(...).rsample()), "
                      "so there is no sample z = mu + eps * std to fuse. Is it an autoencoder, or does it sample only in another mode "
                      "(the drop-in analyses the first forward in training mode)?")
    sites, why = [], []
    for call in randoms:
        site, reason = _find_site(g, call)
        if site is not None:
            sites.append(site)
        else:
            why.append(reason)
    if not sites:
        raise Refused("fastvae.accelerate: " + "; ".join(dict.fromkeys(why)))
    site = sites[0]
    skip, reason = _skip_set(g, site)
    if len(sites) > 1:
        skip, reason = set(), f"the forward draws {len(sites)} samples (only a single one is fused)"
    actions: dict[int, list[tuple]] = {}
    zcall = trace.values[site.z].producer
    if not reason:
        for c in skip:
            actions[c] = [("skip",)]
        mutated = trace.calls[zcall].mutates
        if mutated is not None:  # z is written in place: the tensor it lands in is created empty instead
            creator = mutated
            while trace.values[creator].producer is not None and trace.calls[trace.values[creator].producer].mutates is not None:
                creator = trace.calls[trace.values[creator].producer].mutates
            first = trace.values[creator].producer
            if first not in skip or first < max(trace.values[site.mu].producer, trace.values[site.scale].producer):
                reason = "z is written in place into a tensor created before mu and the scale"
            else:
                actions[first] = [("buffer",)]
        actions[zcall] = [("z", mutated is not None)]
    if reason:
        actions = {}
    for slot, vid in (("mu", site.mu), ("scale", site.scale)):
        call = g.call(vid)
        actions.setdefault(call.index, []).append(("capture", slot, call.outputs.index(vid)))
    outputs = []
    for vid, kind, path, pos in _outputs(g, site):
        call = g.call(vid)
        wrap = kind in ("sigmoid", "logits") and call.index not in actions
        if wrap:
            actions[call.index] = [("wrap", pos, kind)]
        outputs.append(Output(kind, g.describe(vid), path, wrap))
    sampling = Sampling(site.form, g.describe(site.mu), g.describe(site.scale), g.describe(site.z), g.describe(site.eps),
                        tuple(trace.values[site.mu].tensor.shape), not reason, reason,
                        [] if reason else [f"{short(trace.calls[c].key)} at {trace.calls[c].where}" for c in sorted(skip)])
    return Plan(sampling, outputs, _windows(g, actions))
