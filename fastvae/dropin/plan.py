"""Find a VAE's parts in the data flow of its first recorded training step (``trace.Trace``).

Everything is proven by the structure of the recorded graph (``algebra``), never by equal numbers:

- The sample: a standard normal draw eps (torch.randn/randn_like/normal_/normal, which is also
  what ``Normal(mu, std).rsample()`` and ``Variable(t.data.new(size).normal_())`` run) and the
  first tensor z computed from it whose ops make it exactly ``mu + eps * exp(0.5 * logvar)``,
  ``mu + eps * exp(log_std)`` or ``mu + eps * std`` of two tensors mu and logvar/log_std/std
  computed before it (same shape). An op the fused sampler does not compute (a clamp of the
  log-variance, a relu, a where, dropout, ...) cannot be part of that formula, so the tensor the
  sampler takes is the one after it. std is taken only where it is positive by structure (the
  sampler reads log(std)).
- Where z is computed decides how it is replaced. In the forward: the calls that only serve to
  compute z are skipped at run time and z is the fused sample (``Window`` actions). In a method
  call of its own (``posterior.sample()`` on an object the model returned, as latent-diffusion
  autoencoders are trained: ``vae.encode(x).latent_dist.sample()``; or a model method such as
  ``model.reparameterize(mu, logvar)``) whose every op serves z: the whole call is replaced by the
  fused op on the same attributes / arguments (``Replacement``).
- The KL: a method call of the posterior object (``posterior.kl()``) whose ops make its result
  exactly ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)`` over each row of the sample's mu and
  logvar is answered from the sampling pass (the fused kernel reduces it in the same pass).
- The decoder output: a tensor computed from z that a call returns (or feeds to a loss inside the
  forward) with as many values per row as an input, reached from its logits through reshapes and
  crops and at most one sigmoid or tanh. Its kind comes from that structure and from the
  torch.distributions object holding it: "sigmoid" (probabilities), "tanh" (a bounded mean),
  "logits" (a layer's raw output) or "other" (any other last op: a clamp, relu, ...).

The plan holds names and call positions only (no tensors), so an accelerated model pickles.
Each window action sits in the run of calls between two module events (a submodule's entry or
exit, or the forward's start and end): the runtime switches a TorchFunctionMode on for that run only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from . import algebra
from .trace import Call, Segment, Trace, short

RANDOM = {"randn", "randn_like", "normal", "normal_"}
ALLOCATIONS = {"empty", "empty_like", "new", "new_empty", "empty_strided"}  # uninitialised memory: never mu or a scale
VIEWS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "permute", "transpose",
         "contiguous", "__getitem__", "narrow", "expand", "expand_as", "clone", "movedim", "t"}
ACTIVATIONS = {"sigmoid": "sigmoid", "expit": "sigmoid", "tanh": "tanh"}
LAYERS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "addmm", "matmul",
          "__matmul__", "mm", "bmm", "baddbmm", "einsum"}  # a raw output of one of these is the decoder's logits
LOSSES = {"binary_cross_entropy": "bernoulli", "binary_cross_entropy_with_logits": "bernoulli", "mse_loss": "gaussian",
          "l1_loss": None, "smooth_l1_loss": None, "gaussian_nll_loss": None}
POSITIVE = {"exp", "exp_", "softplus", "sigmoid"}  # never negative (a positive constant added makes them positive)
FORMS = ("logvar", "logstd", "std")  # preferred first: the fused sampler takes logvar
DISTRIBUTIONS = {"Normal": "gaussian", "Bernoulli": "bernoulli"}  # decoder distributions fastvae.fit trains


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
class Replacement:
    """A whole method call answered by the fused op: ``owner`` None is the model itself, else the
    object at ``owner[1]`` in the result of the top-level call ``owner[0]`` (of class ``cls``)."""

    kind: str  # "sample" or "kl"
    owner: tuple[str, tuple] | None
    cls: type | None
    method: str
    plain: tuple  # the recorded call's non-tensor arguments
    state: tuple  # the owner object's other attributes at the recorded call
    mu: tuple  # ("attr", name) or ("arg", path in (args, kwargs))
    scale: tuple
    form: str


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
    segment: str = "forward"  # the top-level call z is computed in


@dataclasses.dataclass
class Output:
    kind: str  # "sigmoid", "tanh", "logits" (a layer's raw output) or "other"
    logits: str
    path: tuple | None  # where its call returns it (None: only fed to a loss in the forward)
    wrapped: bool
    segment: str = "forward"
    last_op: str = ""  # the op it ends in, for "other"
    dist: str | None = None  # the torch.distributions class holding it
    learned_scale: bool = False  # that distribution's scale is computed from the input or parameters
    loss: str | None = None  # the loss a call inside the step computes from it

    def likelihood(self) -> tuple[str | None, str]:
        """(the likelihood this decoder output implies for fastvae.fit, or None; why)."""
        if self.dist is not None:
            implied = DISTRIBUTIONS.get(self.dist)
            if implied is None:
                return None, f"the decoder returns a {self.dist} distribution; fastvae.fit trains a Bernoulli or a fixed-variance Gaussian only"
            if implied == "gaussian" and self.learned_scale:
                return None, ("the decoder returns a Normal whose scale is learned; fastvae.fit's Gaussian likelihood has a fixed "
                              "variance (squared error), so it cannot train it: train it with your own loop")
            return implied, f"the decoder returns a {self.dist} distribution"
        if self.loss is not None:
            implied = LOSSES[self.loss]
            if implied is None:
                return None, f"the decoder output feeds {self.loss}, which fastvae.fit does not train"
            return implied, f"the decoder output feeds {self.loss}"
        if self.kind == "sigmoid":
            return "bernoulli", "the decoder ends in a sigmoid (probabilities)"
        if self.kind == "tanh":
            return "gaussian", "the decoder ends in a tanh (a bounded mean)"
        if self.kind == "logits":
            return None, ("the decoder ends in a layer's raw output, which may be Bernoulli logits or a Gaussian mean: "
                          "pass likelihood='bernoulli' or likelihood='gaussian'")
        return None, (f"the decoder ends in {self.last_op}, neither a sigmoid, a tanh nor a layer's raw output: "
                      "pass likelihood='gaussian' to train the squared error on it")


@dataclasses.dataclass
class Plan:
    sampling: Sampling
    outputs: list[Output]
    windows: list[Window]
    replacements: list[Replacement] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what runs as written, and why

    @property
    def kl_from_sample(self) -> bool:
        return any(r.kind == "kl" for r in self.replacements)

    def describe(self) -> str:
        """What was found and what runs fused, in words."""
        s = self.sampling
        where = "" if s.segment == "forward" else f" in {s.segment}()"
        lines = [f"sample{where}: z = {s.z} from mu = {s.mu}, {s.form} = {s.scale}, eps = {s.eps}"]
        if s.replaceable:
            what = (f"the whole {s.segment}() call" if any(r.kind == "sample" for r in self.replacements)
                    else ", ".join(s.skipped))
            lines.append(f"  where the fused sampler pays, it replaces {what}")
        else:
            lines.append(f"  your own sampling runs: {s.reason}")
        for r in self.replacements:
            if r.kind == "kl":
                owner = f"{r.owner[0]}()" + "".join(f"[{k!r}]" if isinstance(k, int) else f".{k}" for k in r.owner[1])
                lines.append(f"kl: {owner}.{r.method}() is the KL of that sample: answered from the fused sampling pass")
        lines.extend(self.notes)
        for o in self.outputs:
            what = {"sigmoid": "sigmoid(logits)", "tanh": "tanh(mean)", "logits": "a layer's raw output",
                    "other": f"{o.last_op}(...)"}[o.kind]
            use = ("binary_cross_entropy on it runs from the logits" if o.kind == "sigmoid" and o.wrapped else
                   "binary_cross_entropy_with_logits on it runs fused where that pays" if o.kind == "logits" and o.wrapped else
                   "its loss runs as written")
            held = f", the {o.dist} distribution's parameter" if o.dist else ""
            where = "" if o.segment == "forward" else f" of {o.segment}()"
            implied, why = o.likelihood()
            fit = f"fastvae.fit: likelihood={implied!r} ({why})" if implied else f"fastvae.fit needs likelihood=: {why}"
            source = "logits" if o.kind in ("sigmoid", "logits") else "its input" if o.kind == "tanh" else "made by"
            lines.append(f"decoder output{where}: {what}{held}, {source} = {o.logits}; {use}; {fit}")
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

    def ancestors(self, vid: int, shape: torch.Size | None = None, exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Values `vid` is computed from (through values of `shape`, when given), not in `exclude`."""
        seen, found, stack = {vid}, [], [vid]
        while stack:
            call = self.call(stack.pop())
            if call is None:
                continue
            for v in call.inputs:
                value = self.t.values[v]
                if v in seen or (shape is not None and (value.tensor.shape != shape or not value.tensor.is_floating_point())):
                    continue
                seen.add(v)
                if v not in exclude:
                    found.append(v)
                stack.append(v)
        return sorted(found)

    def learned(self, vid: int) -> bool:
        """Whether a value is computed from the step's data or the model's parameters (through each output
        of torch.broadcast_tensors from its own input only)."""
        seen, stack = {vid}, [vid]
        while stack:
            v = stack.pop()
            if self.t.values[v].origin in ("input", "parameter"):
                return True
            call = self.call(v)
            if call is None:
                continue
            sources = ([call.inputs[call.outputs.index(v)]] if last(call.key) == "broadcast_tensors"
                       and len(call.inputs) == len(call.outputs) else call.inputs)
            stack.extend(s for s in sources if s not in seen)
            seen.update(sources)
        return False


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


