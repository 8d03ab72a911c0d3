"""fastvae.data: the IDX reader, the search for real datasets, its errors, and checksum-verified download.

Small IDX files are written here byte by byte; the real Fashion-MNIST comes from Debian's package.
No test touches the network: the download tests replace data._fetch with local bytes.
"""
import gzip
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae import data

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C,
         np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, CODES[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool | None = None) -> Path:
    raw = idx_bytes(arr)
    gz = path.name.endswith(".gz") if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_split(folder: Path, split: str, n: int, seed: int, gz: bool = True):
    """Write one split's images and labels into `folder`; return them as numpy arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img_name, lbl_name = data._FILES[split]
    sfx = ".gz" if gz else ""
    write_idx(folder / (img_name + sfx), images)
    write_idx(folder / (lbl_name + sfx), labels)
    return images, labels


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No standard place holds data: HOME, cwd and $FASTVAE_DATA point into tmp, no Debian folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data._SYSTEM_DIRS, "fashion-mnist", (tmp_path / "no-debian",))
    return tmp_path


# ---- read_idx ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype,shape", [("u1", (3, 5, 7)), ("u1", (11,)), ("i1", (4, 3)), ("i2", (2, 9)),
                                         ("i4", (5,)), ("f4", (3, 2, 2)), ("f8", (7,)), ("u1", (0, 28, 28))])
def test_read_idx_round_trip_exact(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        arr = rng.standard_normal(shape).astype(dt)
    else:
        info = np.iinfo(dt)
        arr = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)
    path = write_idx(tmp_path / "x-idx", arr, gz=gz)  # no .gz suffix: compression is detected from the bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a read-only numpy buffer
        out = data.read_idx(path)
    assert out.is_contiguous()
    assert out.shape == shape
    assert out.dtype == torch.from_numpy(arr).dtype
    np.testing.assert_array_equal(out.numpy(), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload_names_file_and_expected_size(tmp_path, gz):
    raw = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(raw[:-1]) if gz else raw[:-1])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*\(2, 28, 28\).*1568 payload bytes.*1567 bytes.*truncated"):
        data.read_idx(path)


def test_trailing_bytes_are_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\0")
    with pytest.raises(ValueError, match=r"labels.*\(5,\).*5 payload bytes.*more bytes"):
        data.read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big"))
    with pytest.raises(ValueError, match=r"short.*truncated IDX header.*3 dimensions"):
        data.read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*corrupt gzip"):
        data.read_idx(path)


@pytest.mark.parametrize("head", [b"", b"\x00\x00", b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_wrong_magic(tmp_path, head):
    path = tmp_path / "bad-magic"
    path.write_bytes(head + bytes(16))
    with pytest.raises(ValueError, match=r"bad-magic: not an IDX file"):
        data.read_idx(path)


# ---- load: layouts and search order --------------------------------------------------------------

@pytest.mark.parametrize("layout", [".", "FashionMNIST/raw", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_from_root_layouts(isolated, layout, gz):
    root = isolated / "root"
    folder = root / layout
    images, labels = make_split(folder, "test", n=13, seed=2, gz=gz)
    ds = data.load("FashionMNIST", "test", root=root)
    assert isinstance(ds, data.Dataset)
    assert (ds.name, ds.split, len(ds)) == ("fashion-mnist", "test", 13)
    assert ds.source == str(folder) or Path(ds.source) == folder
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (13, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (13,)
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels.astype(np.int64))


def test_load_reads_each_split_its_own_files(isolated):
    root = isolated / "both"
    train = make_split(root, "train", n=9, seed=3, gz=False)
    test = make_split(root, "test", n=4, seed=4, gz=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = data.load("mnist", split, root=root)
        np.testing.assert_array_equal(ds.images.numpy(), images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)


def test_env_var_then_cache_then_cwd(isolated, monkeypatch):
    cwd_folder = isolated / "data" / "MNIST" / "raw"
    make_split(cwd_folder, "train", n=3, seed=5)
    assert Path(data.load("mnist").source) == cwd_folder

    cache = isolated / "home" / ".cache" / "fastvae" / "mnist"
    make_split(cache, "train", n=4, seed=6)
    assert Path(data.load("mnist").source) == cache  # the cache comes before ./data

    env = isolated / "env"
    make_split(env / "MNIST" / "raw", "train", n=5, seed=7)
    monkeypatch.setenv(data.ENV_VAR, str(env))
    ds = data.load("mnist")
    assert Path(ds.source) == env / "MNIST" / "raw" and len(ds) == 5  # $FASTVAE_DATA comes first


def test_explicit_root_is_the_only_place_searched(isolated):
    make_split(isolated / "home" / ".cache" / "fastvae" / "mnist", "train", n=3, seed=8)
    with pytest.raises(data.DatasetNotFoundError):
        data.load("mnist", root=isolated / "elsewhere")


# ---- load: errors -------------------------------------------------------------------------------

def test_nothing_found_lists_places_and_fixes(isolated):
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist")
    assert isinstance(info.value, data.DatasetNotFoundError)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(isolated / "no-debian") in msg
    assert str(isolated / "home" / ".cache" / "fastvae" / "fashion-mnist") in msg
    assert str(isolated / "data" / "FashionMNIST" / "raw") in msg
    assert "$FASTVAE_DATA  (not set)" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "root=" in msg and "--data-dir" in msg and "download=True" in msg


def test_missing_root_folder(isolated):
    root = isolated / "nope"
    with pytest.raises(data.DatasetNotFoundError, match="no such folder") as info:
        data.load("mnist", "test", root=root)
    assert str(root) in str(info.value)
    assert "apt-get" not in str(info.value)  # Debian ships only Fashion-MNIST


def test_root_missing_one_file_says_which(isolated):
    root = isolated / "half"
    make_split(root, "train", n=2, seed=9)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion-mnist", root=root)
    line = next(l for l in str(info.value).splitlines() if l.strip().startswith(str(root) + " "))
    assert "exists; missing train-labels-idx1-ubyte[.gz]" in line
    assert "train-images" not in line.split("missing")[1]


@pytest.mark.parametrize("variant", ["fashion-mnist", "fashion_mnist", "FashionMNIST", "Fashion-MNIST", "FASHION_MNIST"])
def test_name_variants(isolated, variant):
    make_split(isolated / "r", "train", n=1, seed=10)
    assert data.load(variant, root=isolated / "r").name == "fashion-mnist"
    assert data.load("MNIST", "TRAIN", root=isolated / "r").name == "mnist"


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(name="cifar10"), r"name must be one of 'fashion-mnist', 'mnist'.*'cifar10'"),
    (dict(name="fashion"), r"name must be one of"),
    (dict(name="mnist", split="val"), r"split must be one of 'train', 'test'.*'val'"),
    (dict(name="mnist", split=None), r"split must be one of"),
])
def test_bad_name_or_split(isolated, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.load(**kwargs)


def test_name_must_be_str():
    with pytest.raises(TypeError, match="name must be a str"):
        data.load(3)


def test_wrong_image_shape_and_label_mismatch(isolated):
    root = isolated / "odd"
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((2, 28, 27), np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected uint8 images of shape \(N, 28, 28\)"):
        data.load("mnist", "test", root=root)
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 2 integer labels"):
        data.load("mnist", "test", root=root)
    write_idx(root / "t10k-labels-idx1-ubyte", np.array([0, 10], np.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, got 0\.\.10"):
        data.load("mnist", "test", root=root)


# ---- to_float -----------------------------------------------------------------------------------

def test_to_float_exact():
    images = torch.arange(3 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 28, 28)
    x = data.to_float(images)
    assert x.dtype == torch.float32 and x.shape == (3, 784)
    expected = images.reshape(3, 784).double() / 255
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-7)
    assert x.min() == 0 and x.max() == 1
    assert images.dtype == torch.uint8  # the input is left alone


def test_to_float_refuses_non_uint8():
    with pytest.raises(TypeError, match="images must be uint8"):
        data.to_float(torch.rand(2, 28, 28))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        data.to_float(np.zeros((2, 784), np.uint8))
    with pytest.raises(ValueError, match="images must be"):
        data.to_float(torch.zeros(5, dtype=torch.uint8))


# ---- the real data (Debian's dataset-fashion-mnist) -----------------------------------------------

@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    for split, n in (("train", 60000), ("test", 10000)):
        ds = data.load("fashion-mnist", split, root=DEBIAN_FASHION)
        assert ds.images.shape == (n, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        # Fashion-MNIST is balanced: n/10 of each class 0..9
        assert ds.labels.bincount(minlength=10).tolist() == [n // 10] * 10
        assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
        assert ds.images.float().mean().item() == pytest.approx(72.9, abs=1.0)  # the dataset's known mean pixel
    assert Path(data.load("fashion_mnist", "test").source) == DEBIAN_FASHION  # the standard search finds it


# ---- download (never real: _fetch is replaced) -------------------------------------------------

@pytest.fixture
def mirror(monkeypatch):
    """A fake network: `served[filename] = bytes`, `fail` = set of mirror prefixes that error; logs urls."""
    state = {"served": {}, "fail": set(), "urls": []}

    def fetch(url):
        state["urls"].append(url)
        if any(url.startswith(m) for m in state["fail"]):
            raise OSError("connection refused")
        return io.BytesIO(state["served"][url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_fetch", fetch)
    return state


def publish(monkeypatch, mirror, name, split, n, seed):
    """Serve gzipped IDX files for `split` and register their MD5s as the published ones."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
    for stem, arr in zip(data._FILES[split], arrays):
        blob = gzip.compress(idx_bytes(arr))
        mirror["served"][stem + ".gz"] = blob
        monkeypatch.setitem(data._MD5[name], stem + ".gz", hashlib.md5(blob).hexdigest())
    return arrays


