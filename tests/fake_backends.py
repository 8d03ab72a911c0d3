"""Test helper: stand-in accelerated backends registered through fastvae.backends for one test."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import importlib

import torch

backends = importlib.import_module("fastvae.backends")  # the module (fastvae.backends the attribute is the report function)

BACKEND = "cpp"  # the backend "auto" tries first on CPU


def isolate(monkeypatch) -> None:
    """Give this test its own registry and warning state (restored afterwards)."""
    for name in ("_loaders", "_loaded", "_errors", "_failed_at_run"):
        monkeypatch.setattr(backends, name, type(getattr(backends, name))(getattr(backends, name)))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    monkeypatch.delenv("FASTVAE_STRICT", raising=False)


def install(monkeypatch, op: str, impl: Any = None, load_error: Exception | None = None) -> None:
    """Register `impl` (or a loader raising `load_error`) as the "cpp" implementation of `op`."""
    def loader() -> Any:
        if load_error is not None:
            raise load_error
        return impl
    backends.register(op, BACKEND, loader)
    backends._loaded.pop((op, BACKEND), None)
    backends._errors.pop((op, BACKEND), None)


def failing(message: str = "kernel exploded") -> SimpleNamespace:
    """An implementation of every op whose kernels all raise RuntimeError(message)."""
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)
    return SimpleNamespace(reparam_forward=boom, reparam_backward=boom, loss_forward=boom, decode_mlp=boom, to_image=boom)


class Spy(SimpleNamespace):
    """An implementation of every op that records calls and raises: for "no kernel ran" checks."""

    def __init__(self) -> None:
        super().__init__(calls=[])
        for fn in ("reparam_forward", "reparam_backward", "loss_forward", "decode_mlp", "to_image"):
            setattr(self, fn, self._recorder(fn))

    def _recorder(self, fn: str):
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(fn)
            raise AssertionError(f"kernel {fn} ran on bad input")
        return record


class Contract(SimpleNamespace):
    """A pure-PyTorch implementation of the round-2 backend interface (/work/notes/contract.md), to test
    the op layer's plumbing without the real kernels: it takes seeds and betas as device tensors (and
    asserts their dtype and device), ORs the value-check bits into `flags` without reading them on the
    host, folds `scale` into the gradients, regenerates eps in the backward (as the GPU kernels do), and
    its scale_grads skips a 0-dim 1. `calls` records (function, details) per call.

    `slower_below`: its ``slower`` hook says torch is faster below that many elements of mu (0: never).
    """

    tensor_seed = True

    def __init__(self, slower_below: int = 0) -> None:
        super().__init__(calls=[], slower_below=slower_below)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _device_scalar(t: Any, dtype, like) -> None:
        assert t.dim() == 0 and t.dtype == dtype and t.device == like.device, f"expected a 0-dim {dtype} on {like.device}, got {t.shape} {t.dtype} {t.device}"

    @staticmethod
    def _flag(flags, bit: int, bad) -> None:
        """flags[0] |= bit where `bad` (a bool tensor) has a True: on the device, no host read."""
        if flags is not None:
            assert flags.shape == (1,) and flags.dtype == torch.int32
            flags.bitwise_or_(bad.any().to(torch.int32) * bit)

    def _latent_flags(self, flags, mu, logvar) -> None:
        from fastvae import _checks

        self._flag(flags, _checks.FLAG_MU_NONFINITE, ~torch.isfinite(mu))
        self._flag(flags, _checks.FLAG_LOGVAR_NONFINITE, ~torch.isfinite(logvar))
        self._flag(flags, _checks.FLAG_LOGVAR_HIGH, torch.isfinite(logvar) & (logvar > _checks.MAX_LOGVAR))

    def _eps(self, seed, mu, k):
        from fastvae.ops import philox

        if isinstance(seed, torch.Tensor):
            self._device_scalar(seed, torch.int64, mu)
        acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
        return philox.randn(seed, k * mu.numel(), device=mu.device).view(k, *mu.shape).to(acc)

    # -- reparam -------------------------------------------------------------------------------
    def unsupported(self, *tensors) -> str | None:
        return None

    def slower(self, *tensors) -> str | None:
        return f"torch is faster below {self.slower_below} elements" if tensors[0].numel() < self.slower_below else None

    def routing(self) -> str | None:
        return f"contract fake: torch below {self.slower_below} elements" if self.slower_below else None

    def reparam_forward(self, mu, logvar, seed, k, need_kl, flags):
        self.calls.append(("reparam_forward", {"seed": type(seed).__name__, "need_kl": need_kl, "flags": flags is not None}))
        self._latent_flags(flags, mu, logvar)
        mu_a, lv_a = (t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in (mu, logvar))
        z = (mu_a + self._eps(seed, mu, k) * torch.exp(0.5 * lv_a)).to(mu.dtype)
        kl = -0.5 * (1 + lv_a - mu_a * mu_a - lv_a.exp()).sum(-1) if need_kl else None
        return z, kl

    def reparam_backward(self, grad_z, grad_kl, mu, logvar, z, seed, k):
        self.calls.append(("reparam_backward", {"seed": type(seed).__name__, "grad_kl": grad_kl is not None}))
        mu_a, lv_a = (t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in (mu, logvar))
        gz = grad_z.to(mu_a.dtype)
        g_mu = gz.sum(0)
        g_lv = 0.5 * (gz * self._eps(seed, mu, k) * torch.exp(0.5 * lv_a)).sum(0)
        if grad_kl is not None:
            gk = grad_kl.to(mu_a.dtype)[:, None]
            g_mu = g_mu + gk * mu_a
            g_lv = g_lv + gk * 0.5 * (lv_a.exp() - 1)
        return g_mu.to(mu.dtype), g_lv.to(logvar.dtype)

    # -- loss ----------------------------------------------------------------------------------
    def loss_forward(self, logits, x, mu, logvar, beta, likelihood, need_grad, scale, flags):
        from fastvae import _checks

        self.calls.append(("loss_forward", {"beta": type(beta).__name__, "need_grad": need_grad, "scale": scale, "flags": flags is not None}))
        if isinstance(beta, torch.Tensor):
            self._device_scalar(beta, torch.float64, logits)
        self._latent_flags(flags, mu, logvar)
        self._flag(flags, _checks.FLAG_LOGITS_NONFINITE, ~torch.isfinite(logits))
        if x.is_floating_point():
            self._flag(flags, _checks.FLAG_X_NONFINITE, ~torch.isfinite(x))
            if likelihood == "bernoulli":
                self._flag(flags, _checks.FLAG_X_RANGE, (x < 0) | (x > 1))
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        l, m, v = logits.to(acc), mu.to(acc), logvar.to(acc)
        t = x.to(acc) / 255.0 if x.dtype == torch.uint8 else x.to(acc)
        if likelihood == "gaussian":
            recon, g_l = ((l - t) ** 2).sum(-1), 2 * (l - t)
        else:
            recon, g_l = (l.clamp(min=0) - l * t + torch.log1p(torch.exp(-l.abs()))).sum(-1), torch.sigmoid(l) - t
        kl = -0.5 * (1 + v - m * m - v.exp()).sum(-1)
        if not need_grad:
            return recon, kl, None, None, None
        b = beta.to(acc) if isinstance(beta, torch.Tensor) else beta
        grads = (scale * g_l, scale * b * m, scale * b * 0.5 * (v.exp() - 1))
        return (recon, kl, *(g.to(like.dtype) for g, like in zip(grads, (logits, mu, logvar))))

    def scale_grads(self, grad_out, grads):
        if grad_out.dim() == 0 and float(grad_out) == 1.0:
            self.calls.append(("scale_grads", "skipped"))
            return
        self.calls.append(("scale_grads", tuple(grad_out.shape)))
        for t in grads:
            t.mul_(grad_out if grad_out.dim() == 0 else grad_out.reshape(-1, *([1] * (t.dim() - 1))).to(t.dtype))

    def called(self, fn: str) -> list:
        return [detail for name, detail in self.calls if name == fn]
