"""fastvae.accelerate inside the loops users already train in: PyTorch Lightning and Hugging Face Accelerate.

Each runs a user's module twice, plain and accelerated, from the same weights on the same batches,
the plain one fed the eps the fused sampler draws (InjectEps), and compares the loss and every
gradient at every step. The optional packages are pyproject's "integrations" extra (.ci/run installs it).
"""
import copy

import pytest
import torch

import fastvae
from fastvae.dropin import routing
from test_dropin import SEED, InjectEps, rel_err
from user_vaes import CASES

CASE = {c.name: c for c in CASES}
STEPS, BATCH = 4, 16


@pytest.fixture(autouse=True)
def _fused_everywhere(monkeypatch):
    """The fused loss on every size (on this CPU it is routed to torch's BCE-with-logits below a size)."""
    monkeypatch.setattr(routing, "CPU_FUSED_LOSS_MIN", 0)


def _batches(case, n=STEPS * BATCH):
    g = torch.Generator().manual_seed(5)
    return case.batch(n, g)[0]


def _pair(case):
    torch.manual_seed(0)
    plain = case.model()
    accelerated = fastvae.accelerate(copy.deepcopy(plain), sampling="fused", seed=SEED)
    return plain, accelerated


def _compare(plain_log, acc_log, tol=1e-5, grad_tol=None):
    assert len(plain_log) == len(acc_log) == STEPS
    for step, ((lp, gp), (la, ga)) in enumerate(zip(plain_log, acc_log)):
        assert rel_err(la, lp) <= tol, f"step {step}: loss {float(la)} vs {float(lp)}"
        whole = torch.cat([g.flatten() for g in gp])
        assert rel_err(torch.cat([g.flatten() for g in ga]), whole) <= (grad_tol or tol), f"step {step}: gradients"


@pytest.mark.parametrize("name", ["examples_mlp", "crop_conv28"])
def test_lightning_trains_an_accelerated_module_with_the_same_losses_and_gradients(name, tmp_path):
    L = pytest.importorskip("lightning", reason="pip install 'fastvae[integrations]' (lightning) to run the Lightning test")
    case = CASE[name]

    class LitVAE(L.LightningModule):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.log_ = []  # (loss, gradients) per step
            self.draws = []

        def training_step(self, batch, batch_idx):
            with InjectEps() as inject:
                loss = case.loss(self.vae, (batch,), self.vae(batch))
            self.draws.append(inject.draws)
            self.log_.append([loss.detach().clone(), None])
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.log_[-1][1] = [p.grad.detach().clone() for p in self.vae.parameters()]

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = _batches(case)
    logs = []
    for vae in _pair(case):
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)
        lit = LitVAE(vae)
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(lit, loader)
        logs.append(lit)
    plain, acc = logs
    _compare(plain.log_, acc.log_)
    assert plain.draws == [1] * STEPS
    assert acc.draws == [1] + [0] * (STEPS - 1)  # after the recorded first batch the fused sampler replaced the user's draw
    assert acc.vae._fastvae_dropin.plan.sampling.replaceable
    for p, q in zip(plain.vae.parameters(), acc.vae.parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-5


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_loop_trains_an_accelerated_module_with_the_same_losses_and_gradients(mixed_precision, tmp_path):
    pytest.importorskip("accelerate", reason="pip install 'fastvae[integrations]' (accelerate) to run the Accelerate test")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    case = CASE["examples_mlp"]
    data = _batches(case)
    logs = []
    for vae in _pair(case):
        AcceleratorState._reset_state(True)  # one Accelerator per loop, as a script has
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)
        model, optimizer, loader = accelerator.prepare(vae, optimizer, loader)
        log = []
        for batch in loader:
            with InjectEps():
                loss = case.loss(model, (batch,), model(batch))
            accelerator.backward(loss)
            log.append((loss.detach().clone(), [p.grad.detach().clone() for p in model.parameters()]))
            optimizer.step()
            optimizer.zero_grad()
        logs.append((log, accelerator.unwrap_model(model), accelerator))
    (plain_log, _, _), (acc_log, acc_model, accelerator) = logs
    if mixed_precision == "no":
        _compare(plain_log, acc_log)
    else:  # bf16 autocast: the user's sigmoid output is rounded to bf16 before its BCE, the fused loss reads the logits in float32
        _compare(plain_log, acc_log, tol=1e-4, grad_tol=5e-2)
        assert all(torch.equal(g, h) for g, h in zip(plain_log[0][1], acc_log[0][1]))  # the recorded first batch ran as written
    assert acc_model._fastvae_dropin.plan.sampling.replaceable

    accelerator.save_model(acc_model, tmp_path / "saved")  # Accelerate's own save: the user's state_dict, hooks and all
    from safetensors.torch import load_file

    plain = case.model()
    plain.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), acc_model.state_dict().values()))


def test_lightning_validation_summary_bf16_and_checkpoint_reload(tmp_path):
    """What a Lightning run does around the training step: a summary forward on example_input_array, a validation
    loop in eval mode before the first training batch, bf16-mixed autocast, a checkpoint, load_from_checkpoint."""
    L = pytest.importorskip("lightning", reason="pip install 'fastvae[integrations]' (lightning) to run the Lightning test")
    case = CASE["examples_mlp"]

    class LitVAE(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.vae = fastvae.accelerate(case.model())
            self.example_input_array = torch.rand(2, 1, 28, 28)

        def forward(self, x):
            return self.vae(x)

        def training_step(self, batch, batch_idx):
            return case.loss(self.vae, (batch,), self.vae(batch))

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", case.loss(self.vae, (batch,), self.vae(batch)))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = _batches(case)
    loader = lambda: torch.utils.data.DataLoader(data, batch_size=BATCH)  # noqa: E731
    lit = LitVAE()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(lit, loader(), loader())
    state = lit.vae._fastvae_dropin
    assert state.plan is not None and state.plan.sampling.replaceable and state.plan.outputs[0].wrapped, fastvae.dropin.explain(lit.vae)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    back = LitVAE.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), lit.state_dict().values()))


@pytest.mark.parametrize("order", ["accelerate-then-ddp", "ddp-then-accelerate"])
def test_distributed_data_parallel_wrapping_in_either_order(order, tmp_path):
    """Lightning's and Accelerate's multi-device strategies wrap the module in DistributedDataParallel, before
    or after the user's fastvae.accelerate: one gloo process here, the same losses and gradients as the plain module."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        case = CASE["examples_mlp"]
        data = _batches(case)
        plain, vae = _pair(case)
        wrapped = DDP(vae) if order == "accelerate-then-ddp" else fastvae.accelerate(DDP(fastvae.dropin.deaccelerate(vae)), sampling="fused", seed=SEED)
        logs = []
        for model in (plain, wrapped):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            log = []
            for batch in data.split(BATCH):
                with InjectEps() as inject:
                    loss = case.loss(model, (batch,), model(batch))
                loss.backward()
                log.append((loss.detach().clone(), [p.grad.detach().clone() for p in model.parameters()]))
                optimizer.step()
                optimizer.zero_grad()
            logs.append(log)
            draws = inject.draws
        _compare(*logs)
        assert draws == 0  # the last batch's sample came from the fused kernel
    finally:
        dist.destroy_process_group()
