"""FlatAdam: torch.optim.Adam over one flat parameter arena, so a step is one fused call.

The model's parameters become views of one flat buffer (``flat``), their gradients views of a
second (``flat_grad``) and their Adam moments views of two more. Values, parameter objects, names
and state_dicts are unchanged; only where the numbers live changes. A step is then a single
``torch._fused_adam_`` over the four flat buffers: no per-parameter bookkeeping, no
per-parameter kernel. ``state_dict()`` is torch.optim.Adam's own (per-parameter state, the
moments as views), so checkpoints load both ways between FlatAdam and torch.optim.Adam.

Two differences from torch.optim.Adam, both for speed: ``zero_grad`` zeroes the gradient
buffer in place (the views stay, ``set_to_none`` is ignored), and a parameter that got no
gradient in a step is updated with a zero gradient (its moments decay) instead of being
skipped. A ``layout`` packs chosen parameters next to each other with no gap (fastvae.VAE's
mu and logvar heads, so that the hand-written step multiplies them as one matrix).
``unpack()`` gives every parameter its own storage again (the Trainer calls it when fit ends).
The Trainer uses it only for models that use every parameter at every step (``uses_every_parameter``:
fastvae's own), where the second difference changes nothing.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

ALIGN = 16  # elements: every packed group starts on a 64-byte boundary (float32)


def _unsupported(params: list[nn.Parameter]) -> str | None:
    if not params:
        return "no parameters"
    first = params[0]
    if first.dtype not in (torch.float32, torch.float64) or first.device.type not in ("cpu", "cuda"):
        return f"parameters of {first.dtype} on {first.device.type}"
    if len({id(p) for p in params}) != len(params):
        return "a parameter is listed twice"
    for p in params:
        if p.dtype != first.dtype or p.device != first.device:
            return "parameters of several dtypes or devices"
        if p.is_sparse or not p.requires_grad:
            return "sparse or frozen parameters"
    return None


class FlatAdam(torch.optim.Adam):
    """Adam (fused) whose parameters, gradients and moments live in flat buffers; see the module docstring.

    layout: groups of parameters to store back to back, in that order (each group aligned, no gap
    inside a group); parameters in no group follow, one group each.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, *, layout: Sequence[Sequence[nn.Parameter]] = ()) -> None:
        params = list(params)
        why = _unsupported(params)
        if why is not None:
            raise ValueError(f"FlatAdam cannot hold these parameters: {why}; use torch.optim.Adam")
        super().__init__(params, lr=lr, fused=True)
        listed = {id(p) for group in layout for p in group}
        if not listed <= {id(p) for p in params}:
            raise ValueError("layout names a parameter the optimizer does not hold")
        self._groups = [list(g) for g in layout] + [[p] for p in params if id(p) not in listed]
        self._params = params
        self._packed = False
        self.pack()

    # -- the arena -----------------------------------------------------------------------------------------------
    def pack(self) -> None:
        """Move the parameters, their gradients and moments into the flat buffers (the current values kept)."""
        if self._packed:
            return
        first = self._params[0]
        offsets, total = {}, 0
        for group in self._groups:
            total = -(-total // ALIGN) * ALIGN
            for p in group:
                offsets[id(p)] = total
                total += p.numel()
        kw = {"dtype": first.dtype, "device": first.device}
        self.flat, self.flat_grad = torch.zeros(total, **kw), torch.zeros(total, **kw)
        self.exp_avg, self.exp_avg_sq = torch.zeros(total, **kw), torch.zeros(total, **kw)
        step = self._uniform_step()
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        for p in self._params:
            o, n = offsets[id(p)], p.numel()
            views = tuple(buf[o:o + n].view_as(p) for buf in (self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq))
            views[0].copy_(p.detach())
            state = self.state.get(p, {})
            if p.grad is not None:
                views[1].copy_(p.grad)
            for key, view in (("exp_avg", views[2]), ("exp_avg_sq", views[3])):
                if key in state:
                    view.copy_(state[key])
            p.data = views[0]
            p.grad = views[1]
            self._views[id(p)] = views
        self.step_count = torch.tensor(float(step), dtype=torch.float32, device=first.device)
        for p in self._params:
            _, _, m, v = self._views[id(p)]
            self.state[p] = {"step": self.step_count, "exp_avg": m, "exp_avg_sq": v}
        self._offsets = offsets
        self._packed = True

    def unpack(self) -> None:
        """Give every parameter, gradient and moment its own storage again (views of nothing shared)."""
        if not self._packed:
            return
        for p in self._params:
            p.data = p.data.clone()
            p.grad = None
            state = self.state[p]
            self.state[p] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}
        self._packed = False

    def _uniform_step(self) -> float:
        steps = {float(s["step"]) for s in self.state.values() if "step" in s}
        if len(steps) > 1:
            raise ValueError(f"FlatAdam steps all parameters together; this state has parameters at steps {sorted(steps)}")
        return steps.pop() if steps else 0.0

    def joint(self, *params: nn.Parameter, grad: bool = False) -> torch.Tensor:
        """One flat view spanning `params`, which the layout stored back to back (flat_grad's with grad=True)."""
        buf = self.flat_grad if grad else self.flat
        start = self._offsets[id(params[0])]
        n = sum(p.numel() for p in params)
        if any(self._offsets[id(p)] != start + sum(q.numel() for q in params[:i]) for i, p in enumerate(params)):
            raise ValueError("joint: these parameters are not stored back to back (pass them together in layout=)")
        return buf[start:start + n]

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        return self._views[id(p)][1]

    # -- torch.optim.Optimizer --------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer in place (set_to_none is ignored: the gradients stay views of it)."""
        if not self._packed:
            super().zero_grad(set_to_none)
            return
        self.flat_grad.zero_()
        for p in self._params:
            if p.grad is not self._views[id(p)][1]:
                p.grad = self._views[id(p)][1]

    def _gather_grads(self) -> None:
        """Gradients that autograd put elsewhere (or left None) into the buffer, as views again."""
        stray, into = [], []
        for p in self._params:
            view = self._views[id(p)][1]
            g = p.grad
            if g is view:
                continue
            if g is None:
                view.zero_()
            else:
                stray.append(g)
                into.append(view)
            p.grad = view
        if stray:
            torch._foreach_copy_(into, stray)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._packed:
            super().step()
            return loss
        self._gather_grads()
        self.step_count += 1
        self.flat_step()
        return loss

    def flat_step(self) -> None:
        """The fused Adam update over the flat buffers at the current ``step_count`` (which the caller advanced)."""
        g = self.param_groups[0]
        beta1, beta2 = g["betas"]
        torch._fused_adam_([self.flat], [self.flat_grad], [self.exp_avg], [self.exp_avg_sq], [], [self.step_count],
                           lr=float(g["lr"]), beta1=float(beta1), beta2=float(beta2), weight_decay=float(g["weight_decay"]),
                           eps=float(g["eps"]), amsgrad=bool(g["amsgrad"]), maximize=bool(g["maximize"]))

    def state_dict(self) -> dict:
        """torch.optim.Adam's state_dict; each parameter gets its own "step" tensor (they share one here, and a
        torch.optim.Adam that loaded a shared one would advance it once per parameter)."""
        out = super().state_dict()
        out["state"] = {k: {**v, "step": v["step"].clone()} if "step" in v else v for k, v in out["state"].items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Adam's state_dict (from either optimizer), then packed into the flat buffers again."""
        packed = self._packed
        if packed:
            self.unpack()
        super().load_state_dict(state_dict)
        if len(self.param_groups) != 1:
            raise ValueError("FlatAdam holds one parameter group; this state_dict has several")
        if packed:
            self.pack()