def test_download_verifies_and_installs(isolated, monkeypatch, mirror):
    images, labels = publish(monkeypatch, mirror, "fashion-mnist", "test", n=6, seed=11)
    ds = data.load("fashion-mnist", "test", download=True)
    cache = isolated / "home" / ".cache" / "fastvae" / "fashion-mnist"
    assert Path(ds.source) == cache
    assert sorted(os.listdir(cache)) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert all(u.startswith(data._MIRRORS["fashion-mnist"][0]) for u in mirror["urls"])
    # a second load finds the files and fetches nothing
    mirror["urls"].clear()
    data.load("fashion-mnist", "test", download=True)
    assert mirror["urls"] == []


def test_download_into_root_falls_back_to_next_mirror(isolated, monkeypatch, mirror):
    publish(monkeypatch, mirror, "mnist", "train", n=2, seed=12)
    first, second = data._MIRRORS["mnist"][:2]
    mirror["fail"].add(first)
    ds = data.load("mnist", root=isolated / "dl", download=True)
    assert Path(ds.source) == isolated / "dl" and len(ds) == 2
    assert [u.rsplit("/", 1)[0] + "/" for u in mirror["urls"]] == [first, second, first, second]


def test_corrupt_download_raises_and_leaves_nothing(isolated, monkeypatch, mirror):
    publish(monkeypatch, mirror, "mnist", "test", n=3, seed=13)
    good = mirror["served"]["t10k-images-idx3-ubyte.gz"]
    mirror["served"]["t10k-images-idx3-ubyte.gz"] = good[:-5] + bytes(b ^ 0xFF for b in good[-5:])
    root = isolated / "dl"
    with pytest.raises(data.DownloadError, match=r"t10k-images-idx3-ubyte\.gz.*nothing was written[\s\S]*checksum mismatch") as info:
        data.load("mnist", "test", root=root, download=True)
    assert str(info.value).count("checksum mismatch") == len(data._MIRRORS["mnist"])  # every mirror was tried
    assert os.listdir(root) == []


def test_published_checksums_are_complete():
    for name in data.NAMES:
        files = {f + ".gz" for pair in data._FILES.values() for f in pair}
        assert set(data._MD5[name]) == files
        assert all(len(h) == 32 and int(h, 16) >= 0 for h in data._MD5[name].values())
