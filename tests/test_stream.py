"""The streaming engine and the other data sources, on real files: shard sets written here (shards.write),
trained streamed and resident (bit-identical on CPU), killed and resumed, read from a Dataset and a
DataLoader, split over two processes, and checked against a checkpoint's image size."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastvae
from fastvae import checkpoint, shards, stream
from fastvae.cli import main

N, SIDE, BATCH = 203, 6, 16  # 13 batches, the last of 11 rows
HERE = os.path.dirname(os.path.abspath(__file__))


def _images(n=N, shape=(SIDE, SIDE), seed=0):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _write(tmp_path, images, name="set", **kw):
    """A shard set of several shards (about 50 images each), so batches cross shard boundaries."""
    per_image = images[0].numel()
    return fastvae.data.open(shards.write(images, tmp_path / name, shard_bytes=50 * per_image, **kw))


def _train(data, epochs=2, out=None, model=None, labels=None, **cfg):
    """Train a fresh model (made by `model`, default a small VAE) with the same seeds, in one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = model() if model else fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(16,), latent_dim=3)
        config = fastvae.TrainConfig(epochs=epochs, batch_size=BATCH, lr=3e-3, seed=5, log_every=4, progress=False, **cfg)
        trainer = fastvae.Trainer(net, data, config, device="cpu", out_dir=out, labels=labels)
        trainer.fit()
        return trainer
    finally:
        torch.set_num_threads(threads)


def _same(a, b):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


# -- the batch order -------------------------------------------------------------------------------------------------

def test_epoch_order_depends_on_seed_and_epoch_only_and_sorts_each_batch():
    a = stream.epoch_order(N, BATCH, 5, 3)
    assert torch.equal(a, stream.epoch_order(N, BATCH, 5, 3))
    torch.manual_seed(123)  # torch's global generator plays no part
    assert torch.equal(a, stream.epoch_order(N, BATCH, 5, 3))
    assert not torch.equal(a, stream.epoch_order(N, BATCH, 5, 4)) and not torch.equal(a, stream.epoch_order(N, BATCH, 6, 3))
    assert torch.equal(a.sort().values, torch.arange(N))
    for start in range(0, N, BATCH):
        rows = a[start:start + BATCH]
        assert torch.equal(rows, rows.sort().values)
    # the batches are those of the permutation, so each is a uniform random draw
    perm = stream.permutation(N, 5, 3)
    assert all(set(perm[s:s + BATCH].tolist()) == set(a[s:s + BATCH].tolist()) for s in range(0, N, BATCH))
    # torchrun shares: contiguous, disjoint, covering, torch.tensor_split's cut
    for size in (1, 7, 16):
        parts = [stream.share(size, r, 3) for r in range(3)]
        assert [hi - lo for lo, hi in parts] == [len(t) for t in torch.arange(size).tensor_split(3)]
        assert parts[0][0] == 0 and parts[-1][1] == size and all(parts[i][1] == parts[i + 1][0] for i in range(2))


def test_gather_across_shards_returns_the_rows_in_order(tmp_path):
    images = _images()
    ds = _write(tmp_path, images)
    assert len(ds.shards) > 2
    reader = stream.ArrayRows(ds.shards, None, ds.shape)
    rows = np.sort(np.random.default_rng(0).choice(N, 40, replace=False))
    out = np.full((40, SIDE * SIDE), 7, dtype=np.uint8)
    reader.gather(rows, out, None)
    assert torch.equal(torch.from_numpy(out), images.reshape(N, -1)[torch.from_numpy(rows)])


# -- streamed == resident, bit for bit --------------------------------------------------------------------------------

class _Items(Dataset):
    """A user's map-style Dataset: (C, H, W) uint8 tensors and int labels."""

    def __init__(self, images, labels=None):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].unsqueeze(0)
        return x if self.labels is None else (x, int(self.labels[i]))


