"""`fastvae prepare`: real image files (made with Pillow from Fashion-MNIST) -> shards, checked against Pillow itself."""
import gzip
import json
import os
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import fastvae  # noqa: E402
from fastvae.cli import main  # noqa: E402
from fastvae.prepare import KILL_AFTER_ENV, prepare  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _tint(gray: np.ndarray, rgb) -> np.ndarray:
    return (gray[..., None].astype(np.float32) * np.asarray(rgb, np.float32) / 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pictures(real_data):
    return real_data.images[:40].numpy(), real_data.labels[:40].numpy()


def _folder(root: Path, pictures) -> dict:
    """coats/ (gray PNG), shoes/ (tinted RGB JPEG, some deeper; one BMP, one WebP), two bad files, a text file."""
    images, _ = pictures
    made = {}
    for i in range(5):
        made[f"coats/c{i}.png"] = Image.fromarray(images[i], "L")
    for i in range(5, 9):
        made[f"shoes/s{i}.jpg"] = Image.fromarray(_tint(images[i], (255, 120, 40)), "RGB")
    made["shoes/deep/er/s9.jpeg"] = Image.fromarray(_tint(images[9], (40, 200, 255)), "RGB")
    made["shoes/s10.bmp"] = Image.fromarray(_tint(images[10], (90, 255, 90)), "RGB")
    made["shoes/s11.webp"] = Image.fromarray(_tint(images[11], (255, 255, 0)), "RGB")
    for rel, img in made.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=95) if rel.endswith((".jpg", ".jpeg")) else img.save(root / rel)
    (root / "coats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # corrupt
    Image.fromarray(images[12], "L").save(root / "coats" / "cut.png")
    data = (root / "coats" / "cut.png").read_bytes()
    (root / "coats" / "cut.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "coats" / "notes.txt").write_text("not an image")
    return made


def _reference(path: Path, size: int, channels: int) -> np.ndarray:
    """Pillow alone: convert, centre square, resize to size x size (bicubic); (C, H, W) uint8."""
    img = Image.open(path).convert("RGB" if channels == 3 else "L")
    side = min(img.size)
    left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
    a = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".verified.json"}


def test_folder_prepared_as_pillow_decodes_it(tmp_path, pictures, capsys):
    made = _folder(tmp_path / "src", pictures)
    out = prepare(tmp_path / "src", tmp_path / "out", image_size=20, workers=2, progress=False)
    ds = fastvae.data.open(out)
    assert ds.shape == (3, 20, 20) and len(ds) == 12 and ds.label_names == ["coats", "shoes"]
    order = sorted(made)  # the sorted relative paths: coats/c0..c4, then shoes/deep/er/s9.jpeg, s10.bmp, s11.webp, s5..s8
    assert ds.labels.tolist() == [0] * 5 + [1] * 7
    for i, rel in enumerate(order):
        image, label = ds[i]
        assert label == (0 if rel.startswith("coats") else 1)
        assert np.array_equal(image.numpy(), _reference(tmp_path / "src" / rel, 20, 3)), rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["path"] for s in manifest["skipped"]} == {"coats/broken.png", "coats/cut.png"}
    assert "truncated" in {s["path"]: s["reason"] for s in manifest["skipped"]}["coats/cut.png"]
    assert manifest["source"]["kind"] == "folder" and manifest["source"]["images"] == 14 and manifest["source"]["ignored_files"] == 1
    assert manifest["resize"]["size"] == 20 and "centred square" in manifest["resize"]["policy"]
    assert not (out / ".prepare").exists()
    err = capsys.readouterr().err
    assert "skipped 2 of 14 files" in err and "coats/cut.png" in err


def test_modes_kept_or_forced(tmp_path, pictures):
    images, _ = pictures
    (tmp_path / "gray").mkdir()
    for i in range(4):
        Image.fromarray(images[i], "L").save(tmp_path / "gray" / f"{i}.png")
    img16 = Image.fromarray(images[4].astype(np.uint16) * 257)  # a 16-bit grayscale PNG: scaled, not clipped
    img16.save(tmp_path / "gray" / "4.png")
    ds = fastvae.data.open(prepare(tmp_path / "gray", tmp_path / "g1", progress=False))
    assert ds.shape == (1, 28, 28) and ds.labels is None and ds.manifest["resize"]["policy"].startswith("none")
    assert torch.equal(ds.tensor()[:, 0], torch.from_numpy(images[:5]))  # kept: no resize, exact pixels
    rgb = fastvae.data.open(prepare(tmp_path / "gray", tmp_path / "g3", channels=3, progress=False))
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb.tensor(), ds.tensor().expand(-1, 3, -1, -1))
    (tmp_path / "color").mkdir()
    Image.fromarray(_tint(images[5], (200, 100, 50)), "RGB").save(tmp_path / "color" / "a.png")
    Image.fromarray(images[6], "L").save(tmp_path / "color" / "b.png")
    Image.fromarray(np.dstack([_tint(images[7], (10, 250, 90)), images[8]]), "RGBA").save(tmp_path / "color" / "c.png")
    mixed = fastvae.data.open(prepare(tmp_path / "color", tmp_path / "c3", progress=False))
    assert mixed.shape == (3, 28, 28)  # one colour image makes the set RGB; gray is expanded, alpha dropped
    assert np.array_equal(mixed[1][0].numpy(), np.repeat(images[6][None], 3, 0))
    assert np.array_equal(mixed[2][0].numpy(), _tint(images[7], (10, 250, 90)).transpose(2, 0, 1))
    forced = fastvae.data.open(prepare(tmp_path / "color", tmp_path / "c1", channels=1, progress=False))
    assert np.array_equal(forced[0][0].numpy()[0], np.asarray(Image.open(tmp_path / "color" / "a.png").convert("L")))


