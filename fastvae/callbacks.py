"""Callbacks: the one way out of ``Trainer.fit`` (metrics.jsonl, TensorBoard, pictures, your own code).

The protocol: subclass ``Callback`` and override what you need (or write any object with some of
these methods); pass them as ``Trainer(..., callbacks=[...])``. Each hook gets the Trainer
(``trainer.model``, ``.config``, ``.out_dir``, ``.epoch``, ``.step``, ``.history``):

    on_run_start(trainer)                  fit() begins (after a resume: at the resumed step)
    on_log(trainer, record)                every log_every steps and at each epoch's end
                                           (record["event"] == "epoch"); the values are Python
                                           numbers the Trainer has already read from the device,
                                           so a callback adds no host sync
    on_epoch_end(trainer, record, model)   an epoch ended and its checkpoint is written
    on_run_end(trainer, status)            "finished", "interrupted" (Ctrl-C) or "failed"

To end a run early, a hook sets ``trainer.should_stop = True``: training stops after the current
epoch (its checkpoint written) and the run ends as "finished"; a resume continues it.
A callback that raises stops the run with a ``CallbackError`` naming it and the hook; the
checkpoint of the last finished epoch stays (none is written after the failure). Callbacks run
in every process under torchrun (the writers below only on rank 0, where ``out_dir`` is set).

Built in: ``JSONLWriter`` (metrics.jsonl, always, when the Trainer has an out_dir),
``TensorBoard`` (``TrainConfig(logger="tensorboard")`` / ``fastvae train --logger tensorboard``)
and ``Pictures`` (the PNGs ``fastvae.train`` writes at the end).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from . import plots
from ._extras import need
from .checkpoint import FILENAME as CHECKPOINT

METRICS = "metrics.jsonl"
HOOKS = ("on_run_start", "on_log", "on_epoch_end", "on_run_end")
STATUSES = ("finished", "interrupted", "failed")


class Run(Protocol):
    """What a callback may read of the Trainer it is given (``fastvae.Trainer`` is one; described here rather
    than imported: trainer.py imports this module), and ``should_stop``, the one thing it may set."""

    model: nn.Module
    config: Any  # the TrainConfig
    device: torch.device
    out_dir: Path | None
    data: torch.Tensor | None  # the training inputs (N, input_dim) on the device, where held as one tensor
    labels: torch.Tensor | None
    sample_shape: tuple[int, ...] | None  # one input's shape as given
    epoch: int  # epochs finished
    step: int  # steps taken
    history: list[dict[str, float]]
    should_stop: bool


class Callback:
    """Base class of Trainer callbacks: every hook does nothing; override those you need (see the module docstring)."""

    def on_run_start(self, trainer: Run) -> None:
        pass

    def on_log(self, trainer: Run, record: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, trainer: Run, record: dict[str, float], model: nn.Module) -> None:
        pass

    def on_run_end(self, trainer: Run, status: str) -> None:
        pass


class CallbackError(RuntimeError):
    """A callback raised: the run stopped. `callback` is the object, `hook` the method that raised."""

    def __init__(self, message: str, callback: Any, hook: str) -> None:
        super().__init__(message)
        self.callback, self.hook = callback, hook


def name_of(callback: Any) -> str:
    return getattr(callback, "name", None) or type(callback).__name__


def check(callbacks: Sequence[Any] | None) -> list[Any]:
    """The callbacks as a list; refuses what has none of the hooks (a bare function, say), naming it."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence):
        raise TypeError(f"callbacks must be a list of callback objects, got {type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise TypeError(f"callbacks[{i}] ({name_of(cb)}) has none of the hooks {', '.join(HOOKS)}; "
                            "subclass fastvae.callbacks.Callback and override the ones you need")
    return list(callbacks)