def _positive(g: _Graph, vid: int) -> bool:
    """Whether a std is positive by structure: a positive constant plus positive multiples of values that
    are never negative (exp, softplus, sigmoid), or a clamp with a positive minimum."""
    call = g.call(vid)
    if call is not None and last(call.key) in ("clamp", "clamp_", "clip", "clamp_min", "clamp_min_"):
        low = call.args[1] if len(call.args) > 1 else call.kwargs.get("min")
        return algebra.number(low) is not None and low > 0
    poly = algebra.Expander(g.t, set())(vid)
    if any(c <= 0 for c in poly.values()):
        return False
    positive_const = poly.get((), 0.0) > 0
    for mono in poly:
        if mono == ():
            continue
        if len(mono) != 1:
            return False
        if mono[0][0] == "e":
            positive_const = True  # exp(...) itself is positive
            continue
        producer = g.call(mono[0][1])
        if producer is None or last(producer.key) not in POSITIVE:
            return False
    return positive_const


@dataclasses.dataclass
class _Site:
    eps: int
    z: int
    mu: int
    scale: int
    form: str
    reason: str = ""  # why the user's sampling must run although the formula holds


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
                    if m != s and algebra.same(algebra.Expander(t, {m, s, eps})(z), algebra.sample_formula(form, m, s, eps)):
                        site = _Site(eps, z, m, s, form)
                        if form == "std" and not _positive(g, s):
                            site.reason = (f"the std ({g.describe(s)}) is not positive by its ops (it can be 0: the fused sampler "
                                           "reads log(std)); add a positive constant, or compute std = exp(0.5 * logvar)")
                        return site, ""
    blocker = next((c for v in sorted(from_eps) if t.values[v].producer is not None
                    for c in [t.calls[t.values[v].producer]] if c is not random_call and last(c.key) not in algebra.KNOWN
                    and last(c.key) not in ALLOCATIONS and t.values[v].tensor.shape == e.tensor.shape), None)
    why = (f"; {short(blocker.key)} at {blocker.where} changes the noise on its way to z, which the fused sampler does not compute"
           if blocker is not None else "")
    return None, (f"no tensor computed from the noise of {short(random_call.key)} at {random_call.where} (shape {tuple(e.tensor.shape)}) "
                  "equals mu + eps * std, mu + eps * exp(0.5 * logvar) or mu + eps * exp(log_std) by its ops for tensors mu and std "
                  f"of that shape{why} (several samples per input, a learned prior or a flow after the sample are not supported)")


