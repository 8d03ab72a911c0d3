"""Optional dependencies: imported where a feature needs them, with an error that names the extra."""
from __future__ import annotations

import importlib
from types import ModuleType

# pyproject's optional-dependencies: the extra that installs each module.
EXTRAS = {"tensorboard": "tensorboard", "safetensors": "hub", "huggingface_hub": "hub",
          "lightning": "integrations", "accelerate": "integrations"}


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message says which extra installs it."""


def need(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import `module` (e.g. "safetensors.torch"), or raise MissingExtra naming `purpose`, the missing
    `package` (default: the module's top-level name) and the extra that installs it."""
    package = package or module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != package:
            raise  # the package is there but something else failed: show the real error
        raise MissingExtra(f"{purpose} needs the {package} package, which is not installed: pip install 'fastvae[{EXTRAS[package]}]' "
                           f"(or pip install {package})") from None
