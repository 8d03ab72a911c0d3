"""Two CPU processes (gloo, DistributedDataParallel) train exactly what one process of the same code path trains."""
import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvae
from fastvae import checkpoint

# 65 = 4 * 16 + 1: the last global batch has 1 row, so rank 1 gets an empty shard.
N, BATCH, EPOCHS = 65, 16, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        images = torch.randint(0, 256, (N, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = fastvae.VAE(input_dim=25, hidden_dims=(12,), latent_dim=3).double()
        if rank == 0:
            torch.manual_seed(0)
            model.load_state_dict(fastvae.VAE(input_dim=25, hidden_dims=(12,), latent_dim=3).double().state_dict())
        cfg = fastvae.TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=1e-2, beta=0.5, seed=3, log_every=2, progress=False)
        fastvae.Trainer(model, images, cfg, device="cpu", out_dir=out).fit()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    _train(0, 1, _port(), tmp_path / "one")  # the same code path on one rank, in this process
    mp.spawn(_train, args=(2, _port(), tmp_path / "two"), nprocs=2, join=True)

    one, two = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("one", "two"))
    assert one["step"] == two["step"] == EPOCHS * 5
    torch.manual_seed(0)
    initial = fastvae.VAE(input_dim=25, hidden_dims=(12,), latent_dim=3).double().state_dict()
    assert all((initial[k] - p).abs().max() > 1e-3 for k, p in one["model"].items())  # it trained
    for name, p in one["model"].items():
        torch.testing.assert_close(two["model"][name], p, rtol=0, atol=1e-10, msg=name)
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-9 * abs(a["loss"])  # logged losses are all-reduced over ranks
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # rank 0 alone writes
    assert [json.loads(x)["step"] for x in lines if "event" not in json.loads(x)] == [2, 4, 5, 6, 8, 10]  # log_every counts global steps
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
