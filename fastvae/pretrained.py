"""Weights as the ecosystem shares them: a folder of model.safetensors + config.json (+ a README.md card).

The layout is huggingface_hub's ``PyTorchModelHubMixin``'s (config.json holds the constructor
arguments, model.safetensors the state_dict), so the folder can be pushed to the Hub as it is and
is read back from a folder or a Hub repo id. fastvae does not inherit the mixin: it would make
huggingface_hub a hard dependency of ``fastvae.VAE``, and its ``from_pretrained`` calls the class
it is called on with whatever config.json holds, where fastvae must pick the kind from the config
(``fastvae.models.from_pretrained``), refuse another kind or shape with a clear error, keep the
``backend`` (a runtime choice) out of the file, and write atomically.

- fastvae's models: ``model.save_pretrained(dir)``, ``fastvae.VAE.from_pretrained(dir)`` (or any
  variant's class), ``fastvae.models.from_pretrained(dir)`` (whatever kind the folder holds; the
  kinds are fastvae.models' registry, so that module builds them from what this one reads).
- A user's own module (trained with ``fastvae.fit`` or not): ``fastvae.save_pretrained(module, dir)``
  writes its state_dict and its class's import path; fastvae cannot rebuild a class it does not
  know (its constructor arguments are the user's), so ``fastvae.load_pretrained(dir, MyVAE(...))``
  fills a module the user built, after checking it is of the saved class and shapes.
- ``fastvae export RUN DIR`` (``fastvae.runner.export``): a run's checkpoint.pt as such a folder. The checkpoint
  (weights, optimizer, RNG, position) stays the format training resumes from.

Writes are atomic: the files are written and fsynced in a temporary folder beside the target,
which is renamed into place (or, into an existing folder, each file replaced by rename, config.json
last). model.safetensors carries a copy of the config, so a folder whose files come from different
saves is refused at load, never read as a wrong model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._extras import need

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
FORMAT = "fastvae-pretrained-v1"
USER = "dropin"  # the kind of a user's own module (as fastvae.fit's checkpoints name it)


def _safetensors():
    return need("safetensors.torch", "save_pretrained / from_pretrained (model.safetensors)", package="safetensors")


def config_of(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """config.json's content: {"model": kind, **constructor arguments} for a model of fastvae's own classes
    (fastvae.VAE, fastvae.models, fit's adapter); for any other module (a user's class, a subclass of
    fastvae.VAE included) its class path and `input_shape`."""
    cls = type(model)
    if cls.__module__.split(".")[0] == "fastvae" and callable(getattr(model, "config", None)):
        return {"model": getattr(model, "name", "vae"), **model.config()}
    return {"model": USER, "module": f"{cls.__module__}.{cls.__qualname__}",
            "input_shape": list(input_shape) if input_shape is not None else None}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, input_shape: tuple[int, ...] | None = None) -> Path:
    """Write `model` (a fastvae model, or any nn.Module such as one trained with fastvae.fit) as
    model.safetensors + config.json + README.md in `save_directory`; returns the folder.
    input_shape: one sample's shape, recorded for a user's module (fastvae's models know theirs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return write(save_directory, config_of(model, input_shape), model.state_dict())


def write(directory: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor], card: str | None = None) -> Path:
    """Write config.json, model.safetensors and README.md into `directory` atomically (see the module docstring)."""
    st = _safetensors()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file; save_pretrained writes a folder: pass a folder path")
    config = {"model": config.get("model", "vae"), **config}
    text = json.dumps(config, indent=2) + "\n"
    # Every tensor copied to its own contiguous CPU storage: safetensors refuses shared (tied) storage; both names are kept.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        st.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "fastvae": FORMAT, "config": text})
        (tmp / CONFIG).write_text(text)
        (tmp / CARD).write_text(card if card is not None else model_card(config))
        mask = _umask()
        for name in (WEIGHTS, CARD, CONFIG):
            os.chmod(tmp / name, 0o666 & ~mask)
            _fsync(tmp / name)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 (and safetensors' 0600) would make the files private
        if not directory.exists():
            os.rename(tmp, directory)
        else:
            for name in (WEIGHTS, CARD, CONFIG):  # config.json last: until it lands, the folder is refused, not misread
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory.parent)
    _fsync(directory)
    return directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_card(config: dict[str, Any], trained: str = "") -> str:
    """A short README.md: the Hub's metadata header, what the folder holds and how to load it."""
    kind = config["model"]
    load = (f"module = MyVAE(...)  # your class, {config.get('module')}\nfastvae.load_pretrained(\"<folder or repo id>\", module)"
            if kind == USER else "model = fastvae.models.from_pretrained(\"<folder or repo id>\")")
    return (f"---\nlibrary_name: fastvae\ntags:\n- fastvae\n- vae\n---\n\n# fastvae {kind} model\n\n"
            f"{trained}config.json holds its configuration and model.safetensors its weights.\n\n"
            f"```python\nimport fastvae\n\n{load}\n```\n\nConfiguration:\n\n```json\n{json.dumps(config, indent=2)}\n```\n")


