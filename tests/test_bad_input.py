"""Bad input: each case gets a ValueError/TypeError naming the argument and the fix.

Shapes, dtypes, devices and arguments are refused before any kernel runs: a spy implementation
stands in for the accelerated backend "auto" would pick, and every such case checks that no kernel
was called. Bad values (NaN/Inf, targets outside [0, 1], logvar > 88) are found by the fused
kernel in its one pass (a stand-in that honours the flag-word contract) or by the torch backend's
own checks, with the same error.
"""
import math

import pytest
import torch

import fastvae
from fastvae import _checks
from fastvae.cli import main
from fastvae.functional import decode_latents, kl_divergence, loss_terms, reparameterize, vae_loss

import fake_backends as fake


@pytest.fixture
def spy(monkeypatch):
    fake.isolate(monkeypatch)
    impl = fake.Spy()
    for op in ("reparam", "loss", "decode"):
        fake.install(monkeypatch, op, impl)
    yield impl
    assert impl.calls == [], f"a kernel ran on bad input: {impl.calls}"


def _latents(b=4, l=3, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, l, generator=g, **kw), 0.1 * torch.randn(b, l, generator=g, **kw)


def _loss_args(b=4, d=6, l=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, d, generator=g), torch.rand(b, d, generator=g), *_latents(b, l)


def _tiny():
    torch.manual_seed(0)
    return fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=3)


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