def test_mixed_sizes_need_image_size(tmp_path, pictures):
    images, _ = pictures
    (tmp_path / "src").mkdir()
    Image.fromarray(images[0], "L").save(tmp_path / "src" / "a.png")
    Image.fromarray(images[1], "L").resize((40, 30)).save(tmp_path / "src" / "b.png")
    with pytest.raises(ValueError, match=r"2 different sizes .*pass --image-size S"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)
    ds = fastvae.data.open(prepare(tmp_path / "src", tmp_path / "out", image_size=16, progress=False))
    assert ds.shape == (1, 16, 16)
    assert np.array_equal(ds[0][0].numpy(), _reference(tmp_path / "src" / "a.png", 16, 1))
    assert np.array_equal(ds[1][0].numpy(), _reference(tmp_path / "src" / "b.png", 16, 1))


def test_jpeg_draft_decoding_is_used_and_close(tmp_path, pictures):
    images, _ = pictures
    big = Image.fromarray(_tint(images[3], (250, 200, 120)), "RGB").resize((112, 96), Image.Resampling.BICUBIC)
    (tmp_path / "src").mkdir()
    big.save(tmp_path / "src" / "a.jpg", quality=95)
    ds = fastvae.data.open(prepare(tmp_path / "src", tmp_path / "out", image_size=24, progress=False))
    drafted = Image.open(tmp_path / "src" / "a.jpg")
    drafted.draft("RGB", (24, 24))  # decoded at 1/4 scale (28x24), then the same crop and resize
    assert drafted.size == (28, 24)
    side = 24
    left = (28 - side) / 2
    expect = np.asarray(drafted.convert("RGB").resize((24, 24), Image.Resampling.BICUBIC, box=(left, 0, left + side, side)))
    got = ds[0][0].numpy().transpose(1, 2, 0)
    assert np.array_equal(got, expect)
    full = _reference(tmp_path / "src" / "a.jpg", 24, 3).transpose(1, 2, 0)
    assert np.abs(got.astype(int) - full).mean() < 8  # the draft is a sane approximation of the full decode


def test_exif_orientation_is_applied(tmp_path, pictures):
    from PIL import ImageOps

    images, _ = pictures
    (tmp_path / "src").mkdir()
    tall = np.concatenate([images[0], images[1][:12]])  # 40 high, 28 wide
    Image.fromarray(tall, "L").save(tmp_path / "src" / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored 40 wide, 28 high
    Image.fromarray(np.ascontiguousarray(np.rot90(tall, 1)), "L").save(tmp_path / "src" / "b.jpg", exif=exif, quality=95)
    ds = fastvae.data.open(prepare(tmp_path / "src", tmp_path / "out", progress=False))  # the header scan sees both upright
    assert ds.shape == (1, 40, 28)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "src" / "b.jpg")))
    assert upright.shape == (40, 28) and np.array_equal(ds[1][0].numpy()[0], upright)
    assert np.abs(ds[1][0].numpy()[0].astype(int) - tall).mean() < 4  # upright indeed (JPEG-close to the original)


def test_labels_only_from_subfolders(tmp_path, pictures):
    images, _ = pictures
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(images[i], "L").save(tmp_path / "flat" / f"{i}.png")
    assert fastvae.data.open(prepare(tmp_path / "flat", tmp_path / "o1", progress=False)).labels is None
    (tmp_path / "flat" / "cls").mkdir()
    Image.fromarray(images[3], "L").save(tmp_path / "flat" / "cls" / "x.png")
    ds = fastvae.data.open(prepare(tmp_path / "flat", tmp_path / "o2", progress=False))
    assert len(ds) == 1 and ds.label_names == ["cls"]
    assert [s["path"] for s in ds.manifest["skipped"]] == ["0.png", "1.png", "2.png"]
    assert "class sub-folder" in ds.manifest["skipped"][0]["reason"]


