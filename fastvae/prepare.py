"""`fastvae prepare`: an image folder, an IDX pair or a .npy array -> uint8 shards + manifest (fastvae/shards.py).

Images are decoded with Pillow: what a Python user already has (matplotlib depends on it), it reads
JPEG, PNG, WebP and BMP, and its JPEG *draft* mode decodes straight at 1/2, 1/4 or 1/8 scale when
the target is that much smaller, a real speed win for photos (torchvision.io decodes no faster
on a CPU, and PyPI's torchvision does not import beside this torch build).

Resize policy (``image_size=S``): EXIF orientation applied, the largest centred square cropped,
resized to S x S (bicubic, antialiased; JPEGs first drafted to the smallest 1/2^k scale that is
still >= S). Without ``image_size`` every image must already have the same size.

Work is split into shards by a deterministic function of the sorted file list and the settings;
each shard is converted by one worker process and written atomically, then a record of it; the
manifest is written last. A killed run leaves its settings in OUT/.prepare/state.json and a
re-run with the same settings and source converts only the shards without a record, giving the
same bytes as an uninterrupted run; a re-run with other settings is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Sequence

import numpy as np

from . import shards

__all__ = ["prepare", "IMAGE_EXTENSIONS", "RESIZE_POLICY"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RESIZE_POLICY = ("EXIF orientation applied; the largest centred square cropped and resized to SxS "
                 "(bicubic, antialiased; JPEGs first decoded at the smallest 1/2, 1/4 or 1/8 scale still >= S)")
STATE_DIR = ".prepare"
SHARD_BYTES = 64 << 20         # at most this many bytes of pixels per shard ...
MIN_SHARD_IMAGES = 256         # ... and at least this many images, or 1/64 of the set: enough shards to share among workers
KILL_AFTER_ENV = "FASTVAE_PREPARE_KILL_AFTER"  # tests: SIGKILL this process after k shards were recorded (a real kill -9)
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_OURS = re.compile(r"^(manifest\.json|images-\d{5}\.npy|labels-\d{5}\.npy|\.verified\.json|\.prepare|\..+\.tmp)$")


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
            workers: int | None = None, progress: bool = True, labels: str | os.PathLike | None = None,
            shard_images: int | None = None) -> Path:
    """Convert `src` (an image folder, an IDX images file, or a .npy uint8 array) into a shard set in `out`.

    image_size: S to centre-crop and resize every image to S x S (see RESIZE_POLICY); None keeps the
    size, which must then be the same for all images. channels: 1 or 3 to force grayscale or RGB;
    None keeps it (3 when any image is in colour, else 1). workers: processes (default: the cores
    this process may use). labels: a labels file (IDX or .npy) for an array source (default for IDX:
    the matching *-labels-idx1-ubyte file beside it). shard_images: images per shard (default: at
    most 64 MB of pixels, at least 256 images or 1/64 of the set).
    Returns `out`; a finished `out` of the same settings and source is returned as it is.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size (--image-size) must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels (--channels) must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers (--workers) must be a positive integer, got {workers!r}")
    if shard_images is not None and (not isinstance(shard_images, int) or shard_images < 1):
        raise ValueError(f"shard_images must be a positive integer, got {shard_images!r}")
    source = _Source.of(src, labels, out)
    settings = {"source": source.describe(), "image_size": image_size, "channels": channels, "shard_images": shard_images}
    key = {"settings": settings, "fingerprint": source.fingerprint}
    done = _check_out(out, key)
    if done:
        _say(f"fastvae prepare: {out} already holds this set (same source and settings); nothing to do", progress)
        return out
    workers = workers or _free_cores()
    state_path = out / STATE_DIR / "state.json"
    if state_path.is_file():
        plan = json.loads(state_path.read_text())["plan"]
    else:
        plan = source.plan(image_size, channels, shard_images, workers, progress)
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR).mkdir(exist_ok=True)
        shards.atomic_write_bytes(state_path, json.dumps({"key": key, "plan": plan}, indent=1).encode())
    if isinstance(source, _Array):
        workers = 1  # an array is converted in this process: shipping it to workers would cost more than the copy
    return _run(source, out, key, plan, workers, progress)


# --------------------------------------------------------------------------------------------- sources

class _Source:
    """What to convert: the sorted items, how each becomes a (C, H, W) uint8 array, and a fingerprint."""

    kind = ""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def of(src: Path, labels: str | os.PathLike | None, out: Path) -> "_Source":
        if not src.exists():
            raise FileNotFoundError(f"src: {src} does not exist; give a folder of images (JPEG, PNG, WebP, BMP), "
                                    f"an IDX images file or a .npy array")
        if src.is_dir():
            if labels is not None:
                raise ValueError("labels (--labels) is for an IDX or .npy source; an image folder takes its labels from "
                                 "its sub-folder names")
            return _Folder(src, out)
        return _Array(src, labels)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.realpath(self.path)}


