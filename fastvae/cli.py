"""The ``fastvae`` command: train, sample, reconstruct, score, info."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Sequence

import torch

from .models import MODELS


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


def _checkpoint_on_data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of commands that run a checkpoint over a data split (reconstruct, score)."""
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=("train", "test"), default="test")
    return p


def _dims(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace(",", " ").split() if p]
    return tuple(_positive_int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Fused-kernel VAE training engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE (default: the reference model on Fashion-MNIST)")
    t.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or mnist")
    t.add_argument("--data-dir", default=None, help="folder holding the four IDX files (default: standard places)")
    t.add_argument("--model", choices=MODELS, default="vae",
                   help="vae (default), cvae (conditioned on the labels), conv, hvae (two levels), rvae (images as row sequences), aae")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--latent-dim", type=_positive_int, default=20)
    t.add_argument("--hidden-dims", type=_dims, default=None,
                   help="comma-separated widths, e.g. 512,256 (default: the model's, 400 for vae; conv: channels per level; rvae: GRU size)")
    t.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli")
    t.add_argument("--beta", type=_non_negative_float, default=1.0, help="KL weight (beta-VAE)")
    t.add_argument("--warmup", type=_non_negative_int, default=0, help="KL warm-up length (0: none)")
    t.add_argument("--warmup-unit", choices=("steps", "epochs"), default="steps")
    t.add_argument("--warmup-schedule", choices=("linear", "cyclical"), default="linear", help="KL warm-up shape")
    t.add_argument("--cycles", type=_positive_int, default=4, help="cycles of a cyclical warm-up")
    t.add_argument("--objective", choices=("elbo", "iwae"), default="elbo", help="training bound")
    t.add_argument("--k", type=_positive_int, default=5, help="samples per input for --objective iwae")
    t.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    t.add_argument("--backend", default=None, choices=("auto", "torch", "triton", "cpp", "cuda"))
    t.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--tf32", action="store_true", help="TF32 matmuls (CUDA)")
    t.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="run the CUDA training step eagerly instead of replaying it as a CUDA graph")
    t.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<date>-<time>)")
    t.add_argument("--resume", default=None, help="checkpoint.pt to continue from")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=_positive_int, default=None, help="use only the first N training images")
    t.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="decode prior samples of a trained model to a PNG grid")
    s.add_argument("checkpoint")
    s.add_argument("-n", type=_positive_int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=_non_negative_int, default=None, help="class to draw (conditional models; default: every class in turn)")
    s.add_argument("--out", default="samples.png")

    r = _checkpoint_on_data(sub.add_parser("reconstruct", help="originals above reconstructions, as a PNG grid"))
    r.add_argument("-n", type=_positive_int, default=32)
    r.add_argument("--out", default="reconstructions.png")

    sc = _checkpoint_on_data(sub.add_parser("score", help="per-sample anomaly scores (-ELBO, or -IWAE bound with --k > 1) to a CSV"))
    sc.add_argument("--k", type=_positive_int, default=1)
    sc.add_argument("--batch-size", type=_positive_int, default=256)
    sc.add_argument("--out", default="scores.csv")

    sub.add_parser("info", help="versions, devices and active backends")
    sub.add_parser("bench", help="run the benchmark suite (source checkout; see python -m benchmarks.run --help)", add_help=False)
    return parser


def _load_model(path: str):
    from . import checkpoint, models

    state = checkpoint.load(path)
    model = models.from_config(state["config"])
    model.load_state_dict(state["model"])
    return model.eval()


def _side(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else (1, n)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # all further arguments belong to benchmarks.run
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.run import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input (data, checkpoint, settings): a message, not a traceback
        print(f"fastvae {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .distributed import init_from_env, is_main
        from .runner import train

        init_from_env()  # under torchrun: one process per rank, DistributedDataParallel

        _, history = train(
            args.dataset, data_dir=args.data_dir, out=args.out, device=args.device, resume=args.resume, limit=args.limit,
            model=args.model, hidden_dims=args.hidden_dims, latent_dim=args.latent_dim, likelihood=args.likelihood, backend=args.backend,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta, warmup=args.warmup,
            warmup_unit=args.warmup_unit, seed=args.seed, amp=args.amp, tf32=args.tf32, cuda_graph=args.cuda_graph, progress=not args.no_progress,
            warmup_schedule=args.warmup_schedule, cycles=args.cycles, objective=args.objective, k=args.k)
        for h in history if is_main() else ():
            print(f"epoch {h['epoch']}: loss {h['loss']:.2f} per sample (recon {h['recon']:.2f}, kl {h['kl']:.2f}), {h['seconds']:.2f} s")
        return 0
    if args.command == "sample":
        from . import plots

        model = _load_model(args.checkpoint)
        if args.label is not None and not model.conditional:
            raise ValueError(f"--label needs a conditional model (cvae); {args.checkpoint} holds {model.name}")
        if args.label is not None and args.label >= model.num_classes:
            raise ValueError(f"--label must be below the model's num_classes ({model.num_classes}), got {args.label}")
        condition = {"labels": args.label} if model.conditional else {}
        pixels = model.sample(args.n, seed=args.seed, out_dtype=torch.uint8, **condition)
        plots.write_png(plots.grid(pixels, _side(model.input_dim)), args.out)
        print(f"wrote {args.out}")
        return 0
    if args.command == "reconstruct":
        from . import data, plots

        model = _load_model(args.checkpoint)
        split = data.load(args.dataset, args.split, root=args.data_dir)
        images = split.images[: args.n]
        condition = {"labels": split.labels[: args.n]} if model.conditional else {}
        out = plots.write_png(plots.reconstruction_grid(model, images, tuple(images.shape[1:3]), **condition), args.out)
        print(f"wrote {out}")
        return 0
    if args.command == "score":
        from . import data
        from .apps import write_scores

        split = data.load(args.dataset, args.split, root=args.data_dir)
        out = write_scores(_load_model(args.checkpoint), split.images, split.labels, args.out, k=args.k, batch_size=args.batch_size)
        print(f"wrote {out}")
        return 0
    print(json.dumps(info(), indent=2))
    return 0


def info() -> dict:
    from . import __version__, backends
    from .dropin import routing

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"fastvae": __version__, "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "gpus": gpus, "cpu_threads": torch.get_num_threads(), "backends": backends(),
            "dropin": routing.describe()}


if __name__ == "__main__":
    sys.exit(main())