def test_streamed_and_resident_training_give_bit_identical_parameters(tmp_path):
    images = _images()
    ds = _write(tmp_path, images)
    resident = _train(ds, stream=False)
    streamed = _train(ds, stream=True, prefetch=3, read_threads=2)
    assert resident.source.resident and not streamed.source.resident
    assert "2 reader threads" in streamed.source.describe()
    _same(resident, streamed)
    inline = _train(ds, stream=True)  # CPU's default: each batch gathered on the training thread
    assert "gathered on the training thread" in inline.source.describe()
    _same(resident, inline)
    _same(resident, _train(images))  # the tensor itself, resident as before
    _same(resident, _train(images, stream=True))  # a CPU tensor streamed from host memory
    _same(resident, _train(_Items(images)))  # a user's Dataset, read item by item on the same order
    assert [h["loss"] for h in resident.history] == [h["loss"] for h in streamed.history]
    torch.manual_seed(0)
    initial = fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(16,), latent_dim=3).state_dict()
    assert all(not torch.equal(initial[k], p) for k, p in resident.model.state_dict().items())  # it trained


def test_the_rule_streams_what_does_not_fit(monkeypatch, tmp_path):
    ds = _write(tmp_path, _images())
    cfg = fastvae.TrainConfig(batch_size=BATCH, progress=False)
    model = fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(8,), latent_dim=2)
    assert fastvae.Trainer(model, ds, cfg, device="cpu").source.resident
    monkeypatch.setattr(stream, "free_memory", lambda device: 2 * ds.nbytes - 1)  # the set takes more than half of it
    source = fastvae.Trainer(model, ds, cfg, device="cpu").source
    assert not source.resident and "> 0.5 x free host memory" in source.describe()
    assert stream.decide(10, torch.device("cpu"), False) == (False, "forced by stream=False")
    # the host ring is the bound the docs state: prefetch x batch x (sample bytes + 8 for a label)
    assert source.nbytes_ring() == cfg.prefetch * BATCH * SIDE * SIDE


@pytest.mark.parametrize("read_threads", [0, 2])
def test_an_error_in_a_step_stops_the_readers_and_the_next_epoch_starts_clean(tmp_path, read_threads):
    import threading

    ds = _write(tmp_path, _images())
    torch.manual_seed(0)
    model = fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(16,), latent_dim=3)
    cfg = fastvae.TrainConfig(epochs=1, batch_size=BATCH, stream=True, progress=False, read_threads=read_threads)
    trainer = fastvae.Trainer(model, ds, cfg, device="cpu")
    before, calls, real = threading.active_count(), [0], model.loss_terms

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    model.loss_terms = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert threading.active_count() == before  # the readers were stopped and joined
    model.loss_terms = real
    trainer.fit()
    assert trainer.step == 4 + 13  # the failed epoch's four steps, then a whole epoch


# -- kill -9 and resume while streaming -------------------------------------------------------------------------------

EPOCHS = 12
WORKER = f"import sys; sys.path.insert(0, {HERE!r}); import test_stream as t; t.resumable(sys.argv[1], sys.argv[2])"


def resumable(data, out):
    """Streamed training that resumes from out/checkpoint.pt when present (also the worker's body)."""
    ds = fastvae.data.open(data)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(16,), latent_dim=3)
    cfg = fastvae.TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=3e-3, seed=5, log_every=2, progress=False, stream=True,
                              warmup=1, warmup_unit="epochs")
    trainer = fastvae.Trainer(model, ds, cfg, device="cpu", out_dir=out)
    if (Path(out) / "checkpoint.pt").exists():
        trainer.resume(Path(out) / "checkpoint.pt")
    print("ready", trainer.epoch, flush=True)
    trainer.fit()


def test_kill_9_while_streaming_then_resume_is_bit_identical(tmp_path):
    ds = _write(tmp_path, _images())
    out = tmp_path / "run"
    start = lambda: subprocess.Popen([sys.executable, "-c", WORKER, str(ds.path), str(out)], stdout=subprocess.PIPE, text=True)  # noqa: E731
    proc = start()
    assert proc.stdout.readline().startswith("ready")
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(random.Random(3).uniform(0.0, 0.1))  # mostly mid-epoch, with batches in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= checkpoint.load(out / "checkpoint.pt")["epoch"] < EPOCHS, "the run ended before it was killed"
    proc = start()
    assert proc.stdout.readline().startswith("ready") and proc.wait(timeout=120) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    resumable(str(ds.path), str(tmp_path / "straight"))
    want = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    assert state["epoch"] == EPOCHS and state["step"] == want["step"] and state["data_seed"] == want["data_seed"] == 5
    for name, p in want["model"].items():
        assert torch.equal(state["model"][name], p), name
    assert [h["loss"] for h in state["history"]] == [h["loss"] for h in want["history"]]