def test_out_inside_src_and_a_symlink_cycle(tmp_path, pictures):
    images, _ = pictures
    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(images[i], "L").save(tmp_path / "src" / "a" / f"{i}.png")
    (tmp_path / "src" / "a" / "loop").symlink_to("..")  # followed once, not forever
    out = prepare(tmp_path / "src", tmp_path / "src" / "shards", progress=False)
    ds = fastvae.data.open(out)
    assert len(ds) == 3 and ds.label_names == ["a"]
    assert prepare(tmp_path / "src", out, progress=False) == out  # OUT is not searched: the same files, nothing to do


def test_empty_imageless_and_unreadable_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="src: .*empty is empty"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds 1 files but none is an image \(\.jpg"):
        prepare(tmp_path / "text", tmp_path / "out", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    (tmp_path / "bad" / "b.png").write_bytes(b"")
    for channels in (None, 3):  # found by the header scan, or only when decoding
        with pytest.raises(ValueError, match="none of the 2 image files .* could be read"):
            prepare(tmp_path / "bad", tmp_path / "out", channels=channels, image_size=8, workers=1, progress=False)
        assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if p.name != ".prepare"]
    with pytest.raises(FileNotFoundError, match="src: .* does not exist"):
        prepare(tmp_path / "nowhere", tmp_path / "out", progress=False)


def _prepare_in_subprocess(src, out, *extra, env=None, preexec_fn=None):
    code = ("import sys; from fastvae.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "prepare", str(src), str(out), "--no-progress", *extra],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          preexec_fn=preexec_fn, cwd=REPO)


def _many(root: Path, pictures, n=30):
    images, labels = pictures
    for i in range(n):
        path = root / f"class{labels[i]}" / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_tint(images[i], (255, 40 * (i % 6), 90)), "RGB").save(path)
    (root / "class0" / "zz-bad.jpg").write_bytes(b"not a jpeg")


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_resume_gives_the_same_bytes(tmp_path, pictures, workers):
    _many(tmp_path / "src", pictures)
    clean = prepare(tmp_path / "src", tmp_path / "clean", image_size=12, shard_images=4, workers=1, progress=False)
    code = ("import sys; from fastvae.prepare import prepare; "
            f"prepare(sys.argv[1], sys.argv[2], image_size=12, shard_images=4, workers={workers}, progress=False)")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "out")],
                            env={**os.environ, KILL_AFTER_ENV: "3", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished `fastvae prepare`: run the same command again"):
        fastvae.data.open(tmp_path / "out")
    records = list((tmp_path / "out" / ".prepare").glob("shard-*.json"))
    assert 3 <= len(records) < 8
    # what a kill can leave besides: a temporary file, and a shard written under its final name without its record
    (tmp_path / "out" / ".images-00007.npy.12345.tmp").write_bytes(b"half a shard")
    done = {json.loads(r.read_text())["index"] for r in records}
    missing = min(set(range(8)) - done)
    (tmp_path / "out" / f"images-{missing:05d}.npy").write_bytes(b"garbage")
    again = prepare(tmp_path / "src", tmp_path / "out", image_size=12, shard_images=4, workers=workers, progress=False)
    assert _files(again) == _files(clean) and len(_files(clean)) == 1 + 2 * 8
    assert sorted(p.name for p in again.iterdir() if p.name.startswith(".")) == [".verified.json"]


def test_disk_full_mid_shard_then_resume(tmp_path, pictures):
    _many(tmp_path / "src", pictures)
    clean = prepare(tmp_path / "src", tmp_path / "clean", image_size=16, workers=1, progress=False)
    limit = 4096  # a write past 4 KB fails (EFBIG, as ENOSPC would): mid-way through the shard (31 x 768 bytes)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    full = _prepare_in_subprocess(tmp_path / "src", tmp_path / "out", "--image-size", "16", "--workers", "1",
                                  preexec_fn=small_files, env={"PYTHONPATH": str(REPO)})
    assert full.returncode == 2 and "could not write" in full.stderr and "images-00000.npy" in full.stderr, full.stderr
    assert "nothing under that name was written" in full.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".prepare"]  # no shard under a final name, no tmp left
    # the unfinished prepare refuses other settings and a changed source: it never mixes two
    with pytest.raises(FileExistsError, match=r"unfinished prepare with other settings .*Re-run that command"):
        prepare(tmp_path / "src", tmp_path / "out", image_size=10, workers=1, progress=False)
    Image.fromarray(pictures[0][0], "L").save(tmp_path / "src" / "class0" / "new.png")
    with pytest.raises(FileExistsError, match="its source files changed since"):
        prepare(tmp_path / "src", tmp_path / "out", image_size=16, workers=1, progress=False)
    (tmp_path / "src" / "class0" / "new.png").unlink()
    import fcntl

    with open(tmp_path / "out" / ".prepare" / "lock", "w") as held:  # another prepare at work on the same OUT
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another `fastvae prepare` is writing into"):
            prepare(tmp_path / "src", tmp_path / "out", image_size=16, workers=1, progress=False)
    again = prepare(tmp_path / "src", tmp_path / "out", image_size=16, workers=1, progress=False)
    assert _files(again) == _files(clean)


