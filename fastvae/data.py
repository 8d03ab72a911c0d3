"""Real MNIST and Fashion-MNIST: find the IDX files on disk, read them fast, download only on request;
and `open`, a user's own images prepared as uint8 shards (fastvae/shards.py, `fastvae prepare`).

The project trains on real data only. `load` looks in an explicit `root`, else in $FASTVAE_DATA and
the standard places (Debian's dataset-fashion-mnist package, ~/.cache/fastvae/<name>/, torchvision's
./data/<Name>/raw/), and fails with a message that lists where it looked and how to fix it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from . import shards as _shards
from .shards import ShardSet

__all__ = ["Dataset", "DatasetNotFoundError", "DownloadError", "ShardSet", "load", "open", "read_idx", "to_float", "NAMES", "SPLITS"]

NAMES = ("fashion-mnist", "mnist")
SPLITS = ("train", "test")
ENV_VAR = "FASTVAE_DATA"

_TORCHVISION_DIR = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),), "mnist": ()}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MIRRORS = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
}
# MD5 of the published .gz files (the checksums torchvision uses).
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_FETCH_TIMEOUT_S = 60.0


def open(path: str | os.PathLike, *, verify: str = "auto") -> ShardSet:
    """Open a prepared shard set (the OUT folder of `fastvae prepare`): see fastvae.shards.open."""
    return _shards.open(path, verify=verify)


class DatasetNotFoundError(FileNotFoundError):
    """No folder holds the IDX files of the requested dataset split; the message lists where we looked."""


class DownloadError(OSError):
    """Every mirror failed (network error or checksum mismatch); nothing was written."""


@dataclass(frozen=True)
class Dataset:
    """One split: uint8 images (N, 28, 28), int64 labels (N,), and the folder they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or not, detected from its bytes) into a tensor of its shape.

    The header (magic 0x0000, type code, dim count, big-endian uint32 dims) is validated and the
    payload must be exactly the size the header promises: a truncated or padded file is refused.
    """
    path = Path(path)
    with io.open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if compressed else io.open(path, "rb")) as f:
            return _read_idx_stream(f, path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip stream ({e}); delete the file and download or reinstall it") from None


def _read_idx_stream(f: BinaryIO, path: Path) -> torch.Tensor:
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise ValueError(f"{path}: not an IDX file (magic {head.hex() or 'empty'}; expected 0000 then a type code "
                         f"in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and a dimension count >= 1)")
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    ndim = head[3]
    dims_bytes = f.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header: expected {ndim} dimensions ({4 * ndim} bytes), got {len(dims_bytes)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(dims_bytes, dtype=">u4"))
    expected = math.prod(shape) * dtype.itemsize
    out = np.empty(shape, dtype=dtype)
    got = _read_into(f, memoryview(out).cast("B") if out.size else memoryview(bytearray()))
    extra = len(f.read(1)) if got == expected else 0
    if got != expected or extra:
        size = f"{got} bytes" if not extra else "more bytes than that"
        raise ValueError(f"{path}: IDX header says shape {shape} of {dtype.name} ({expected} payload bytes) but the file "
                         f"holds {size}; the file is truncated or corrupt: delete it and download or reinstall it")
    return torch.from_numpy(out.astype(dtype.newbyteorder("="), copy=False))


def _read_into(f: BinaryIO, buf: memoryview) -> int:
    """Fill `buf` from `f` (gzip streams may return short reads); the number of bytes read."""
    n = 0
    while n < len(buf):
        k = f.readinto(buf[n:])
        if not k:
            break
        n += k
    return n


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, ...) -> float32 (N, prod(...)) in [0, 1], the VAE's input and BCE target."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (as load() returns them), got {images.dtype}")
    if images.dim() < 2:
        raise ValueError(f"images must be (N, H, W) or (N, D), got shape {tuple(images.shape)}")
    return images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)


def load(name: str, split: str = "train", *, root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load one split of a real dataset as uint8 images (N, 28, 28) and int64 labels (N,).

    root: a folder of the IDX files (or holding <FashionMNIST|MNIST>/raw/ or <name>/); when given it
    is the only place searched. Otherwise $FASTVAE_DATA (same layouts), then the standard places.
    download: fetch the missing files (MD5-checked) into root, or ~/.cache/fastvae/<name>/.
    """
    name, split = _canonical_name(name), _canonical_split(split)
    images_file, labels_file = _FILES[split]
    candidates = _candidates(name, root)
    for folder in candidates:
        found = [_find(folder, f) for f in (images_file, labels_file)]
        if all(found):
            return _load_files(name, split, folder, *found)
    if download:
        folder = Path(root) if root is not None else _cache_dir(name)
        for f in (images_file, labels_file):
            if _find(folder, f) is None:
                _download(name, f + ".gz", folder)
        return _load_files(name, split, folder, folder / (images_file + ".gz"), folder / (labels_file + ".gz"))
    raise DatasetNotFoundError(_not_found_message(name, split, candidates, root is not None))