# (id, call, exception, message pattern): the message must name the argument and say what is right.
CASES = [
    ("targets-shape", lambda: loss_terms(*_replace(_loss_args(), 1, torch.rand(4, 5))), ValueError, r"x must hold 6 features per row like logits \(4, 6\), got \(4, 5\)"),
    ("mu-logvar-shape", lambda: reparameterize(torch.zeros(4, 3), torch.zeros(4, 2)), ValueError, r"mu and logvar must have the same shape, got mu \(4, 3\) and logvar \(4, 2\)"),
    ("mu-logits-batch", lambda: loss_terms(*_replace(_replace(_loss_args(), 2, torch.zeros(3, 3)), 3, torch.zeros(3, 3))), ValueError, "mu and logits must have the same batch size, got 3 and 4"),
    ("mu-not-2d", lambda: reparameterize(torch.zeros(4), torch.zeros(4)), ValueError, r"must be \(batch, latent_dim\)"),
    ("int-logits", lambda: loss_terms(*_replace(_loss_args(), 0, torch.ones(4, 6, dtype=torch.int64))), TypeError, r"logits must be a floating-point tensor .* got torch.int64; convert it with logits.float\(\)"),
    ("int-mu", lambda: reparameterize(torch.ones(4, 3, dtype=torch.int32), torch.zeros(4, 3)), TypeError, r"mu must be a floating-point tensor .* convert it with mu.float\(\)"),
    ("int32-targets", lambda: loss_terms(*_replace(_loss_args(), 1, torch.ones(4, 6, dtype=torch.int32))), TypeError, r"x \(targets\) must be floating point or uint8"),
    ("list-targets", lambda: loss_terms(*_replace(_loss_args(), 1, [[0.5] * 6] * 4)), TypeError, "x must be a torch.Tensor, got list"),
    ("mixed-dtypes", lambda: reparameterize(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64)), TypeError, "mu and logvar must share a dtype"),
    ("logits-other-device", lambda: loss_terms(*_replace(_loss_args(), 0, torch.zeros(4, 6, device="meta"))), ValueError, r"tensors must be on one device, got logits on meta, x on cpu.*move them with .to\(device\)"),
    ("latents-other-device", lambda: loss_terms(*_loss_args()[:2], torch.zeros(4, 3, device="meta"), torch.zeros(4, 3, device="meta")), ValueError, "tensors must be on one device, got .*mu on meta, logvar on meta"),
    ("logvar-other-device", lambda: reparameterize(torch.zeros(4, 3), torch.zeros(4, 3, device="meta")), ValueError, "got mu on cpu, logvar on meta"),
    ("model-input-other-device", lambda: _tiny().loss(torch.zeros(2, 6, device="meta")), ValueError, r"x is on meta but the model's parameters are on cpu; move x with x.to\('cpu'\)"),
    ("model-input-float64", lambda: _tiny().loss(torch.rand(2, 6, dtype=torch.float64)), TypeError, r"x is torch.float64 but the model's parameters are torch.float32; convert x with x.to\(torch.float32\)"),
    ("model-input-features", lambda: _tiny().loss(torch.rand(2, 7)), ValueError, r"input_dim=6 features per sample, got shape \(2, 7\)"),
    ("empty-batch-loss", lambda: loss_terms(torch.zeros(0, 6), torch.zeros(0, 6), torch.zeros(0, 3), torch.zeros(0, 3)), ValueError, r"the batch is empty \(0 rows\); pass at least one sample"),
    ("empty-batch-kl-mean", lambda: kl_divergence(torch.zeros(0, 3), torch.zeros(0, 3), "mean"), ValueError, "empty batch .* reduction='mean' is undefined"),
    ("empty-z-decode", lambda: decode_latents(_tiny(), torch.zeros(0, 3)), ValueError, r"z holds no latents \(0 rows\)"),
    ("bernoulli-targets-negative-vae-loss", lambda: vae_loss(torch.full((4, 6), 0.5), torch.full((4, 6), -0.1), *_latents()), ValueError, r"x \(targets\) must lie in \[0, 1\]"),
    ("k-zero", lambda: reparameterize(*_latents(), k=0), ValueError, r"k \(samples per input\) must be >= 1, got 0"),
    ("k-float", lambda: reparameterize(*_latents(), k=1.5), TypeError, r"k \(samples per input\) must be an int >= 1, got 1.5"),
    ("chunk-size-zero", lambda: decode_latents(_tiny(), n=4, latent_dim=3, chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    ("n-zero", lambda: _tiny().sample(0), ValueError, "n must be >= 1, got 0"),
    ("seed-negative", lambda: reparameterize(*_latents(), seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    ("beta-negative", lambda: loss_terms(*_loss_args(), beta=-1.0), ValueError, "beta \\(the KL weight\\) must be a finite number >= 0, got -1.0"),
    ("beta-nan", lambda: loss_terms(*_loss_args(), beta=math.nan), ValueError, "beta \\(the KL weight\\) must be a finite number >= 0, got nan"),
    ("beta-string", lambda: loss_terms(*_loss_args(), beta="1"), TypeError, "beta \\(the KL weight\\) must be a number >= 0, got str"),
    ("reduction-unknown", lambda: loss_terms(*_loss_args(), reduction="avg"), ValueError, "reduction must be 'sum', 'mean' \\(per sample\\) or 'none', got 'avg'"),
    ("likelihood-unknown", lambda: loss_terms(*_loss_args(), likelihood="poisson"), ValueError, "likelihood must be one of \\('bernoulli', 'gaussian'\\), got 'poisson'"),
    ("backend-unknown", lambda: reparameterize(*_latents(), backend="gpu"), ValueError, "backend='gpu' is unknown; use None, 'auto', 'torch'"),
    ("out-dtype-unknown", lambda: decode_latents(_tiny(), n=2, latent_dim=3, out_dtype=torch.int32), ValueError, "out_dtype must be one of"),
    ("config-batch-size-zero", lambda: fastvae.Trainer(_tiny(), torch.rand(4, 6), fastvae.TrainConfig(batch_size=0), device="cpu"), ValueError, "batch_size must be >= 1, got 0"),
    ("config-read-threads-negative", lambda: fastvae.Trainer(_tiny(), torch.rand(4, 6), fastvae.TrainConfig(read_threads=-1), device="cpu"), ValueError, "read_threads must be >= 0, got -1"),
    ("config-lr-negative", lambda: fastvae.Trainer(_tiny(), torch.rand(4, 6), fastvae.TrainConfig(lr=-1e-3), device="cpu"), ValueError, "lr must be a positive finite number, got -0.001"),
    ("trainer-empty-dataset", lambda: fastvae.Trainer(_tiny(), torch.zeros(0, 6), device="cpu"), ValueError, r"images must be a non-empty batch \(N, ...\), got shape \(0, 6\)"),
    ("trainer-amp-on-cpu", lambda: fastvae.Trainer(_tiny(), torch.rand(4, 6), fastvae.TrainConfig(amp=True), device="cpu"), ValueError, "amp=True .* needs a CUDA device; drop --amp or use device='cuda'"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_kernel(spy, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# Bad values: the fused kernels find them in the pass they make anyway (a flag word, read at once on
# the CPU), the torch backend in separate Python checks; the error is the same.
VALUE_CASES = [
    ("nan-logits", lambda: loss_terms(*_replace(_loss_args(), 0, torch.full((4, 6), math.nan))), ValueError, "logits contains NaN or Inf; check the data and the learning rate"),
    ("inf-mu", lambda: reparameterize(torch.tensor([[0.0, math.inf]]), torch.zeros(1, 2)), ValueError, "mu contains NaN or Inf"),
    ("nan-targets", lambda: loss_terms(*_replace(_loss_args(), 1, torch.full((4, 6), math.nan))), ValueError, "x contains NaN or Inf"),
    ("bernoulli-targets-above-1", lambda: loss_terms(*_replace(_loss_args(), 1, torch.full((4, 6), 1.5))), ValueError, r"x \(targets\) must lie in \[0, 1\] for the Bernoulli likelihood; scale the data to \[0, 1\] or use likelihood='gaussian'"),
    ("logvar-overflows-exp", lambda: reparameterize(torch.zeros(2, 2), torch.full((2, 2), 89.0)), ValueError, r"logvar has values above 88.0: exp\(logvar\) overflows float32.*lower the learning rate"),
]


@pytest.fixture
def contract(monkeypatch):
    fake.isolate(monkeypatch)
    monkeypatch.setenv("FASTVAE_STRICT", "1")  # a contract violation (AssertionError in the fake) must not fall back quietly
    impl = fake.Contract()
    for op in ("reparam", "loss"):
        fake.install(monkeypatch, op, impl)
    return impl


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_values_flagged_by_the_fused_kernel(contract, call, exc, message):
    with pytest.raises(exc, match=message):
        call()
    assert [d["flags"] for fn, d in contract.calls if fn.endswith("forward")] == [True]  # one kernel, given the flag word
    assert all(int(w.tensor.item()) == 0 for w in _checks._words.values())  # read and cleared


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_values_found_by_the_torch_backend(monkeypatch, call, exc, message):
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    with pytest.raises(exc, match=message):
        call()


def test_env_backend_unknown(spy, monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND='fast' is unknown; set it to one of 'auto', 'torch'.* or unset it"):
        reparameterize(*_latents())


def test_float64_on_a_backend_that_lacks_it(monkeypatch):
    fake.isolate(monkeypatch)
    impl = fake.Spy()
    impl.unsupported = lambda *ts: "float64 is not supported by this kernel" if any(t.dtype == torch.float64 for t in ts) else None
    fake.install(monkeypatch, "loss", impl)
    args = [t.double() for t in _loss_args()]
    with pytest.raises(TypeError, match="backend='cpp' cannot run loss on these inputs: float64 is not supported by this kernel. Use backend='auto' or 'torch'"):
        loss_terms(*args, backend="cpp")
    assert torch.equal(loss_terms(*args).loss, loss_terms(*args, backend="torch").loss)  # "auto": PyTorch, quietly
    assert impl.calls == []


def test_non_contiguous_inputs_give_the_contiguous_answer():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 14, generator=g, dtype=torch.float64)
    logits, x = wide[:, ::2], torch.rand(9, 14, generator=g, dtype=torch.float64)[:, 1::2]
    mu, logvar = torch.randn(3, 9, generator=g, dtype=torch.float64).t(), 0.2 * torch.randn(3, 9, generator=g, dtype=torch.float64).t()
    assert not (logits.is_contiguous() or x.is_contiguous() or mu.is_contiguous())

    def run(*ts):
        ts = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(t.dtype.is_floating_point) if i != 1 else t for i, t in enumerate(ts)]
        leaves = [ts[0], ts[2], ts[3]]
        z = reparameterize(ts[2], ts[3], seed=11)
        terms = loss_terms(ts[0], ts[1], ts[2], ts[3], beta=0.5)
        (terms.loss + z.square().sum()).backward()
        return [z.detach(), terms.loss.detach(), terms.recon] + [t.grad for t in leaves]

    strided = run(logits, x, mu, logvar)
    packed = run(*(t.contiguous() for t in (logits, x, mu, logvar)))
    for a, b in zip(strided, packed):
        assert torch.equal(a, b)
    model = _tiny().double()
    imgs = torch.rand(6, 12, dtype=torch.float64)[:, ::2]
    assert torch.equal(model.reconstruct(imgs), model.reconstruct(imgs.contiguous()))
    z = torch.randn(3, 8, dtype=torch.float64)[:, ::3].t()  # (3, 3), strided
    assert torch.equal(decode_latents(model, z, chunk_size=2), decode_latents(model, z.contiguous(), chunk_size=2))


def test_check_finite_names_the_step_of_an_injected_nan():
    model = _tiny()
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        mu, logvar = output
        return (mu * math.nan, logvar) if len(calls) == 4 else output  # the 4th step: step index 3

    model.encoder.register_forward_hook(poison)
    trainer = fastvae.Trainer(model, torch.rand(64, 6), fastvae.TrainConfig(epochs=1, batch_size=8, progress=False, check_finite=True), device="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"the loss became nan at step 3 \(epoch 1\); lower lr, check the data, or resume from the last checkpoint"):
        trainer.fit()
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_check_finite_catches_divergence_from_a_huge_learning_rate():
    trainer = fastvae.Trainer(_tiny(), torch.rand(64, 6), fastvae.TrainConfig(epochs=50, batch_size=8, lr=1e6, progress=False, check_finite=True), device="cpu")
    with pytest.raises(FloatingPointError, match=r"the loss became (nan|inf) at step \d+ \(epoch \d+\)"):
        trainer.fit()


def test_checkpoint_of_another_configuration_truncated_or_missing(tmp_path):
    trainer = fastvae.Trainer(_tiny(), torch.rand(8, 6), fastvae.TrainConfig(epochs=1, batch_size=4, progress=False), device="cpu", out_dir=tmp_path)
    trainer.fit()
    path = tmp_path / "checkpoint.pt"
    other = fastvae.Trainer(fastvae.VAE(input_dim=6, hidden_dims=(7,), latent_dim=3), torch.rand(8, 6), fastvae.TrainConfig(progress=False), device="cpu")
    with pytest.raises(ValueError, match=r"was written for another model configuration \(hidden_dims: checkpoint \[5\] vs model \[7\]\); build the model with the checkpoint's settings or start a new run"):
        other.resume(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="is truncated or corrupt .*; resume from an earlier checkpoint or start a new run"):
        trainer.resume(truncated)
    assert main(["sample", str(truncated), "--out", str(tmp_path / "s.png")]) == 2


def test_data_folder_without_idx_files_and_cli_flags(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"(?s)fashion-mnist train split not found: need train-images-idx3-ubyte\[.gz\].*exists; missing.*Fix: .*--data-dir"):
        fastvae.data.load("fashion-mnist", "train", root=tmp_path)
    assert main(["train", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvae train: error: fashion-mnist train split not found") and "Traceback" not in err
    for argv, flag in ((["--epochs", "0"], "--epochs: must be >= 1, got 0"), (["--limit", "0"], "--limit: must be >= 1, got 0"),
                       (["--lr", "-1"], "--lr: must be a finite number >= 0"), (["--warmup", "-2"], "--warmup: must be >= 0, got -2"),
                       (["--latent-dim", "x"], "--latent-dim: expected a positive integer, got 'x'")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", *argv])
        assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
