"""Benchmark set-up: fastvae must not fall back silently while timed (FASTVAE_STRICT=1), and the
Triton interpreter is only switched on for CPU when FASTVAE_BENCH_TRITON=1 asks for it."""
import os

os.environ["FASTVAE_STRICT"] = "1"
if os.environ.get("FASTVAE_BENCH_TRITON") == "1":
    import torch

    if not torch.cuda.is_available() or os.environ.get("FASTVAE_BENCH_DEVICE") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
