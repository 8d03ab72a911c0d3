"""The training engine: device-resident uint8 data, on-device shuffling, fused loss, fused Adam.

Per step there is no per-sample Python and no host sync: the batch is gathered on the device
from the uint8 dataset by a shuffled index, the loss runs through the fused ops, and the
running sums are read back every ``log_every`` steps for the progress bar and the metrics.
Where the batches come from (resident, streamed from shards, a Dataset or a DataLoader) is
``fastvae.stream``'s concern: the Trainer asks its source for each epoch's batches.
What leaves the loop (metrics.jsonl, TensorBoard, pictures, users' code) goes through the
callbacks (fastvae.callbacks), at those logging steps and at the epochs' ends.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import _checks, _memory, callbacks as callbacks_, checkpoint, distributed, graphs, mlp_step, stream
from .iwae import iwae_terms
from .ops.loss import add_terms
from .schedules import SCHEDULES, kl_weight

CHECKPOINT = checkpoint.FILENAME
METRICS = callbacks_.METRICS


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; the defaults are the reference's (Adam 1e-3, batch 128, 10 epochs)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup: int = 0  # KL warm-up length: beta ramps linearly from 0 over this many steps or epochs
    warmup_unit: str = "steps"  # "steps" or "epochs"
    warmup_schedule: str = "linear"  # "linear" or "cyclical" (see fastvae.schedules)
    cycles: int = 4  # cyclical warm-up: number of cycles within the warm-up
    objective: str = "elbo"  # "elbo" or "iwae" (importance-weighted bound with k samples per input)
    k: int = 5  # samples per input for objective="iwae"
    seed: int | None = 0
    amp: bool = False  # bf16 autocast (CUDA only)
    tf32: bool = False  # TF32 matmuls (CUDA only)
    cuda_graph: bool | None = None  # replay the step as a CUDA graph (None: on for CUDA); see fastvae.graphs
    log_every: int = 50  # steps between reads of the running loss (host syncs)
    progress: bool = True
    check_finite: bool = False  # raise, naming the step, as soon as the loss is NaN/Inf (one sync per step)
    stream: bool | None = None  # None: stream the data when they take > half the device's free memory (fastvae.stream.decide); True/False force it
    prefetch: int = 4  # streaming: batches in flight (host buffers, and as many device buffers on CUDA)
    read_threads: int | None = None  # streaming: background threads gathering batches (None: 0 on CPU, 2 on CUDA; see fastvae.stream)
    logger: str = "jsonl"  # "tensorboard": TensorBoard event files in the run folder too (metrics.jsonl is always written)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, stored in checkpoints (dataset name, ...)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            _checks.positive_int(name, getattr(self, name))
        if self.read_threads is not None:
            _checks.positive_int("read_threads", self.read_threads, minimum=0)
        _checks.positive_int("prefetch", self.prefetch, minimum=2)
        if self.stream not in (None, True, False):
            raise ValueError(f"stream must be None (the rule), True or False, got {self.stream!r}")
        _checks.positive_int("warmup", self.warmup, minimum=0)
        _checks.positive_int("cycles", self.cycles)
        _checks.positive_int("k", self.k)
        if self.warmup_schedule not in SCHEDULES:
            raise ValueError(f"warmup_schedule must be one of {SCHEDULES}, got {self.warmup_schedule!r}")
        if self.objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {self.objective!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.warmup_unit not in ("steps", "epochs"):
            raise ValueError(f"warmup_unit must be 'steps' or 'epochs', got {self.warmup_unit!r}")
        if self.logger not in callbacks_.LOGGERS:
            raise ValueError(f"logger must be one of {callbacks_.LOGGERS} (metrics.jsonl is always written), got {self.logger!r}")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) is CUDA when present, else CPU; anything else is checked to exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible to torch; use device='cpu' or 'auto'")
    return dev


def prepare_labels(model: nn.Module, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Check the labels against the model (``model.conditional``) and the data set, once."""
    conditional = getattr(model, "conditional", False)
    if labels is None:
        if conditional:
            raise ValueError(f"{type(model).__name__} is conditional: pass labels=... (one per image) to the Trainer")
        return None
    if not conditional:
        raise ValueError(f"labels were given but {type(model).__name__} is not conditional; drop them or use fastvae.models.ConditionalVAE")
    model.condition(labels, n)  # validates dtype, shape and range
    return labels


