"""Checkpoints: written atomically (temp file, fsync, rename), read with weights_only=True.

A crash while writing leaves the previous checkpoint intact; a checkpoint carrying pickled
code is refused by torch's weights-only unpickler.
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastvae-checkpoint-v1"
FILENAME = "checkpoint.pt"  # in each run folder
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# Test hook only: seconds to sleep between writing the temp file and renaming it, so that a test
# can kill the process at exactly that moment (tests/test_crash_safety.py).
TEST_PAUSE_ENV = "FASTVAE_TEST_PAUSE_BEFORE_RENAME"


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(TEST_PAUSE_ENV):
            time.sleep(float(os.environ[TEST_PAUSE_ENV]))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed before its rename
        stale.unlink(missing_ok=True)
    return path


def locate(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: itself, or a run folder's checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / FILENAME).is_file():
            raise FileNotFoundError(f"{str(path)!r} is a folder without a {FILENAME}; pass a run folder (runs/<name>) "
                                    f"whose first epoch has finished, or a {FILENAME} file")
        return path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a run folder (runs/<name>) or its {FILENAME}")
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a fastvae checkpoint (a file, or a run folder's checkpoint.pt); a clear error for a
    missing, truncated, foreign or unsafe file."""
    path = locate(path)
    foreign = f"{str(path)!r} is not a fastvae checkpoint"
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise ValueError(f"{foreign} (not a file torch.save wrote); pass a run folder (runs/<name>) or its {FILENAME}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{foreign}: refused by torch.load(weights_only=True) as it may carry pickled code "
                         "(Python objects, which fastvae checkpoints never hold); it was not loaded") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(exc).__name__}: {exc}); resume from an earlier checkpoint or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{foreign} (no format tag {FORMAT!r}); to load bare weights use model.load_state_dict(torch.load(path, weights_only=True))")
    return state


def check_config(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint written for a different model configuration, naming the differences."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs model {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} was written for another model configuration ({'; '.join(diffs)}); build the model with the checkpoint's settings or start a new run")


def _describe(shape: tuple[int, ...]) -> str:
    from .stream import image_shape

    image = image_shape(shape)
    if image is None:
        return f"samples of shape {'x'.join(map(str, shape))}"
    c, h, w = image
    kind = {1: "grey", 3: "RGB", 4: "RGBA"}[c]
    return f"{h}x{w} {kind} images ({c} channel{'s' if c > 1 else ''})"


def check_data(state: dict[str, Any], sample_shape: tuple[int, ...], path: str | os.PathLike, what: str) -> None:
    """Refuse data whose samples are not what the checkpoint was trained on (image size, channels), naming
    both and the fix. Checkpoints written before the data's shape was stored pass."""
    from .stream import image_shape

    saved = (state.get("data") or {}).get("shape")
    if saved is None:
        return
    saved, new = tuple(int(s) for s in saved), tuple(int(s) for s in sample_shape)
    a, b = image_shape(saved), image_shape(new)
    same = a == b if a is not None and b is not None else math.prod(saved) == math.prod(new)
    if not same:
        fix = (f"prepare the data at the checkpoint's size (fastvae prepare SRC OUT --image-size {a[1]} --channels {a[0]})"
               if a is not None and a[1] == a[2] else "pass data of the checkpoint's shape")
        raise ValueError(f"checkpoint {str(path)!r} was trained on {_describe(saved)} but {what} holds {_describe(new)}; "
                         f"{fix}, or train a new model on these data")