def locate(path: str | os.PathLike, **hub: Any) -> Path:
    """The local folder holding config.json and model.safetensors: `path` itself, or a Hub repo id
    ("user/name") fetched with huggingface_hub (revision=, token=, cache_dir=, local_files_only=)."""
    folder = Path(path)
    if folder.is_dir():
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{str(folder)!r} has no {name}; pass a folder written by save_pretrained or `fastvae export`")
        return folder
    if folder.exists():
        raise ValueError(f"{str(folder)!r} is a file; pass the folder that holds {CONFIG} and {WEIGHTS}")
    text = str(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no folder {text!r}; pass a folder written by save_pretrained or `fastvae export`, or a Hub repo id 'user/name'")
    hf = need("huggingface_hub", f"loading {text!r} from the Hugging Face Hub (no local folder has that name)")
    files = [Path(hf.hf_hub_download(text, name, **hub)) for name in (CONFIG, WEIGHTS)]
    return files[0].parent


def read(path: str | os.PathLike, map_location: str | torch.device = "cpu", **hub: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of a save_pretrained folder (or Hub repo id); refuses a foreign or inconsistent folder."""
    st = _safetensors()
    folder = locate(path, **hub)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as exc:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({exc}); save the model again") from None
    try:
        with st.safe_open(str(folder / WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own error types differ between versions
        raise ValueError(f"{folder / WEIGHTS} is not a readable safetensors file ({type(exc).__name__}: {exc}); save the model again") from None
    if meta.get("fastvae") != FORMAT or not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{str(folder)!r} is not a fastvae model folder (no {FORMAT!r} tag in {WEIGHTS}, or no \"model\" kind in {CONFIG}); "
                         "load other libraries' weights with their own from_pretrained")
    if json.loads(meta["config"]) != config:
        raise ValueError(f"{folder / WEIGHTS} was saved for another configuration than {folder / CONFIG} says "
                         f"(weights: {meta['config'].strip()}; config.json: {json.dumps(config, sort_keys=True)}): the folder mixes two saves "
                         "(an interrupted save into an existing folder?); save the model again")
    return config, st.load_file(str(folder / WEIGHTS), device=str(map_location))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load_state_dict with an error that names the tensors whose presence or shape differs."""
    mine = model.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    shapes = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(mine[k].shape)}" for k in mine if k in state and state[k].shape != mine[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {unexpected[:5]}"] if unexpected else []) + shapes[:5]
        raise ValueError(f"the weights in {where} do not fit this model ({'; '.join(parts)}); build the model with the saved configuration")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # float64 weights stay float64
    model.load_state_dict(state)


def load_pretrained(path: str | os.PathLike, model: nn.Module, *, map_location: str | torch.device | None = None, **hub: Any) -> nn.Module:
    """Fill `model` (one you built: your own module, or a fastvae model) with the weights saved in `path`;
    refuses a folder saved from another class or configuration, naming the difference. Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module you built, got {type(model).__name__}")
    if map_location is None:
        param = next(model.parameters(), None)
        map_location = param.device if param is not None else "cpu"
    config, state = read(path, map_location, **hub)
    mine = config_of(model)
    if config["model"] == USER or mine["model"] == USER:
        if config.get("module") != mine.get("module"):
            raise ValueError(f"{str(path)!r} holds the weights of {config.get('module') or config['model']}, not of {mine.get('module') or mine['model']}; "
                             "load them into the class they were saved from (the tensors alone: safetensors.torch.load_file)")
    else:
        diffs = [f"{k}: saved {config.get(k)!r} vs model {mine.get(k)!r}" for k in sorted(set(config) | set(mine)) if config.get(k) != mine.get(k)]
        if diffs:
            raise ValueError(f"{str(path)!r} holds a model of another configuration ({'; '.join(diffs)}); build the model with the saved "
                             "settings, or let fastvae.models.from_pretrained(path) build it")
    load_weights(model, state, str(path))
    return model


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload fastvae model", input_shape: tuple[int, ...] | None = None) -> Any:
    """save_pretrained into a temporary folder and upload it to the Hub repo `repo_id` (created if missing)."""
    hf = need("huggingface_hub", "push_to_hub")
    api = hf.HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", input_shape=input_shape)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
