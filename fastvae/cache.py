"""``--data PATH`` for the CLI: a shard folder is opened; an image folder (or an IDX/.npy file) is prepared
into a cache first, and that cache is re-used while the source and the settings are unchanged.

The cache lives in $FASTVAE_CACHE, else ~/.cache/fastvae/prepared, one folder per source and settings:
``<name>-<hash of the source's path>-<hash of the settings and of every file's path, size and mtime>``.
A changed folder (a file added, removed or rewritten) gets a new folder; the stale one of the same
source is deleted once the new one is complete. ``fastvae.prepare.prepare`` is resumable, so a killed
preparation continues where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

ENV_VAR = "FASTVAE_CACHE"
MANIFEST = "manifest.json"


def root() -> Path:
    """Where prepared copies go: $FASTVAE_CACHE, else ~/.cache/fastvae/prepared."""
    return Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else Path.home() / ".cache" / "fastvae" / "prepared"


def fingerprint(src: Path, settings: dict[str, Any]) -> str:
    """A hash of the settings and of every file under `src` (relative path, size, mtime in ns), sorted."""
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    if src.is_file():
        st = src.stat()
        h.update(f"{src.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    entries = []
    for folder, dirs, files in os.walk(src, followlinks=True):
        dirs.sort()
        for name in files:
            path = Path(folder) / name
            try:
                st = path.stat()
            except OSError:
                continue  # a broken link: prepare reports it
            entries.append(f"{path.relative_to(src)}\0{st.st_size}\0{st.st_mtime_ns}\n")
    for line in sorted(entries):
        h.update(line.encode())
    return h.hexdigest()[:16]


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def open_data(path: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
              say: Callable[[str], None] = print, prepare: bool = True) -> Any:
    """The shard set at `path`, or the cached preparation of the images at `path` (prepared now if needed).
    prepare=False waits for another process to prepare it (torchrun's other ranks wait for rank 0)."""
    from . import data

    src = Path(path).expanduser()
    if is_shard_folder(src):
        shards = data.open(src)
        c, h, w = shards.shape
        if (image_size is not None and (h, w) != (image_size, image_size)) or (channels is not None and channels != c):
            raise ValueError(f"{src} is a prepared shard set of {h}x{w} images with {c} channel(s); --image-size/--channels "
                             f"apply when preparing: run fastvae prepare on the original images with the size you want, or drop them")
        return shards
    if not src.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; pass a shard folder (fastvae prepare SRC OUT) or an image folder")
    settings = {"image_size": image_size, "channels": channels}
    base = f"{src.resolve().name or 'data'}-{hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]}"
    out = root() / f"{base}-{fingerprint(src, settings)}"
    if is_shard_folder(out):
        say(f"fastvae: using {out}, the prepared copy of {src} (the folder and settings are unchanged since it was prepared)")
        return data.open(out)
    if not prepare:
        while not is_shard_folder(out):
            time.sleep(1.0)
        return data.open(out)
    say(f"fastvae: preparing {src} into the cache {out} (once: re-used while the folder and settings are unchanged; "
        f"set ${ENV_VAR} to put it elsewhere)")
    from .prepare import prepare

    prepare(src, out, image_size=image_size, channels=channels)
    for stale in root().glob(f"{base}-*"):
        if stale != out and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            say(f"fastvae: removed {stale}, a stale prepared copy of {src}")
    return data.open(out)