def _canonical_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {', '.join(NAMES)}; got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    for n in NAMES:
        if key == n.replace("-", ""):
            return n
    raise ValueError(f"name must be one of {', '.join(repr(n) for n in NAMES)} (case, '-' and '_' are ignored), got {name!r}")


def _canonical_split(split: object) -> str:
    if not isinstance(split, str) or split.lower() not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}, got {split!r}")
    return split.lower()


def _cache_dir(name: str) -> Path:
    return Path.home() / ".cache" / "fastvae" / name


def _layouts(base: Path, name: str) -> list[Path]:
    """The folder itself, torchvision's <base>/<Name>/raw/, and <base>/<name>/."""
    return [base, base / _TORCHVISION_DIR[name] / "raw", base / name]


def _candidates(name: str, root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return _layouts(Path(root).expanduser(), name)
    places: list[Path] = []
    if os.environ.get(ENV_VAR):
        places += _layouts(Path(os.environ[ENV_VAR]).expanduser(), name)
    places += [*_SYSTEM_DIRS[name], _cache_dir(name), Path.cwd() / "data" / _TORCHVISION_DIR[name] / "raw"]
    return places


def _find(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / (stem + ".gz")):
        if p.is_file():
            return p
    return None


def _load_files(name: str, split: str, folder: Path, images_path: Path, labels_path: Path) -> Dataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} integer labels (one per image in {images_path.name}), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{labels_path}: labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
    return Dataset(images=images, labels=labels, name=name, split=split, source=str(folder))


def _not_found_message(name: str, split: str, candidates: list[Path], explicit_root: bool) -> str:
    wanted = " and ".join(f"{f}[.gz]" for f in _FILES[split])
    lines = [f"{name} {split} split not found: need {wanted} in one folder. Searched:"]
    if not explicit_root and not os.environ.get(ENV_VAR):
        lines.append(f"  ${ENV_VAR}  (not set)")
    for folder in candidates:
        if folder.is_dir():
            missing = [f"{f}[.gz]" for f in _FILES[split] if _find(folder, f) is None]
            lines.append(f"  {folder}  (exists; missing {', '.join(missing)})")
        else:
            lines.append(f"  {folder}  (no such folder)")
    fixes = []
    if name == "fashion-mnist":
        fixes.append("install Debian's package: apt-get install dataset-fashion-mnist")
    fixes.append("point root= (CLI: --data-dir) or $" + ENV_VAR + " at a folder holding the four IDX files "
                 "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not)")
    fixes.append(f"where a network exists, download them: CLI --download, Python download=True (MD5-checked, into "
                 f"{'root (--data-dir)' if explicit_root else _cache_dir(name)})")
    lines.append("Fix: " + "; or ".join(fixes) + ".")
    return "\n".join(lines)


def _fetch(url: str) -> BinaryIO:
    """Open `url` for reading (the only network access in fastvae; tests replace it)."""
    return urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S)


def _download(name: str, filename: str, folder: Path) -> Path:
    """Fetch `filename` from the first mirror whose bytes match the published MD5, into `folder`.

    The bytes go to a temporary file beside the target, renamed only after the checksum matches,
    so a failed or corrupt download leaves nothing behind.
    """
    expected = _MD5[name][filename]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    errors = []
    for mirror in _MIRRORS[name]:
        url = mirror + filename
        fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=folder)
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, _fetch(url) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected:
                raise ValueError(f"checksum mismatch: md5 {digest.hexdigest()}, expected {expected}")
            os.replace(tmp, target)
            return target
        except (OSError, ValueError) as e:
            errors.append(f"  {url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(f"could not download {name} {filename}; nothing was written. Tried:\n" + "\n".join(errors) +
                        "\nWithout a network, copy the four IDX files into a folder and pass it as --data-dir (root=).")