# -- Dataset and DataLoader inputs ------------------------------------------------------------------------------------

def test_a_conditional_model_reads_labels_from_a_dataset_and_from_a_shard_set(tmp_path):
    images, labels = _images(), torch.arange(N) % 4
    cvae = lambda: fastvae.models.ConditionalVAE(input_dim=SIDE * SIDE, num_classes=4, hidden_dims=(8,), latent_dim=2)  # noqa: E731
    with_tensor = _train(images, model=cvae, labels=labels)
    from_dataset = _train(_Items(images, labels), model=cvae)
    from_shards = _train(_write(tmp_path, images, labels=labels.numpy(), label_names=list("abcd")), model=cvae, stream=True)
    _same(with_tensor, from_dataset)
    _same(with_tensor, from_shards)


def test_a_dataloader_is_used_as_given(tmp_path):
    images = _images().float().div(255).unsqueeze(1)
    seen = []

    class Spy(TensorDataset):
        def __getitem__(self, i):
            seen.append(i)
            return super().__getitem__(i)

    loader = DataLoader(Spy(images, torch.zeros(N)), batch_size=32, shuffle=False)
    trainer = _train(loader, epochs=2)
    assert trainer.config.batch_size == 32 and trainer.steps_per_epoch == 7 and trainer.step == 14
    assert seen == list(range(N)) * 2  # its own order (shuffle=False), every epoch
    assert trainer.source.sample_shape == (1, SIDE, SIDE)
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"] + 50


def test_fit_takes_a_shard_set_a_dataset_and_a_dataloader(tmp_path):
    class UserVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mu, self.lv = torch.nn.Linear(36, 16), torch.nn.Linear(16, 2), torch.nn.Linear(16, 2)
            self.dec = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 36))

        def forward(self, x):
            h = torch.relu(self.enc(x.flatten(1)))
            mu, logvar = self.mu(h), self.lv(h)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return torch.sigmoid(self.dec(z)).view_as(x), mu, logvar

    images = _images()
    ds = _write(tmp_path, images)
    for data in (ds, _Items(images), DataLoader(_Items(images), batch_size=32, shuffle=True)):
        torch.manual_seed(0)
        history = fastvae.fit(UserVAE(), data, epochs=1, batch_size=BATCH, device="cpu", progress=False)
        assert len(history) == 1 and np.isfinite(history[0]["loss"]), type(data).__name__


# -- bad input --------------------------------------------------------------------------------------------------------

class _Bad(Dataset):
    def __init__(self, item, n=4):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


@pytest.mark.parametrize("data, error, match", [
    (_Bad(lambda i: "a picture"), TypeError, r"dataset\[0\] returned str; a Dataset for fastvae returns a torch.Tensor"),
    (_Bad(lambda i: (torch.zeros(SIDE, SIDE), "cat")), TypeError, r"dataset\[0\] returned the label 'cat' \(str\); labels must be class indices"),
    (_Bad(lambda i: torch.zeros(SIDE, SIDE, dtype=torch.int32)), TypeError, r"dataset\[0\] returned a torch.int32 tensor; return uint8 pixels or floats"),
    (_Bad(lambda i: torch.zeros(SIDE, SIDE + (i == 2), dtype=torch.uint8)), ValueError,
     r"dataset\[2\] returned torch.uint8 \(6, 7\) but dataset\[0\] was torch.uint8 \(6, 6\); every item must have the same shape"),
    (_Bad(lambda i: torch.zeros(SIDE, SIDE), n=0), ValueError, r"the Dataset is empty \(len\(dataset\) == 0\)"),
    (_Bad(lambda i: torch.zeros(5, 5)), ValueError, r"the Dataset has samples of shape \(5, 5\) \(25 values\) but the model's input_dim is 36"),
    (DataLoader(_Bad(lambda i: torch.zeros(SIDE, SIDE), n=0), batch_size=4), ValueError, r"the DataLoader yields no batches"),
    ({"images": 1}, TypeError, r"data must be a torch.Tensor of images, a shard set \(fastvae.data.open\), a torch.utils.data.Dataset or a DataLoader; got dict"),
])
def test_bad_data_sources_are_refused_naming_the_item_and_the_fix(data, error, match):
    with pytest.raises(error, match=match):
        _train(data, epochs=1)


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
    ds = _write(tmp_path, _images(shape=(3, 4, 4)))
    with pytest.raises(ValueError, match=r"has samples of shape \(3, 4, 4\) \(48 values\) but the model's input_dim is 36; build the model for these"):
        _train(ds)
    with pytest.raises(ValueError, match="stream=False .* a DataLoader is iterated as given"):
        _train(DataLoader(_Items(_images()), batch_size=4), stream=False)