class Dispatch:
    """Calls one hook on every callback in order; the first that raises stops the run (CallbackError)."""

    def __init__(self, trainer: Run, callbacks: Sequence[Any]) -> None:
        self.trainer, self.callbacks = trainer, list(callbacks)

    def __call__(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            try:
                method(self.trainer, *args)
            except Exception as exc:
                raise CallbackError(self._message(cb, hook, exc), cb, hook) from exc

    def end(self, status: str) -> None:
        """on_run_end for every callback, even after one raised; after a failure or Ctrl-C their errors only warn
        (the run's own error is the one to see)."""
        first = None
        for cb in self.callbacks:
            method = getattr(cb, "on_run_end", None)
            if method is None:
                continue
            try:
                method(self.trainer, status)
            except Exception as exc:
                if status != "finished":
                    warnings.warn(f"while the run stopped ({status}): {self._message(cb, 'on_run_end', exc)}", RuntimeWarning, stacklevel=3)
                elif first is None:
                    first = CallbackError(self._message(cb, "on_run_end", exc), cb, "on_run_end")
                    first.__cause__ = exc
        if first is not None:
            raise first

    def _message(self, cb: Any, hook: str, exc: Exception) -> str:
        t = self.trainer
        where = f"at step {t.step}, epoch {t.epoch + 1}" if hook != "on_epoch_end" else f"after epoch {t.epoch}"
        if t.out_dir is None:
            kept = "no checkpoint is written (the Trainer has no out_dir)"
        elif t.epoch > 0 and (t.out_dir / CHECKPOINT).is_file():
            kept = f"{t.out_dir / CHECKPOINT} holds epoch {t.epoch}, the last one finished: resume from it"
        else:
            kept = "no epoch finished, so there is no checkpoint yet"
        return f"callback {name_of(cb)} raised in {hook} {where}, so the run stopped ({type(exc).__name__}: {exc}); {kept}"


class EpochFunction(Callback):
    """``fit(on_epoch=f)``: f(record) as each epoch ends."""

    def __init__(self, function: Callable[[dict[str, float]], None]) -> None:
        self.function = function
        self.name = f"on_epoch={getattr(function, '__qualname__', repr(function))}"

    def on_epoch_end(self, trainer: Run, record: dict[str, float], model: nn.Module) -> None:
        self.function(record)


class JSONLWriter(Callback):
    """metrics.jsonl in the run folder: one JSON line per logging step and per epoch, appended as they come.

    On a resumed run, lines past the checkpoint's step (written by a run killed after its last
    checkpoint) are dropped first, so every step appears once."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def on_run_start(self, trainer: Run) -> None:
        if self.path is None and trainer.out_dir is None:
            raise ValueError("JSONLWriter() writes the run folder's metrics.jsonl: give the Trainer an out_dir, or JSONLWriter(path)")
        self.path = self.path or trainer.out_dir / METRICS
        trim(self.path, trainer.step)

    def on_log(self, trainer: Run, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def trim(path: Path, step: int) -> None:
    """Drop the records of `path` past `step` (atomically: temp file and rename)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class TensorBoard(Callback):
    """TensorBoard event files in the run folder (``tensorboard --logdir runs``), via torch.utils.tensorboard.

    Scalars: every number of each metrics.jsonl record, as train/<key> at the logging steps (loss,
    recon and kl per sample, beta, lr, samples_per_s) and epoch/<key> at each epoch's end; images
    at each epoch's end: "reconstructions" (the first `n_images` training inputs, each row above its
    reconstructions) and "samples" (`n_images` * 2 prior draws, seed 0; a conditional model one class
    per column); the run's hyper-parameters (TrainConfig and model config) under HPARAMS and as text.
    The x axis is the training step. The writer's thread writes to disk, at the latest every `flush_secs`. The images use the posterior mean and seeded draws, so they
    take nothing from the training RNG: a run logs the same losses with and without this callback.
    A resumed run hides what a killed run logged past the checkpoint (SummaryWriter's purge_step).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, n_images: int = 32, flush_secs: int = 30) -> None:
        self._tb = need("torch.utils.tensorboard", "the TensorBoard logger (--logger tensorboard)", package="tensorboard")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.n_images, self.flush_secs = n_images, flush_secs
        self.writer = None
        self._images: Callable[..., torch.Tensor] | None = None

    def on_run_start(self, trainer: Run) -> None:
        log_dir = self.log_dir or trainer.out_dir
        if log_dir is None:
            raise ValueError("the TensorBoard logger writes into the run folder: give the Trainer an out_dir (or TensorBoard(log_dir=...))")
        self.writer = self._tb.SummaryWriter(str(log_dir), purge_step=trainer.step + 1 if trainer.step else None, flush_secs=self.flush_secs)
        self._images = image_layout(trainer)  # None: the samples are not images
        self._hparams(trainer)

    def _hparams(self, trainer: Run) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = hyperparameters(trainer)
        for summary in hparams(values, {"epoch/loss": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(values, indent=2) + "\n```", trainer.step)

    def on_log(self, trainer: Run, record: dict[str, Any]) -> None:
        prefix = "epoch" if record.get("event") == "epoch" else "train"
        for key, value in record.items():
            if key not in ("step", "epoch", "event") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def on_epoch_end(self, trainer: Run, record: dict[str, float], model: nn.Module) -> None:
        if self._images is None:
            return
        try:
            pictures = epoch_pictures(trainer, model, self.n_images)
        except RuntimeError as exc:  # a user's module (fastvae.fit) that cannot decode outside its training forward
            self._images = None
            warnings.warn(f"TensorBoard: no images from this model ({exc}); the scalars are logged", RuntimeWarning, stacklevel=2)
            return
        for tag, (rows, columns) in pictures.items():
            self._add_png(tag, self._images(rows, columns), trainer.step)

    def _add_png(self, tag: str, picture: torch.Tensor, step: int) -> None:
        """An image summary of a (C, H, W) uint8 picture, PNG-encoded at zlib level 1 (lossless like any level):
        SummaryWriter.add_image also resamples the picture and encodes at level 6, several times slower here."""
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        c, h, w = picture.shape
        pixels = picture[0].numpy() if c == 1 else picture.permute(1, 2, 0).contiguous().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L" if c == 1 else "RGB").save(buffer, format="PNG", compress_level=1)
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def on_run_end(self, trainer: Run, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def hyperparameters(trainer: Run) -> dict[str, Any]:
    """TrainConfig and the model's config() in TensorBoard's types (numbers, strings, bools)."""
    train = {k: v for k, v in asdict(trainer.config).items() if k not in ("progress", "extra")}
    model = getattr(trainer.model, "config", dict)()
    values = {**{f"model.{k}": v for k, v in model.items()}, **train, **{f"extra.{k}": v for k, v in trainer.config.extra.items()}}
    values.setdefault("model.model", getattr(trainer.model, "name", type(trainer.model).__name__))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def image_layout(trainer: Run) -> Callable[..., torch.Tensor] | None:
    """A function (rows (N, D) uint8, columns) -> (C, H', W') uint8 picture of the rows as a grid, for the
    model's sample shape: (C, H, W) or (H, W, C) with C 1 or 3, (H, W), or a square D; None otherwise."""
    model = trainer.model
    shape = getattr(model, "image_shape", None) or getattr(model, "input_shape", None) or getattr(trainer, "sample_shape", None)
    d = model.input_dim
    shape = tuple(int(s) for s in shape) if shape is not None else (d,)
    if math.prod(shape) != d:
        return None
    channels_last = False
    if len(shape) == 1 and math.isqrt(d) ** 2 == d:
        shape = (1, math.isqrt(d), math.isqrt(d))
    elif len(shape) == 2:
        shape = (1, *shape)
    elif len(shape) == 3 and shape[0] not in (1, 3) and shape[2] in (1, 3):
        shape, channels_last = (shape[2], shape[0], shape[1]), True
    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    c, h, w = shape

    def picture(rows: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        rows = rows.cpu().reshape(rows.shape[0], h * w, c).transpose(1, 2) if channels_last else rows.cpu().reshape(rows.shape[0], c, h * w)
        return torch.stack([plots.grid(rows[:, i].contiguous(), (h, w), columns=columns) for i in range(c)])

    return picture


def first_inputs(trainer: Run, n: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The first n training inputs (N, D) and their labels (or None), on the device, for pictures; read
    from a streamed source (``fastvae.stream.Streamed.head``) where the Trainer holds no data tensor;
    None from a DataLoader."""
    data = getattr(trainer, "data", None)
    if data is None:
        head = getattr(getattr(trainer, "source", None), "head", None)
        return head(n) if head is not None else None
    return data[:n], (trainer.labels[:n] if trainer.labels is not None else None)


@torch.no_grad()
def epoch_pictures(trainer: Run, model: nn.Module, n: int) -> dict[str, tuple[torch.Tensor, int | None]]:
    """{"reconstructions": (originals above reconstructions as uint8 rows, 8 columns), "samples": (2n prior
    samples as uint8 rows, columns)}, made in eval mode (batch-norm statistics untouched), the mode restored."""
    was_training = model.training
    model.eval()
    pictures = {}
    try:
        inputs = first_inputs(trainer, n)
        if inputs is not None:
            rows, labels = inputs
            condition = {"labels": labels} if labels is not None else {}
            originals = plots.to_pixels(rows if rows.dtype == torch.uint8 else rows.to(model.dtype)).cpu()
            pictures["reconstructions"] = (plots.above(originals, plots.to_pixels(model.reconstruct(rows, **condition)).cpu(), 8), 8)
        columns, extra = None, {}
        if getattr(model, "conditional", False):
            if hasattr(model, "num_classes"):  # the model draws classes 0, 1, ... in turn: one class per column
                columns = model.num_classes
            else:  # a user's conditional module: the training set's first labels
                first = first_inputs(trainer, 2 * n)
                extra = {"labels": first[1]} if first is not None and first[1] is not None else None
        if extra is not None:
            count = extra["labels"].shape[0] if extra else 2 * n
            pictures["samples"] = (model.sample(count, seed=0, out_dtype=torch.uint8, **extra).cpu(), columns)
    finally:
        model.train(was_training)
    return pictures


class Pictures(Callback):
    """The PNGs of a finished run, in the run folder: reconstructions.png (the first 32 `images`, each
    row above its reconstructions), samples.png (a conditional model: one class per column),
    loss.png (from metrics.jsonl) and latent_map.png for an MLP VAE with a 2-D latent space.
    `image_shape` (H, W) of grey images or (C, H, W) (None: no pictures); `caption(history)` titles them and
    `ylabel` labels the loss curve. Nothing is drawn after a failed or interrupted run."""

    def __init__(self, images: torch.Tensor, image_shape: tuple[int, ...] | None, *, labels: torch.Tensor | None = None,
                 caption: Callable[[Sequence[dict[str, float]]], str] | None = None, ylabel: str = "loss per sample") -> None:
        self.images, self.image_shape, self.labels = images, image_shape, labels
        self.caption = caption or (lambda history: f"epoch {history[-1]['epoch']}, loss {history[-1]['loss']:.2f} per sample" if history else "untrained")
        self.ylabel = ylabel

    def on_run_end(self, trainer: Run, status: str) -> None:
        if status != "finished" or trainer.out_dir is None or self.image_shape is None:
            return
        from .apps import latent_map
        from .model import VAE

        model, out_dir, caption = trainer.model, trainer.out_dir, self.caption(trainer.history)
        condition = {"labels": self.labels[:32]} if self.labels is not None else {}
        plots.write_reconstructions(model, self.images[:32], self.image_shape, out_dir / "reconstructions.png", caption, **condition)
        n = 8 * model.num_classes if getattr(model, "conditional", False) else 64
        plots.write_samples(model, out_dir / "samples.png", n, self.image_shape, caption)
        if (out_dir / METRICS).exists():
            plots.loss_curve(out_dir / METRICS, out_dir / "loss.png", ylabel=self.ylabel)
        h, w = self.image_shape[-2:]
        if isinstance(model, VAE) and model.latent_dim == 2 and h * w == model.input_dim and h == w:
            latent_map(model, out_dir / "latent_map.png", title=f"the 2-D latent space decoded\n{caption}")


LOGGERS = ("jsonl", "tensorboard")


def standard(trainer: Run) -> list[Callback]:
    """The writers a Trainer with an out_dir gets from its config: metrics.jsonl always, TensorBoard with logger="tensorboard"."""
    if trainer.out_dir is None:
        return []
    writers: list[Callback] = [JSONLWriter()]
    if trainer.config.logger == "tensorboard":
        writers.append(TensorBoard())
    return writers
