"""The whole reference run (REFERENCE.md: 10 epochs, batch 128, Adam 1e-3) done four ways.

(a) "seed-loop": the classic script: DataLoader over a TensorDataset of float images,
    shuffle=True, per-batch .view(-1, 784), ReferenceVAE + reference_loss, loss.item() per batch.
(b) "eager-device": the same model and loss on device-resident float data, shuffled by
    randperm on the device, running sums kept on the device (no per-step sync).
(c) "compile" / "compile-ro": torch.compile of (b)'s forward+loss (default and
    mode="reduce-overhead"; on CPU reduce-overhead adds nothing over default). Compile time is
    reported separately ("compile_s").
(d) "fastvae": fastvae.Trainer with its defaults (uint8 data on the device, fused ops, CUDA
    graphs on CUDA); "fastvae-torch" is the same Trainer with every op on the torch backend,
    which isolates what the fused kernels add to a whole run.

Every variant first runs warm-up steps (a full batch and the short last batch, so compiled
code exists for both shapes) on a snapshot of the weights and optimizer that is then restored;
"seconds" is the training time after that (fastvae: a throwaway Trainer on a few batches warms
up, then a new one trains; its graph capture is part of the timed run). "fastvae" also times the
step's GEMM floor (benchmarks/floor.py) of every 50 steps right after them (its logging steps), so
that run and floor see the same machine; that time is taken out of "seconds", and "floor_ratio" is
"seconds" over the floors' sum ("floor_ratio_median": the median of the per-epoch ratios). "final_loss" is the reference's figure: the summed
loss over the last epoch divided by the number of samples.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch

import fastvae
from fastvae.reference import ReferenceVAE, reference_loss

from . import floor
from .common import sync

VARIANTS = ("seed-loop", "eager-device", "compile", "compile-ro", "fastvae", "fastvae-torch")


def load_images(samples: int | None, data_dir: str | None = None) -> torch.Tensor:
    """Fashion-MNIST's training images (uint8), the first `samples` of them when given."""
    images = fastvae.data.load("fashion-mnist", "train", root=data_dir).images
    return images[:samples] if samples else images


def _warm(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: Callable[[], None]) -> float:
    """Run `steps` (warm-up) and restore the weights and optimizer; returns its seconds."""
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    t0 = time.perf_counter()
    steps()
    seconds = time.perf_counter() - t0
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    return seconds


def _seed_loop(images: torch.Tensor, epochs: int, batch: int, device: torch.device) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    model = ReferenceVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(images.float().div(255).unsqueeze(1), torch.zeros(len(images))), batch_size=batch, shuffle=True)

    def step(data: torch.Tensor) -> float:
        data = data.to(device)
        opt.zero_grad()
        recon, mu, logvar = model(data)
        loss = reference_loss(recon, data.view(-1, 784), mu, logvar)
        loss.backward()
        opt.step()
        return loss.item()

    tail = len(images) % batch or batch
    warm = _warm(model, opt, lambda: [step(images[:n].float().div(255).unsqueeze(1)) for n in (batch, tail)])
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        total = 0.0
        for data, _ in loader:
            total += step(data)
    sync(device)
    return {"seconds": time.perf_counter() - t0, "final_loss": total / len(images), "warmup_s": warm}


def _device_loop(images: torch.Tensor, epochs: int, batch: int, device: torch.device, mode: str | None) -> dict:
    model = ReferenceVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = images.to(device).float().div(255).view(-1, 784)

    def forward(x: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = model(x)
        return reference_loss(recon, x, mu, logvar)

    if mode is not None:
        forward = torch.compile(forward, mode=None if mode == "default" else mode)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = forward(x)
        loss.backward()
        opt.step()
        return loss.detach()

    n = len(data)
    tail = n % batch or batch

    def warm_steps() -> None:
        for rows in (batch, tail, batch, tail):
            step(data[:rows])
        sync(device)

    warm = _warm(model, opt, warm_steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        total = torch.zeros((), device=device, dtype=torch.float64)
        perm = torch.randperm(n, device=device)
        for i in range(0, n, batch):
            total += step(data[perm[i:i + batch]])
    final = float(total) / n
    sync(device)
    return {"seconds": time.perf_counter() - t0, "final_loss": final, ("compile_s" if mode else "warmup_s"): warm}


def _fastvae(images: torch.Tensor, epochs: int, batch: int, device: torch.device, backend: str | None, with_floor: bool = False) -> dict:
    cfg = dict(batch_size=batch, progress=False, seed=None, log_every=floor.WINDOW if with_floor else 10**9)
    warm_n = batch * 5 + (len(images) % batch or batch)  # past the graph engine's eager warm-up steps and its capture
    t0 = time.perf_counter()
    fastvae.Trainer(fastvae.VAE(backend=backend), images[:warm_n], fastvae.TrainConfig(epochs=1, **cfg), device=device).fit()
    sync(device)
    warm = time.perf_counter() - t0
    timer = floor.FloorAfterEachWindow(floor.GemmFloor(batch, device=device)) if with_floor else None
    trainer = fastvae.Trainer(fastvae.VAE(backend=backend), images, fastvae.TrainConfig(epochs=epochs, **cfg), device=device,
                              callbacks=[timer] if timer else None)
    sync(device)
    t0 = time.perf_counter()
    history = trainer.fit()
    sync(device)
    out = {"seconds": time.perf_counter() - t0, "final_loss": history[-1]["loss"], "warmup_s": warm}
    if timer is not None:
        out["seconds"] -= sum(timer.epoch_floor)
        epoch_s = [h["seconds"] - f for h, f in zip(history, timer.epoch_floor)]
        out.update(epoch_s=epoch_s, floor_s=timer.epoch_floor, window_steps=floor.WINDOW,
                   floor_ratio=out["seconds"] / sum(timer.epoch_floor),
                   floor_ratio_median=statistics.median(e / f for e, f in zip(epoch_s, timer.epoch_floor)))
    return out


def run(variant: str, *, epochs: int = 10, samples: int | None = None, batch: int = 128, device: str = "auto", seed: int = 0,
        data_dir: str | None = None) -> dict:
    """One variant of the reference run; returns a benchmark record. `data_dir`: the folder of the
    Fashion-MNIST IDX files (default: fastvae.data's standard places)."""
    dev = fastvae.trainer.resolve_device(device)
    images = load_images(samples, data_dir)
    torch.manual_seed(seed)
    if variant == "seed-loop":
        out = _seed_loop(images, epochs, batch, dev)
    elif variant in ("eager-device", "compile", "compile-ro"):
        mode = {"eager-device": None, "compile": "default", "compile-ro": "reduce-overhead"}[variant]
        out = _device_loop(images, epochs, batch, dev, mode)
    elif variant in ("fastvae", "fastvae-torch"):
        out = _fastvae(images, epochs, batch, dev, "torch" if variant == "fastvae-torch" else None, with_floor=variant == "fastvae")
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    notes = "reduce-overhead is the default mode on CPU (no CUDA graphs)" if variant == "compile-ro" and dev.type == "cpu" else ""
    return {"name": "reference_run", "backend": variant, "shape": [len(images), 784, 20], "dtype": "float32", "device": dev.type,
            "epochs": epochs, "batch_size": batch, "median_ms": out["seconds"] * 1e3, "gbps": None, "peak_mem_mb": None,
            **out, **({"notes": notes} if notes else {})}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        print(json.dumps(run(v, epochs=args.epochs, samples=args.samples, device=args.device, data_dir=args.data_dir)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