def test_out_is_checked_before_anything_is_written(tmp_path, pictures):
    _many(tmp_path / "src", pictures, n=6)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="out: .*file exists and is not a folder"):
        prepare(tmp_path / "src", tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files \(thesis.tex\); nothing was changed"):
        prepare(tmp_path / "src", tmp_path / "busy", progress=False)
    assert os.listdir(tmp_path / "busy") == ["thesis.tex"]
    out = prepare(tmp_path / "src", tmp_path / "out", image_size=8, progress=False)
    before = _files(out)
    assert prepare(tmp_path / "src", out, image_size=8, progress=False) == out and _files(out) == before  # done: a no-op
    with pytest.raises(FileExistsError, match="already holds a shard set of other settings"):
        prepare(tmp_path / "src", out, image_size=9, progress=False)
    assert _files(out) == before


def _idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    head = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.tobytes())


def test_idx_pair_and_npy_arrays(tmp_path, pictures):
    images, labels = pictures
    _idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    ds = fastvae.data.open(prepare(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "idx", progress=False))
    assert ds.shape == (1, 28, 28) and torch.equal(ds.tensor()[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist() and ds.manifest["source"]["kind"] == "idx"
    rgb = np.stack([_tint(im, (255, 100, 0)) for im in images[:7]])  # (N, H, W, C)
    np.save(tmp_path / "rgb.npy", rgb)
    np.save(tmp_path / "lab.npy", np.arange(7))
    ds = fastvae.data.open(prepare(tmp_path / "rgb.npy", tmp_path / "npy", labels=tmp_path / "lab.npy", progress=False))
    assert ds.shape == (3, 28, 28) and torch.equal(ds.tensor(), torch.from_numpy(rgb.transpose(0, 3, 1, 2)))
    assert ds.labels.tolist() == list(range(7))
    small = fastvae.data.open(prepare(tmp_path / "rgb.npy", tmp_path / "small", image_size=14, channels=1, progress=False))
    assert small.shape == (1, 14, 14)
    expect = _reference_array(rgb[2], 14)
    assert np.array_equal(small[2][0].numpy(), expect)
    np.save(tmp_path / "float.npy", images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"holds float32; prepare takes uint8 .*astype\(np.uint8\)"):
        prepare(tmp_path / "float.npy", tmp_path / "f", progress=False)
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(ValueError, match="neither a folder, a .npy array nor an IDX file"):
        prepare(tmp_path / "x.bin", tmp_path / "b", progress=False)


def _reference_array(hwc: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(hwc, "RGB").convert("L")
    side = min(img.size)
    left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))[None]


def test_cli_prepare(tmp_path, pictures, capsys):
    _many(tmp_path / "src", pictures, n=5)
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--image-size", "8", "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'out'}: 5 images 3x8x8 in 1 shards" in out.out and "1 skipped" in out.out
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    helptext = capsys.readouterr().out
    assert "centred square" in helptext and "--channels {1,3}" in helptext and "--workers N" in helptext
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "busy"), "--no-progress"]) == 2
    assert "fastvae prepare: error: out:" in capsys.readouterr().err


def test_benchmark_helpers_run(tmp_path, real_data):
    """The prepare benchmark (tiny) and the big-set maker (a few MB, shard by shard) run and produce what they say."""
    sys.path.insert(0, str(REPO))
    from benchmarks import make_shards, prepare_bench

    result = prepare_bench.run(24, 1)
    assert set(result["images_per_s"]) == {"loop", "prepare-1", "prepare-2"} and result["ratio_prepare2_vs_loop"] > 0
    out = make_shards.make(tmp_path / "big", 0.01, (3, 32, 32), labels=True, progress=False, shard_bytes=1 << 20)
    ds = fastvae.data.open(out)
    assert len(ds) == 3496 and len(ds.shards) == 11 and ds.shape == (3, 32, 32) and ds.labels.tolist()[:5] == real_data.labels[:5].tolist()
    gray = make_shards.upscale(real_data.images[7:8].numpy(), 32, 32)[0, 0].astype(np.uint16)
    assert gray.shape == (32, 32) and np.array_equal(gray[::8, ::8], real_data.images[7].numpy()[::7, ::7])
    image = ds[7][0].numpy()
    for c in range(3):  # each channel is the upscaled garment times some tint
        assert any(np.array_equal(image[c], (gray * t >> 8).astype(np.uint8)) for t in range(64, 256))
