"""The ``fastvae`` command: train, sample, reconstruct, score, prepare, export, info."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .models import MODELS

if TYPE_CHECKING:
    from .runner import TrainingInterrupted


def _number(kind: type, low: float, expected: str, bound: str):
    """An argparse type: `kind` parsed from the text (else "expected ..."), finite and >= low
    (else "must be <bound>")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


_positive_int = _number(int, 1, "a positive integer", ">= 1")
_non_negative_int = _number(int, 0, "an integer >= 0", ">= 0")
_non_negative_float = _number(float, 0.0, "a number", "a finite number >= 0")


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where there is no value to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def _subcommand(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Help)
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice, one per core). "
                        "Use fewer when other processes share the cores")
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or mnist")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder holding the four IDX files (default: $FASTVAE_DATA, then the standard places)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing IDX files (MD5-checked) into --data-dir, else ~/.cache/fastvae/<dataset>")


def _own_data_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", default=None, metavar="PATH",
                   help=f"your own images instead of --dataset: a shard folder (fastvae prepare), or an image folder, IDX or .npy file, "
                        f"prepared once into a cache ($FASTVAE_CACHE, else ~/.cache/fastvae/prepared){what}")


def _checkpoint_on_data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of commands that run a checkpoint over a data split (reconstruct, score)."""
    p.add_argument("checkpoint", metavar="RUN", help="a run folder (runs/<name>) or its checkpoint.pt")
    _data_arguments(p)
    _own_data_argument(p, " at the checkpoint's image size")
    p.add_argument("--split", choices=("train", "test"), default="test", help="which split of the data set (--dataset)")
    return p


def _dims(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace(",", " ").split() if p]
    return tuple(_positive_int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Fused-kernel VAE training engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = _subcommand(sub, "train", "train a VAE (default: the reference model on Fashion-MNIST)")
    _data_arguments(t)
    _own_data_argument(t, "; the cache is re-used while the folder and settings are unchanged")
    t.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                   help="with --data on an image folder: the size S x S the images are prepared at (see fastvae prepare --help)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None, help="with --data on an image folder: 1 (grey) or 3 (RGB)")
    how = t.add_mutually_exclusive_group()
    how.add_argument("--stream", dest="stream", action="store_true", default=None,
                     help="stream the data from memory-mapped shards (default: when they take more than half the device's free memory)")
    how.add_argument("--resident", dest="stream", action="store_false",
                     help="hold the whole data set in the device's memory (default: when it takes at most half its free memory)")
    t.add_argument("--model", choices=MODELS, default=None,
                   help="vae, cvae (conditioned on the labels), conv, hvae (two levels), rvae (images as row sequences), aae (adversarial) "
                        "(default: vae for 28x28 grey images, conv for other images)")
    t.add_argument("--epochs", type=_positive_int, default=10, metavar="N", help="passes over the training images")
    t.add_argument("--batch-size", type=_positive_int, default=128, metavar="N", help="images per step (the global batch under torchrun)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--latent-dim", type=_positive_int, default=20, metavar="N", help="size of the latent space (2 also draws latent_map.png)")
    t.add_argument("--hidden-dims", type=_dims, default=None, metavar="W[,W...]",
                   help="comma-separated widths, e.g. 512,256 (default: the model's, 400 for vae; conv: channels per level; rvae: GRU size)")
    t.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli", help="reconstruction term: BCE or squared error")
    t.add_argument("--beta", type=_non_negative_float, default=1.0, help="KL weight (beta-VAE)")
    t.add_argument("--warmup", type=_non_negative_int, default=0, help="KL warm-up length (0: none)")
    t.add_argument("--warmup-unit", choices=("steps", "epochs"), default="steps", help="unit of --warmup")
    t.add_argument("--warmup-schedule", choices=("linear", "cyclical"), default="linear", help="KL warm-up shape")
    t.add_argument("--cycles", type=_positive_int, default=4, help="cycles of a cyclical warm-up")
    t.add_argument("--objective", choices=("elbo", "iwae"), default="elbo", help="training bound")
    t.add_argument("--k", type=_positive_int, default=5, help="samples per input for --objective iwae")
    t.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    t.add_argument("--backend", default=None, choices=("auto", "torch", "triton", "cpp", "cuda"),
                   help="kernels for every op (default: $FASTVAE_BACKEND, else auto: the fastest that runs here)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--tf32", action="store_true", help="TF32 matmuls (CUDA)")
    t.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="run the CUDA training step eagerly instead of replaying it as a CUDA graph")
    t.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/<dataset>-<date>-<time>; with --resume, the checkpoint's folder)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue a run: its folder or checkpoint.pt")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and samples")
    t.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="use only the first N training images")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the start-up and per-epoch lines still print)")
    t.add_argument("--logger", choices=("jsonl", "tensorboard"), default="jsonl",
                   help="tensorboard: TensorBoard event files (scalars, images, hyper-parameters) in the run folder too; "
                        "needs pip install 'fastvae[tensorboard]'. metrics.jsonl is always written")

    s = _subcommand(sub, "sample", "decode prior samples of a trained model to a PNG grid")
    s.add_argument("checkpoint", metavar="RUN", help="a run folder (runs/<name>) or its checkpoint.pt")
    s.add_argument("-n", type=_positive_int, default=64, help="how many samples")
    s.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    s.add_argument("--label", type=_non_negative_int, default=None,
                   help="class to draw (conditional models; default: one class per column)")
    s.add_argument("--out", default=None, metavar="PNG", help="PNG to write (default: samples-n<N>-seed<S>.png in the checkpoint's run folder)")

    r = _checkpoint_on_data(_subcommand(sub, "reconstruct", "originals above reconstructions, as a PNG grid"))
    r.add_argument("-n", type=_positive_int, default=32, help="how many images, from the start of the split")
    r.add_argument("--out", default=None, metavar="PNG", help="PNG to write (default: reconstructions-<split>-n<N>.png in the checkpoint's run folder)")

    sc = _checkpoint_on_data(_subcommand(sub, "score", "per-sample anomaly scores (-ELBO, or -IWAE bound with --k > 1) to a CSV"))
    sc.add_argument("--k", type=_positive_int, default=1, help="importance samples per input (1: the ELBO)")
    sc.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="inputs per batch")
    sc.add_argument("--out", default=None, metavar="CSV", help="CSV to write (default: scores-<split>-k<K>.csv in the checkpoint's run folder)")

    _prepare_arguments(sub)
    e = _subcommand(sub, "export", "write a run's model as model.safetensors + config.json (Hugging Face layout)")
    e.add_argument("checkpoint", metavar="RUN", help="a run folder (runs/<name>) or its checkpoint.pt")
    e.add_argument("out", metavar="DIR", help="folder to write (created; files of an earlier export there are replaced atomically)")
    sub.add_parser("info", help="versions, devices and active backends")
    sub.add_parser("bench", help="run the benchmark suite (source checkout; see python -m benchmarks.run --help)", add_help=False)
    return parser


def _prepare_arguments(sub) -> None:
    """`fastvae prepare SRC OUT`: an image folder, IDX file or .npy array -> uint8 shards (fastvae/prepare.py)."""
    from .prepare import IMAGE_EXTENSIONS, RESIZE_POLICY

    p = sub.add_parser("prepare", help="convert an image folder, an IDX file or a .npy array into uint8 shards for training",
                       formatter_class=_Help,
                       description="Convert SRC into uint8 shard files plus a manifest in OUT (read them with fastvae.data.open). "
                                   f"SRC: a folder of images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}; searched recursively; "
                                   "sub-folders name the labels, as torchvision's ImageFolder), an IDX images file, or a .npy "
                                   "uint8 array. Unreadable images are skipped, counted and listed in the manifest. A killed run "
                                   "resumes when the same command runs again.")
    p.add_argument("src", metavar="SRC", help="image folder, IDX images file (e.g. train-images-idx3-ubyte.gz) or .npy array")
    p.add_argument("out", metavar="OUT", help="a new or empty folder for the shards (or an unfinished prepare of the same command)")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                   help=f"resize to SxS: {RESIZE_POLICY}. Default: keep the size (all images must then have the same)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="force grayscale (1) or RGB (3); default: keep (3 when any image is in colour, else 1)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="decoding processes for an image folder (default: the cores this process may use)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labels of an IDX/.npy source (IDX or .npy integers; default for IDX: the *-labels-idx1-ubyte file beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(path: str):
    """(model in eval mode, what its loss is, checkpoint state) of a run folder or checkpoint file."""
    from . import checkpoint, models
    from .runner import Objective

    state = checkpoint.load(path)
    model = models.from_config(state["config"])
    model.load_state_dict(state["model"])
    return model.eval(), Objective.of(getattr(model, "name", "vae"), state.get("train", {})), state


def _next_to(checkpoint_arg: str, out: str | None, name: str) -> Path:
    """--out as given, else `name` in the run folder of the checkpoint (never the current folder)."""
    if out is not None:
        return Path(out)
    path = Path(checkpoint_arg)
    return (path if path.is_dir() else path.parent) / name


def _side(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else (1, n)


def _image_shape(model, state: dict) -> tuple[int, ...]:
    """The (C, H, W) the checkpoint's model was trained on (stored since the data's shape is), else a square guess."""
    shape = (state.get("data") or {}).get("image_shape") or getattr(model, "image_shape", None)
    return tuple(shape) if shape else _side(model.input_dim)


def _checkpoint_data(args: argparse.Namespace, state: dict, n: int | None):
    """(images, labels or None, file-name part, caption part) for reconstruct/score: --data (checked against
    the checkpoint's image size; an image folder is prepared at it) or a split of --dataset; the first `n` or all."""
    from . import checkpoint, data, stream

    if args.data is None:
        split = data.load(args.dataset, args.split, root=args.data_dir, download=args.download)
        checkpoint.check_data(state, tuple(split.images.shape[1:]), args.checkpoint, f"the {split.name} {split.split} split")
        images, labels = (split.images[:n], split.labels[:n]) if n else (split.images, split.labels)
        return images, labels, split.split, f"{split.name} {split.split} split"
    from .cache import is_shard_folder, open_data

    image = (state.get("data") or {}).get("image_shape")
    prepare = {} if is_shard_folder(Path(args.data)) or not image or image[1] != image[2] else {"image_size": image[1], "channels": image[0]}
    shards = open_data(args.data, **prepare)
    checkpoint.check_data(state, tuple(shards.shape), args.checkpoint, str(shards.path))
    if n:
        images, labels = stream.head(shards, n)
    else:
        images, labels = shards, shards.labels
    return images, labels, Path(shards.path).name, str(shards.path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # all further arguments belong to benchmarks.run
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.run import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    from ._extras import MissingExtra
    from .backends import BackendUnavailable
    from .callbacks import CallbackError
    from .runner import TrainingInterrupted

    try:
        return _run(args)
    except (ValueError, OSError, BackendUnavailable, MissingExtra, CallbackError) as exc:  # bad input (data, checkpoint, settings, files): a message, not a traceback
        print(f"fastvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        from .distributed import is_main

        if is_main():  # under torchrun every rank stops; one says so
            print(_resume_advice(stop, argv), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nfastvae {args.command}: interrupted", file=sys.stderr)
        return 130


def _resume_advice(stop: TrainingInterrupted, argv: list[str]) -> str:
    """What Ctrl-C left and the command that continues the run (the same options, --resume added)."""
    import shlex

    kept = [a for i, a in enumerate(argv) if a != "--resume" and (i == 0 or argv[i - 1] != "--resume") and not a.startswith("--resume=")]
    again = shlex.join(["fastvae", *kept[:1], "--resume", str(stop.out_dir), *kept[1:]])
    lines = [f"\nfastvae train: {stop}."]
    if stop.checkpoint is None:
        lines.append(f"Nothing to resume from; {'metrics so far are in ' + str(stop.out_dir) if stop.out_dir.is_dir() else 'nothing was written'}. "
                     f"Start again with: {shlex.join(['fastvae', *kept])}")
    else:
        lines.append(f"Every file written stays. Continue from the end of epoch {stop.checkpoint_epoch} with:\n  {again}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .distributed import init_from_env
        from .runner import train

        init_from_env()  # under torchrun: one process per rank, DistributedDataParallel

        if args.data is not None and args.data_dir is not None:
            raise ValueError("--data (your own images) and --data-dir (the folder of --dataset's IDX files) exclude each other; drop one")
        if args.data is None and (args.image_size or args.channels):
            raise ValueError("--image-size and --channels prepare an image folder given with --data; add --data FOLDER or drop them")
        train(args.dataset, data=args.data, image_size=args.image_size, channels=args.channels, stream=args.stream,
              data_dir=args.data_dir, download=args.download, out=args.out, device=args.device, resume=args.resume,
              limit=args.limit, model=args.model, hidden_dims=args.hidden_dims, latent_dim=args.latent_dim, likelihood=args.likelihood,
              backend=args.backend, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta, warmup=args.warmup,
              warmup_unit=args.warmup_unit, seed=args.seed, amp=args.amp, tf32=args.tf32, cuda_graph=args.cuda_graph,
              progress=not args.no_progress, warmup_schedule=args.warmup_schedule, cycles=args.cycles, objective=args.objective, k=args.k,
              logger=args.logger)
        return 0
    if args.command == "export":
        from .runner import export

        print(f"wrote {export(args.checkpoint, args.out)} (model.safetensors, config.json, README.md)")
        return 0
    if args.command == "prepare":
        from .prepare import prepare

        try:
            out = prepare(args.src, args.out, image_size=args.image_size, channels=args.channels, workers=args.workers,
                          progress=not args.no_progress, labels=args.labels)
        except KeyboardInterrupt:
            print(f"\nfastvae prepare: interrupted; the finished shards in {args.out} are kept: run the same command "
                  f"again to resume", file=sys.stderr)
            return 130
        from .shards import open as open_shards

        ds = open_shards(out)
        c, h, w = ds.shape
        labels = f", {len(ds.label_names)} labels" if ds.label_names else ""
        print(f"wrote {out}: {len(ds)} images {c}x{h}x{w} in {len(ds.shards)} shards{labels}, "
              f"{len(ds.manifest['skipped'])} skipped")
        return 0
    if args.command == "sample":
        from . import plots

        model, objective, state = _load(args.checkpoint)
        if args.label is not None and not model.conditional:
            raise ValueError(f"--label needs a conditional model (cvae); {args.checkpoint} holds {model.name}")
        if args.label is not None and args.label >= model.num_classes:
            raise ValueError(f"--label must be below the model's num_classes ({model.num_classes}), got {args.label}")
        label = f"-label{args.label}" if args.label is not None else ""
        out = _next_to(args.checkpoint, args.out, f"samples-n{args.n}-seed{args.seed}{label}.png")
        plots.write_samples(model, out, args.n, _image_shape(model, state), objective.caption(state["history"]), seed=args.seed, label=args.label)
        print(f"wrote {out}")
        return 0
    if args.command == "reconstruct":
        from . import plots, stream

        model, objective, state = _load(args.checkpoint)
        images, labels, name, what = _checkpoint_data(args, state, args.n)
        condition = {"labels": labels} if model.conditional else {}
        out = _next_to(args.checkpoint, args.out, f"reconstructions-{name}-n{args.n}.png")
        plots.write_reconstructions(model, images, stream.image_shape(images.shape[1:]) or _image_shape(model, state), out,
                                    f"{what}; {objective.caption(state['history'])}", **condition)
        print(f"wrote {out}")
        return 0
    if args.command == "score":
        from .apps import write_scores

        model, _, state = _load(args.checkpoint)
        images, labels, name, _ = _checkpoint_data(args, state, None)
        out = write_scores(model, images, labels, _next_to(args.checkpoint, args.out, f"scores-{name}-k{args.k}.csv"),
                           k=args.k, batch_size=args.batch_size)
        print(f"wrote {out}")
        return 0
    print(json.dumps(info(), indent=2))
    return 0


def info() -> dict:
    from . import __version__, backends
    from .dropin import routing as dropin_routing

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    report = backends()
    routing = [f"{op} {b}: {rule}" for op, r in report.items() for b, rule in r["routing"].items()]  # where "auto" still picks torch
    return {"fastvae": __version__, "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "gpus": gpus, "cpu_threads": torch.get_num_threads(), "backends": report, "routing": routing,
            "dropin": dropin_routing.describe()}


if __name__ == "__main__":
    sys.exit(main())
