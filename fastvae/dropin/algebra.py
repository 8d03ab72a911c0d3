"""What formula of chosen tensors a recorded value is, read from the ops that computed it.

The drop-in proves its parts by structure, never by equal numbers: z must be exactly
``mu + eps * exp(0.5 * logvar)`` (or ``exp(log_std)``, or ``std``) of the chosen tensors, and a
KL exactly ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)`` over each row. ``Expander`` rewrites a
value as a polynomial over leaves and ``exp`` of polynomials, through the ops whose meaning it
knows (sums, products, constants, exp, sqrt / log / pow of exponentials, element-order-keeping
reshapes). Any other op (clamp, relu, abs, where, masked_fill, nan_to_num, maximum, dropout, a
detach, a slice, ...) makes its output an opaque leaf of its own, so a formula only holds when
every op between the chosen tensors and the value is one the fused kernel computes.

A polynomial is a dict {monomial: coefficient}; a monomial a sorted tuple of atoms, each
("v", value id) or ("e", frozen exponent polynomial), with at most one "e" atom.
"""
from __future__ import annotations

import math
from typing import Any

from .trace import Call, Trace

Poly = dict[tuple, float]

ORDER_KEEPING = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone", "view_as",
                 "reshape_as", "to", "float", "double", "type_as"}  # same elements in the same order (or a dtype cast)
ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}
SUB = {"sub", "__sub__", "sub_", "__isub__", "subtract"}
RSUB = {"rsub", "__rsub__"}
MUL = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
DIV = {"div", "__truediv__", "div_", "__itruediv__", "true_divide", "divide"}
NEG = {"neg", "__neg__", "negative", "neg_"}
EXP = {"exp", "exp_"}
KNOWN = ORDER_KEEPING | ADD | SUB | RSUB | MUL | DIV | NEG | EXP | {
    "sqrt", "sqrt_", "rsqrt", "pow", "__pow__", "pow_", "square", "log", "log_", "reciprocal", "__rtruediv__", "addcmul",
    "addcmul_", "broadcast_tensors"}


def _round(c: float) -> float:
    return float(f"{c:.12g}")


def freeze(p: Poly) -> tuple:
    return tuple(sorted((m, _round(c)) for m, c in p.items() if c != 0.0))


def const(c: float) -> Poly:
    return {(): float(c)} if c != 0.0 else {}


def leaf(vid: int) -> Poly:
    return {(("v", vid),): 1.0}


def add(p: Poly, q: Poly, alpha: float = 1.0) -> Poly:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, 0.0) + alpha * c
    return {m: c for m, c in out.items() if abs(c) > 1e-300}


def scale(p: Poly, c: float) -> Poly:
    return {m: v * c for m, v in p.items()} if c != 0.0 else {}


def _mono(atoms: list, coef: float) -> tuple[tuple, float]:
    """Merge the exp atoms of a monomial into one (a constant exponent goes into the coefficient)."""
    plain = sorted(a for a in atoms if a[0] == "v")
    exponent: Poly = {}
    for a in atoms:
        if a[0] == "e":
            exponent = add(exponent, dict(a[1]))
    c0 = exponent.pop((), 0.0)
    coef *= math.exp(c0) if c0 else 1.0
    if exponent:
        plain.append(("e", freeze(exponent)))
    return tuple(plain), coef


def mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            m, c = _mono([*m1, *m2], c1 * c2)
            out[m] = out.get(m, 0.0) + c
    return {m: c for m, c in out.items() if abs(c) > 1e-300}


def exp(p: Poly) -> Poly:
    c0 = p.get((), 0.0)
    rest = {m: c for m, c in p.items() if m != ()}
    if not rest:
        return const(math.exp(c0))
    return {(("e", freeze(rest)),): math.exp(c0)}


def _exponential(p: Poly) -> tuple[float, Poly] | None:
    """(c, P) when p is c * exp(P) with c > 0 (P may be empty: a positive constant)."""
    if len(p) != 1:
        return None
    (m, c), = p.items()
    if c <= 0 or any(a[0] == "v" for a in m):
        return None
    return c, (dict(m[0][1]) if m else {})


def power(p: Poly, n: float) -> Poly | None:
    if float(n).is_integer() and 0 <= n <= 4:
        out = const(1.0)
        for _ in range(int(n)):
            out = mul(out, p)
        return out
    e = _exponential(p)
    if e is None:
        return None
    c, exponent = e
    return mul(const(c ** n), exp(scale(exponent, n)))


def log(p: Poly) -> Poly | None:
    e = _exponential(p)
    return None if e is None else add(const(math.log(e[0])), e[1])


def divide(p: Poly, q: Poly) -> Poly | None:
    r = power(q, -1.0)
    return None if r is None else mul(p, r)