# -- several processes ------------------------------------------------------------------------------------------------

def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, data, out, streamed):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(12,), latent_dim=3).double()
        cfg = fastvae.TrainConfig(epochs=2, batch_size=BATCH, lr=1e-2, seed=3, log_every=3, progress=False, stream=streamed)
        trainer = fastvae.Trainer(model, fastvae.data.open(data), cfg, device="cpu", out_dir=out)
        if streamed:  # this rank reads only its share: ceil(16 / 2) rows per batch buffer
            assert trainer.source.host.shape[1] == BATCH // world
        trainer.fit()
    finally:
        dist.destroy_process_group()


def test_two_processes_streaming_their_shares_equal_one(tmp_path):
    ds = _write(tmp_path, _images(n=65))  # 65 = 4 x 16 + 1: rank 1's share of the last batch is empty
    _rank(0, 1, _port(), str(ds.path), tmp_path / "one", True)
    _rank(0, 1, _port(), str(ds.path), tmp_path / "resident", False)
    mp.spawn(_rank, args=(2, _port(), str(ds.path), tmp_path / "two", True), nprocs=2, join=True)
    one, two, resident = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("one", "two", "resident"))
    assert one["step"] == two["step"] == 10
    for name, p in one["model"].items():
        assert torch.equal(resident["model"][name], p), name  # the same code path resident, bit for bit
        torch.testing.assert_close(two["model"][name], p, rtol=0, atol=1e-10, msg=name)
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-9 * abs(a["loss"])


# -- image size and channels in checkpoints; the CLI ------------------------------------------------------------------