def _chain(t: Trace, out: int, keep: set[int]) -> set[int]:
    """The calls `out` is computed by, back to the values in `keep` (or to values with no producer)."""
    chain: set[int] = set()
    stack = [t.values[out].producer]
    chain.add(stack[0])
    while stack:
        for v in t.calls[stack.pop()].inputs:
            p = t.values[v].producer
            if v in keep or p is None or p in chain:
                continue
            chain.add(p)
            stack.append(p)
    return chain


def _serving(t: Trace, out: int, chain: set[int]) -> set[int]:
    """The calls of `chain` (all but out's own) whose outputs only feed other calls of the chain and are never returned."""
    zcall = t.values[out].producer
    returned = {vid for _, vid in t.outputs} | {vid for s in t.segments for vid in s.attrs.values()}
    skip = {c for c in chain if c != zcall and len(t.calls[c].outputs) == 1}  # a skipped call returns one stand-in tensor
    changed = True
    while changed:
        changed = False
        for c in sorted(skip):
            outs = t.calls[c].outputs
            if any(v in returned or any(k not in skip and k != zcall for k in t.values[v].consumers) for v in outs):
                skip.discard(c)
                changed = True
    return skip


def _skip_set(g: _Graph, site: _Site) -> tuple[set[int], str]:
    """The calls that only serve to compute z from eps, mu and the scale (skipped at run time), or why none can be."""
    t = g.t
    zcall = t.values[site.z].producer
    skip = _serving(t, site.z, _chain(t, site.z, {site.mu, site.scale}))
    noise = t.values[site.eps].producer
    if noise not in skip:
        users = sorted({k for v in t.calls[noise].outputs for k in t.values[v].consumers} - skip - {zcall})
        used = f"by {short(t.calls[users[0]].key)} at {t.calls[users[0]].where}" if users else "as a returned tensor"
        return set(), f"the noise eps is also used outside z = mu + eps * std ({used}); fusing would change it"
    if any(t.calls[k].mutates == site.z for k in t.values[site.z].consumers):
        return set(), f"z is modified in place after sampling ({g.describe(site.z)})"
    return skip, ""


