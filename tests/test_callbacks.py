"""Trainer callbacks (fastvae.callbacks): the protocol, failures, and the TensorBoard logger read back from its event files."""
import json
import sys

import pytest
import torch

import fastvae
from fastvae import callbacks
from fastvae._extras import MissingExtra
from fastvae.cli import main

EPOCHS, BATCH, N = 2, 32, 160  # 5 steps per epoch


class Recorder(callbacks.Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, trainer):
        self.events.append(("start", trainer.step))

    def on_log(self, trainer, record):
        self.events.append(("log", dict(record)))

    def on_epoch_end(self, trainer, record, model):
        assert model is trainer.model and (trainer.out_dir is None or (trainer.out_dir / "checkpoint.pt").is_file())
        self.events.append(("epoch", record["epoch"]))

    def on_run_end(self, trainer, status):
        self.events.append(("end", status))


def _trainer(images, out=None, cbs=(), model=None, **config):
    torch.manual_seed(0)
    model = model or fastvae.VAE(hidden_dims=(32,), latent_dim=4)
    cfg = fastvae.TrainConfig(epochs=EPOCHS, batch_size=BATCH, log_every=2, progress=False, seed=1, **config)
    return fastvae.Trainer(model, images, cfg, device="cpu", out_dir=out, callbacks=list(cbs))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_callbacks_see_every_record_the_jsonl_gets_in_order(tmp_path, real_data):
    rec = Recorder()
    trainer = _trainer(real_data.images[:N], tmp_path, [rec])
    trainer.fit(on_epoch=lambda r: rec.events.append(("on_epoch", r["epoch"])))
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and rec.events[-1] == ("end", "finished")
    assert kinds.count("epoch") == EPOCHS and kinds.count("on_epoch") == EPOCHS
    assert kinds.index("epoch") < kinds.index("on_epoch")  # fit(on_epoch=) runs after the callbacks
    logged = [e[1] for e in rec.events if e[0] == "log"]
    assert logged == _records(tmp_path)  # the JSONL writer is one of the callbacks: the same records, in order
    steps = [r for r in logged if r.get("event") != "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 5, 6, 8, 10]  # every log_every steps and each epoch's last
    assert {"loss", "recon", "kl", "beta", "lr", "samples_per_s"} <= set(steps[0]) and steps[0]["lr"] == 1e-3


def test_a_callback_that_raises_stops_the_run_named_and_the_last_checkpoint_stays(tmp_path, real_data):
    class Breaks(callbacks.Callback):
        def on_log(self, trainer, record):
            if trainer.epoch == 1 and record["step"] >= 8:
                raise ZeroDivisionError("boom")

    rec = Recorder()
    trainer = _trainer(real_data.images[:N], tmp_path, [Breaks(), rec])
    with pytest.raises(callbacks.CallbackError, match=r"callback Breaks raised in on_log at step 8, epoch 2.*ZeroDivisionError: boom.*holds epoch 1") as err:
        trainer.fit()
    assert isinstance(err.value.callback, Breaks) and err.value.hook == "on_log" and isinstance(err.value.__cause__, ZeroDivisionError)
    assert rec.events[-1] == ("end", "failed")  # the other callbacks were told (writers close their files)
    state = fastvae.checkpoint.load(tmp_path)
    assert state["epoch"] == 1 and state["step"] == 5  # epoch 1's checkpoint, not overwritten after the failure
    resumed = _trainer(real_data.images[:N], tmp_path)
    resumed.resume(tmp_path)
    resumed.fit()
    assert [r["step"] for r in _records(tmp_path) if r.get("event") != "epoch"] == [2, 4, 5, 6, 8, 10]  # each step once


def test_a_callback_stops_the_run_early_after_an_epoch(tmp_path, real_data):
    class Enough(callbacks.Callback):
        def on_log(self, trainer, record):
            trainer.should_stop = record["step"] >= 3  # mid-epoch: the epoch still ends, with its checkpoint

    rec = Recorder()
    history = _trainer(real_data.images[:N], tmp_path, [Enough(), rec]).fit()
    assert len(history) == 1 and fastvae.checkpoint.load(tmp_path)["epoch"] == 1 and rec.events[-1] == ("end", "finished")


def test_ctrl_c_in_the_loop_reaches_every_callback_as_interrupted(real_data):
    class Interrupts(callbacks.Callback):
        def on_log(self, trainer, record):
            raise KeyboardInterrupt

    rec = Recorder()
    with pytest.raises(KeyboardInterrupt):
        _trainer(real_data.images[:N], None, [Interrupts(), rec]).fit()
    assert rec.events[-1] == ("end", "interrupted")


def test_bad_callbacks_and_logger_are_refused_by_name(tmp_path, real_data):
    with pytest.raises(TypeError, match=r"callbacks\[1\] \(function\) has none of the hooks"):
        _trainer(real_data.images[:N], None, [Recorder(), lambda t: None])
    with pytest.raises(ValueError, match="logger must be one of"):
        _trainer(real_data.images[:N], tmp_path, logger="wandb")
    with pytest.raises(ValueError, match="pass out_dir"):
        _trainer(real_data.images[:N], None, logger="tensorboard")


def test_without_tensorboard_the_error_names_the_extra(tmp_path, real_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'fastvae\[tensorboard\]'"):
        _trainer(real_data.images[:N], tmp_path, logger="tensorboard")
    assert main(["train", "--epochs", "1", "--limit", "64", "--out", str(tmp_path / "run"), "--no-progress", "--logger", "tensorboard"]) == 2
    assert "fastvae[tensorboard]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_the_metrics_images_and_hyperparameters(tmp_path, real_data):
    pytest.importorskip("tensorboard", reason="pip install 'fastvae[tensorboard]' to run the TensorBoard tests")
    from tensorboard.plugins.hparams import plugin_data_pb2

    history = _trainer(real_data.images[:N], tmp_path, logger="tensorboard").fit()
    acc = _events(tmp_path)
    records = _records(tmp_path)
    steps = [r for r in records if r.get("event") != "epoch"]
    for key in ("loss", "recon", "kl", "beta", "lr", "samples_per_s"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in steps], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6), key  # float32 in the event file
    epochs = acc.Scalars("epoch/loss")
    assert [e.step for e in epochs] == [5, 10] and [e.value for e in epochs] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    for tag, shape in (("reconstructions", (8 * 30 + 2, 8 * 30 + 2)), ("samples", (8 * 30 + 2, 8 * 30 + 2))):
        images = acc.Images(tag)
        assert [i.step for i in images] == [5, 10], tag
        assert (images[-1].height, images[-1].width) == shape, tag  # 32 inputs above their reconstructions / 64 samples, 28x28 tiles
        assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert images[0].encoded_image_string != images[1].encoded_image_string  # the model changed between the epochs
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == 1e-3 and hp["batch_size"].number_value == BATCH and hp["model.latent_dim"].number_value == 4
    assert hp["model.model"].string_value == "vae" and hp["logger"].string_value == "tensorboard"

    # The images take nothing from the training RNG: the same run without TensorBoard logs the same losses.
    plain = _trainer(real_data.images[:N], tmp_path / "plain").fit()
    assert [h["loss"] for h in plain] == [h["loss"] for h in history]


def test_tensorboard_images_of_colour_conv_and_a_users_module(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'fastvae[tensorboard]' to run the TensorBoard tests")
    from user_vaes import CASES

    g = torch.Generator().manual_seed(0)
    colour = (torch.rand(64, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    conv = fastvae.models.ConvVAE(image_shape=(3, 8, 8), channels=(4,), latent_dim=3)
    _trainer(colour, tmp_path / "conv", model=conv, logger="tensorboard").fit()
    image = _events(tmp_path / "conv").Images("samples")[-1]
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(image.encoded_image_string)).mode == "RGB" and (image.height, image.width) == (8 * 10 + 2, 8 * 10 + 2)

    grey = (torch.rand(64, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    fastvae.fit(CASES[0].model(), grey, epochs=1, batch_size=32, device="cpu", out_dir=tmp_path / "fit", progress=False, logger="tensorboard")
    acc = _events(tmp_path / "fit")
    assert acc.Scalars("train/loss") and [i.height for i in acc.Images("reconstructions")] == [8 * 30 + 2]


def test_fit_passes_callbacks_to_its_trainer_and_they_can_stop_it(real_data):
    from user_vaes import CASES

    class StopAfterFirst(Recorder):
        def on_epoch_end(self, trainer, record, model):
            super().on_epoch_end(trainer, record, model)
            trainer.should_stop = True

    rec = StopAfterFirst()
    history = fastvae.fit(CASES[0].model(), real_data.images[:N], epochs=3, batch_size=BATCH, device="cpu", progress=False,
                          log_every=2, callbacks=[rec])
    assert len(history) == 1 and rec.events[0] == ("start", 0) and rec.events[-1] == ("end", "finished")
    assert [e[1] for e in rec.events if e[0] == "epoch"] == [1]
    with pytest.raises(TypeError, match="callbacks"):
        fastvae.fit(CASES[0].model(), real_data.images[:N], epochs=1, device="cpu", progress=False, callbacks=[object()])


def test_logger_overhead_benchmark_runs(real_data, capsys):
    pytest.importorskip("tensorboard", reason="pip install 'fastvae[tensorboard]' to run the TensorBoard tests")
    from benchmarks import logger_overhead

    result = logger_overhead.run(rounds=2, epochs=1, samples=256, device="cpu")
    assert [len(result["seconds"][k]) for k in ("jsonl", "tensorboard")] == [2, 2]
    assert result["ratio_min"] == pytest.approx(min(result["seconds"]["tensorboard"]) / min(result["seconds"]["jsonl"]))
    assert result["target"] == "ratio_min <= 1.03" and isinstance(result["met"], bool)
    assert [json.loads(line)["logger"] for line in capsys.readouterr().out.splitlines()] == ["jsonl", "tensorboard", "tensorboard", "jsonl"]


def test_a_resumed_run_logs_each_step_once_in_tensorboard(tmp_path, real_data):
    """A run killed after epoch 2 began logging resumes from epoch 1's checkpoint: TensorBoard hides the lost steps."""
    pytest.importorskip("tensorboard", reason="pip install 'fastvae[tensorboard]' to run the TensorBoard tests")
    import shutil

    class KeepFirst(callbacks.Callback):
        def on_epoch_end(self, trainer, record, model):
            if trainer.epoch == 1:
                shutil.copy(trainer.out_dir / "checkpoint.pt", tmp_path / "epoch1.pt")

    _trainer(real_data.images[:N], tmp_path / "run", [KeepFirst()], logger="tensorboard").fit()
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "run" / "checkpoint.pt")  # as if killed during epoch 2
    resumed = _trainer(real_data.images[:N], tmp_path / "run", logger="tensorboard")
    resumed.resume(tmp_path / "run")
    resumed.fit()
    events = _events(tmp_path / "run").Scalars("train/loss")
    steps = [r for r in _records(tmp_path / "run") if r.get("event") != "epoch"]
    assert [e.step for e in events] == [r["step"] for r in steps] == [2, 4, 5, 6, 8, 10]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in steps], rel=1e-6)


def test_tensorboard_without_a_data_tensor_logs_samples_only(tmp_path, real_data):
    """Data the Trainer does not hold as one tensor (streamed): no reconstructions to draw, the samples still are."""
    pytest.importorskip("tensorboard", reason="pip install 'fastvae[tensorboard]' to run the TensorBoard tests")
    trainer = _trainer(real_data.images[:N], tmp_path, logger="tensorboard")
    board = next(cb for cb in trainer.callbacks if isinstance(cb, callbacks.TensorBoard))
    board.on_run_start(trainer)
    trainer.data = None
    board.on_epoch_end(trainer, {}, trainer.model)
    board.on_run_end(trainer, "finished")
    acc = _events(tmp_path)
    assert acc.Tags()["images"] == ["samples"]
