"""save_pretrained / from_pretrained / load_pretrained / fastvae export: model.safetensors + config.json round trips."""
import json
import os
import sys

import pytest
import torch

import fastvae
from fastvae import models, pretrained
from fastvae._extras import MissingExtra
from fastvae.cli import main
from user_vaes import CASES

pytest.importorskip("safetensors", reason="pip install 'fastvae[hub]' (safetensors) to run the save/load tests")

SMALL = {
    "vae": dict(input_dim=36, hidden_dims=(16, 8), latent_dim=3),
    "cvae": dict(input_dim=36, hidden_dims=(16,), latent_dim=3, num_classes=4),
    "conv": dict(image_shape=(3, 8, 8), channels=(4, 8), latent_dim=3),
    "hvae": dict(input_dim=36, hidden_dims=(16,), latent_dims=(4, 2), top_hidden_dims=(8,)),
    "rvae": dict(seq_len=6, features=6, hidden_size=8, latent_dim=3),
    "aae": dict(input_dim=36, hidden_dims=(16,), latent_dim=3, discriminator_dims=(8,)),
}


def _outputs(model, x):
    """Every deterministic output: the code, its decoding, the reconstruction and seeded prior samples."""
    labels = {"labels": torch.arange(x.shape[0]) % model.num_classes} if model.conditional else {}
    with torch.no_grad():
        code = model.code(x, **labels)
        return [code, model.decode(code, **labels), model.reconstruct(x, **labels), model.sample(5, seed=3)]


@pytest.mark.parametrize("kind", models.MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_every_kind_round_trips_with_identical_outputs(kind, dtype, tmp_path):
    torch.manual_seed(1)
    model = models.get(kind)(**SMALL[kind]).to(dtype)
    x = torch.rand(7, model.input_dim, dtype=dtype)
    folder = model.save_pretrained(tmp_path / kind)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]
    assert json.loads((folder / "config.json").read_text()) == {"model": kind, **{k: v for k, v in model.config().items()}}
    for back in (type(model).from_pretrained(folder), models.from_pretrained(folder), fastvae.models.base.LatentModel.from_pretrained(folder)):
        assert type(back) is type(model) and not back.training and back.dtype == dtype
        assert back.config() == model.config()
        for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        for a, b in zip(_outputs(model, x), _outputs(back, x), strict=True):
            assert torch.equal(a, b)
    fresh = models.get(kind)(**SMALL[kind]).to(dtype)
    assert fastvae.load_pretrained(folder, fresh) is fresh
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_loading_refuses_another_kind_or_shape_naming_it(tmp_path):
    conv = models.ConvVAE(**SMALL["conv"]).save_pretrained(tmp_path / "conv")
    vae = fastvae.VAE(**SMALL["vae"]).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"holds a conv model \(fastvae.models.conv.ConvVAE\), not a VAE; load it with ConvVAE.from_pretrained"):
        fastvae.VAE.from_pretrained(conv)
    with pytest.raises(ValueError, match="holds a vae model .* not a HierarchicalVAE"):
        models.HierarchicalVAE.from_pretrained(vae)
    with pytest.raises(ValueError, match=r"another configuration \(hidden_dims: saved \[16, 8\] vs model \[16\]; latent_dim: saved 3 vs model 2\)"):
        fastvae.load_pretrained(vae, fastvae.VAE(input_dim=36, hidden_dims=(16,), latent_dim=2))
    with pytest.raises(ValueError, match="another configuration .*model: saved 'conv' vs model 'vae'"):
        fastvae.load_pretrained(conv, fastvae.VAE(**SMALL["vae"]))
    # Weights that do not fit the config they came with (written by hand, or a foreign file) are named tensor by tensor.
    state = fastvae.VAE(input_dim=36, hidden_dims=(16,), latent_dim=3).state_dict()
    pretrained.write(tmp_path / "odd", {"model": "vae", **SMALL["vae"], "hidden_dims": [16, 8]}, state)
    with pytest.raises(ValueError, match=r"do not fit this model \(missing \['decoder.fc3.bias'.*encoder.fc_mu.weight: saved \(3, 16\) vs model \(3, 8\)"):
        fastvae.VAE.from_pretrained(tmp_path / "odd")