class _Folder(_Source):
    kind = "folder"

    def __init__(self, path: Path, out: Path):
        super().__init__(path)
        files, ignored = [], 0
        seen = {os.path.realpath(out)}  # OUT inside SRC is not searched; a symlink cycle is followed once
        for root, dirs, names in os.walk(path, followlinks=True):
            seen.add(os.path.realpath(root))
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen)
            for name in names:
                if name.startswith("."):
                    continue
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/"))
                else:
                    ignored += 1
        files.sort()
        if not files:
            what = "is empty" if not ignored else f"holds {ignored} files but none is an image ({', '.join(IMAGE_EXTENSIONS)})"
            raise ValueError(f"src: {path} {what}; point SRC at a folder of images (sub-folders name the labels)")
        classes = sorted({f.split("/")[0] for f in files if "/" in f})
        self.label_names = classes or None
        index = {c: i for i, c in enumerate(classes)}
        self.items = [(f, index.get(f.split("/")[0], -1) if "/" in f else -1) for f in files]
        self.ignored = ignored
        digest = hashlib.sha256()
        for f in files:
            st = os.stat(path / f)
            digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        self.fingerprint = digest.hexdigest()

    def plan(self, image_size, channels, shard_images, workers, progress) -> dict:
        shape = None
        if channels is None or image_size is None:  # a header pass (no pixel decoding) decides what is kept
            headers = _map(_header, [(str(self.path / f),) for f, _ in self.items], workers, progress, "scan")
            readable = [(f, h) for (f, _), h in zip(self.items, headers) if isinstance(h, tuple)]
            if not readable:
                reasons = "; ".join(f"{f}: {h}" for (f, _), h in list(zip(self.items, headers))[:3])
                raise ValueError(f"src: none of the {len(self.items)} image files in {self.path} could be read ({reasons})")
            if channels is None:
                channels = 1 if all(h[0] in _GRAY_MODES or h[0].startswith("I;") for _, h in readable) else 3
            if image_size is None:
                sizes = {}
                for f, h in readable:
                    sizes.setdefault(h[1], f)
                if len(sizes) > 1:
                    shown = ", ".join(f"{w}x{h} ({f})" for (w, h), f in list(sizes.items())[:3])
                    raise ValueError(f"src: the images have {len(sizes)} different sizes ({shown}); pass --image-size S "
                                     f"(image_size=S) to crop and resize them all to SxS")
                (w, h), = sizes
                shape = [channels, h, w]
        if shape is None:
            shape = [channels, image_size, image_size]
        return _plan(len(self.items), shape, shard_images, self.label_names, image_size is not None,
                     {"images": len(self.items), "ignored_files": self.ignored})

    def job(self, plan: dict, index: int) -> tuple:
        k = plan["shard_images"]
        return (_folder_shard, str(self.path), plan["shape"], plan["resize"],
                self.items[index * k:(index + 1) * k], plan["labelled"])


