"""The training step's GEMM floor: its matrix products alone, and the Trainer measured against them.

One training step of an MLP VAE (fastvae.VAE: input -> hidden... -> mu, logvar heads; latent ->
hidden... -> output) needs, per Linear layer (in -> out) at batch B:
    forward   y = a @ W^T                  (B, in) x (in, out)
    backward  dW = g^T @ a                 (out, B) x (B, in)
              da = g @ W                   (B, out) x (out, in), except for the first layer
For the reference 784-400-20 that is 14 products (the two heads counted apart, as the reference
model computes them), 0.42 GFLOP per step at batch 128. ``gemm_seconds`` times exactly those,
with ``torch.mm(..., out=)`` on preallocated tensors in the operand layouts the step uses, at the
process's threads: nothing else a step could avoid. The floor of a run of S steps is S times that.

``interleaved`` runs one Trainer epoch per round and times the floor of every 50 steps right
after them (``FloorAfterEachWindow``, a Trainer callback on its logging steps), so that both see
the same machine within a third of a second (the cores are shared, and this VM's speed drifts by
20% within seconds); the ratio of each round and their minimum and median are what to report
(``python -m benchmarks.run --parts floor``, ``run`` makes its record). The reference part's
10-epoch run uses the same callback (benchmarks/reference_run.py).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Sequence

import torch


def layer_shapes(input_dim: int, hidden_dims: Sequence[int], latent_dim: int) -> list[tuple[int, int, bool]]:
    """(in, out, needs the input's gradient) per Linear layer of fastvae.VAE, the heads apart."""
    enc = [input_dim, *hidden_dims]
    layers = [(enc[i], enc[i + 1], i > 0) for i in range(len(hidden_dims))]
    layers += [(enc[-1], latent_dim, True)] * 2  # fc_mu, fc_logvar
    dec = [latent_dim, *reversed(hidden_dims), input_dim]
    layers += [(dec[i], dec[i + 1], True) for i in range(len(dec) - 1)]
    return layers


def flops_per_step(batch: int, layers: Sequence[tuple[int, int, bool]]) -> int:
    return sum(2 * batch * i * o * (3 if grad_in else 2) for i, o, grad_in in layers)


class GemmFloor:
    """The products of one step on preallocated tensors (random values: denormal-free)."""

    def __init__(self, batch: int = 128, input_dim: int = 784, hidden_dims: Sequence[int] = (400,), latent_dim: int = 20,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.layers = layer_shapes(input_dim, hidden_dims, latent_dim)
        self.flops = flops_per_step(batch, self.layers)
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g, dtype=dtype).to(device)

        self.calls = []
        for i, o, grad_in in self.layers:
            a, w, y, grad = rand(batch, i), rand(o, i), rand(batch, o), rand(batch, o)
            self.calls.append((a, w.t(), y))  # forward
            self.calls.append((grad.t(), a, rand(o, i)))  # weight gradient
            if grad_in:
                self.calls.append((grad, w, rand(batch, i)))  # input gradient
        self.device = torch.device(device)

    def step(self) -> None:
        for a, b, out in self.calls:
            torch.mm(a, b, out=out)

    def seconds(self, steps: int) -> float:
        """Wall time of `steps` steps' products (synchronised on CUDA)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - t0


WINDOW = 50  # steps between the floor's turns (the Trainer's default log_every): a third of a second on this CPU


class FloorAfterEachWindow:
    """A Trainer callback: after every logging window (``log_every`` steps, and an epoch's last), the floor of that
    window's steps, so that run and floor alternate a few times a second and see the same machine. ``seconds``
    holds the floor's time per window and ``epoch_floor`` per epoch; the run's own time is its wall time minus them."""

    def __init__(self, floor: GemmFloor) -> None:
        floor.seconds(20)  # warm: the BLAS's buffers and threads
        self.floor, self.seconds, self.epoch_floor = floor, [], []
        self._done, self._epoch = 0, 0.0

    def on_run_start(self, trainer) -> None:
        self._done = trainer.step

    def on_log(self, trainer, record: dict) -> None:
        if record.get("event") == "epoch":
            return
        seconds = self.floor.seconds(trainer.step - self._done)
        self._done = trainer.step
        self.seconds.append(seconds)
        self._epoch += seconds

    def on_epoch_end(self, trainer, record: dict, model) -> None:
        self.epoch_floor.append(self._epoch)
        self._epoch = 0.0


def interleaved(images: torch.Tensor, rounds: int = 5, batch: int = 128, device: str = "cpu", backend: str | None = None) -> dict:
    """One Trainer epoch over `images` per round, `rounds` times, the floor of every ``WINDOW`` steps timed right
    after them (FloorAfterEachWindow); an epoch's time is its wall time minus its floors'.

    Returns the per-round seconds of both, the min and median of the per-round ratios epoch / floor,
    the floor's GFLOP/s and the threads; the Trainer's final loss of its last epoch (a sanity check)."""
    import fastvae

    steps = math.ceil(len(images) / batch)
    floor = GemmFloor(batch, device=device)
    timer = FloorAfterEachWindow(floor)
    config = fastvae.TrainConfig(epochs=1, batch_size=batch, progress=False, seed=0, log_every=WINDOW)
    trainer = fastvae.Trainer(fastvae.VAE(backend=backend), images, config, device=device, callbacks=[timer])
    trainer.fit()  # warm-up epoch (kept: training goes on through the rounds)
    epoch_s, floor_s = [], []
    for _ in range(rounds):
        trainer.config.epochs += 1
        t0 = time.perf_counter()
        history = trainer.fit()
        floor_s.append(timer.epoch_floor[-1])
        epoch_s.append(time.perf_counter() - t0 - floor_s[-1])
    ratios = [e / f for e, f in zip(epoch_s, floor_s)]
    return {"steps_per_epoch": steps, "epoch_s": epoch_s, "floor_s": floor_s, "ratio_min": min(ratios),
            "ratio_median": statistics.median(ratios), "ratio_of_minima": min(epoch_s) / min(floor_s), "window_steps": WINDOW,
            "gflops_floor": floor.flops * steps / min(floor_s) / 1e9, "gflop_per_step": floor.flops / 1e9,
            "products_per_step": len(floor.calls), "threads": torch.get_num_threads(), "final_loss": history[-1]["loss"]}


def run(rounds: int = 7, samples: int | None = None, batch: int = 128, device: str = "cpu", data_dir: str | None = None) -> dict:
    """The floor part of ``benchmarks.run``: a results record of ``interleaved`` on the first `samples` Fashion-MNIST
    training images (all by default)."""
    import fastvae

    images = fastvae.data.load("fashion-mnist", "train", root=data_dir).images
    images = images[:samples] if samples else images
    out = interleaved(images, rounds=rounds, batch=batch, device=device)
    step_ms, floor_ms = (min(v) / out["steps_per_epoch"] * 1e3 for v in (out["epoch_s"], out["floor_s"]))
    return {"name": "floor", "backend": "fastvae", "shape": [len(images), 784, 20], "dtype": "float32", "device": device,
            "batch_size": batch, "rounds": rounds, "median_ms": step_ms, "step_ms": step_ms, "floor_ms": floor_ms,
            "gbps": None, "peak_mem_mb": None, **out}