def test_foreign_missing_and_mixed_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        fastvae.VAE.from_pretrained(tmp_path / "nothing")
    folder = fastvae.VAE(**SMALL["vae"]).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        fastvae.VAE.from_pretrained(folder / "config.json")
    # config.json edited by hand (or left from another save): the weights carry their own config and disagree.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_dim": 2}))
    with pytest.raises(ValueError, match="mixes two saves"):
        fastvae.VAE.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastvae.VAE.from_pretrained(folder)
    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"))
    (other / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="is not a fastvae model folder"):
        models.from_pretrained(other)
    (other / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        models.from_pretrained(other)
    os.remove(other / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.from_pretrained(other)


def test_a_failed_save_leaves_the_earlier_one_loadable_or_refused_never_misread(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first, second = fastvae.VAE(**SMALL["vae"]), fastvae.VAE(input_dim=36, hidden_dims=(12,), latent_dim=3)
    folder = first.save_pretrained(tmp_path / "m")
    (folder / "notes.txt").write_text("mine")  # a user's file in the folder stays
    st = sys.modules["safetensors.torch"]
    real_save = st.save_file

    def dies_midway(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(folder)
    monkeypatch.setattr(st, "save_file", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the temporary folder is gone
    back = fastvae.VAE.from_pretrained(folder)  # the earlier save, whole
    assert back.config() == first.config() and all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), back.state_dict().values()))

    # Killed between the renames into the existing folder (weights moved, config.json not yet): refused, not misread.
    real_replace = os.replace

    def stops_before_config(src, dst):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(pretrained.os, "replace", stops_before_config)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(folder)
    monkeypatch.setattr(pretrained.os, "replace", real_replace)
    with pytest.raises(ValueError, match="mixes two saves"):
        fastvae.VAE.from_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    second.save_pretrained(folder)  # saving again repairs it
    assert fastvae.VAE.from_pretrained(folder).config() == second.config()


def test_export_of_a_run_and_of_a_users_module_trained_with_fit(tmp_path, real_data):
    images = real_data.images[:64]
    torch.manual_seed(0)
    trained = fastvae.VAE(hidden_dims=(16,), latent_dim=3)
    fastvae.Trainer(trained, images, fastvae.TrainConfig(epochs=1, batch_size=32, progress=False), device="cpu", out_dir=tmp_path / "run").fit()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    back = fastvae.VAE.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), back.state_dict().values()))
    assert "Trained 1 epochs" in (tmp_path / "exported" / "README.md").read_text()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2

    # A user's own class: fastvae writes its state_dict and class path; the user builds the module, fastvae fills it.
    case = CASES[0]
    mine = case.model()
    fastvae.fit(mine, images.unsqueeze(1), epochs=1, batch_size=32, device="cpu", out_dir=tmp_path / "fit", progress=False)
    assert main(["export", str(tmp_path / "fit"), str(tmp_path / "fit-exported")]) == 0
    config = json.loads((tmp_path / "fit-exported" / "config.json").read_text())
    assert config == {"model": "dropin", "module": "user_vaes.ExamplesMLP", "input_shape": [1, 28, 28], "likelihood": "bernoulli"}
    with pytest.raises(ValueError, match=r"holds a user's own module \(user_vaes.ExamplesMLP\), which fastvae cannot rebuild"):
        fastvae.models.from_pretrained(tmp_path / "fit-exported")
    filled = fastvae.load_pretrained(tmp_path / "fit-exported", case.model())
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), filled.state_dict().values()))
    with pytest.raises(ValueError, match="holds the weights of user_vaes.ExamplesMLP, not of user_vaes.ChunkMLP"):
        fastvae.load_pretrained(tmp_path / "fit-exported", CASES[1].model())
    # A subclass of a fastvae model is the user's class too: fastvae would rebuild the parent, not it.
    class Mine(fastvae.VAE):
        pass

    fastvae.save_pretrained(Mine(**SMALL["vae"]), tmp_path / "sub")
    assert json.loads((tmp_path / "sub" / "config.json").read_text())["module"].endswith("Mine")
    assert type(fastvae.load_pretrained(tmp_path / "sub", Mine(**SMALL["vae"]))) is Mine
    # ... and straight from the module, accelerated or not (the hooks leave the state_dict alone).
    fastvae.save_pretrained(fastvae.accelerate(mine), tmp_path / "mine", input_shape=(1, 28, 28))
    again = fastvae.load_pretrained(tmp_path / "mine", case.model())
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), again.state_dict().values()))


def test_hub_repo_ids_download_and_push_through_huggingface_hub_without_a_network(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub", reason="pip install 'fastvae[hub]' (huggingface_hub) to run the Hub test")
    model = fastvae.VAE(**SMALL["vae"])
    uploaded = {}

    class FakeApi:  # records what would be uploaded; nothing leaves the machine
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            target = tmp_path / "hub" / repo_id
            target.mkdir(parents=True)
            for f in os.listdir(folder_path):
                (target / f).write_bytes(open(os.path.join(folder_path, f), "rb").read())
            return "commit"

    def fake_download(repo_id, filename, **kwargs):
        uploaded.setdefault("kwargs", kwargs)
        return str(tmp_path / "hub" / repo_id / filename)

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    assert model.push_to_hub("someone/tiny-vae") == "commit" and uploaded["repo"] == "someone/tiny-vae"
    back = fastvae.VAE.from_pretrained("someone/tiny-vae", revision="main")
    assert uploaded["kwargs"] == {"revision": "main"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_without_safetensors_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.delitem(sys.modules, "safetensors.torch", raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'fastvae\[hub\]'"):
        fastvae.VAE().save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
