"""The shard format (fastvae/shards.py): write, open, and every way a shard set on disk can be wrong."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

import fastvae
from fastvae import shards


def _images(n=37, shape=(3, 5, 7), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.fixture
def made(tmp_path):
    """A labelled set of 37 images in shards of 8 (5 shards, the last one short)."""
    images = _images()
    labels = np.arange(37) % 4
    out = shards.write(images, tmp_path / "set", labels=labels, label_names=["a", "b", "c", "d"],
                       shard_bytes=8 * images[0].nbytes, source={"kind": "test"})
    return out, images, labels


def test_round_trip_values_offsets_labels(made):
    out, images, labels = made
    ds = fastvae.data.open(out)
    assert isinstance(ds, shards.ShardSet) and ds.path == out
    assert ds.shape == (3, 5, 7) and len(ds) == ds.count == 37 and ds.nbytes == images.nbytes
    assert [s.shape[0] for s in ds.shards] == [8, 8, 8, 8, 5]
    assert all(not s.flags.writeable and isinstance(s, np.memmap) for s in ds.shards)
    assert ds.offsets.dtype == np.int64 and ds.offsets.tolist() == [0, 8, 16, 24, 32, 37]
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.label_names == ["a", "b", "c", "d"]
    assert torch.equal(ds.tensor(), torch.from_numpy(images))
    for i in (0, 7, 8, 36, -1):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(images[i])) and label == labels[i]
    with pytest.raises(IndexError, match="out of range"):
        ds[37]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "fastvae-shards" and manifest["version"] == 1 and manifest["source"] == {"kind": "test"}
    assert manifest["shards"][0]["images"] == "images-00000.npy" and manifest["shards"][0]["labels"] == "labels-00000.npy"
    assert np.array_equal(np.load(out / "images-00004.npy"), images[32:])  # plain .npy files any tool reads


def test_unlabelled_2d_torch_input_and_dataloader(tmp_path):
    images = torch.from_numpy(_images(10, (1, 4, 4))[:, 0])  # (N, H, W)
    ds = fastvae.data.open(shards.write(images, tmp_path / "s"))
    assert ds.shape == (1, 4, 4) and ds.labels is None and ds.label_names is None
    assert ds[3][1] == -1 and torch.equal(ds[3][0][0], images[3])
    again = pickle.loads(pickle.dumps(ds))  # by path: DataLoader workers re-open the memmaps
    assert len(pickle.dumps(ds)) < 200 and torch.equal(again.tensor(), ds.tensor())
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4))
    assert torch.equal(torch.cat([b[0] for b in batches]), images[:, None]) and batches[0][1].tolist() == [-1] * 4


def test_writer_streams_chunks(tmp_path):
    images = _images(50, (1, 3, 3))
    with shards.ShardWriter(tmp_path / "w", (1, 3, 3), labels=True, shard_bytes=9 * 16) as w:
        for i in range(0, 50, 7):
            w.add(images[i:i + 7], np.full(len(images[i:i + 7]), i // 7))
    ds = fastvae.data.open(tmp_path / "w")
    assert [s.shape[0] for s in ds.shards] == [16, 16, 16, 2]
    assert torch.equal(ds.tensor(), torch.from_numpy(images))
    assert ds.labels.tolist() == [i // 7 for i in range(50)]


def test_write_refuses_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        shards.write(np.zeros((2, 4, 4), np.float32), tmp_path / "a")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        shards.write(np.zeros((4, 4), np.uint8), tmp_path / "a")
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        shards.write(np.zeros((2, 4, 4), np.uint8), tmp_path / "a", labels=[1])
    with pytest.raises(ValueError, match="below len"):
        shards.write(np.zeros((2, 4, 4), np.uint8), tmp_path / "a", labels=[0, 2], label_names=["x", "y"])
    with pytest.raises(ValueError, match="empty"):
        shards.write(np.zeros((0, 4, 4), np.uint8), tmp_path / "a")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


def test_write_never_overwrites(tmp_path, made):
    out, _, _ = made
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        shards.write(_images(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder"):
        shards.write(_images(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt\)"):
        shards.write(_images(), tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_truncated_shard_names_file_and_sizes(made):
    out, _, _ = made
    path = out / "images-00002.npy"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(shards.ShardError, match=rf"images-00002.npy: {size - 10} bytes, but manifest.json expects {size}; the file is truncated"):
        fastvae.data.open(out)
    path.unlink()
    with pytest.raises(shards.ShardError, match="images-00002.npy: missing"):
        fastvae.data.open(out)


def test_altered_shard_fails_its_checksum(made):
    out, _, _ = made
    fastvae.data.open(out)  # passes and is stamped as verified
    path = out / "images-00003.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))  # same size: only the checksum can tell
    assert len(fastvae.data.open(out, verify="size")) == 37  # the size-only check does not hash
    with pytest.raises(shards.ShardError, match=r"images-00003.npy: sha256 [0-9a-f]{64}, but manifest.json expects [0-9a-f]{64}"):
        fastvae.data.open(out)  # the stamp no longer matches the file: hashed again
    with pytest.raises(shards.ShardError, match="sha256"):
        fastvae.data.open(out, verify="full")


def test_verified_stamp_skips_rehash_until_a_file_changes(made):
    out, _, _ = made
    stamp = json.loads((out / ".verified.json").read_text())  # written by the writer: it hashed what it wrote
    assert set(stamp["files"]) == {p.name for p in out.glob("*.npy")}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # a manifest edit changes its own hash: the stamp no longer applies
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match="images-00001.npy: sha256"):
        fastvae.data.open(out)
    # a stamp that matches the files as they are now is trusted: no hashing, so the wrong sha256 goes unseen ...
    raw = (out / "manifest.json").read_bytes()
    names = [p.name for p in sorted(out.glob("*.npy"))]
    shards._write_stamp(out, shards.hashlib.sha256(raw).hexdigest(), names)
    assert len(fastvae.data.open(out)) == 37
    with pytest.raises(shards.ShardError, match="images-00001.npy: sha256"):  # ... except by verify="full"
        fastvae.data.open(out, verify="full")
    os.utime(out / "images-00004.npy")  # any change of a file's mtime/ctime/inode/size voids the stamp
    with pytest.raises(shards.ShardError, match="images-00001.npy: sha256"):
        fastvae.data.open(out)
    with pytest.raises(ValueError, match="verify must be one of auto, full, size"):
        fastvae.data.open(out, verify="yes")


def _edit_manifest(out, **changes):
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_other_format_or_version_refused(made):
    out, _, _ = made
    _edit_manifest(out, version=2)
    with pytest.raises(shards.ShardError, match="manifest version 2, but this fastvae reads version 1"):
        fastvae.data.open(out)
    _edit_manifest(out, version=1, format="webdataset")
    with pytest.raises(shards.ShardError, match="not a fastvae shard manifest"):
        fastvae.data.open(out)
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(shards.ShardError, match="not valid JSON"):
        fastvae.data.open(out)
    _edit_manifest_raw = {"format": "fastvae-shards", "version": 1, "shape": [3, 5, 7], "dtype": "uint8", "count": 99, "shards": []}
    (out / "manifest.json").write_text(json.dumps(_edit_manifest_raw))
    with pytest.raises(shards.ShardError, match="missing or inconsistent"):
        fastvae.data.open(out)


@pytest.mark.parametrize("name", ["../outside.npy", "/tmp/outside.npy", "sub/images-00000.npy", "link.npy"])
def test_files_outside_the_folder_refused(tmp_path, made, name):
    out, images, _ = made
    outside = tmp_path / "outside.npy"
    np.save(outside, images[:8])  # a valid shard: only the path check can refuse it
    (out / "link.npy").symlink_to(outside)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][-1]["images"] = name  # the last shard: every path is checked before any is read
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match=f"names {name!r}, which is not a file inside .*refused, nothing was read"):
        fastvae.data.open(out)


def test_symlink_inside_the_folder_is_fine(made):
    out, images, _ = made
    (out / "images-00000.npy").rename(out / "real.npy")
    (out / "images-00000.npy").symlink_to("real.npy")
    assert torch.equal(fastvae.data.open(out, verify="full")[0][0], torch.from_numpy(images[0]))


def test_shape_mismatch_and_not_a_set(tmp_path, made):
    out, _, _ = made
    _edit_manifest(out, shape=[3, 7, 5])
    with pytest.raises(shards.ShardError, match=r"images-00000.npy: holds uint8 \(8, 3, 5, 7\), but the manifest expects uint8 \(8, 3, 7, 5\)"):
        fastvae.data.open(out, verify="size")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json.*fastvae prepare SRC OUT"):
        fastvae.data.open(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        fastvae.data.open(tmp_path / "nowhere")
