"""The whole engine for a user's own module: ``fastvae.fit(model, images)``.

``DropinModel`` makes an accelerated user module a ``LatentModel``: its ``loss_terms`` runs the
user's forward (fused sampling where it pays) and feeds the decoder's logits, mu and logvar
that the drop-in captured to the fused loss. So ``fastvae.Trainer`` trains it like its own
models: the data set held on the device as uint8, shuffled there, fused loss, fused Adam, and
the whole step replayed as a CUDA graph on GPU. The user's module is trained in place.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import nn

from .. import _checks
from ..models.base import LatentModel
from ..ops.loss import LIKELIHOODS, LossTerms, loss_terms
from .accelerate import Dropin, accelerate, analyse_now, collecting
from .output import DecoderOutput
from .plan import Refused
from .trace import at


class DropinModel(LatentModel):
    """A user's VAE module (forward(x) or forward(x, labels)) as a LatentModel for fastvae.Trainer.

    input_shape: one sample's shape as the module takes it (e.g. (1, 28, 28)); batches arrive
    flattened, uint8 pixels read as x / 255. likelihood: "bernoulli" (BCE from the logits) or
    "gaussian" (squared error on the decoder's output); by default the one the decoder's structure
    implies (a sigmoid or a Bernoulli: "bernoulli"; a tanh, a Normal or an MSE in the forward:
    "gaussian"); where it implies none (a layer's raw output, which may be logits or a mean; a
    clamp; a Normal with a learned scale) it must be given, or the model is refused with the
    reason. example: one batch the parts are found on (needed unless the module was already
    accelerated and has run).
    """

    name = "dropin"
    uses_every_parameter = False  # a user's forward may skip a branch: torch.optim.Adam skips what got no gradient

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], *, likelihood: str | None = None,
                 conditional: bool = False, example: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        super().__init__()
        accelerate(module)
        state: Dropin = module._fastvae_dropin
        if state.plan is None:
            if example is None:
                raise ValueError("DropinModel needs example=<one batch> to find the parts of a module that has not run yet")
            analyse_now(module, (example, labels) if conditional else example)
        plan = state.plan
        self.module = module
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_dim = math.prod(self.input_shape)
        self.latent_dim = math.prod(plan.sampling.shape[1:])
        self.backend = state.backend
        self.conditional = conditional
        if plan.sampling.segment != "forward":
            raise Refused(f"fastvae.fit trains a module through its forward(x); this model draws its sample in {plan.sampling.segment}() "
                          "outside the forward: train it with your own loop (fastvae.accelerate serves it there)")
        returned = [o for o in plan.outputs if o.path is not None and o.segment == "forward"]
        if not returned:
            raise Refused("fastvae.fit: the forward returns no decoder output (a tensor computed from z with as many values as an input); "
                          "return the reconstruction from forward")
        self.output = next((o for o in returned if o.wrapped), returned[0])
        implied, why = self.output.likelihood()
        if likelihood is None and implied is None:
            raise Refused(f"fastvae.fit cannot tell which likelihood this model implies: {why}")
        self.likelihood = likelihood or implied
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.likelihood == "bernoulli" and not self.output.wrapped:
            ends = {"tanh": "tanh", "other": self.output.last_op}.get(self.output.kind, self.output.kind)
            raise Refused(f"fastvae.fit: likelihood='bernoulli' needs a decoder ending in a sigmoid or raw logits; this one ends in "
                          f"{ends} ({self.output.logits}); use likelihood='gaussian'")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """The user's module's own state_dict (checkpoints load into it as they are)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def config(self) -> dict:
        cls = type(self.module)
        return {"model": self.name, "module": f"{cls.__module__}.{cls.__qualname__}", "input_shape": list(self.input_shape),
                "likelihood": self.likelihood}

    def condition(self, labels: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Checks the labels the Trainer will pass to the module's forward(x, labels)."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if batch is not None and labels.shape[:1] != (batch,):
            raise ValueError(f"labels must have one entry per sample ({batch}), got shape {tuple(labels.shape)}")
        return labels

    def _forward(self, flat: torch.Tensor, condition: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder output as the loss takes it (B, D), mu, logvar) from one forward of the module."""
        x = flat.reshape(-1, *self.input_shape)
        args = (x, condition["labels"]) if self.conditional else (x,)
        with collecting(self.module) as state:
            out = self.module(*args)
            if "mu" not in state.slots:
                raise RuntimeError("fastvae.fit: the module's forward did not run its sampling as on the first batch (is it in eval mode?)")
            mu, logvar = state.slots["mu"], state.logvar()
        rec = at(out, self.output.path)
        if self.likelihood == "bernoulli":
            if not isinstance(rec, DecoderOutput) or rec._fastvae_logits is None:
                raise RuntimeError("fastvae.fit: the decoder output did not carry its logits on this forward")
            rec = rec._fastvae_logits
        elif isinstance(rec, DecoderOutput):
            rec = rec.as_subclass(torch.Tensor)
        b = flat.shape[0]
        return rec.reshape(b, -1), mu.reshape(b, -1), logvar.reshape(b, -1).to(mu.dtype)

    def loss_terms(self, x: torch.Tensor, beta: float = 1.0, reduction: str = "sum", **condition: torch.Tensor) -> LossTerms:
        flat = self.flatten(x)
        out, mu, logvar = self._forward(flat, condition)
        return loss_terms(out, self.target(x, flat), mu, logvar, beta=beta, reduction=reduction, likelihood=self.likelihood, backend=self.backend)

    def posterior(self, flat: torch.Tensor, **condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar); runs the whole forward of the module (its decoder too)."""
        _, mu, logvar = self._forward(flat, condition)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """Decoder logits (means) for z; runs the module's forward on a blank input with z in place of its sample."""
        state: Dropin = self.module._fastvae_dropin
        blank = torch.zeros(z.shape[0], self.input_dim, device=z.device, dtype=self.dtype)
        state.z_override = lambda mu, logvar: z.reshape(mu.shape).to(mu.dtype)
        try:
            return self._forward(blank, condition)[0]
        finally:
            state.z_override = None

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, out_dtype: torch.dtype = torch.float32, **condition: torch.Tensor) -> torch.Tensor:
        """n samples from the prior: (n, input_dim) probabilities / means, or uint8 pixels."""
        z = self.prior(n, self.latent_dim, seed)
        return self.to_output(self.decode_logits(z, **condition), out_dtype, self.likelihood == "bernoulli")


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *, epochs: int = 10, batch_size: int = 128,
        lr: float = 1e-3, beta: float = 1.0, likelihood: str | None = None, device: str | torch.device | None = "auto",
        out_dir: str | os.PathLike | None = None, callbacks: Sequence[Any] | None = None, **config: Any) -> list[dict[str, float]]:
    """Train a user's own VAE module with fastvae's engine; returns the per-epoch history.

    images: (N, ...) uint8 pixels (read as x / 255) or floats, each sample shaped as the module's
    forward takes it; or a shard set (``fastvae.data.open``), a map-style ``torch.utils.data.Dataset``
    or a ``DataLoader`` (see ``fastvae.Trainer``; their labels are not passed to the module);
    labels: with a tensor, passed as forward(x, labels) when given. The objective is the
    negative ELBO summed over the batch (``likelihood`` as in ``DropinModel``), optimised with
    Adam(lr); further ``fastvae.TrainConfig`` fields go in ``config`` (``logger="tensorboard"``
    with ``out_dir``); ``callbacks`` as in ``fastvae.Trainer`` (``fastvae.callbacks``). The module
    is trained in place and ends on ``device``.
    """
    from ..stream import head
    from ..trainer import TrainConfig, Trainer

    if isinstance(images, torch.Tensor) and images.dim() < 2:
        raise TypeError(f"images must be a tensor (N, ...) of samples, got shape {tuple(images.shape)}")
    if config.get("objective", "elbo") != "elbo":
        raise ValueError("fastvae.fit trains the ELBO only (objective='elbo'); IWAE needs fastvae's own models")
    _checks.positive_int("batch_size", batch_size)
    if labels is not None and not isinstance(images, torch.Tensor):
        raise ValueError("labels= goes with a tensor of images; pass a tensor to train a conditional module")
    param = next(model.parameters())
    first = head(images, batch_size)[0].to(param.device) if not isinstance(images, torch.Tensor) else images[:batch_size].to(param.device)
    example = first.to(param.dtype) / 255.0 if first.dtype == torch.uint8 else first.to(param.dtype)
    first_labels = labels[:batch_size].to(param.device) if labels is not None else None
    adapter = DropinModel(model, tuple(first.shape[1:]), likelihood=likelihood, conditional=labels is not None,
                          example=example, labels=first_labels)
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, beta=beta, **config)
    return Trainer(adapter, images, train, device=device, out_dir=out_dir, labels=labels, callbacks=callbacks).fit()
