"""The model variants, by name: ``fastvae train --model NAME`` and checkpoints' config()["model"].

vae   fastvae.VAE, the reference MLP VAE (its config() has no "model" key: read as "vae")
cvae  ConditionalVAE: a one-hot label or a condition vector joins the encoder's input and z
conv  ConvVAE: stride-2 Conv2d encoder, ConvTranspose2d decoder, for (C, H, W) images
hvae  HierarchicalVAE: two stochastic levels, p(z2) p(z1 | z2) p(x | z1)
rvae  RecurrentVAE: GRU encoder and GRU decoder for (T, F) sequences
aae   AdversarialAE: a discriminator on z replaces the KL; its own training_step
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Sequence

from torch import nn

_CLASSES = {
    "vae": ("fastvae.model", "VAE"),
    "cvae": ("fastvae.models.cvae", "ConditionalVAE"),
    "conv": ("fastvae.models.conv", "ConvVAE"),
    "hvae": ("fastvae.models.hierarchical", "HierarchicalVAE"),
    "rvae": ("fastvae.models.recurrent", "RecurrentVAE"),
    "aae": ("fastvae.models.aae", "AdversarialAE"),
}
MODELS = tuple(_CLASSES)

__all__ = ["MODELS", "get", "from_config", "from_pretrained", "for_data", "ConditionalVAE", "ConvVAE", "HierarchicalVAE", "RecurrentVAE", "AdversarialAE"]


def get(name: str) -> type[nn.Module]:
    """The model class registered as `name` (one of MODELS)."""
    if name not in _CLASSES:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def from_config(config: dict[str, Any], *, backend: str | None = None) -> nn.Module:
    """Rebuild a model (untrained weights) from its config(), as stored in checkpoints."""
    kwargs = dict(config)
    return get(kwargs.pop("model", "vae"))(**kwargs, backend=backend)


def from_pretrained(path: Any, cls: type[nn.Module] | None = None, *, backend: str | None = None, map_location: Any = "cpu",
                    **hub: Any) -> nn.Module:
    """The fastvae model a save_pretrained folder (or Hub repo id) holds, in eval mode on `map_location`
    (see fastvae.pretrained). cls: the class expected (None: whatever kind the folder holds); another
    kind, or a user's own module (which fastvae cannot rebuild), is refused with the way to load it."""
    from ..pretrained import USER, load_weights, read

    config, state = read(path, map_location, **hub)
    kind = config["model"]
    if kind == USER:
        raise ValueError(f"{str(path)!r} holds a user's own module ({config.get('module')}), which fastvae cannot rebuild (its constructor "
                         "is yours): build it and fill it with fastvae.load_pretrained(path, MyVAE(...))")
    if kind not in MODELS:
        raise ValueError(f"{str(path)!r} holds a model of kind {kind!r}, which this fastvae does not know (one of {MODELS})")
    wanted = get(kind)
    if cls is not None and not issubclass(wanted, cls):
        raise ValueError(f"{str(path)!r} holds a {kind} model ({wanted.__module__}.{wanted.__qualname__}), not a {cls.__qualname__}; "
                         f"load it with {wanted.__qualname__}.from_pretrained(path) or fastvae.models.from_pretrained(path)")
    try:
        model = from_config(config, backend=backend)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r}: config.json does not describe a valid {kind} model ({exc})") from None
    load_weights(model, state, str(path))
    return model.to(map_location).eval()


def for_data(name: str, sample_shape: Sequence[int], *, hidden_dims: Sequence[int] | None = None, latent_dim: int = 20,
             likelihood: str = "bernoulli", num_classes: int = 10, backend: str | None = None) -> nn.Module:
    """Build model `name` for samples of `sample_shape` ((H, W) or (C, H, W) images; rvae: (T, F) rows)
    from the CLI's common settings. hidden_dims=None keeps each model's default; for conv they are
    the channels per stride-2 level, for rvae the first entry is the GRU's hidden size; hvae's top
    level gets max(1, latent_dim // 2) dimensions."""
    shape = tuple(int(s) for s in sample_shape)
    size = math.prod(shape)
    common: dict[str, Any] = {"latent_dim": latent_dim, "likelihood": likelihood, "backend": backend}
    if hidden_dims is not None:
        hidden_dims = tuple(hidden_dims)
    if name == "conv":
        image_shape = shape if len(shape) == 3 else (1, *shape)
        return get(name)(image_shape=image_shape, **({"channels": hidden_dims} if hidden_dims else {}), **common)
    if name == "rvae":
        if len(shape) != 2:
            raise ValueError(f"rvae reads each sample as a (steps, features) sequence, got sample shape {shape}")
        return get(name)(seq_len=shape[0], features=shape[1], **({"hidden_size": hidden_dims[0]} if hidden_dims else {}), **common)
    extra: dict[str, Any] = {"hidden_dims": hidden_dims} if hidden_dims else {}
    if name == "hvae":
        common.pop("latent_dim")
        extra["latent_dims"] = (latent_dim, max(1, latent_dim // 2))
    if name == "cvae":
        extra["num_classes"] = num_classes
    return get(name)(input_dim=size, **extra, **common)


def __getattr__(name: str) -> type[nn.Module]:
    """fastvae.models.ConditionalVAE etc., imported on first use."""
    for key, (_, cls) in _CLASSES.items():
        if cls == name and key != "vae":
            return get(key)
    raise AttributeError(f"module 'fastvae.models' has no attribute {name!r}")
