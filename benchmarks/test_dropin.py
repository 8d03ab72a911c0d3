"""Drop-in benchmarks: one training step (zero_grad, forward, the user's loss, backward, Adam) of the
user VAEs in tests/user_vaes.py, three ways (latent-diffusion autoencoders at batch 8, 64x64x3,
trained through forward or through encode / posterior.sample() / decode / kl(); diffusers'
AutoencoderKL where diffusers is installed):

- "user": the module and loss as written;
- "accelerated": the same after ``fastvae.accelerate(model)`` (the one-line change);
- "engine": ``fastvae.fit``'s step: the module through ``DropinModel``, uint8 batches, the fused
  loss, fused Adam, value checks off, and the whole step as a CUDA graph on GPU.

Records carry extra_info {"op": "dropin", "pass": "step", "model", "impl", "backend", "shape":
[batch], "dtype", "device"}. Sizes: FASTVAE_BENCH_SIZE=smoke (2 models and the ldm-style model
through its methods, batch 16 / 2), quick (the MLP models, one conv model and the latent-diffusion
ones) or full (all); each model at its case's batch (128, the latent-diffusion models 8). Run through ``python -m
benchmarks.run --parts dropin`` or ``python -m pytest benchmarks/test_dropin.py --benchmark-only``.
On a shared, noisy machine compare with ``python -m benchmarks.test_dropin --seconds 600``: the
impls interleaved step by step, min and median of paired ratios (the numbers in docs/your-own-vae.md).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae import _memory, graphs
from fastvae.dropin import DropinModel

from . import common

DEV = common.device()
_spec = importlib.util.spec_from_file_location("user_vaes", Path(__file__).resolve().parents[1] / "tests" / "user_vaes.py")
user_vaes = sys.modules.setdefault("user_vaes", importlib.util.module_from_spec(_spec))
if not hasattr(user_vaes, "CASES"):
    _spec.loader.exec_module(user_vaes)

IMPLS = ("user", "accelerated", "engine")


LDM = ("ldm_conv", "ldm_conv_methods", "diffusers_autoencoder_kl")


def _cases() -> tuple[int, list]:
    preset = common.preset()
    every = user_vaes.CASES + user_vaes.METHOD_CASES + user_vaes.diffusers_cases()
    if preset == "smoke":
        return 16, [c for c in every if c.name in ("examples_mlp", "crop_conv28", "ldm_conv_methods")]
    if preset == "quick":
        return 128, [c for c in every if c.kind == "mlp" or c.name == "crop_conv28" or c.name in LDM]
    return 128, every


BATCH, CASES = _cases()


def batch_size(case) -> int:
    """The case's batch (128; the latent-diffusion models 8), smaller in the smoke preset."""
    return min(BATCH, case.bench_batch) if BATCH > 16 or case.bench_batch >= BATCH else max(1, case.bench_batch // 4)


def _batch(case) -> tuple:
    """The same batch of the case's size for every impl, on the device."""
    return tuple(t.to(DEV) if isinstance(t, torch.Tensor) else {k: v.to(DEV) for k, v in t.items()}
                 for t in case.batch(batch_size(case), torch.Generator().manual_seed(0)))


def _loop_step(case, model, batch):
    """The user's training loop: Adam as users create it, their loss on the forward's output (or their step through methods)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = case.step_loss(model, batch)
        loss.backward()
        optimizer.step()
    return step


def _engine_step(case, model, batch):
    """fastvae.fit's step on a batch held as uint8 on the device."""
    images = case.images(batch)
    if not case.signed:  # data in [0, 1] is held as uint8 pixels, as fit() takes a data set
        images = (images * 255).round().to(torch.uint8)
    labels = batch[1] if case.inputs == "labels" else None
    adapter = DropinModel(model, tuple(images.shape[1:]), likelihood=case.likelihood, conditional=labels is not None,
                          example=case.images(batch), labels=labels)
    n = images.shape[0]
    trainer = fastvae.Trainer(adapter, images, fastvae.TrainConfig(batch_size=n, lr=1e-4, progress=False), device=DEV, labels=labels)
    rows = torch.arange(n, device=DEV)
    engine = graphs.engine(trainer)
    condition = {"labels": trainer.labels[rows]} if labels is not None else {}

    def step():
        if engine is not None:
            engine.step(rows)
            return
        with fastvae.value_checks(False), _memory.heap_reuse(DEV):  # as fit() trains (the user's steps around it keep glibc's defaults)
            terms = adapter.loss_terms(torch.index_select(trainer.data, 0, rows), beta=1.0, reduction="sum", **condition)  # the Trainer's gather
            trainer.optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            trainer.optimizer.step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_step(benchmark, case, impl):
    if not case.fit and impl == "engine":
        pytest.skip("fastvae.fit does not train this model's objective (an L1 loss or a step through methods)")
    if case.inputs == "dict" and impl == "engine":
        pytest.skip("fastvae.fit takes forward(x) or forward(x, labels), not a dict batch")
    torch.manual_seed(0)
    model, batch = case.model().to(DEV), _batch(case)
    if impl == "engine":
        step = _engine_step(case, model, batch)
    else:
        if impl == "accelerated":
            model = fastvae.accelerate(model)
        step = _loop_step(case, model, batch)

    def timed():
        step()
        common.sync(DEV)

    for _ in range(graphs.WARMUP_STEPS + 2):  # the accelerated model's first step is recorded; the engine captures its graph
        timed()
    benchmark.extra_info.update({
        "op": "dropin", "pass": "step", "model": case.name, "impl": impl,
        "backend": "eager" if impl == "user" else fastvae.backends()["loss"]["active"][DEV.type],
        "shape": [batch_size(case)], "dtype": "float32", "device": DEV.type,
    })
    benchmark(timed)


def interleaved(seconds: float, names: list[str] | None = None) -> dict[str, dict]:
    """Every impl of every model one step after the other, round after round for `seconds`: the min per
    impl and the median of the per-round ratios user / impl (robust on a shared, noisy machine)."""
    import statistics
    import time

    steps = {}
    for case in CASES:
        if names and case.name not in names:
            continue
        for impl in IMPLS:
            if impl == "engine" and (case.inputs == "dict" or not case.fit):
                continue
            torch.manual_seed(0)
            model, batch = case.model().to(DEV), _batch(case)
            if impl == "accelerated":
                model = fastvae.accelerate(model)
            step = _engine_step(case, model, batch) if impl == "engine" else _loop_step(case, model, batch)
            for _ in range(12 if impl == "engine" else 4):  # past the first (recorded) step and the tagging decision; the graph capture
                step()
            steps[(case.name, impl)] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    end = time.time() + seconds
    while time.time() < end:
        for key, step in steps.items():
            t = time.perf_counter()
            step()
            common.sync(DEV)
            times[key].append(time.perf_counter() - t)
    result = {}
    for name in dict.fromkeys(k[0] for k in steps):
        user = times[(name, "user")]
        row = {"rounds": len(user), "user_ms": min(user) * 1e3}
        for impl in IMPLS[1:]:
            if (name, impl) in times:
                t = times[(name, impl)]
                row[impl] = {"ms": min(t) * 1e3, "speedup_min": min(user) / min(t),
                             "speedup_median_pair": statistics.median(a / b for a, b in zip(user, t))}
        result[name] = row
    return result


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="interleaved drop-in step timings (python -m benchmarks.test_dropin)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--models", default="", help="comma-separated names (default: all of the preset)")
    parser.add_argument("--out", default=None, help="also write the result here, with the device, versions and command")
    args = parser.parse_args()
    result = interleaved(args.seconds, [n for n in args.models.split(",") if n])
    print(json.dumps(result, indent=1))
    if args.out:
        from . import run

        run.write_results(args.out, run.module_meta(DEV, "benchmarks.test_dropin", preset=common.preset()), result)