def test_cli_trains_a_conv_model_on_rgb_shards_and_refuses_another_image_size(tmp_path, capsys):
    rgb = _write(tmp_path, _images(n=48, shape=(3, 8, 8)), name="rgb")
    grey = _write(tmp_path, _images(n=48, shape=(1, 8, 8)), name="grey")
    run = tmp_path / "run"
    assert main(["train", "--data", str(rgb.path), "--epochs", "1", "--batch-size", "16", "--stream", "--out", str(run),
                 "--no-progress", "--threads", "1"]) == 0
    said = capsys.readouterr().out
    assert "48 of 48 images (3x8x8" in said and "streamed to cpu" in said and "model conv" in said
    state = checkpoint.load(run)
    assert state["config"]["model"] == "conv" and state["data"] == {"shape": [3, 8, 8], "image_shape": [3, 8, 8]}
    for name in ("reconstructions.png", "samples.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    assert main(["score", str(run), "--data", str(grey.path), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "was trained on 8x8 RGB images (3 channels) but" in err and "holds 8x8 grey images (1 channel)" in err
    assert "fastvae prepare SRC OUT --image-size 8 --channels 3" in err
    assert main(["train", "--data", str(grey.path), "--epochs", "2", "--resume", str(run), "--no-progress", "--threads", "1"]) == 2
    assert "was trained on 8x8 RGB images" in capsys.readouterr().err

    assert main(["score", str(run), "--data", str(rgb.path), "--threads", "1"]) == 0
    lines = (run / "scores-rgb-k1.csv").read_text().splitlines()
    assert lines[0] == "index,label,score" and len(lines) == 49
    assert main(["reconstruct", str(run), "--data", str(rgb.path), "-n", "8", "--threads", "1"]) == 0
    assert (run / "reconstructions-rgb-n8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prepares_an_image_folder_into_a_cache_once_and_again_when_it_changes(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    pixels = _images(n=12, shape=(10, 10, 3)).numpy()
    for i, img in enumerate(pixels):
        (folder / ("cats" if i % 2 else "dogs")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(folder / ("cats" if i % 2 else "dogs") / f"{i}.png")
    argv = ["train", "--data", str(folder), "--image-size", "8", "--epochs", "1", "--batch-size", "4", "--no-progress", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--limit", "10"]) == 0
    said = capsys.readouterr().out
    assert f"preparing {folder} into the cache {tmp_path / 'cache'}" in said and "10 of 12 images (3x8x8" in said
    (cached,) = (tmp_path / "cache").iterdir()
    assert fastvae.data.open(cached).label_names == ["cats", "dogs"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out
    assert f"using {cached}, the prepared copy of {folder}" in said and "preparing" not in said
    Image.fromarray(pixels[0], "RGB").save(folder / "cats" / "new.png")  # the folder changed: prepared again, the stale copy goes
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    said = capsys.readouterr().out
    assert "preparing" in said and f"removed {cached}" in said and "13 of 13 images" in said
    (cached,) = (tmp_path / "cache").iterdir()
    assert main(["train", "--data", str(cached), "--image-size", "16", "--no-progress"]) == 2
    assert "is a prepared shard set of 8x8 images" in capsys.readouterr().err


def test_score_and_pictures_take_a_shard_set(tmp_path):
    ds = _write(tmp_path, _images(n=40, shape=(3, 8, 8)))
    torch.manual_seed(0)
    model = fastvae.models.ConvVAE(image_shape=(3, 8, 8), channels=(4,), latent_dim=2).eval()
    scores = fastvae.score(model, ds, batch_size=16)
    assert scores.shape == (40,) and torch.equal(scores, fastvae.score(model, ds.tensor(), batch_size=16))
    from fastvae import plots

    png = plots.write_reconstructions(model, ds, (3, 8, 8), tmp_path / "r.png", "caption")
    from PIL import Image

    assert Image.open(png).mode in ("RGB", "RGBA")
    with pytest.raises(ValueError, match=r"holds images of shape \(3, 8, 8\) \(192 values\) but the model takes input_dim=36"):
        fastvae.score(fastvae.VAE(input_dim=36, hidden_dims=(8,), latent_dim=2), ds)


def test_the_stream_benchmark_runs_in_its_smoke_mode(tmp_path, real_data):
    from benchmarks import stream as bench

    out = tmp_path / "stream.json"
    assert bench.main(["--smoke", "--parts", "loader,train", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    results = {r["part"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"loader", "train"}
    assert results["train"]["speed_ratio"] > 0 and set(results["loader"]["batches_per_s"]) == {
        "fastvae", "dataloader-default", "dataloader-2-workers-pinned"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.json"]  # the shard sets were deleted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the side-stream copies and the graph's static input")
def test_cuda_streaming_feeds_the_captured_graph_and_matches_resident(tmp_path):
    ds = _write(tmp_path, _images(n=1000))

    def run(flag):
        torch.manual_seed(0)
        trainer = fastvae.Trainer(fastvae.VAE(input_dim=SIDE * SIDE, hidden_dims=(16,), latent_dim=3), ds,
                                  fastvae.TrainConfig(epochs=3, batch_size=64, seed=5, stream=flag, progress=False), device="cuda")
        trainer.fit()
        return trainer

    resident, streamed = run(False), run(True)
    assert streamed.source.host.is_pinned() and not streamed._graph.gathers and streamed._graph.graph is not None
    for (name, p), q in zip(resident.model.state_dict().items(), streamed.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_callbacks_see_the_first_inputs_of_a_streamed_set(tmp_path):
    from fastvae import callbacks

    images, labels = _images(), torch.arange(N) % 3
    ds = _write(tmp_path, images, labels=labels.numpy())
    cvae = fastvae.models.ConditionalVAE(input_dim=SIDE * SIDE, num_classes=3, hidden_dims=(8,), latent_dim=2)
    trainer = fastvae.Trainer(cvae, ds, fastvae.TrainConfig(stream=True, progress=False), device="cpu")
    assert trainer.data is None and trainer.sample_shape == (1, SIDE, SIDE)
    rows, first = callbacks.first_inputs(trainer, 5)
    assert torch.equal(rows, images[:5].reshape(5, -1)) and torch.equal(first, labels[:5])