def _whole_call(t: Trace, seg: Segment, out: int, keep: set[int]) -> str:
    """Why the segment's call cannot be answered as a whole by the op computing `out` from `keep` ("" if it can)."""
    if [vid for p, vid in seg.outputs] != [out] or seg.outputs[0][0] != ():
        return f"{seg.name}() returns more than that tensor"
    lo, hi = seg.calls
    skip = _serving(t, out, _chain(t, out, keep)) | {t.values[out].producer}
    extra = [c for c in range(lo, hi) if t.calls[c].outputs and c not in skip]
    if extra:
        c = t.calls[extra[0]]
        return f"{seg.name}() also computes {short(c.key)} at {c.where}"
    return ""


def _locate(seg: Segment, vid: int) -> tuple | None:
    """Where a call can read a value at run time: an attribute of its owner object, or one of its arguments."""
    name = next((k for k, v in seg.attrs.items() if v == vid), None)
    if name is not None:
        return ("attr", name)
    path = next((p for p, v in seg.inputs if v == vid), None)
    return None if path is None else ("arg", path)


def _owner(t: Trace, seg: Segment) -> tuple[str, tuple] | None:
    return None if seg.owner is None else (t.segments[seg.owner[0]].name, seg.owner[1])


def _replacement(g: _Graph, site: _Site, seg: Segment) -> tuple[Replacement | None, str]:
    """The sample as a whole-call replacement of its segment, or why it cannot be."""
    why = _whole_call(g.t, seg, site.z, {site.mu, site.scale})
    mu, scale = _locate(seg, site.mu), _locate(seg, site.scale)
    if not why and (mu is None or scale is None):
        missing = g.describe(site.mu if mu is None else site.scale)
        why = f"{seg.name}() computes {'mu' if mu is None else 'the scale'} ({missing}) itself"
    if why:
        return None, why
    return Replacement("sample", _owner(g.t, seg), seg.cls, seg.method, seg.plain, seg.state, mu, scale, site.form), ""


