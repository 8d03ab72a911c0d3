"""beta-VAE with linear and cyclical KL warm-up: the schedule's values, the trainer's use, the CLI flags."""
import pytest
import torch

import fastvae
from fastvae.cli import build_parser
from fastvae.schedules import kl_weight


def test_linear_warmup_values():
    assert [kl_weight(s, 2.0, 4) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert kl_weight(0, 0.3, 0) == 0.3  # no warm-up: beta from the first step


def test_cyclical_warmup_values():
    # 8 steps, 2 cycles of 4: ramp over the first half of each cycle, hold, then beta for good
    values = [kl_weight(s, 1.0, 8, "cyclical", cycles=2) for s in range(10)]
    assert values == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    # uneven cycles: 10 steps in 3 cycles of 10/3 steps
    values = [kl_weight(s, 3.0, 10, "cyclical", cycles=3) for s in range(10)]
    assert values == pytest.approx([0.0, 1.8, 3.0, 3.0, 1.2, 3.0, 3.0, 0.6, 2.4, 3.0])
    with pytest.raises(ValueError, match="warmup_schedule"):
        kl_weight(1, 1.0, 4, "cosine")


def test_trainer_beta_at_follows_the_schedule_in_epochs():
    images = torch.randint(0, 256, (40, 6), dtype=torch.uint8)
    model = fastvae.VAE(input_dim=6, hidden_dims=(5,), latent_dim=2)
    cfg = fastvae.TrainConfig(batch_size=10, beta=4.0, warmup=2, warmup_unit="epochs", warmup_schedule="cyclical", cycles=2, progress=False)
    trainer = fastvae.Trainer(model, images, cfg, device="cpu")
    assert [trainer.beta_at(s) for s in range(10)] == [0.0, 2.0, 4.0, 4.0, 0.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="warmup_schedule"):
        fastvae.TrainConfig(warmup_schedule="cosine").validate()


def test_cli_flags():
    args = build_parser().parse_args(["train", "--warmup", "100", "--warmup-schedule", "cyclical", "--cycles", "3", "--objective", "iwae", "--k", "7"])
    assert (args.warmup_schedule, args.cycles, args.objective, args.k) == ("cyclical", 3, "iwae", 7)
    args = build_parser().parse_args(["train"])
    assert (args.warmup_schedule, args.objective) == ("linear", "elbo")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--warmup-schedule", "cosine"])
