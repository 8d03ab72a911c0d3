"""The hand-written training step of fastvae.VAE's MLP: forward, loss, backward and Adam, no autograd.

Autograd's bookkeeping (a node per op, saved tensors, gradient accumulation) and Adam's
per-parameter loop cost about as much as the small ops themselves at the reference size. This
step calls the matrix products and the fused kernels directly, on buffers allocated once per
batch size, and writes every gradient straight into the optimizer's flat gradient buffer
(``fastvae.arena.FlatAdam``), whose update is then one fused call:

    forward   x (uint8)  -> x / 255 in float (one pass; the C++ op folds the 1/255 into the first product)
              h = relu(x W1^T + b1) ...          one addmm + ReLU (torch._addmm_activation) per layer
              [mu | logvar] = h [Wmu; Wlogvar]^T + [bmu; blogvar]   one product: the heads are stored
                                                 back to back in the arena (state_dict names unchanged)
              z = mu + exp(logvar / 2) eps       fused reparam kernel (eps drawn in the kernel)
              logits = relu(z V1^T + c1) ... Vn^T + cn
              recon rows, KL rows, dlogits       fused loss kernel (one pass)
    backward  dVn = dlogits^T h, dcn = column sums, dh = dlogits Vn, ReLU mask + bias gradient
              (fastvae.ops.bias_grad: one pass) ... dz -> d[mu | logvar] (reparam backward, with
              beta * the KL gradient), the heads' and encoder's products likewise
    update    FlatAdam.flat_step: one fused Adam over all parameters

On the CPU the whole step, Adam included, is one C++ op (``torch.ops.fastvae.mlp_step``, the
cpp backend's "mlp_step", csrc/cpu/mlp_step.cpp): one call from Python per step instead of forty,
the products straight to the BLAS, and each layer's Adam update run as soon as its gradients are
final (its parameters still in cache). The Trainer calls nothing else per step: the op gathers the
batch's rows from the resident data, draws the sample's seed from torch's generator (as
``new_seed`` does) and adds the loss terms to the Trainer's running sums (each small torch op
between two steps costs tens of microseconds on a 2-core CPU, where the products have just
evicted the interpreter's data from the caches). Elsewhere it runs as the PyTorch calls above, which is
also what a CUDA graph captures (fastvae.graphs): 25 kernel launches for the reference model
(tests/test_graphs.py counts them, and models the bytes the kernels other than the products move).

It covers fastvae.VAE (any hidden_dims, Bernoulli or Gaussian) trained on the ELBO with fused
kernels active (not backend="torch"), float32 or float64, no autocast, one process; ``unsupported``
says why not otherwise, and the Trainer then runs the autograd step (the reference). Both compute
the same values and gradients (tests/test_mlp_step.py compares them in float64).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from . import _checks
from .arena import FlatAdam
from .backends import pick
from .ops import bias_grad
from .ops.loss import LossTerms, add_terms
from .ops.reparam import new_seed


def layout(model: nn.Module) -> list[list[nn.Parameter]]:
    """FlatAdam's layout for `model`: a fastvae.VAE's mu and logvar heads back to back (weights, then biases)."""
    enc = getattr(model, "encoder", None)
    if not (hasattr(enc, "fc_mu") and hasattr(enc, "fc_logvar")):
        return []
    return [[enc.fc_mu.weight, enc.fc_logvar.weight], [enc.fc_mu.bias, enc.fc_logvar.bias]]


def make_optimizer(model: nn.Module, lr: float, *, flat: bool = True) -> torch.optim.Optimizer:
    """FlatAdam over the model's parameters where it can hold them (and `flat`) and the model uses every one of them at
    every step (``uses_every_parameter``, fastvae's own models), else torch.optim.Adam (fused where offered). FlatAdam
    updates a parameter that got no gradient with a zero one (its moments still move it); torch.optim.Adam skips it,
    and that is what a user's module trained through fastvae.fit gets."""
    params = list(model.parameters())
    if flat and getattr(model, "uses_every_parameter", False):
        try:
            return FlatAdam(params, lr, layout=layout(model))
        except ValueError:
            pass
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@contextlib.contextmanager
def packed(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """A FlatAdam's arena packed within (the Trainer's fit), every parameter in its own storage again after."""
    if not isinstance(optimizer, FlatAdam):
        yield
        return
    optimizer.pack()
    try:
        yield
    finally:
        optimizer.unpack()


class Run(Protocol):
    """What ``engine`` reads of a training run (fastvae.Trainer has it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    labels: torch.Tensor | None
    shard: object | None
    config: Any


HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
METHODS = ("forward", "loss_terms", "posterior", "decode_logits", "train_logits", "flatten", "target")


def _as_built(model: nn.Module) -> str | None:
    """Why `model` may compute something other than fastvae.VAE's own forward and loss (a subclass, other
    modules, hooks, a replaced method), or None: the hand-written step must never bypass what a user added."""
    from .model import VAE, MLPDecoder, MLPEncoder

    plain = (VAE, MLPEncoder, MLPDecoder, nn.Linear)
    if type(model) is not VAE:
        return f"{type(model).__name__} is not fastvae.VAE"
    for m in model.modules():
        if type(m) not in plain:
            return f"it holds a {type(m).__name__}"
        if any(getattr(m, h, None) for h in HOOKS) or any(name in m.__dict__ for name in METHODS):
            return f"its {type(m).__name__} has hooks or a replaced method"
    registry = nn.modules.module
    if any(getattr(registry, f"_global{h}", None) for h in HOOKS):
        return "global module hooks are registered"
    if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()):
        return "a parameter has hooks"
    return None


def unsupported(run: Run) -> str | None:
    """Why the hand-written step cannot train `run`'s model, or None."""
    model, c = run.model, run.config
    why = _as_built(model)
    if why is not None:
        return why
    if c.objective != "elbo" or c.amp or run.shard is not None or run.labels is not None:
        return "it trains the ELBO in one process without autocast"
    opt = run.optimizer
    if not isinstance(opt, FlatAdam) or not opt._packed or opt.param_groups[0]["amsgrad"] or opt.param_groups[0]["maximize"]:
        return "the optimizer is not a packed FlatAdam"
    probe = torch.empty(1, 1, dtype=model.dtype, device=opt.flat.device)
    for op, args in (("reparam", 2), ("loss", 4)):
        name, impl = pick(op, model.backend, *[probe] * args)
        if impl is None:
            return f"the {op} op runs on {name}"
    return None


def engine(run: Run) -> MLPStep | None:
    """The hand-written step for `run`, or None (the Trainer then runs the autograd step)."""
    return MLPStep(run.model, run.optimizer) if unsupported(run) is None else None  # type: ignore[arg-type]


@dataclass
class _Workspace:
    """The buffers of one batch size (the Python-call step; the C++ op allocates its own)."""

    x: torch.Tensor  # float copy of a uint8 batch
    enc: list[torch.Tensor]  # encoder hidden activations (after ReLU)
    heads: torch.Tensor  # (B, 2L): [mu | logvar] as the heads' product writes them
    latent: torch.Tensor  # (2, B, L): mu and logvar, each contiguous, for the kernels
    dec: list[torch.Tensor]  # decoder hidden activations, then the logits
    d_enc: list[torch.Tensor]  # gradients of the encoder's hidden activations
    d_heads: torch.Tensor  # (B, 2L)
    d_dec: list[torch.Tensor]  # gradient of z, then of the decoder's hidden activations
    rows: torch.Tensor  # (2B,): the loss kernel's recon rows, then its KL rows
    stats: torch.Tensor  # (3,): [loss, recon, kl] summed over the batch
    beta_rows: torch.Tensor  # (B,): beta per row, the KL weight the reparam backward applies
    weigh: torch.Tensor  # (3, 2B): stats = weigh @ rows
    beta_t: torch.Tensor  # 0-dim float64: beta as the loss kernel reads it from memory (CUDA graphs)
    beta: float | None = None  # the value these buffers hold


class MLPStep:
    """Training steps of a fastvae.VAE whose optimizer is a packed FlatAdam (see the module docstring).

    ``step(x, beta)`` trains on the batch x; it returns its LossTerms (sums over the batch, detached)
    in buffers the next step overwrites: consume them first (or pass ``window=`` to have them added up).
    """

    def __init__(self, model: nn.Module, optimizer: FlatAdam) -> None:
        enc, dec = model.encoder, model.decoder
        self.model, self.optimizer = model, optimizer
        self.likelihood, self.latent_dim = model.likelihood, model.latent_dim
        self.enc = [getattr(enc, f"fc{i + 1}") for i in range(enc.depth)]
        self.dec = dec.linears()
        heads_w, heads_b = (enc.fc_mu.weight, enc.fc_logvar.weight), (enc.fc_mu.bias, enc.fc_logvar.bias)
        width = enc.fc_mu.in_features
        self.w_heads, self.b_heads = optimizer.joint(*heads_w).view(-1, width), optimizer.joint(*heads_b)
        self.gw_heads, self.gb_heads = optimizer.joint(*heads_w, grad=True).view(-1, width), optimizer.joint(*heads_b, grad=True)
        self.grad = {id(p): optimizer.grad_view(p) for p in model.parameters()}
        probe = torch.empty(1, 1, dtype=self.w_heads.dtype, device=self.w_heads.device)
        self._reparam = pick("reparam", model.backend, probe, probe)[1]
        self._loss = pick("loss", model.backend, probe, probe, probe, probe)[1]
        self._bias_grad = bias_grad.implementation(model.backend, probe)
        self._whole = pick("mlp_step", model.backend, probe)[1]  # the whole step as one op (the cpp backend)
        at = optimizer._offsets
        linears = [*self.enc, enc.fc_mu, *self.dec]  # fc_mu's offsets start the heads (fc_logvar follows it)
        rows = [2 * self.latent_dim if m is enc.fc_mu else m.out_features for m in linears]
        self._layout = [v for m, r in zip(linears, rows) for v in (r, m.in_features, at[id(m.weight)], at[id(m.bias)])]
        self._buffers = (optimizer.flat, optimizer.flat_grad, optimizer.exp_avg, optimizer.exp_avg_sq)
        self._spaces: dict[int, _Workspace] = {}
        self._stats = torch.empty(3, dtype=probe.dtype, device=probe.device)  # the C++ op's [loss, recon, kl]
        self._terms = LossTerms(self._stats[0], self._stats[1], self._stats[2])
        self._255 = torch.tensor(255.0, dtype=probe.dtype, device=probe.device)  # 0-dim: the division runs in the parameters' dtype

    def space(self, batch: int) -> _Workspace:
        """The buffers of this batch size (allocated on first use; a CUDA graph keeps using them)."""
        ws = self._spaces.get(batch)
        if ws is None:
            kw: dict[str, Any] = {"dtype": self.w_heads.dtype, "device": self.w_heads.device}
            L = self.latent_dim
            enc = [torch.empty(batch, m.out_features, **kw) for m in self.enc]
            dec = [torch.empty(batch, m.out_features, **kw) for m in self.dec]
            ws = self._spaces[batch] = _Workspace(
                x=torch.empty(batch, self.model.input_dim, **kw), enc=enc, heads=torch.empty(batch, 2 * L, **kw),
                latent=torch.empty(2, batch, L, **kw), dec=dec, d_enc=[torch.empty_like(t) for t in enc],
                d_heads=torch.empty(batch, 2 * L, **kw), d_dec=[torch.empty(batch, L, **kw)] + [torch.empty_like(t) for t in dec[:-1]],
                rows=torch.empty(2 * batch, **kw), stats=torch.empty(3, **kw), beta_rows=torch.empty(batch, **kw),
                weigh=torch.zeros(3, 2 * batch, **kw), beta_t=torch.empty((), dtype=torch.float64, device=kw["device"]))
            ws.weigh[0, :batch] = 1
            ws.weigh[1, :batch] = 1
            ws.weigh[2, batch:] = 1
        return ws

    def set_beta(self, batch: int, beta: float) -> torch.Tensor:
        """Put the KL weight of the coming steps of this batch size into their device buffers (outside a CUDA
        graph capture: a few fills, and none when it did not change); returns it as the 0-dim tensor to pass."""
        ws = self.space(batch)
        if ws.beta != beta:
            ws.beta_rows.fill_(beta)
            ws.weigh[0, batch:] = beta
            ws.beta_t.fill_(beta)
            ws.beta = beta
        return ws.beta_t

    def step(self, x: torch.Tensor, beta: float, seed: int | None = None, *, rows: torch.Tensor | None = None,
             window: torch.Tensor | None = None) -> LossTerms:
        """One training step on the batch `x` ((B, input_dim), uint8 or the parameters' dtype), the update included.

        rows: train on x's rows `rows` instead (x: the whole resident data set; the C++ op gathers them).
        window: a float64 (3,) tensor to which [loss, recon, kl] are added (the Trainer's running sums).
        """
        if rows is not None and (self._whole is None or not self._readable(x)):
            x, rows = torch.index_select(x, 0, rows), None
        if self._whole is not None:  # no autograd to turn off: the op records nothing
            g = self.optimizer.param_groups[0]
            return self._one_op(x, rows, beta, seed, (g["lr"], *g["betas"], g["eps"], g["weight_decay"]), window)
        with torch.no_grad():
            terms = self.calls(self._batch(x), beta, seed)
            self.optimizer.step_count += 1
            self.optimizer.flat_step()
            if window is not None:
                add_terms(window, terms)
        return terms

    def _readable(self, x: torch.Tensor) -> bool:
        """Whether the kernels read x as it is: (B, input_dim) contiguous, uint8 or the parameters' dtype."""
        return x.dim() == 2 and x.is_contiguous() and (x.dtype == torch.uint8 or x.dtype == self.w_heads.dtype)

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernels read it (else the model's own flatten, which raises the error the autograd step would)."""
        return x if self._readable(x) else self.model.flatten(x).contiguous()

    def _one_op(self, x: torch.Tensor, rows: torch.Tensor | None, beta: float, seed: int | None, adam: tuple[float, ...] | None,
                window: torch.Tensor | None = None) -> LossTerms:
        """The C++ op; the seed is drawn inside it (from torch's generator, as new_seed would) when not given."""
        self._whole.mlp_step(x if rows is not None else self._batch(x), rows, self._buffers, self.optimizer.step_count, self._layout,
                             len(self.enc), -1 if seed is None else new_seed(seed), beta, self.likelihood, adam,
                             _checks.flag_word(x.device), self._stats, window)
        return self._terms

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor, beta: float | torch.Tensor, seed: int | torch.Tensor | None = None) -> LossTerms:
        """The batch's loss terms; every gradient written into the optimizer's flat gradient buffer.

        beta: the KL weight, or the tensor ``set_beta`` returned (read from device memory: CUDA graphs).
        seed: the Philox seed of the sample (an int or 0-dim int64 device tensor; None: drawn from torch's generator).
        """
        if self._whole is not None and not isinstance(beta, torch.Tensor) and not isinstance(seed, torch.Tensor):
            return self._one_op(x, None, beta, seed, None)
        return self.calls(self._batch(x), beta, seed)

    @torch.no_grad()
    def calls(self, x: torch.Tensor, beta: float | torch.Tensor, seed: int | torch.Tensor | None = None) -> LossTerms:
        """forward_backward as PyTorch calls and the fused ops' kernels, on this batch size's buffers: any device,
        and what a CUDA graph captures (fastvae.graphs: beta as set_beta's tensor, seed a device tensor)."""
        B, L = x.shape[0], self.latent_dim
        ws = self.space(B)
        if not isinstance(beta, torch.Tensor):
            self.set_beta(B, beta)
        elif beta is not ws.beta_t:
            raise ValueError("a tensor beta must be the one set_beta returned for this batch size")
        flags = _checks.flag_word(x.device)
        # forward: `inputs` holds each encoder layer's input, then the heads'; `dec_in` each decoder layer's
        inputs = [torch.div(x, self._255, out=ws.x) if x.dtype == torch.uint8 else x]  # uint8 pixels read as x / 255 in one pass
        for layer, h in zip(self.enc, ws.enc):
            torch._addmm_activation(layer.bias, inputs[-1], layer.weight.t(), out=h)  # bias + ReLU in the product's epilogue on CUDA
            inputs.append(h)
        torch.addmm(self.b_heads, inputs[-1], self.w_heads.t(), out=ws.heads)
        ws.latent.copy_(ws.heads.view(B, 2, L).transpose(0, 1))
        mu, logvar = ws.latent[0], ws.latent[1]
        seed = new_seed(seed, like=mu, on_device=getattr(self._reparam, "tensor_seed", False))
        z = self._reparam.reparam_forward(mu, logvar, seed, 1, False, flags)[0]
        dec_in = [z[0]]
        for layer, h in zip(self.dec[:-1], ws.dec):
            torch._addmm_activation(layer.bias, dec_in[-1], layer.weight.t(), out=h)
            dec_in.append(h)
        top = self.dec[-1]
        logits = torch.addmm(top.bias, dec_in[-1], top.weight.t(), out=ws.dec[-1])
        recon, kl, g, _, _ = self._loss.loss_forward(logits, x, mu, logvar, beta, self.likelihood, True, 1.0, flags)
        torch.cat((recon, kl), out=ws.rows)
        torch.mv(ws.weigh, ws.rows, out=ws.stats)
        # backward: g is the gradient of a layer's pre-activation output
        self._bias_grad(g, None, self.grad[id(top.bias)])
        for i in range(len(self.dec) - 1, -1, -1):
            layer = self.dec[i]
            torch.mm(g.t(), dec_in[i], out=self.grad[id(layer.weight)])
            torch.mm(g, layer.weight, out=ws.d_dec[i])
            g = ws.d_dec[i]
            if i > 0:
                self._bias_grad(g, dec_in[i], self.grad[id(self.dec[i - 1].bias)])
        # g = d loss / d z; the reparam backward adds beta * d KL / d(mu, logvar) (grad_kl = beta per row)
        g_mu, g_logvar = self._reparam.reparam_backward(g.unsqueeze(0), ws.beta_rows, mu, logvar, z, seed, 1)
        torch.cat((g_mu, g_logvar), 1, out=ws.d_heads)
        g = ws.d_heads
        self._bias_grad(g, None, self.gb_heads)
        torch.mm(g.t(), inputs[-1], out=self.gw_heads)
        weight = self.w_heads
        for j in range(len(self.enc) - 1, -1, -1):
            torch.mm(g, weight, out=ws.d_enc[j])
            g, layer = ws.d_enc[j], self.enc[j]
            self._bias_grad(g, inputs[j + 1], self.grad[id(layer.bias)])
            torch.mm(g.t(), inputs[j], out=self.grad[id(layer.weight)])
            weight = layer.weight
        return LossTerms(ws.stats[0], ws.stats[1], ws.stats[2])
