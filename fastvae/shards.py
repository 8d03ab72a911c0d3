"""uint8 image shards on disk: the writer and the validating reader (`fastvae.data.open`).

A shard set is one folder: ``manifest.json`` plus ``images-NNNNN.npy`` (uint8, (n, C, H, W)) and,
where the set has labels, ``labels-NNNNN.npy`` (int64, (n,)). Every file is written under a
temporary name in the folder, fsynced and renamed, and the manifest last, so a file with a final
name is whole and a folder with a manifest is complete (the format: docs/data.md).

Checksum policy: `open` always checks every file's size (a stat, free). The full sha256 of every
file is checked the first time a set is opened; after a full check a *verified stamp* (size,
mtime, ctime and inode of each file, and the manifest's sha256) is kept in ``.verified.json`` in
the folder (or, where the folder is read-only, in ~/.cache/fastvae/verified/); later opens whose
files still match the stamp skip the hashing. ``verify="full"`` hashes every time, ``"size"``
never. `fastvae prepare` writes the stamp itself, so its output opens without a re-hash.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["FORMAT", "VERSION", "ShardSet", "ShardError", "ShardWriter", "open", "write", "DEFAULT_SHARD_BYTES"]

FORMAT = "fastvae-shards"
VERSION = 1
MANIFEST = "manifest.json"
STAMP = ".verified.json"
DEFAULT_SHARD_BYTES = 64 << 20
_CHUNK = 4 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
VERIFY_MODES = ("auto", "full", "size")


class ShardError(ValueError):
    """A shard set that cannot be read as it is: the message names the file, what was expected and the fix."""


# ----------------------------------------------------------------------------------------------- writing

def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder, rename; with `durable`, fsync the
    file and the folder too (a small record that may be lost at a power cut, and redone, needs neither)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with io.open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)


def write_npy(path: Path, array: np.ndarray) -> tuple[int, str]:
    """Write `array` as a standard .npy file atomically; (file size, sha256 of the file), hashed as written.

    The bytes go to a temporary name in the same folder, are fsynced, then renamed: a reader never
    sees a half-written file under the final name, whatever happens (kill, disk full).
    """
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.sha256(header.getvalue())
    data = memoryview(array).cast("B") if array.size else memoryview(b"")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with io.open(tmp, "wb") as f:
            f.write(header.getvalue())
            for i in range(0, len(data), _CHUNK):
                piece = data[i:i + _CHUNK]
                f.write(piece)
                digest.update(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {path} ({exc.strerror or exc}); nothing under that name was "
                                 f"written: free space or fix the folder's permissions and run again") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(header.getvalue()) + len(data), digest.hexdigest()


def shard_names(index: int) -> tuple[str, str]:
    return f"images-{index:05d}.npy", f"labels-{index:05d}.npy"


def write_shard(out: Path, index: int, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """Write shard `index` (images, then labels) into `out`; its manifest entry."""
    images_name, labels_name = shard_names(index)
    size, sha = write_npy(out / images_name, images)
    entry: dict[str, Any] = {"images": images_name, "labels": None, "count": int(images.shape[0]), "bytes": size, "sha256": sha}
    if labels is not None:
        lsize, lsha = write_npy(out / labels_name, np.asarray(labels, dtype=np.int64))
        entry.update(labels=labels_name, labels_bytes=lsize, labels_sha256=lsha)
    return entry


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()


def write_manifest(out: Path, shape: Sequence[int], entries: list[dict], label_names: Sequence[str] | None, **extra: Any) -> Path:
    """Write OUT/manifest.json (atomically, last) and the verified stamp of the files just written."""
    manifest = {"format": FORMAT, "version": VERSION, "shape": [int(s) for s in shape], "dtype": "uint8",
                "count": int(sum(e["count"] for e in entries)), "shards": entries,
                "label_names": list(label_names) if label_names is not None else None}
    manifest.update(extra)
    manifest.setdefault("skipped", [])
    data = manifest_bytes(manifest)
    fsync_dir(out)  # the shards' renames are durable before the manifest that names them
    atomic_write_bytes(out / MANIFEST, data)
    _write_stamp(out, hashlib.sha256(data).hexdigest(), _files_of(manifest))
    return out / MANIFEST


def check_out_folder(out: str | os.PathLike, *, argument: str = "out", allowed: Iterable[str] = ()) -> Path:
    """`out` as a Path that is a new or empty folder (created); refuses a file or a folder holding other files.

    `allowed`: names that may already be there (a caller's own partial state). Nothing is deleted.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{argument}: {out} exists and is not a folder; give a new or empty folder for the shards")
    if out.is_dir():
        others = sorted(n for n in os.listdir(out) if n not in set(allowed))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            what = "already holds a shard set" if MANIFEST in others else f"holds other files ({shown})"
            raise FileExistsError(f"{argument}: {out} {what}; nothing was changed. Give a new or empty folder "
                                  f"(or delete {out} first)")
    out.mkdir(parents=True, exist_ok=True)
    return out


class ShardWriter:
    """Writes a shard set incrementally: `add` chunks of images (and labels), `close` writes the manifest.

    At most one shard is held in memory, so sets larger than RAM are written from a generator::

        with ShardWriter(out, (3, 64, 64), labels=True) as w:
            for images, labels in chunks:
                w.add(images, labels)

    Leaving the `with` block by an exception writes no manifest: the folder is then not a shard set.
    """

    def __init__(self, out: str | os.PathLike, shape: Sequence[int], *, labels: bool = False,
                 label_names: Sequence[str] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES, **manifest_extra: Any):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
        if int(shard_bytes) < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.out = check_out_folder(out)
        self.shape = shape
        self.has_labels = bool(labels) or label_names is not None
        self.label_names = list(label_names) if label_names is not None else None
        self.per_shard = max(1, int(shard_bytes) // int(np.prod(shape)))
        self.extra = manifest_extra
        self.entries: list[dict] = []
        self._images = np.empty((self.per_shard, *shape), dtype=np.uint8)
        self._labels = np.empty(self.per_shard, dtype=np.int64)
        self._fill = 0
        self._closed = False

    def add(self, images: Any, labels: Any = None) -> None:
        """Append images (uint8 (n, C, H, W), or (n, H, W) for one channel) and, if the set has labels, their labels."""
        images = _as_uint8_images(images, "images")
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images must have shape (n, {', '.join(map(str, self.shape))}), got {tuple(images.shape)}")
        if self.has_labels:
            if labels is None:
                raise ValueError("labels: this set has labels (labels=True or label_names given); pass labels with every add()")
            labels = _as_labels(labels, images.shape[0], self.label_names)
        elif labels is not None:
            raise ValueError("labels given to a ShardWriter made without labels=True")
        done = 0
        while done < images.shape[0]:
            take = min(self.per_shard - self._fill, images.shape[0] - done)
            self._images[self._fill:self._fill + take] = images[done:done + take]
            if self.has_labels:
                self._labels[self._fill:self._fill + take] = labels[done:done + take]
            self._fill += take
            done += take
            if self._fill == self.per_shard:
                self._flush()

    def _flush(self) -> None:
        if self._fill:
            labels = self._labels[:self._fill] if self.has_labels else None
            self.entries.append(write_shard(self.out, len(self.entries), self._images[:self._fill], labels))
            self._fill = 0

    def close(self) -> Path:
        """Write the last shard and the manifest; the folder's path."""
        if not self._closed:
            self._flush()
            if not self.entries:
                raise ValueError("no images were added: a shard set needs at least one image")
            write_manifest(self.out, self.shape, self.entries, self.label_names, **self.extra)
            self._closed = True
            self._images = self._labels = None
        return self.out

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()


def write(images: Any, out: str | os.PathLike, *, labels: Any = None, label_names: Sequence[str] | None = None,
          shard_bytes: int = DEFAULT_SHARD_BYTES, **manifest_extra: Any) -> Path:
    """Write uint8 images (numpy or torch, (N, C, H, W) or (N, H, W)) as a shard set in the new or empty folder `out`.

    labels: N integers (and label_names, their names) or None. A numpy memmap is copied shard by
    shard, never whole. Extra keyword arguments are stored in the manifest (e.g. source=...).
    """
    images = _as_uint8_images(images, "images")
    if images.shape[0] == 0:
        raise ValueError("images: empty (0 images); a shard set needs at least one image")
    if labels is not None:
        labels = _as_labels(labels, images.shape[0], label_names)
    writer = ShardWriter(out, images.shape[1:], labels=labels is not None, label_names=label_names,
                         shard_bytes=shard_bytes, **manifest_extra)
    step = writer.per_shard
    for i in range(0, images.shape[0], step):
        writer.add(images[i:i + step], labels[i:i + step] if labels is not None else None)
    return writer.close()


def _as_uint8_images(images: Any, argument: str) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{argument} must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"{argument} must be uint8 (0..255), got {images.dtype}; convert floats in [0, 1] with "
                        f"(x * 255).round().astype(np.uint8)")
    if images.ndim not in (3, 4):
        raise ValueError(f"{argument} must be (N, C, H, W) or (N, H, W), got shape {tuple(images.shape)}")
    return images if images.ndim == 4 else images[:, None]


def _as_labels(labels: Any, n: int, label_names: Sequence[str] | None) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be {n} integers (one per image), got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if n and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if label_names is not None and n and int(labels.max()) >= len(label_names):
        raise ValueError(f"labels must lie below len(label_names) = {len(label_names)}, got {int(labels.max())}")
    return labels


# ----------------------------------------------------------------------------------------------- reading

class ShardSet(torch.utils.data.Dataset):
    """A validated shard set: memory-mapped uint8 shards, labels in memory, map-style indexing.

    ``ds[i]`` is ``(uint8 tensor (C, H, W), label or -1)``, so a DataLoader takes it as it is;
    `tensor()` loads the whole set as one tensor (the resident path); `shards` and `offsets` are
    what a streaming reader gathers from. Pickles by path (DataLoader workers re-open it).
    """

    def __init__(self, path: Path, manifest: dict, shards: list[np.ndarray], labels: torch.Tensor | None):
        self.path = path
        self.manifest = manifest
        self.shape: tuple[int, int, int] = tuple(manifest["shape"])  # type: ignore[assignment]
        self.count = int(manifest["count"])
        self.shards = shards
        self.offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.shape[0] for s in shards], out=self.offsets[1:])
        self.labels = labels
        self.label_names: list[str] | None = manifest.get("label_names")
        self.nbytes = self.count * int(np.prod(self.shape))
        self._starts = self.offsets.tolist()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = int(index)
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"index {index} out of range for a shard set of {self.count} images")
        s = bisect.bisect_right(self._starts, i) - 1
        image = torch.from_numpy(np.array(self.shards[s][i - self._starts[s]]))
        return image, (int(self.labels[i]) if self.labels is not None else -1)

    def tensor(self) -> torch.Tensor:
        """The whole set as one uint8 (N, C, H, W) tensor in memory."""
        out = torch.empty((self.count, *self.shape), dtype=torch.uint8)
        view = out.numpy()
        for shard, start in zip(self.shards, self._starts):
            view[start:start + shard.shape[0]] = shard
        return out

    def __repr__(self) -> str:
        c, h, w = self.shape
        labels = f", {len(self.label_names)} labels" if self.label_names else (", labels" if self.labels is not None else "")
        return f"ShardSet({str(self.path)!r}: {self.count} images {c}x{h}x{w} in {len(self.shards)} shards{labels})"

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(open(state["path"], verify="size").__dict__)


