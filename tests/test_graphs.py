"""The CUDA-graph training engine: its device-side pieces on CPU, graph vs eager on a GPU."""
import warnings

import pytest
import torch

import fastvae
from fastvae import graphs
from fastvae.ops.loss import loss_terms
from fastvae.ops.reparam import reparameterize

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("unit,warmup,schedule", [("steps", 7, "linear"), ("epochs", 2, "linear"), ("steps", 0, "linear"), ("steps", 11, "cyclical")])
def test_warmup_beta_tensor_matches_beta_at(unit, warmup, schedule):
    cfg = fastvae.TrainConfig(batch_size=128, beta=0.7, warmup=warmup, warmup_unit=unit, warmup_schedule=schedule, cycles=3)
    trainer = fastvae.Trainer(fastvae.VAE(), _images(300), cfg, device="cpu")
    length = warmup * (trainer.steps_per_epoch if unit == "epochs" else 1)
    for step in range(15):
        got = graphs.warmup_beta(torch.tensor(float(step), dtype=torch.float64), 0.7, length, schedule, 3)
        assert got.item() == pytest.approx(trainer.beta_at(step), abs=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_tensor_beta_matches_float_beta(reduction):
    b, d, lat = 7, 13, 3
    logits, mu, logvar = (torch.randn(b, d, dtype=torch.float64) * 3, torch.randn(b, lat, dtype=torch.float64), torch.randn(b, lat, dtype=torch.float64) * 0.5)
    x = torch.rand(b, d, dtype=torch.float64)
    results = []
    for beta in (0.37, torch.tensor(0.37, dtype=torch.float64)):
        leaves = [t.clone().requires_grad_() for t in (logits, mu, logvar)]
        terms = loss_terms(leaves[0], x, leaves[1], leaves[2], beta=beta, reduction=reduction)
        terms.loss.sum().backward()
        results.append((terms, [t.grad for t in leaves]))
    (a, ga), (t, gt) = results
    for u, v in zip(a, t):
        torch.testing.assert_close(u, v)
    for u, v in zip(ga, gt):
        torch.testing.assert_close(u, v)
    with pytest.raises(ValueError, match="0-dim float tensor"):
        loss_terms(logits, x, mu, logvar, beta=torch.ones(2))


def test_tensor_seed_draws_the_int_seed_stream():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(reparameterize(mu, logvar, seed=torch.tensor(1234), backend="torch"), reparameterize(mu, logvar, seed=1234, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="0-dim int64"):
        reparameterize(mu, logvar, seed=torch.tensor([1]))
    with pytest.raises(ValueError, match="0-dim int64"):
        reparameterize(mu, logvar, seed=torch.tensor(1.0))


def _history(cuda_graph, device, **cfg):
    torch.manual_seed(0)
    images = fastvae.data.load("fashion-mnist", "train").images[:3000] if device == "cuda" else _images(300)
    config = fastvae.TrainConfig(epochs=2, batch_size=128, warmup=5, progress=False, cuda_graph=cuda_graph, log_every=7, **cfg)
    trainer = fastvae.Trainer(fastvae.VAE(), images, config, device=device)
    return trainer, trainer.fit()


def test_cpu_trains_eagerly_and_cuda_graph_true_warns_once():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer, auto = _history(None, "cpu")
    assert trainer._graph is None
    with pytest.warns(RuntimeWarning, match="cuda_graph=True but it needs a CUDA device"):
        _, forced = _history(True, "cpu")
    assert [h["loss"] for h in forced] == [h["loss"] for h in auto]


def test_tf32_needs_cuda():
    with pytest.raises(ValueError, match="tf32=True needs a CUDA device"):
        fastvae.Trainer(fastvae.VAE(), _images(10), fastvae.TrainConfig(tf32=True), device="cpu")


@needs_cuda
@pytest.mark.parametrize("amp", [False, True])
def test_graph_replay_matches_eager_training(amp):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer, replayed = _history(True, "cuda", amp=amp)
    assert trainer._graph is not None and trainer._graph.graph is not None and not trainer._graph.failed
    assert trainer.step == 2 * trainer.steps_per_epoch
    _, eager = _history(False, "cuda", amp=amp)
    for r, e in zip(replayed, eager):
        assert r["loss"] == pytest.approx(e["loss"], rel=0.02)
        assert r["kl"] == pytest.approx(e["kl"], rel=0.1)


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_reparam_in_a_graph_draws_new_eps_per_replay(backend):
    if fastvae.backends()["reparam"]["backends"][backend] != "available":
        pytest.skip(f"{backend} not available")
    mu, logvar = torch.randn(64, 20, device="cuda"), torch.randn(64, 20, device="cuda")
    reparameterize(mu, logvar, backend=backend)  # warm-up: compile / load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = reparameterize(mu, logvar, backend=backend)
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z)
    assert torch.isfinite(z).all()


def test_graph_step_body_trains_like_the_eager_loop(monkeypatch):
    """The captured body (device warm-up weight, stats buffer, step counter), run eagerly on CPU."""
    _, eager = _history(False, "cpu")

    def forced(trainer):
        step = graphs.GraphStep(trainer)
        step.failed = True  # every step through the body, eagerly
        return step

    monkeypatch.setattr(graphs, "engine", forced)
    trainer, body = _history(False, "cpu")
    assert trainer._graph.step_t.item() == trainer.step
    for b, e in zip(body, eager):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(e[key], rel=1e-5)