class _Array(_Source):
    """An IDX images file (gzipped or not) or a .npy array: (N, H, W), (N, C, H, W) or (N, H, W, C), uint8."""

    def __init__(self, path: Path, labels: str | os.PathLike | None):
        super().__init__(path)
        self.kind = "npy" if path.suffix == ".npy" else "idx"
        self.array = _read_array(path, "src")
        a = self.array
        if a.dtype != np.uint8:
            raise ValueError(f"src: {path} holds {a.dtype}; prepare takes uint8 images: convert floats in [0, 1] with "
                             f"(x * 255).round().astype(np.uint8) and save that")
        if a.ndim == 3:
            self.layout = "NHW"
        elif a.ndim == 4 and a.shape[1] in (1, 3):
            self.layout = "NCHW"
        elif a.ndim == 4 and a.shape[3] in (1, 3):
            self.layout = "NHWC"
        else:
            raise ValueError(f"src: {path} holds shape {a.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3")
        if a.shape[0] == 0:
            raise ValueError(f"src: {path} holds no images (shape {a.shape})")
        self.labels_path = Path(labels).expanduser() if labels is not None else _idx_labels_beside(path) if self.kind == "idx" else None
        self.labels = None
        if self.labels_path is not None:
            lab = _read_array(self.labels_path, "labels")
            if lab.shape != (a.shape[0],) or not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 0):
                raise ValueError(f"labels: {self.labels_path} holds {lab.dtype} {lab.shape}; expected {a.shape[0]} "
                                 f"integers >= 0, one per image of {path}")
            self.labels = lab.astype(np.int64)
        digest = hashlib.sha256()
        for p in (path, self.labels_path):
            if p is not None:
                st = os.stat(p)
                digest.update(f"{os.path.realpath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        self.fingerprint = digest.hexdigest()

    def describe(self) -> dict:
        return {**super().describe(), "labels": os.path.realpath(self.labels_path) if self.labels_path else None}

    def chw(self, lo: int, hi: int) -> np.ndarray:
        a = self.array[lo:hi]
        return a[:, None] if self.layout == "NHW" else a if self.layout == "NCHW" else a.transpose(0, 3, 1, 2)

    def plan(self, image_size, channels, shard_images, workers, progress) -> dict:
        c, h, w = self.chw(0, 1).shape[1:]
        shape = [channels or c, image_size or h, image_size or w]
        names = [str(i) for i in range(int(self.labels.max()) + 1)] if self.labels is not None else None
        return _plan(self.array.shape[0], shape, shard_images, names, image_size is not None, {"images": int(self.array.shape[0]), "layout": self.layout})

    def job(self, plan: dict, index: int) -> tuple:
        k = plan["shard_images"]
        lo, hi = index * k, min((index + 1) * k, self.array.shape[0])
        return (_array_shard, self, lo, hi, plan)


def _read_array(path: Path, argument: str) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{argument}: {path} is not a readable .npy array ({exc})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\0\0" and head != b"\x1f\x8b":
        raise ValueError(f"{argument}: {path} is neither a folder, a .npy array nor an IDX file; give a folder of images "
                         f"(JPEG, PNG, WebP, BMP), an IDX file (e.g. train-images-idx3-ubyte[.gz]) or a .npy uint8 array")
    from .data import read_idx
    return read_idx(path).numpy()


def _idx_labels_beside(path: Path) -> Path | None:
    """train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz] where that file exists."""
    name = path.name.replace("images", "labels").replace("idx3", "idx1")
    for candidate in (name, name + ".gz", name.removesuffix(".gz")):
        if candidate != path.name and (path.parent / candidate).is_file():
            return path.parent / candidate
    return None


def _plan(n: int, shape: list, shard_images: int | None, label_names: list | None, resize: bool, source_info: dict) -> dict:
    """How the work is cut: shard i holds items [i*k, (i+1)*k) of the sorted list (a function of the list and the settings)."""
    image_bytes = math.prod(shape)
    k = shard_images or max(1, min(SHARD_BYTES // image_bytes, max(MIN_SHARD_IMAGES, math.ceil(n / 64))))
    return {"shape": shape, "shard_images": k, "shards": math.ceil(n / k), "label_names": label_names,
            "labelled": label_names is not None, "resize": resize, "source_info": source_info}


# ------------------------------------------------------------------------------------------ decoding

def _header(path: str):
    """(mode, (width, height) after EXIF orientation) from the header only, or the reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in (5, 6, 7, 8):  # turned by 90 degrees
                w, h = h, w
            return img.mode, (w, h)
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for a bad file
        return _reason(exc)


def _orientation(img) -> int:
    """The EXIF orientation (1: upright) where the header holds EXIF (JPEG, WebP, PNG with eXIf before the pixels);
    read without decoding: Pillow's PNG getexif() would decode the whole image to look for a late eXIf chunk."""
    return img.getexif().get(0x0112, 1) if "exif" in img.info else 1


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def decode(path: str | os.PathLike, shape: Sequence[int], resize: bool = True) -> np.ndarray:
    """One image file -> uint8 (C, H, W) by the prepare policy (RESIZE_POLICY); raises on a bad file."""
    from PIL import Image

    c, h, w = shape
    with Image.open(path) as img:
        if resize:
            img.draft("RGB" if c == 3 else "L", (w, h))  # JPEG only: decode at a reduced scale still >= S
        return _to_chw(img, shape, resize)


def _to_chw(img, shape: Sequence[int], resize: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    c, h, w = shape
    if _orientation(img) != 1:  # a rotated photo is turned upright (exif_transpose copies even when it need not)
        img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit gray (PNG): scaled to 0..255, where convert() would clip
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L")
    target = "RGB" if c == 3 else "L"
    if img.mode != target:
        img = img.convert(target)  # alpha is dropped, palettes expanded
    if resize:
        side = min(img.size)
        left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
        img = img.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    elif img.size != (w, h):
        raise ValueError(f"size {img.size[0]}x{img.size[1]} differs from the set's {w}x{h}; pass --image-size")
    a = np.asarray(img)
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def _folder_shard(out: str, index: int, root: str, shape: list, resize, items: list, labelled: bool) -> dict:
    images = np.empty((len(items), *shape), dtype=np.uint8)
    labels, skipped, n = [], [], 0
    for rel, label in items:
        if labelled and label < 0:
            skipped.append({"path": rel, "reason": "not in a class sub-folder (labels come from the sub-folder names)"})
            continue
        try:
            images[n] = decode(os.path.join(root, rel), shape, resize)
        except Exception as exc:  # a corrupt, truncated or unreadable file is skipped and listed, never fatal
            skipped.append({"path": rel, "reason": _reason(exc)})
            continue
        labels.append(label)
        n += 1
    return _record(Path(out), index, images[:n], np.asarray(labels, dtype=np.int64) if labelled else None, skipped)


def _array_shard(out: str, index: int, source: _Array, lo: int, hi: int, plan: dict) -> dict:
    from PIL import Image

    shape = plan["shape"]
    chunk = source.chw(lo, hi)
    if tuple(chunk.shape[1:]) == tuple(shape):
        images = np.ascontiguousarray(chunk)
    else:  # resize or channel change: per image, by the same Pillow policy as image files
        images = np.empty((hi - lo, *shape), dtype=np.uint8)
        for i, a in enumerate(chunk):
            img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), "L" if a.shape[0] == 1 else "RGB")
            images[i] = _to_chw(img, shape, plan["resize"])
    labels = source.labels[lo:hi] if source.labels is not None else None
    return _record(Path(out), index, images, labels, [])


def _record(out: Path, index: int, images: np.ndarray, labels: np.ndarray | None, skipped: list) -> dict:
    """Write shard `index` (if it holds any image), then its record: a shard is done once its record exists."""
    entry = shards.write_shard(out, index, images, labels) if len(images) else None
    record = {"index": index, "entry": entry, "skipped": skipped}
    # the shard's data are fsynced and renamed before the record exists; the record itself need not be durable:
    # lost at a power cut, the shard is converted again; a lost rename leaves a record whose file is missing (redone)
    shards.atomic_write_bytes(out / STATE_DIR / f"shard-{index:05d}.json", json.dumps(record).encode(), durable=False)
    return record


# ------------------------------------------------------------------------------------------ running

def _check_out(out: Path, key: dict) -> bool:
    """True when `out` already holds this very set; raises when it holds anything else; False to (re)start."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} exists and is not a folder; give a new or empty folder for the shards")
    if not out.is_dir():
        return False
    names = os.listdir(out)
    foreign = sorted(n for n in names if not _OURS.match(n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"out: {out} holds other files ({shown}); nothing was changed. Give a new or empty folder")
    if "manifest.json" in names:
        try:
            made = json.loads((out / "manifest.json").read_text()).get("prepare")
        except (OSError, ValueError):
            made = None
        if made == key:
            return True
        raise FileExistsError(f"out: {out} already holds a shard set {'of other settings or another source' if made else ''}; "
                              f"nothing was changed. Give a new folder, or delete {out} to prepare it again")
    state = out / STATE_DIR / "state.json"
    if state.is_file():
        try:
            started = json.loads(state.read_text())["key"]
        except (OSError, ValueError, KeyError):
            started = None
        if started != key:
            why = ("its source files changed since" if started and started["settings"] == key["settings"]
                   else f"other settings ({json.dumps(started['settings']) if started else 'unreadable'})")
            raise FileExistsError(f"out: {out} holds an unfinished prepare with {why}; nothing was changed. Re-run "
                                  f"that command to finish it, or delete {out} (or give another OUT) to start this one")
    elif names:
        raise FileExistsError(f"out: {out} holds shard files but no manifest or prepare state; nothing was changed. "
                              f"Delete it or give another OUT")
    return False


def _run(source: _Source, out: Path, key: dict, plan: dict, workers: int, progress: bool) -> Path:
    state = out / STATE_DIR
    with _lock(state):
        return _convert(source, out, key, plan, workers, progress)


@contextlib.contextmanager
def _lock(state: Path):
    """One prepare at a time per OUT: a second one (which would delete the first one's temporary files) is refused."""
    with open(state / "lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise FileExistsError(f"out: another `fastvae prepare` is writing into {state.parent} now; wait for it to "
                                  f"finish (or stop it; a re-run then resumes)") from None
        yield


def _convert(source: _Source, out: Path, key: dict, plan: dict, workers: int, progress: bool) -> Path:
    state = out / STATE_DIR
    for leftover in out.glob(".*.tmp"):  # the temporary files of a killed run: never taken as whole
        leftover.unlink()
    records: dict[int, dict] = {}
    for path in state.glob("shard-*.json"):
        record = json.loads(path.read_text())
        if _whole(out, record):
            records[record["index"]] = record
    todo = [i for i in range(plan["shards"]) if i not in records]
    if records:
        _say(f"fastvae prepare: resuming {out}: {len(records)} of {plan['shards']} shards already done", progress)
    total = plan["source_info"]["images"]
    k = plan["shard_images"]
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    jobs = [(source.job(plan, i), i) for i in todo]
    sizes = [min(k, total - i * k) for i in todo]
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=total - sum(sizes), unit="img", desc="prepare", disable=not progress, file=sys.stderr) as bar:
        for n, record in enumerate(_run_jobs(jobs, out, min(workers, max(1, len(jobs))))):
            records[record["index"]] = record
            bar.update(min(k, total - record["index"] * k))
            if kill_after and n + 1 >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    ordered = [records[i] for i in range(plan["shards"])]
    entries = [r["entry"] for r in ordered if r["entry"]]
    skipped = [s for r in ordered for s in r["skipped"]]
    if skipped:
        lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more (all listed in {out / 'manifest.json'})" if len(skipped) > 10 else ""
        print(f"fastvae prepare: skipped {len(skipped)} of {total} files:\n{lines}{more}", file=sys.stderr)
    if not entries:
        shutil.rmtree(state, ignore_errors=True)
        raise ValueError(f"src: none of the {total} image files in {source.path} could be read "
                         f"({'; '.join(s['path'] + ': ' + s['reason'] for s in skipped[:3])})")
    resize = ({"policy": RESIZE_POLICY, "size": plan["shape"][1]} if plan["resize"]
              else {"policy": "none (every image has the set's size)"})
    shards.write_manifest(out, plan["shape"], entries, plan["label_names"],
                          source={**key["settings"]["source"], **plan["source_info"]}, resize=resize,
                          channels={"requested": key["settings"]["channels"], "policy": "forced" if key["settings"]["channels"]
                                    else "kept: 3 when any image is in colour, else 1; alpha dropped"},
                          skipped=skipped, prepare=key)
    shutil.rmtree(state, ignore_errors=True)
    return out


def _whole(out: Path, record: dict) -> bool:
    """A recorded shard whose files still have the recorded sizes (else it is converted again)."""
    e = record.get("entry")
    if e is None:
        return True
    try:
        return ((out / e["images"]).stat().st_size == e["bytes"]
                and (not e.get("labels") or (out / e["labels"]).stat().st_size == e["labels_bytes"]))
    except OSError:
        return False


def _call(job_index: tuple) -> dict:
    (fn, *args), index, out = job_index
    return fn(out, index, *args)


def _run_jobs(jobs: list, out: Path, workers: int):
    """Yield each job's record as it completes: in this process for one worker, else in a process pool."""
    if workers <= 1:
        for job, index in jobs:
            yield _call((job, index, str(out)))
        return
    with _pool(workers) as pool:
        futures = [pool.submit(_call, (job, index, str(out))) for job, index in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise ChildProcessError(f"a worker process died (killed, or out of memory?) while converting into {out}; the "
                                    f"finished shards are kept: run the same command again to resume (with fewer --workers "
                                    f"if memory is short)") from None
        finally:
            for f in futures:
                f.cancel()


def _map(fn, args: list, workers: int, progress: bool, desc: str) -> list:
    """[fn(*a) for a in args] over a process pool, in order, with a progress bar."""
    from tqdm.auto import tqdm

    chunk = max(1, min(256, len(args) // (4 * workers) or 1))
    with tqdm(total=len(args), unit="img", desc=desc, disable=not progress, file=sys.stderr) as bar:
        if workers <= 1 or len(args) < 64:
            results = []
            for a in args:
                results.append(fn(*a))
                bar.update(1)
            return results
        with _pool(workers) as pool:
            results = []
            for r in pool.map(_star, [(fn, a) for a in args], chunksize=chunk):
                results.append(r)
                bar.update(1)
            return results


def _star(fn_args):
    fn, args = fn_args
    return fn(*args)


def _pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_worker_init)


def _worker_init() -> None:
    """Workers die with their parent (a kill -9 of `fastvae prepare` leaves no orphan writing files) and ignore Ctrl-C
    (the parent handles it), and use one thread each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _free_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr)