def open(path: str | os.PathLike, *, verify: str = "auto") -> ShardSet:
    """Open and validate the shard set in folder `path` (or its manifest.json).

    Refused with a ShardError naming the file and the fix: a manifest of another format or version,
    a file named outside the folder (a ``../`` path, an absolute path, a symlink leading out: nothing
    is read), a missing, truncated or altered shard (expected and actual size or sha256), a shard
    whose shape or dtype disagrees with the manifest. verify: "auto" (full sha256 unless the
    verified stamp matches; see the module doc), "full", or "size".
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    folder = Path(path).expanduser()
    if folder.name == MANIFEST and folder.is_file():
        folder = folder.parent
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a folder; give the OUT folder of `fastvae prepare` "
                                f"(or of fastvae.shards.write)")
    if not manifest_path.is_file():
        hint = (" It holds an unfinished `fastvae prepare`: run the same command again to finish it."
                if (folder / ".prepare").exists() else " Make one with `fastvae prepare SRC OUT`.")
        raise FileNotFoundError(f"path: {folder} has no {MANIFEST}, so it is not a shard set.{hint}")
    raw = manifest_path.read_bytes()
    manifest = _parse_manifest(manifest_path, raw)
    names = _files_of(manifest)
    files = {name: _inside(folder, name, manifest_path) for name in names}  # every path checked before anything is read
    for entry in manifest["shards"]:
        _check_size(files[entry["images"]], entry["bytes"], manifest_path)
        if entry.get("labels"):
            _check_size(files[entry["labels"]], entry["labels_bytes"], manifest_path)
    if verify == "full" or (verify == "auto" and not _stamp_matches(folder, hashlib.sha256(raw).hexdigest(), names)):
        _verify_checksums(folder, manifest, files, manifest_path)
        _write_stamp(folder, hashlib.sha256(raw).hexdigest(), names)
    shape = tuple(manifest["shape"])
    shards, labels = [], []
    for entry in manifest["shards"]:
        shards.append(_load_npy(files[entry["images"]], (entry["count"], *shape), np.uint8))
        if entry.get("labels"):
            labels.append(np.array(_load_npy(files[entry["labels"]], (entry["count"],), np.int64)))
    label_tensor = None
    if labels:
        label_tensor = torch.from_numpy(np.concatenate(labels))
        names_ = manifest.get("label_names")
        if label_tensor.numel() and (int(label_tensor.min()) < 0 or (names_ and int(label_tensor.max()) >= len(names_))):
            raise ShardError(f"{manifest_path}: labels outside 0..{len(names_) - 1 if names_ else 'inf'}; the set is corrupt: "
                             f"prepare it again")
    return ShardSet(folder, manifest, shards, label_tensor)


def _parse_manifest(path: Path, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: not valid JSON ({exc}); the manifest is damaged: prepare the set again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a fastvae shard manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r}); make one with `fastvae prepare SRC OUT`")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, but this fastvae reads version {VERSION}; "
                         f"prepare the set again with this fastvae, or use the fastvae that wrote it")
    try:
        shape = manifest["shape"]
        entries = manifest["shards"]
        ok = (manifest.get("dtype") == "uint8" and isinstance(shape, list) and len(shape) == 3
              and all(isinstance(s, int) and s >= 1 for s in shape) and isinstance(entries, list) and entries
              and all(isinstance(e, dict) and isinstance(e.get("images"), str) and isinstance(e.get("count"), int)
                      and e["count"] >= 0 and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                      and (e.get("labels") is None or (isinstance(e["labels"], str) and isinstance(e.get("labels_bytes"), int)
                                                       and isinstance(e.get("labels_sha256"), str)))
                      for e in entries)
              and manifest.get("count") == sum(e["count"] for e in entries))
        names = manifest.get("label_names")
        ok = ok and (names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)))
        ok = ok and len({bool(e.get("labels")) for e in entries}) == 1
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ShardError(f"{path}: the manifest's fields are missing or inconsistent (shape [C, H, W], dtype uint8, "
                         f"shards with images/count/bytes/sha256, count = sum of the shard counts); prepare the set again")
    return manifest


def _files_of(manifest: dict) -> list[str]:
    names = []
    for e in manifest["shards"]:
        names.append(e["images"])
        if e.get("labels"):
            names.append(e["labels"])
    return names


def _inside(folder: Path, name: str, manifest_path: Path) -> Path:
    """folder/name, refused unless `name` is a plain file name whose real path stays inside the folder."""
    bad = (not _NAME.match(name) or name in (".", "..") or os.path.isabs(name))
    target = folder / name
    if not bad:
        real, root = os.path.realpath(target), os.path.realpath(folder)
        bad = os.path.dirname(real) != root
    if bad:
        raise ShardError(f"{manifest_path}: names {name!r}, which is not a file inside {folder} (a path, '..', or a "
                         f"symlink leading out); refused, nothing was read. A manifest may name only files in its own folder")
    return target


def _check_size(path: Path, expected: int, manifest_path: Path) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (listed in {manifest_path.name}); the set is incomplete: "
                         f"copy the whole folder again or prepare it again") from None
    if actual != expected:
        raise ShardError(f"{path}: {actual} bytes, but {manifest_path.name} expects {expected}; the file is "
                         f"{'truncated' if actual < expected else 'altered'}: prepare the set again (or copy the file again)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with io.open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _verify_checksums(folder: Path, manifest: dict, files: dict[str, Path], manifest_path: Path) -> None:
    expected = {}
    for e in manifest["shards"]:
        expected[e["images"]] = e["sha256"]
        if e.get("labels"):
            expected[e["labels"]] = e["labels_sha256"]
    threads = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))
    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: shards hash in parallel
        actual = dict(zip(expected, pool.map(lambda n: _sha256(files[n]), expected)))
    for name, want in expected.items():
        if actual[name] != want:
            raise ShardError(f"{files[name]}: sha256 {actual[name]}, but {manifest_path.name} expects {want}; the file was "
                             f"altered or damaged: prepare the set again (or copy the file again)")


def _load_npy(path: Path, shape: tuple, dtype: type) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ShardError(f"{path}: not a readable .npy file ({exc}); prepare the set again") from None
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape) or not array.flags.c_contiguous:
        raise ShardError(f"{path}: holds {array.dtype} {tuple(array.shape)}, but the manifest expects {np.dtype(dtype).name} "
                         f"{tuple(shape)} (C-contiguous); prepare the set again")
    return array


# ------------------------------------------------------------------------------------------ verified stamp

def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp_places(folder: Path) -> list[Path]:
    real = os.path.realpath(folder)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastvae" / "verified"
    return [folder / STAMP, cache / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")]


def _stamp(folder: Path, manifest_sha: str, names: list[str]) -> dict:
    return {"manifest_sha256": manifest_sha, "folder": os.path.realpath(folder),
            "files": {n: _stat_key(folder / n) for n in names}}


def _stamp_matches(folder: Path, manifest_sha: str, names: list[str]) -> bool:
    try:
        now = _stamp(folder, manifest_sha, names)
    except OSError:
        return False
    for place in _stamp_places(folder):
        try:
            if json.loads(place.read_text()) == now:
                return True
        except (OSError, ValueError):
            continue
    return False


def _write_stamp(folder: Path, manifest_sha: str, names: list[str]) -> None:
    """Record that the files as they are now passed a full check (best effort: a read-only folder falls back to the cache)."""
    data = json.dumps(_stamp(folder, manifest_sha, names)).encode()
    for place in _stamp_places(folder):
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(place, data, durable=False)  # lost at a power cut: the next open hashes again
            return
        except OSError:
            continue
