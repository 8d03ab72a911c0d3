"""DecoderOutput: a decoder's output that knows its logits, so the user's own loss runs from them.

An accelerated model's decoder output is this tensor subclass (same values, same autograd graph).
It carries ``_fastvae_logits`` and ``_fastvae_kind`` ("sigmoid": the tensor is sigmoid(logits);
"logits": it is the logits). Reshapes and crops keep that knowledge (sigmoid commutes with
them); every other operation gives a plain tensor. The user's loss is met where it is written:

- ``F.binary_cross_entropy(x_hat, x, ...)`` (and nn.BCELoss) on a "sigmoid" output, and
  ``F.binary_cross_entropy_with_logits(x_hat, x, ...)`` on a "logits" output, compute the same
  quantity from the logits: fused (fastvae's loss kernel) where that pays, else torch's
  binary_cross_entropy_with_logits. Same reduction, weight and result; stable where torch clamps
  log(p) at -100; allowed under autocast (PyTorch refuses binary_cross_entropy there on CUDA).
- Everything else (MSE, KL terms, sums, weights, capacities, divisions by the batch) is the
  user's own code, unchanged: whatever the loss means, it keeps meaning it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from ..ops.loss import loss_terms
from . import routing

_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.flatten, torch.Tensor.unflatten, torch.Tensor.view_as,
          torch.Tensor.reshape_as, torch.Tensor.squeeze, torch.Tensor.unsqueeze, torch.Tensor.permute, torch.Tensor.transpose,
          torch.Tensor.contiguous, torch.Tensor.__getitem__, torch.Tensor.narrow, torch.Tensor.expand, torch.Tensor.expand_as,
          torch.Tensor.clone, torch.Tensor.movedim, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.permute,
          torch.transpose, torch.narrow, torch.movedim, torch.clone}
_SIGMOIDS = {torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit}
_BCE_ARGS = ("input", "target", "weight", "size_average", "reduce", "reduction")
_BCE_LOGITS_ARGS = _BCE_ARGS + ("pos_weight",)


class DecoderOutput(torch.Tensor):
    """A decoder output x_hat that carries the logits it was computed from (see the module docstring)."""

    _fastvae_logits: torch.Tensor | None
    _fastvae_kind: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func in _SIGMOIDS:
                result = _sigmoid(args, kwargs)
            elif func in _VIEWS:
                result = _view(func, args, kwargs)
            elif func is F.binary_cross_entropy:
                result = _bce(args, kwargs, _BCE_ARGS, "sigmoid")
            elif func is F.binary_cross_entropy_with_logits:
                result = _bce(args, kwargs, _BCE_LOGITS_ARGS, "logits")
            else:
                result = None
            if result is None:
                result = func(*args, **kwargs)
                if args and isinstance(args[0], DecoderOutput) and _in_place(func):
                    args[0]._fastvae_logits = None  # changed in place: its logits no longer describe it
            return result


def wrap(t: torch.Tensor, logits: torch.Tensor, kind: str, owner: object = None) -> DecoderOutput:
    """`t` (sigmoid(logits) or the logits themselves) as a DecoderOutput; same values and autograd graph.

    `owner` (the model's drop-in state) is told, through ``owner.loss_seen = True``, when a BCE
    is computed from it: tagging that no loss uses is then switched off.
    """
    out = t.as_subclass(DecoderOutput)
    out._fastvae_logits = logits
    out._fastvae_kind = kind
    out._fastvae_owner = owner
    return out


def logits_of(t: object, kind: str) -> torch.Tensor | None:
    """The logits `t` carries if it is a DecoderOutput of this kind ("sigmoid" or "logits")."""
    if isinstance(t, DecoderOutput) and t._fastvae_kind == kind:
        return t._fastvae_logits
    return None


def used(t: DecoderOutput) -> None:
    """A loss was computed from `t`'s logits: tell the model it came from."""
    if t._fastvae_owner is not None:
        t._fastvae_owner.loss_seen = True


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name == "__setitem__"


def _sigmoid(args, kwargs):
    x = args[0] if args else None
    logits = logits_of(x, "logits")
    if logits is None or len(args) != 1 or kwargs:
        return None
    return wrap(torch.sigmoid(x), logits, "sigmoid", x._fastvae_owner)


def _view(func, args, kwargs):
    x = args[0] if args else None
    if not isinstance(x, DecoderOutput) or x._fastvae_logits is None:
        return None
    out = func(*args, **kwargs)
    if x._fastvae_kind == "logits":
        return wrap(out, out, "logits", x._fastvae_owner)
    try:
        logits = func(x._fastvae_logits, *args[1:], **kwargs)
    except RuntimeError:  # e.g. a view the logits' strides do not allow: forget them
        return out
    return wrap(out, logits, x._fastvae_kind, x._fastvae_owner) if logits.shape == out.shape else out


def _bce(args, kwargs, names, kind):
    """binary_cross_entropy(sigmoid(l), x) or binary_cross_entropy_with_logits(l, x), computed from l."""
    bound = dict(zip(names, args))
    if len(args) > len(names) or any(k not in names or k in bound for k in kwargs):
        return None
    bound.update(kwargs)
    logits = logits_of(bound.get("input"), kind)
    target = bound.get("target")
    if logits is None or not isinstance(target, torch.Tensor) or bound.get("pos_weight") is not None:
        return None
    reduction = bound.get("reduction", "mean")
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        reduction = _reduction.legacy_get_string(bound.get("size_average"), bound.get("reduce"))
    weight = bound.get("weight")
    fused = fusable(logits, target, weight, reduction)
    if kind == "logits" and not fused:
        return None  # already from the logits: as written, and not counted as a use (tagging it gains nothing)
    used(bound["input"])
    if fused:
        return fused_bce(logits, target, reduction)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction=reduction)


def fusable(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> bool:
    """Whether fastvae's fused loss computes this BCE-with-logits, and is faster on this device and size."""
    return (weight is None and reduction in ("sum", "mean") and target.shape == logits.shape and logits.dim() >= 1
            and target.is_floating_point() and not target.requires_grad and logits.numel() > 0
            and routing.fused_loss(logits.device, logits.numel()))


def fused_bce(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """binary_cross_entropy_with_logits(logits, target, reduction=...) ("sum" or "mean") through
    fastvae's fused loss, with no latent term (``fusable`` says when)."""
    flat = logits.reshape(logits.shape[0] if logits.dim() > 1 else 1, -1)
    zeros = flat.new_zeros(flat.shape[0], 1)  # no latent term: beta = 0
    total = loss_terms(flat, target.reshape(flat.shape), zeros, zeros, beta=0.0, reduction="sum").loss
    return total if reduction == "sum" else total / logits.numel()