def _kl_replacements(g: _Graph, site: _Site) -> list[Replacement]:
    """Object method calls (posterior.kl()) whose result is, by their ops, the per-row KL of the sample's mu and logvar."""
    t = g.t
    if site.form == "std":
        return []
    lv = algebra.leaf(site.scale) if site.form == "logvar" else algebra.scale(algebra.leaf(site.scale), 2.0)
    m = algebra.leaf(site.mu)
    target = algebra.scale(algebra.add(algebra.add(algebra.add(algebra.mul(m, m), algebra.exp(lv)), algebra.const(-1.0)), lv, -1.0), 0.5)
    shape = t.values[site.mu].tensor.shape
    found = []
    for seg in t.segments:
        if seg.owner is None or len(seg.outputs) != 1:
            continue
        out = seg.outputs[0][1]
        coef, v = 1.0, out
        while True:  # constant factors around the row sum: 0.5 * sum(...), -sum(...) / 2
            call = g.call(v)
            if call is None:
                break
            name = last(call.key)
            poly = algebra.Expander(t, {call.inputs[0]} if call.inputs else set())(v) if name in algebra.KNOWN else None
            if poly is None or len(poly) != 1 or not call.inputs:
                break
            (mono, c), = poly.items()
            if mono != (("v", call.inputs[0]),):
                break
            coef, v = coef * c, call.inputs[0]
        call = g.call(v)
        if call is None or last(call.key) != "sum" or not call.inputs:
            continue
        dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        inner = call.inputs[0]
        rank = t.values[inner].tensor.dim()
        if (t.values[inner].tensor.shape != shape or sorted(d % rank for d in dims) != list(range(1, rank))
                or call.kwargs.get("keepdim") or t.values[out].tensor.shape != shape[:1]):
            continue
        expanded = algebra.scale(algebra.Expander(t, {site.mu, site.scale})(inner), coef)
        if not algebra.same(expanded, target) or _whole_call(t, seg, out, {site.mu, site.scale}.union(seg.attrs.values())):
            continue
        mu, scale = _locate(seg, site.mu), _locate(seg, site.scale)
        if mu is None or scale is None or mu[0] != "attr" or scale[0] != "attr":
            continue
        found.append(Replacement("kl", _owner(t, seg), seg.cls, seg.method, seg.plain, seg.state, mu, scale, site.form))
    return found


def _windows(g: _Graph, actions: dict[int, list[tuple]]) -> list[Window]:
    """Group the forward's call actions by the run of calls between two adjacent module events."""
    t = g.t
    seg = next(s for s in t.segments if s.name == "forward")
    counts: dict[tuple[str, str], int] = {}
    bounds: list[tuple[int, Event]] = [(seg.events[0] - 1, ("", "root", 0))]
    for pos in range(seg.events[0], seg.events[1]):
        kind, item = t.events[pos]
        if kind != "call":
            n = counts.get((item, kind), 0)
            counts[(item, kind)] = n + 1
            bounds.append((pos, (item, kind, n)))
    bounds.append((seg.events[1], ("", "root", 1)))
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


