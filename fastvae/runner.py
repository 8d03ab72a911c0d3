"""``fastvae.train``: data set -> model -> Trainer -> checkpoint, metrics and PNGs in one call."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import cache, checkpoint, distributed, models, stream
from . import data as datasets
from .backends import OPS, resolve
from .callbacks import Pictures
from .trainer import CHECKPOINT, METRICS, TrainConfig, Trainer


def default_out(dataset: str) -> Path:
    """runs/<dataset>-<date>-<time>: a new folder per run, so no earlier run is overwritten."""
    return Path("runs") / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class Objective:
    """What a run's logged numbers are, for its printed lines and picture titles: the loss is the
    -ELBO (recon + kl), the -IWAE_k bound (recon and kl then are diagnostics, not its terms), or an
    AAE's recon + adversarial loss; `weighted`: a beta or warm-up weights the second term."""

    model: str
    objective: str = "elbo"
    k: int = 1
    weighted: bool = False

    @classmethod
    def of(cls, model_name: str, train: dict[str, Any]) -> "Objective":
        """From a model name and TrainConfig fields (a checkpoint's "train")."""
        return cls(model_name, train.get("objective", "elbo"), int(train.get("k", 1)),
                   train.get("beta", 1.0) != 1.0 or train.get("warmup", 0) > 0)

    @property
    def label(self) -> str:
        if self.model == "aae":
            return "recon + adversarial loss"
        if self.objective == "iwae":
            return f"-IWAE_{self.k} bound"
        return "beta-weighted -ELBO" if self.weighted else "-ELBO"

    def terms(self, record: dict[str, float]) -> str:
        """'<label> L per sample (...)' for a metrics record with loss, recon and kl."""
        loss, recon, kl = record["loss"], record["recon"], record["kl"]
        beta = "beta x " if self.weighted else ""
        if self.model == "aae":
            detail = f"recon {recon:.2f} + {beta}adversarial {kl:.2f}"
        elif self.objective == "iwae":
            detail = f"diagnostics, not its terms: recon {recon:.2f} averaged over the {self.k} samples, analytic kl {kl:.2f}"
        else:
            detail = f"recon {recon:.2f} + {beta}kl {kl:.2f}"
        return f"{self.label} {loss:.2f} per sample ({detail})"

    def caption(self, history: Sequence[dict[str, float]]) -> str:
        """'epoch E, <label> L per sample' of the last epoch (picture titles)."""
        if not history:
            return "untrained"
        return f"epoch {history[-1]['epoch']}, {self.label} {history[-1]['loss']:.2f} per sample"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``fastvae.train``; everything written stays. `checkpoint` is the last one (None
    before the first epoch ended) and `checkpoint_epoch` the epoch it holds."""

    def __init__(self, out_dir: Path, epoch: int, step: int, checkpoint_path: Path | None, checkpoint_epoch: int) -> None:
        self.out_dir, self.epoch, self.step = out_dir, epoch, step
        self.checkpoint, self.checkpoint_epoch = checkpoint_path, checkpoint_epoch
        kept = (f"{checkpoint_path} holds epoch {checkpoint_epoch}" if checkpoint_path is not None
                else "no epoch finished, so there is no checkpoint yet")
        super().__init__(f"interrupted in epoch {epoch + 1} at step {step}; {kept}")


def train(
    dataset: str = "fashion-mnist",
    *,
    data: Any = None,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    resume: str | os.PathLike | None = None,
    limit: int | None = None,
    model: str | None = None,
    hidden_dims: Sequence[int] | None = None,
    latent_dim: int = 20,
    likelihood: str = "bernoulli",
    backend: str | None = None,
    callbacks: Sequence[Any] = (),
    **config: Any,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a VAE on a named data set and write checkpoint.pt, metrics.jsonl and PNGs to `out`.

    Prints a start-up line (data, device, backend per op, run folder) and one line per epoch as it
    ends. `data` is a shard folder or a shard set (``fastvae.data.open``), or an image folder, IDX or
    .npy file, which is prepared into a cache first (``fastvae.cache``, with `image_size` and
    `channels`); it replaces `dataset`. `limit` keeps the first N training images (quick runs);
    `model` is a name of fastvae.models.MODELS (None: vae for 28x28 grey images, else conv; cvae
    trains on the labels; hidden_dims=None: the model's default, (400,) for vae); `resume` is a
    checkpoint or its run folder; `download` fetches a missing data set (checksummed); other
    keywords are TrainConfig's (stream=True/False forces streaming; logger="tensorboard": TensorBoard event
    files in `out` too); `callbacks` go to the Trainer. Ctrl-C raises ``TrainingInterrupted``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of images, got {limit!r}")
    resume = checkpoint.locate(resume) if resume is not None else None
    main = distributed.is_main()
    if data is not None:
        train_set = data if stream.is_shardset(data) else cache.open_data(data, image_size=image_size, channels=channels,
                                                                          say=print if main else (lambda _: None), prepare=main)
        images = stream.first(train_set, limit) if limit else train_set
        labels, classes = None, len(train_set.label_names) if train_set.label_names else 1
        name = Path(train_set.path).name
        shape = tuple(train_set.shape)
    else:
        train_set = datasets.load(dataset, "train", root=data_dir, download=download)
        images = train_set.images[:limit] if limit else train_set.images
        labels, classes = (train_set.labels[:limit] if limit else train_set.labels), int(train_set.labels.max()) + 1
        name, shape = dataset, tuple(images.shape[1:])
    model = model or default_model(shape)
    out_dir = Path(out) if out is not None else (resume.parent if resume else default_out(name))
    cfg = TrainConfig(**config)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)  # the initial weights too
    net = models.for_data(model, shape, hidden_dims=hidden_dims, latent_dim=latent_dim, likelihood=likelihood,
                          num_classes=classes, backend=backend)
    cfg.extra = {**cfg.extra, "dataset": str(train_set.path) if data is not None else dataset, "limit": limit}
    labels = labels if net.conditional else None
    objective = Objective.of(getattr(net, "name", "vae"), vars(cfg))
    first, first_labels = stream.head(images, 32)
    pictures = Pictures(first, stream.image_shape(shape), labels=(labels if labels is not None else first_labels) if net.conditional else None,
                        caption=objective.caption, ylabel=f"{objective.label} per sample")
    trainer = Trainer(net, images, cfg, device=device, out_dir=out_dir, labels=labels, callbacks=[*callbacks, *([pictures] if main else [])])
    # An explicit backend that cannot run on this device fails here, before anything is written.
    active = {op: resolve(op, trainer.device.type, backend)[0] for op in OPS}
    if resume:
        trainer.resume(resume)

    def report(record: dict[str, float]) -> None:
        print(f"epoch {record['epoch']}/{cfg.epochs}: {objective.terms(record)}, {record['seconds']:.1f} s "
              f"({record['samples_per_s']:.0f} samples/s)", flush=True)

    existed = out_dir.exists()
    try:
        if main:
            print(startup_line(train_set, len(images), net, objective, trainer, active, out_dir, resume), flush=True)
        history = trainer.fit(on_epoch=report if main else None)
    except KeyboardInterrupt:
        raise _interrupted(trainer, out_dir, existed) from None
    if main:
        board = ", TensorBoard event files" if cfg.logger == "tensorboard" else ""
        print(f"wrote {out_dir / CHECKPOINT}, {out_dir / METRICS}{board} and PNGs to {out_dir}")
    return net, history


def default_model(shape: Sequence[int]) -> str:
    """vae (the reference MLP) for 28x28 grey images, conv for other images."""
    image = stream.image_shape(shape)
    return "vae" if image is None or image == (1, 28, 28) else "conv"


def startup_line(train_set: Any, n: int, net: nn.Module, objective: Objective, trainer: Trainer,
                 active: dict[str, str], out_dir: Path, resume: Path | None) -> str:
    """What a run is about to do: data (name, split, count, folder; or the shard set, and how it is
    read), model and objective, device, threads, the backend of each op, and where it writes."""
    c, dev = trainer.config, trainer.device
    threads = torch.get_num_threads()
    where = f"{dev}, {threads} CPU thread{'s' if threads > 1 else ''}" if dev.type == "cpu" else str(dev)
    start = f"; resuming from epoch {trainer.epoch} ({resume})" if resume else ""
    if stream.is_shardset(train_set):
        shape = "x".join(map(str, train_set.shape))
        what = (f"fastvae train: {n} of {len(train_set)} images ({shape}, {_size(train_set.nbytes)}) from {train_set.path}, "
                f"{trainer.source.describe()}\n")
    else:
        what = f"fastvae train: {train_set.name} {train_set.split} split, {n} of {len(train_set)} images from {train_set.source}\n"
    return (what +
            f"  model {getattr(net, 'name', 'vae')}, loss {objective.label}, {c.epochs} epochs of {trainer.steps_per_epoch} steps "
            f"(batch {c.batch_size}){start}\n"
            f"  device {where}, backends: {', '.join(f'{op} {name}' for op, name in active.items())}\n"
            f"  run folder {out_dir} (checkpoint.pt after each epoch, metrics.jsonl{', TensorBoard events' if c.logger == 'tensorboard' else ''}, PNGs at the end)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def _interrupted(trainer: Trainer, out_dir: Path, existed: bool) -> TrainingInterrupted:
    """Ctrl-C: keep every file written; drop only a run folder this run created and left empty."""
    saved = out_dir / CHECKPOINT
    saved_epoch = 0
    if saved.is_file():
        try:
            saved_epoch = int(checkpoint.load(saved)["epoch"])
        except (ValueError, OSError, KeyError):
            saved = None
    else:
        saved = None
    if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return TrainingInterrupted(out_dir, trainer.epoch, trainer.step, saved, saved_epoch)


def export(run: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """``fastvae export``: a run's checkpoint (its folder or checkpoint.pt) as a save_pretrained folder
    (model.safetensors, config.json, README.md; see fastvae.pretrained); returns the folder. The weights
    of a fastvae model are loaded into it first, so a checkpoint that does not fit its config is refused
    before anything is written."""
    from . import pretrained

    state = checkpoint.load(run)
    config = {"model": state["config"].get("model", "vae"), **state["config"]}
    if config["model"] != pretrained.USER:
        pretrained.load_weights(models.from_config(config), state["model"], str(run))
    history = state.get("history") or []
    dataset = (state.get("train") or {}).get("extra", {}).get("dataset")
    trained = (f"Trained {len(history)} epochs{' on ' + dataset if dataset else ''} with fastvae; last epoch's loss "
               f"{history[-1]['loss']:.2f} per sample.\n\n") if history else ""
    return pretrained.write(directory, config, state["model"], card=pretrained.model_card(config, trained))
