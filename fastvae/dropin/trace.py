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
    outputs: list[int]
    mutates: int | None  # the value overwritten in place (its object is the output)
    where: str
    module: str


class Trace:
    """The record of one forward: calls, values, events, the forward's inputs and output."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names = names
        self.calls: list[Call] = []
        self.values: list[Value] = []
        self.events: list[tuple[str, Any]] = []  # ("call", index) | ("enter", module name) | ("exit", module name)
        self.current: dict[int, int] = {}  # id(tensor) -> its latest value
        self.stack: list[str] = []
        self.inputs: list[tuple[tuple, int]] = []  # (path in (args, kwargs), value)
        self.outputs: list[tuple[tuple, int]] = []  # (path in the returned structure, value)
        self.kinds: dict[int, str] = {}

    def value_of(self, t: torch.Tensor, origin: str = "other") -> int:
        vid = self.current.get(id(t))
        if vid is None:
            vid = self._new(t, None, self.kinds.get(id(t), origin))
        return vid

    def _new(self, t: torch.Tensor, producer: int | None, origin: str) -> int:
        vid = len(self.values)
        self.values.append(Value(vid, t, producer, origin))
        self.current[id(t)] = vid
        return vid

    def record(self, func: Any, args: tuple, kwargs: dict) -> Any:
        key = func_key(func)
        index = len(self.calls)
        inputs = [self.value_of(t) for _, t in tensors_in((args, kwargs))]
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
        self.calls.append(Call(index, key, args, kwargs, inputs, outputs, mutates, user_frame(), self.stack[-1] if self.stack else ""))
        self.events.append(("call", index))
        return out

    def drop(self) -> None:
        """Release every recorded tensor."""
        self.calls, self.values, self.current = [], [], {}


class Recorder(TorchFunctionMode):
    """Appends every torch call made while it is active to a Trace."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.trace.record(func, args, kwargs or {})


class Recording:
    """Switched on by the root module's pre-hook and off by its forward hook: records the forward
    between them (submodule hooks for the events, a Recorder for the calls)."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.trace = Trace({m: n for n, m in model.named_modules()})
        for name, p in model.named_parameters():
            self.trace.kinds[id(p)] = "parameter"
        for name, b in model.named_buffers():
            self.trace.kinds[id(b)] = "buffer"
        self.trace.inputs = [(path, self.trace.value_of(t, "input")) for path, t in tensors_in((args, kwargs))]
        self.handles = []
        for module, name in self.trace.names.items():
            if module is model:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._exit(name), always_call=True))
        self.mode = Recorder(self.trace)
        self.mode.__enter__()

    def _enter(self, name: str):
        def hook(module, args):
            self.trace.events.append(("enter", name))
            self.trace.stack.append(name)
        return hook

    def _exit(self, name: str):
        def hook(module, args, output):
            self.trace.events.append(("exit", name))
            if self.trace.stack:
                self.trace.stack.pop()
        return hook

    def finish(self, output: Any) -> Trace:
        """Stop recording (idempotent); note the forward's output."""
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
            for h in self.handles:
                h.remove()
            if output is not None:
                self.trace.outputs = [(path, self.trace.value_of(t)) for path, t in tensors_in(output, objects=True)]
        return self.trace