def _outputs(g: _Graph, site: _Site) -> list[tuple[int, Output]]:
    """(logits value, Output) of each decoder output: structure decides its kind."""
    t = g.t
    below = set(g.descendants(site.z))
    sizes = {_per_row(t.values[v].tensor.shape) for _, v in t.inputs}
    candidates: list[tuple[int, tuple | None, Segment | None, str | None]] = [
        (v, path, seg, seg.holders.get(path)) for seg in t.segments if seg.owner is None for path, v in seg.outputs
        if v in below and _per_row(t.values[v].tensor.shape) in sizes]
    losses: dict[int, str] = {}
    for call in t.calls:
        if last(call.key) in LOSSES and call.inputs and call.inputs[0] in below:
            candidates.append((call.inputs[0], None, t.segment_of(call.index), None))
            losses.setdefault(call.inputs[0], last(call.key))
    found: dict[int, tuple[int, Output]] = {}
    for vid, path, seg, dist in candidates:
        v, kind, loss = vid, None, losses.get(vid)
        while True:
            call = g.call(v)
            if call is None or not call.inputs:
                break
            name = last(call.key)
            if name in VIEWS or (name == "broadcast_tensors" and len(call.outputs) == len(call.inputs)):
                v = call.inputs[call.outputs.index(v)] if name == "broadcast_tensors" else call.inputs[0]
            elif name in ACTIVATIONS and kind is None:
                kind, v = ACTIVATIONS[name], call.inputs[0]
            else:
                break
            loss = loss or losses.get(v)
        call = g.call(v)
        if call is None or v not in below or v == site.z:
            continue
        op = last(call.key)
        if kind is None:
            kind = "logits" if op in LAYERS else "other"
        learned = False
        if dist is not None and path is not None:
            sibling = next((w for p, w in seg.outputs if p == (*path[:-1], "scale")), None)
            learned = sibling is not None and g.learned(sibling)
        output = Output(kind, g.describe(v), path, False, seg.name if seg else "forward", short(call.key), dist, learned, loss)
        if v not in found or (found[v][1].path is None and path is not None):
            found[v] = (v, output)
    return list(found.values())


def analyse(trace: Trace) -> Plan:
    """The plan for the recorded step; Refused naming the blocker when no sample is found."""
    g = _Graph(trace)
    randoms = [c for c in trace.calls if last(c.key) in RANDOM]
    if not randoms:
        forward = any(s.name == "forward" for s in trace.segments)
        what = "this forward" if forward else "the model's calls in this step"
        raise Refused(f"fastvae.accelerate: {what} drew no Gaussian noise (torch.randn, randn_like, normal_, Normal(...).rsample()), "
                      "so there is no sample z = mu + eps * std to fuse. Is it an autoencoder, or does it sample only in another mode "
                      "(the drop-in analyses the first training step)?")
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
    zcall = trace.values[site.z].producer
    seg = trace.segment_of(zcall)
    in_forward = seg.name == "forward"
    actions: dict[int, list[tuple]] = {}
    replacements: list[Replacement] = []
    skip: set[int] = set()
    reason = site.reason or (f"the step draws {len(sites)} samples (only a single one is fused)" if len(sites) > 1 else "")
    if in_forward:
        if not reason:
            skip, reason = _skip_set(g, site)
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
            if call is not None and trace.segment_of(call.index) is seg:
                actions.setdefault(call.index, []).append(("capture", slot, call.outputs.index(vid)))
            elif not reason:
                reason = f"{'mu' if slot == 'mu' else 'the scale'} ({g.describe(vid)}) is not computed inside the forward"
                actions = {}
    elif not reason:
        rep, reason = _replacement(g, site, seg)
        if rep is not None:
            replacements.append(rep)
    notes = []
    if not reason:
        kls = _kl_replacements(g, site)
        replacements.extend(kls)
        if not kls:
            notes.append("kl: no call of the step computes the KL of that sample by the fused formula as a method of the posterior; "
                         "your KL runs as written")
    outputs = []
    for vid, output in _outputs(g, site):
        call = g.call(vid)
        if output.kind in ("sigmoid", "logits") and output.segment == "forward" and call.index not in actions:
            actions[call.index] = [("wrap", call.outputs.index(vid), output.kind)]
            output.wrapped = True
        outputs.append(output)
    sampling = Sampling(site.form, g.describe(site.mu), g.describe(site.scale), g.describe(site.z), g.describe(site.eps),
                        tuple(trace.values[site.mu].tensor.shape), not reason, reason,
                        [] if reason or not in_forward else [f"{short(trace.calls[c].key)} at {trace.calls[c].where}" for c in sorted(skip)],
                        seg.name)
    windows = _windows(g, actions) if actions and any(s.name == "forward" for s in trace.segments) else []
    return Plan(sampling, outputs, windows, replacements, notes)