def number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class Expander:
    """Polynomials of the values of one trace, with `cut` values (and the values of calls it does not
    know) as leaves. ``memo`` is per cut."""

    def __init__(self, trace: Trace, cut: set[int]) -> None:
        self.t, self.cut, self.memo = trace, cut, {}

    def __call__(self, vid: int) -> Poly:
        if vid not in self.memo:
            self.memo[vid] = leaf(vid)  # a cycle (impossible in a trace) stays opaque
            self.memo[vid] = self._expand(vid)
        return self.memo[vid]

    def _arg(self, call: Call, pos: int | str, default: Any = None) -> Poly | None:
        """The polynomial of a call's argument (positional index or keyword), a number as a constant,
        None when it is neither."""
        value = (call.args[pos] if isinstance(pos, int) and pos < len(call.args) else
                 call.kwargs.get(pos, default) if isinstance(pos, str) else default)
        path = (0, pos) if isinstance(pos, int) else (1, pos)
        for p, vid in zip(call.paths, call.inputs):
            if p == path:
                return self(vid)
        c = number(value)
        return None if c is None else const(c)

    def _expand(self, vid: int) -> Poly:
        value = self.t.values[vid]
        if vid in self.cut or value.producer is None:
            return leaf(vid)
        call = self.t.calls[value.producer]
        name = call.key.rsplit(".", 1)[-1]
        if name not in KNOWN or call.kwargs.get("out") is not None:
            return leaf(vid)
        out = self._known(call, name, call.outputs.index(vid))
        return leaf(vid) if out is None else out

    def _known(self, call: Call, name: str, index: int) -> Poly | None:
        t = self.t
        shape = t.values[call.outputs[index]].tensor.shape
        if name == "broadcast_tensors":
            src = call.inputs[index] if index < len(call.inputs) else None
            return self(src) if src is not None and t.values[src].tensor.shape == shape else None
        a = self._arg(call, 0)
        if a is None:
            return None
        if name in ORDER_KEEPING:
            src = call.inputs[0] if call.inputs else None
            same = src is not None and t.values[src].tensor.numel() == t.values[call.outputs[index]].tensor.numel()
            return a if same else None
        if name in NEG:
            return scale(a, -1.0)
        if name in EXP:
            return exp(a)
        if name in ("sqrt", "sqrt_"):
            return power(a, 0.5)
        if name == "rsqrt":
            return power(a, -0.5)
        if name == "reciprocal":
            return power(a, -1.0)
        if name == "square":
            return mul(a, a)
        if name in ("log", "log_"):
            return log(a)
        if name in ("addcmul", "addcmul_"):
            b, c = self._arg(call, 1), self._arg(call, 2)
            value = number(call.kwargs.get("value", 1.0))
            return None if b is None or c is None or value is None else add(a, mul(b, c), value)
        b = self._arg(call, 1, call.kwargs.get("other", call.kwargs.get("exponent")))
        if b is None:
            return None
        if name in ("pow", "__pow__", "pow_"):
            n = number(call.args[1] if len(call.args) > 1 else call.kwargs.get("exponent"))
            return None if n is None else power(a, n)
        alpha = number(call.kwargs.get("alpha", 1.0))
        if alpha is None:
            return None
        if name in ADD:
            return add(a, b, alpha)
        if name in SUB:
            return add(a, b, -alpha)
        if name in RSUB:
            return add(b, a, -alpha)
        if name in MUL:
            return mul(a, b)
        if name in DIV and call.kwargs.get("rounding_mode") is None:
            return divide(a, b)
        if name == "__rtruediv__":
            return divide(b, a)
        return None


def sample_formula(form: str, mu: int, scale_vid: int, eps: int) -> Poly:
    """z = mu + eps * exp(0.5 * logvar) / exp(log_std) / std, as a polynomial of the three leaves."""
    factor = {"logvar": exp(scale(leaf(scale_vid), 0.5)), "logstd": exp(leaf(scale_vid)), "std": leaf(scale_vid)}[form]
    return add(leaf(mu), mul(leaf(eps), factor))


def kl_formula(mu: int, logvar: int) -> Poly:
    """The per-element KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)."""
    lv = leaf(logvar)
    inner = add(add(add(mul(leaf(mu), leaf(mu)), exp(lv)), const(-1.0)), lv, -1.0)
    return scale(inner, 0.5)


def same(p: Poly, q: Poly) -> bool:
    return freeze(p) == freeze(q)


def leaves(p: Poly) -> set[int]:
    """The value ids a polynomial reads (in its monomials and its exponents)."""
    out: set[int] = set()
    for m in p:
        for a in m:
            if a[0] == "v":
                out.add(a[1])
            else:
                out |= leaves(dict(a[1]))
    return out
