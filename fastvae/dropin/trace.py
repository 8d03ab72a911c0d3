"""Record one real forward of a user's module: every torch call and every submodule entry/exit.

The record is the data flow the drop-in analyses (``plan.py``): each tensor a call produces is a
*value* (an in-place call produces a new value of the same object; the overwritten value is
snapshotted first, so its numbers stay readable), each call lists the values it consumed and
produced, and the event stream interleaves calls with module entries and exits, which is where
the runtime hooks can later switch a short TorchFunctionMode on and off.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_MUTATING = {"TensorBase.__setitem__"}
_SKIP_FRAMES = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
_KEYS: dict[Any, str] = {}


def func_key(func: Any) -> str:
    """A stable, picklable name for a torch function, method or property getter."""
    try:
        return _KEYS[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property (tensor.data, tensor.shape): name the attribute
        key = "get." + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
    else:
        module = getattr(func, "__module__", None)
        qual = getattr(func, "__qualname__", None) or name or repr(func)
        key = f"{module}.{qual}" if module and not qual.startswith(("TensorBase.", "_VariableFunctionsClass.")) else qual
    try:
        _KEYS[func] = key
    except TypeError:
        pass
    return key


def short(key: str) -> str:
    """'torch.randn_like' for '_VariableFunctionsClass.randn_like', 'tensor.mul_' for 'TensorBase.mul_'."""
    for long, brief in (("_VariableFunctionsClass.", "torch."), ("TensorBase.", "tensor."), ("torch.nn.functional.", "F."), ("torch._C._nn.", "F.")):
        key = key.replace(long, brief)
    return key


def tensors_in(obj: Any, objects: bool = False, depth: int = 0) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(path, tensor) for the tensors in nested tuples, lists and dicts; with ``objects`` also in
    dataclasses and plain objects (a forward's output: a dataclass, a torch.distributions object)."""
    if isinstance(obj, torch.Tensor):
        yield (), obj
        return
    if depth > 5:
        return
    if isinstance(obj, (list, tuple)):
        items: Any = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif objects and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    elif objects and depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        items = vars(obj).items()
    else:
        return
    for key, item in items:
        for path, t in tensors_in(item, objects, depth + 1):
            yield (key, *path), t


def _mutated(key: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a call overwrites in place, if any."""
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None:
        return None
    name = key.rsplit(".", 1)[-1]
    if (name.endswith("_") and not name.endswith("__")) or key in _MUTATING or kwargs.get("inplace") is True:
        return first
    return None


def user_frame() -> str:
    """'file.py:line' of the innermost frame outside torch and fastvae.dropin (for messages)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FRAMES):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


@dataclasses.dataclass
class Value:
    """One tensor value: what produced it (a call index, or None for inputs, parameters, constants)."""

    vid: int
    tensor: torch.Tensor  # held for the whole record, so ids stay unique
    producer: int | None
    origin: str  # "call", "input", "parameter", "buffer" or "other"
    snapshot: torch.Tensor | None = None
    consumers: list[int] = dataclasses.field(default_factory=list)

    def data(self) -> torch.Tensor:
        """Its numbers as they were when it was produced."""
        return self.snapshot if self.snapshot is not None else self.tensor.detach()


@dataclasses.dataclass
class Call:
    index: int
    key: str
    args: tuple
    kwargs: dict
    inputs: list[int]
    paths: list[tuple]  # where each input sits in (args, kwargs)
    outputs: list[int]
    mutates: int | None  # the value overwritten in place (its object is the output)
    where: str
    module: str


@dataclasses.dataclass
class Segment:
    """One recorded top-level call of a training step: the model's forward or one of its public
    methods (``owner`` None), or a method of an object such a call returned (``owner``: the
    producing segment's index and the object's path in its output), e.g. a posterior's sample()."""

    name: str  # "forward", "encode", "encode.latent_dist.sample"
    method: str
    owner: tuple[int, tuple] | None
    cls: type | None  # the owner object's class
    plain: tuple  # the call's non-tensor arguments (a later call must pass the same to be replaced)
    attrs: dict[str, int]  # the owner object's tensor attributes at the call: name -> value
    state: tuple  # the owner object's other attributes at the call (a later owner must hold the same)
    calls: list[int] = dataclasses.field(default_factory=list)  # [first, end) call indices
    events: list[int] = dataclasses.field(default_factory=list)  # [first, end) event positions
    inputs: list[tuple[tuple, int]] = dataclasses.field(default_factory=list)  # (path in (args, kwargs), value)
    outputs: list[tuple[tuple, int]] = dataclasses.field(default_factory=list)  # (path in the returned structure, value)
    holders: dict[tuple, str] = dataclasses.field(default_factory=dict)  # output path -> the torch.distributions class holding it