class Trainer:
    """Trains a ``fastvae.VAE`` (or a fastvae.models variant) on a dataset held on the training device, or streamed to it.

    images: (N, ...) uint8 pixels (read as x/255) or floats; or a shard set (``fastvae.data.open``),
    a map-style ``torch.utils.data.Dataset`` (items: a tensor or (tensor, label)) or a ``DataLoader``
    (iterated as given; its batch size wins): see ``fastvae.stream``. out_dir: where checkpoint.pt,
    metrics.jsonl and the PNGs go (None: nothing is written). labels: one per image of a tensor, for
    conditional models (``model.conditional``), gathered with the same shuffled index.
    callbacks: objects with some of the hooks of ``fastvae.callbacks.Callback``, called after the
    built-in writers (metrics.jsonl when out_dir is set; TensorBoard with config.logger="tensorboard").
    A model with its own ``training_step(batch, optimizer, beta=...)`` (the AAE) makes its updates itself
    with the optimizer its ``make_optimizer(lr)`` returns.
    """

    def __init__(self, model: nn.Module, images: Any, config: TrainConfig | None = None, *,
                 device: str | torch.device | None = "auto", out_dir: str | os.PathLike | None = None,
                 labels: torch.Tensor | None = None, callbacks: Sequence[Any] | None = None) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        user_callbacks = callbacks_.check(callbacks)
        if self.config.logger != "jsonl" and out_dir is None:
            raise ValueError(f"logger={self.config.logger!r} writes into the run folder: pass out_dir=...")
        self.device = resolve_device(device)
        if self.config.amp and self.device.type != "cuda":
            raise ValueError("amp=True (bf16 autocast) needs a CUDA device; drop --amp or use device='cuda'")
        if self.config.tf32 and self.device.type != "cuda":
            raise ValueError("tf32=True needs a CUDA device; drop it or use device='cuda'")
        self.model = model.to(self.device)
        self._open(images, labels)
        if self.config.amp and hasattr(model, "training_step"):
            raise ValueError(f"amp=True is not supported for {type(model).__name__}, which makes its own updates (training_step); drop --amp")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        make_optimizer = getattr(model, "make_optimizer", None)  # models with their own training_step (AAE)
        self.optimizer = make_optimizer(self.config.lr) if make_optimizer else mlp_step.make_optimizer(self.model, self.config.lr, flat=not distributed.active())
        self.data_seed = self.config.seed if self.config.seed is not None else stream.random_seed()  # the batch order's
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        if self.config.objective == "iwae" and distributed.active():
            raise ValueError("objective='iwae' is not supported in multi-process training yet; use objective='elbo' or one process")
        if self.config.objective == "iwae" and getattr(model, "conditional", False):
            raise ValueError("objective='iwae' supports unconditional models only; use objective='elbo' for a conditional VAE")
        if distributed.active() and getattr(model, "name", "vae") != "vae":
            raise ValueError(f"multi-process training supports fastvae.VAE only, not {type(model).__name__}; run this model in one process")
        self.shard = distributed.Sharded(self.model, self.device, self.data_seed) if distributed.active() else None
        if self.shard is not None:
            self.data_seed = self.shard.data_seed  # rank 0's
        if not distributed.is_main():
            self.out_dir = None  # checkpoints and metrics come from rank 0 only
        self.callbacks = callbacks_.standard(self) + user_callbacks
        self.epoch = 0
        self.step = 0
        self.should_stop = False  # a callback sets it to end the run after the current epoch (early stopping)
        self.history: list[dict[str, float]] = []
        self._graph: graphs.GraphStep | None = None
        self._fused: mlp_step.MLPStep | None = None  # the hand-written step, where it covers the model

    def _open(self, images: Any, labels: torch.Tensor | None) -> None:
        """The batch source (fastvae.stream.source) for the data; self.data and self.labels hold resident data, else None."""
        c, model = self.config, self.model
        if isinstance(images, torch.Tensor) and (labels is not None or getattr(model, "conditional", False)):
            labels = prepare_labels(model, labels, images.shape[0] if images.dim() else 0)
        rank, world = distributed.rank_world()
        self.source = stream.source(images, input_dim=model.input_dim, likelihood=model.likelihood, batch_size=c.batch_size,
                                    device=self.device, stream=c.stream, labels=labels, conditional=getattr(model, "conditional", False),
                                    rank=rank, world=world, prefetch=c.prefetch, threads=c.read_threads)
        if self.source.steps is None:
            raise ValueError("the DataLoader has no len() (an IterableDataset?); fastvae needs the number of batches per epoch: "
                             "give the loader a map-style Dataset")
        size = getattr(self.source, "batch_size", None)
        if isinstance(self.source, stream.Loaded) and size is not None and size != c.batch_size:
            self.config = c = replace(c, batch_size=size)  # a DataLoader is used as given
        self.data, self.labels = self.source.data, self.source.labels

    @property
    def steps_per_epoch(self) -> int:
        return self.source.steps

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """One input's shape as given (a DataLoader's: known from its first batch)."""
        return self.source.sample_shape

    def beta_at(self, step: int) -> float:
        """KL weight at a step: linear or cyclical warm-up from 0 to beta, then beta."""
        c = self.config
        length = c.warmup * (self.steps_per_epoch if c.warmup_unit == "epochs" else 1)
        return kl_weight(step, c.beta, length, c.warmup_schedule, c.cycles)

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "config": self.model.config(),
                "train": {k: v for k, v in asdict(self.config).items()}, "epoch": self.epoch, "step": self.step,
                "history": self.history, "rng": rng, "data_seed": self.data_seed,
                "data": stream.describe_shape(self.sample_shape)}

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG states, schedule and position."""
        state = checkpoint.load(path, map_location=self.device)
        if self.sample_shape is not None:
            checkpoint.check_data(state, self.sample_shape, path, "the data given to the Trainer")
        checkpoint.check_config(state["config"], self.model.config(), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], self.device)
        if "data_seed" in state:  # older checkpoints: the order follows this run's seed
            self.data_seed = int(state["data_seed"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])

    def fit(self, on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train up to config.epochs; returns one dict per epoch (loss, recon, kl per sample, seconds).
        `on_epoch(record)` runs as each epoch ends, after its checkpoint is written and after the
        callbacks' on_epoch_end (the CLI prints it). A callback that raises stops the run (CallbackError)."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._emit = callbacks_.Dispatch(self, self.callbacks + ([callbacks_.EpochFunction(on_epoch)] if on_epoch else []))
        # The data was validated once (stream.prepare_data): no separate Python value passes per step. The fused kernels'
        # flags stay on (they cost nothing) and are read at every logging step (_check_values), on CPU too.
        self._checked_step = self.step
        _checks.clear_flags(self.device)  # only this run's steps are reported
        status, self.should_stop = "failed", False
        try:
            self._emit("on_run_start")
            with _checks.python_passes(False), _checks.deferred(), graphs.tf32(self.config.tf32), self.source.running(), \
                    mlp_step.packed(self.optimizer), _memory.heap_reuse(self.device):
                self._fused = mlp_step.engine(self)  # the hand-written step (after the arena is packed), or None
                self._graph = graphs.engine(self)
                while self.epoch < self.config.epochs and not self.should_stop:
                    self.history.append(self._epoch())
                    self.epoch += 1
                    if self.out_dir is not None:
                        checkpoint.save(self.state(), self.out_dir / CHECKPOINT)
                    self._emit("on_epoch_end", self.history[-1], self.model)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self._emit.end(status)
        return self.history

    def _epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        c = self.config
        model = self.model.train()
        custom_step = getattr(model, "training_step", None)  # models that make their own updates (AAE)
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        window = torch.zeros(3, device=self.device, dtype=torch.float64)
        seen, window_seen, t0 = 0, 0, time.perf_counter()
        t_window = t0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{c.epochs}", disable=not c.progress, leave=False)
        for i, batch in enumerate(self.source.batches(self.epoch, self.data_seed)):
            condition = {"labels": batch.labels} if batch.labels is not None else {}
            beta = self.beta_at(self.step)
            summed = False  # the step added its terms to window itself
            if self._graph is not None:
                terms = self._graph.step(batch.rows if batch.x is None else batch.x)  # the whole step, the update included (so checked after it)
            elif custom_step is not None:
                terms = custom_step(self.source.pixels(batch), self.optimizer, beta=beta, **condition)
            elif self._fused is not None:  # the update included; gathers the rows itself and adds its sums to window
                data, rows = self.source.step_input(batch)
                terms, summed = self._fused.step(data, beta, rows=rows, window=window), True
            else:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.amp):
                    terms, objective = self._objective(batch, beta, condition)
                self.optimizer.zero_grad(set_to_none=True)
                objective.backward()
            if c.check_finite and not bool(torch.isfinite(terms.loss)):
                raise FloatingPointError(f"the loss became {terms.loss.item()} at step {self.step} (epoch {self.epoch + 1}); lower lr, check the data, or resume from the last checkpoint")
            if custom_step is None and self._graph is None and self._fused is None:
                self.optimizer.step()
            if not summed:
                add_terms(window, terms)
            self.step += 1
            window_seen += batch.size
            if self.step % c.log_every == 0 or i == self.steps_per_epoch - 1:
                self._check_values()
                if self.shard is not None:
                    self.shard.all_reduce(window)
                sums += window
                values = (window / window_seen).tolist()
                now = time.perf_counter()
                self._log({"step": self.step, "epoch": self.epoch + 1, "loss": values[0], "recon": values[1], "kl": values[2],
                           "beta": self.beta_at(self.step - 1), "lr": self.lr, "samples_per_s": window_seen / max(now - t_window, 1e-9)})
                bar.set_postfix(loss=f"{values[0]:.2f}")
                seen, window_seen, t_window = seen + window_seen, 0, now
                window.zero_()
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        loss, recon, kl = (sums / seen).tolist()
        record = {"epoch": self.epoch + 1, "loss": loss, "recon": recon, "kl": kl, "seconds": seconds, "samples_per_s": seen / seconds}
        self._log({"event": "epoch", "step": self.step, **record})
        return record

    def _objective(self, batch: stream.Batch, beta: float, condition: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """(terms for the metrics, the tensor to differentiate) for a batch of the data."""
        x = self.source.pixels(batch)
        if self.shard is not None:
            return self.shard.loss_terms(x, batch.offset, beta)
        if self.config.objective == "iwae":
            terms = iwae_terms(self.model, x, self.config.k, beta=beta)
        else:
            terms = self.model.loss_terms(x, beta=beta, reduction="sum", **condition)
        return terms, terms.loss

    def _check_values(self) -> None:
        """Raise what the fused kernels flagged (NaN/Inf, logvar > 88) since the last check, naming the steps."""
        _checks.check_values(self.device, where=f"in steps {self._checked_step}..{self.step - 1} of epoch {self.epoch + 1}")
        self._checked_step = self.step

    @property
    def lr(self) -> float:
        """The learning rate now (the first parameter group's; config.lr for optimizers without groups)."""
        groups = getattr(self.optimizer, "param_groups", None)
        return float(groups[0]["lr"]) if groups else self.config.lr

    def _log(self, record: dict[str, Any]) -> None:
        """A logging step's (or an epoch's) record, its values already read from the device, to every callback."""
        self._emit("on_log", record)


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set torch's and (on CUDA) the device's RNG states from a checkpoint loaded onto `device` (the data
    order is a function of the checkpoint's data_seed and the epoch; an older checkpoint's "data" state is unused).

    Every ``set_state`` takes a CPU ByteTensor, whatever the generator's device: the states come back to the CPU.
    """
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