def plain_args(args: tuple, kwargs: dict) -> tuple:
    """The non-tensor arguments of a call, comparable with ==."""
    def norm(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return "<tensor>"
        if isinstance(x, (list, tuple)):
            return tuple(norm(i) for i in x)
        if isinstance(x, dict):
            return tuple(sorted((str(k), norm(v)) for k, v in x.items()))
        return x if isinstance(x, (int, float, str, bool, type(None))) else f"<{type(x).__name__}>"
    return norm((args, kwargs))


def plain_state(obj: Any) -> tuple:
    """An object's non-tensor, non-callable attributes, comparable with == (None for the model itself)."""
    if obj is None:
        return ()
    return tuple(sorted((k, plain_args((v,), {})) for k, v in vars(obj).items()
                        if not isinstance(v, (torch.Tensor, torch.Size)) and not callable(v)))  # shapes follow the batch


def _geometry(t: torch.Tensor) -> tuple | None:
    try:
        return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    except (RuntimeError, NotImplementedError):
        return None


class Trace:
    """The record of one training step: calls, values, events, and the segments (top-level calls) they belong to."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names = names
        self.calls: list[Call] = []
        self.values: list[Value] = []
        self.events: list[tuple[str, Any]] = []  # ("call", index) | ("enter", module name) | ("exit", module name)
        self.current: dict[int, int] = {}  # id(tensor) -> its latest value
        self.storage: dict[tuple, int] = {}  # a value's memory and geometry -> the value (to know its aliases)
        self.aliases: list[torch.Tensor] = []  # tensors made outside torch's functions that alias a value (Variable(t))
        self.stack: list[str] = []
        self.segments: list[Segment] = []
        self.kinds: dict[int, str] = {}

    @property
    def inputs(self) -> list[tuple[tuple, int]]:
        """The data the step was fed: the tensor arguments of the model's own calls that no recorded call made."""
        return [(p, v) for s in self.segments if s.owner is None for p, v in s.inputs if self.values[v].origin == "input"]

    @property
    def outputs(self) -> list[tuple[tuple, int]]:
        """Every tensor the step's calls returned, with its path in its call's result."""
        return [(p, v) for s in self.segments for p, v in s.outputs]

    def value_of(self, t: torch.Tensor, origin: str = "other") -> int:
        vid = self.current.get(id(t))
        if vid is None:
            known = self.storage.get(_geometry(t))
            if known is not None and self.values[known].tensor.requires_grad == t.requires_grad:
                self.current[id(t)] = known  # e.g. torch.autograd.Variable(t): the same numbers, made outside torch's functions
                self.aliases.append(t)
                return known
            vid = self._new(t, None, self.kinds.get(id(t), origin))
        return vid

    def _new(self, t: torch.Tensor, producer: int | None, origin: str) -> int:
        vid = len(self.values)
        self.values.append(Value(vid, t, producer, origin))
        self.current[id(t)] = vid
        key = _geometry(t)
        if key is not None:
            self.storage[key] = vid
        return vid

    def record(self, func: Any, args: tuple, kwargs: dict) -> Any:
        key = func_key(func)
        index = len(self.calls)
        found = list(tensors_in((args, kwargs)))
        inputs = [self.value_of(t) for _, t in found]
        target = _mutated(key, args, kwargs)
        mutates = None
        if target is not None:
            mutates = self.value_of(target)
            value = self.values[mutates]
            if value.snapshot is None and target.is_floating_point():
                value.snapshot = target.detach().clone()
        out = func(*args, **kwargs)
        outputs = [self._new(t, index, "call") for _, t in tensors_in(out)]
        for vid in set(inputs):
            self.values[vid].consumers.append(index)
        self.calls.append(Call(index, key, args, kwargs, inputs, [p for p, _ in found], outputs, mutates, user_frame(),
                               self.stack[-1] if self.stack else ""))
        self.events.append(("call", index))
        return out

    def segment_of(self, call: int) -> Segment | None:
        return next((s for s in self.segments if s.calls[0] <= call < s.calls[1]), None)

    def drop(self) -> None:
        """Release every recorded tensor."""
        self.calls, self.values, self.current, self.storage, self.aliases = [], [], {}, {}, []


class Recorder(TorchFunctionMode):
    """Appends every torch call made while it is active to a Trace."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.trace.record(func, args, kwargs or {})


class Recording:
    """The record of a model's first training step, one segment at a time: ``enter`` (the root's
    pre-hook, or the wrapper of a public method or of a returned object's method) switches a
    Recorder on and hooks the submodules (their entries and exits are events), ``exit`` undoes both."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.trace = Trace({m: n for n, m in model.named_modules()})
        for name, p in model.named_parameters():
            self.trace.kinds[id(p)] = "parameter"
        for name, b in model.named_buffers():
            self.trace.kinds[id(b)] = "buffer"
        self.handles: list[Any] = []
        self.mode: Recorder | None = None

    @property
    def active(self) -> bool:
        return self.mode is not None

    def _enter(self, name: str):
        def hook(module, args):
            if self.mode is not None:
                self.trace.events.append(("enter", name))
                self.trace.stack.append(name)
        return hook

    def _exit(self, name: str):
        def hook(module, args, output):
            if self.mode is not None:
                self.trace.events.append(("exit", name))
                if self.trace.stack:
                    self.trace.stack.pop()
        return hook

    def enter(self, name: str, method: str, args: tuple, kwargs: dict, owner: tuple[int, tuple] | None = None,
              obj: Any = None) -> None:
        """Start recording a segment (a call with these arguments)."""
        t = self.trace
        attrs = {}
        if obj is not None:
            attrs = {k: t.value_of(v) for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}
        seg = Segment(name, method, owner, type(obj) if obj is not None else None, plain_args(args, kwargs), attrs,
                      plain_state(obj), [len(t.calls)], [len(t.events)])
        seg.inputs = [(path, t.value_of(x, "input")) for path, x in tensors_in((args, kwargs))]
        t.segments.append(seg)
        for module, module_name in t.names.items():
            if module is not self.model:
                self.handles.append(module.register_forward_pre_hook(self._enter(module_name)))
                self.handles.append(module.register_forward_hook(self._exit(module_name), always_call=True))
        self.mode = Recorder(t)
        self.mode.__enter__()

    def exit(self, output: Any) -> Segment:
        """Stop recording the current segment; note what it returned."""
        t = self.trace
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        for h in self.handles:
            h.remove()
        self.handles = []
        seg = t.segments[-1]
        seg.calls.append(len(t.calls))
        seg.events.append(len(t.events))
        t.stack.clear()
        if output is not None:
            seg.outputs = [(path, t.value_of(x)) for path, x in tensors_in(output, objects=True)]
            for path, _ in seg.outputs:
                holder = at(output, path[:-1]) if path else None
                if isinstance(holder, torch.distributions.Distribution):
                    seg.holders[path] = type(holder).__name__
        return seg

    def finish(self) -> Trace:
        """End the record (idempotent); the trace holds the recorded tensors until it is dropped."""
        if self.mode is not None:
            self.exit(None)
        return self.trace


def at(out: Any, path: tuple) -> Any:
    """The item at `path` in a call's result (indices and keys of containers, attributes of objects)."""
    for key in path:
        out = out[key] if isinstance(out, (dict, list, tuple)) else getattr(out, key)
    return out


def objects_in(obj: Any, depth: int = 0) -> Iterator[tuple[tuple, Any]]:
    """(path, object) for the plain objects in a call's result (a posterior, a torch.distributions
    object): not tensors, containers, dataclasses or modules; paths as ``tensors_in`` writes them."""
    if isinstance(obj, (torch.Tensor, nn.Module, type, str, bytes, int, float, bool)) or obj is None or depth > 4:
        return
    if isinstance(obj, (list, tuple)):
        items: Any = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    elif hasattr(obj, "__dict__"):
        yield (), obj
        return
    else:
        return
    for key, item in items:
        for path, o in objects_in(item, depth + 1):
            yield (key, *path), o
