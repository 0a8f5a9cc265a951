"""Tests of robustfeat.data: readers, checksums, downloads, on-device batching and splits."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA

import robustfeat.data as rd
from robustfeat.data import (
    DATASETS,
    DataError,
    Dataset,
    DeviceLoader,
    augment_batch,
    load_dataset,
    resolve_data_dir,
    train_val_split,
)
from robustfeat.data import datasets as dsmod
from robustfeat.data import download as dl

SHARED = SHARED_DATA
MNIST_RAW = SHARED / "MNIST" / "raw"
CIFAR_NPZ = SHARED / "cifar10" / "cifar10_lossless.npz"
have_mnist = pytest.mark.skipif(
    not (MNIST_RAW / "train-images-idx3-ubyte.gz").is_file(), reason="no real MNIST"
)
have_cifar = pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason="no real CIFAR-10 npz")


def md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", SHARED, download=False)


@have_mnist
def test_real_mnist(mnist):
    assert isinstance(mnist, Dataset) and mnist.name == "mnist"
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_train.dtype == torch.int64
    assert mnist.y_test.shape == (10000,)
    assert int(mnist.y_train.min()) == 0 and int(mnist.y_train.max()) == 9
    assert mnist.num_classes == 10 and mnist.image_shape == (1, 28, 28)
    mean = mnist.x_train.double().mean().item() / 255
    assert abs(mean - 0.1307) < 1e-3
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.bincount(mnist.y_test, minlength=10).tolist()[0] == 980


@have_mnist
@pytest.mark.parametrize("sub", ["", "MNIST", "MNIST/raw"])
def test_mnist_layouts(sub):
    assert dsmod._find_mnist(SHARED / sub if sub else SHARED, download=False) == MNIST_RAW


@have_cifar
def test_real_cifar10_npz():
    ds = load_dataset("cifar10", SHARED, download=False)
    assert (
        ds.name == "cifar10"
        and ds.x_train.shape == (50000, 3, 32, 32)
        and ds.x_test.shape == (1000, 3, 32, 32)
    )
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    mean = ds.x_train.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=1e-3)
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10


def test_mnist_sample():
    ds = load_dataset("mnist-sample")
    assert ds.x_train.shape == (10000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and int(ds.y_train.max()) == 9
    f = Path(rd.__file__).parent / "mnist_sample.npz"
    assert f.stat().st_size < 3_000_000
    if MNIST_RAW.is_dir():
        raw = dsmod.read_idx(MNIST_RAW / "t10k-images-idx3-ubyte.gz", 3)
        assert np.array_equal(ds.x_test[:, 0].numpy(), raw[:1000])


# --------------------------------------------------------------------------------------------------
# Synthetic official CIFAR files
# --------------------------------------------------------------------------------------------------


def _rows(imgs_hwc: np.ndarray) -> np.ndarray:
    """Official row layout: 1024 R, 1024 G, 1024 B values per image."""
    return imgs_hwc.transpose(0, 3, 1, 2).reshape(len(imgs_hwc), -1)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(6 * n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6 * n)
    for i in range(6):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        sl = slice(i * n, (i + 1) * n)
        _dump(
            d / name,
            {
                b"batch_label": name.encode(),
                b"labels": labels[sl].tolist(),
                b"data": _rows(imgs[sl]),
                b"filenames": [b"x.png"] * n,
            },
        )
    _dump(
        d / "batches.meta",
        {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": n, b"num_vis": 3072},
    )
    return {"imgs": imgs, "labels": labels, "dir": d}


def patch_md5s(monkeypatch, table: dict, d: Path) -> None:
    for name in list(table):
        monkeypatch.setitem(table, name, md5(d / name))


def make_cifar100(root: Path, n: int = 6) -> dict[str, np.ndarray]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {"dir": d}
    for split in ("train", "test"):
        imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        coarse = fine // 5
        _dump(
            d / split,
            {
                b"filenames": [b"a.png"] * n,
                b"batch_label": split.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
                b"data": _rows(imgs),
            },
        )
        out[split] = (imgs, fine, coarse)
    _dump(
        d / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"k{i}".encode() for i in range(20)],
        },
    )
    return out


def test_synthetic_cifar10_official(tmp_path, monkeypatch):
    syn = make_cifar10(tmp_path)
    patch_md5s(monkeypatch, dl.CIFAR10_MD5, syn["dir"])
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    # R, G, B planes -> CHW exactly
    assert np.array_equal(ds.x_train.numpy(), syn["imgs"][:20].transpose(0, 3, 1, 2))
    assert np.array_equal(ds.x_test.numpy(), syn["imgs"][20:].transpose(0, 3, 1, 2))
    assert ds.y_train.tolist() == syn["labels"][:20].tolist()
    assert ds.classes == [f"c{i}" for i in range(10)]
    # data_dir pointing at the batches folder itself also works
    assert load_dataset("cifar10", syn["dir"], download=False).x_train.shape[0] == 20


def test_synthetic_cifar10_prefers_official_over_npz(tmp_path, monkeypatch):
    syn = make_cifar10(tmp_path / "cifar10")
    patch_md5s(monkeypatch, dl.CIFAR10_MD5, syn["dir"])
    np.savez(
        tmp_path / "cifar10_lossless.npz",
        x_train=np.zeros((2, 32, 32, 3), np.uint8),
        y_train=np.zeros(2, np.int64),
        x_test=np.zeros((1, 32, 32, 3), np.uint8),
        y_test=np.zeros(1, np.int64),
    )
    assert load_dataset("cifar10", tmp_path, download=False).x_train.shape[0] == 20


def test_cifar10_md5_mismatch(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = one_line(e)
    assert "data_batch_1" in msg and dl.CIFAR10_MD5["data_batch_1"] in msg and "delete it" in msg


def test_synthetic_cifar100_fine_and_coarse(tmp_path, monkeypatch):
    syn = make_cifar100(tmp_path)
    patch_md5s(monkeypatch, dl.CIFAR100_MD5, syn["dir"])
    fine = load_dataset("cifar100", tmp_path, download=False)
    coarse = load_dataset("cifar100", tmp_path, download=False, coarse=True)
    imgs, f, c = syn["train"]
    assert np.array_equal(fine.x_train.numpy(), imgs.transpose(0, 3, 1, 2))
    assert fine.y_train.tolist() == f.tolist() and coarse.y_train.tolist() == c.tolist()
    assert coarse.y_test.tolist() == syn["test"][2].tolist()
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.classes[3] == "f3" and coarse.classes[3] == "k3"
    with pytest.raises(DataError):
        load_dataset("mnist", tmp_path, download=False, coarse=True)


def _tar_dir(src: Path, archive: Path, arcname: str) -> None:
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname=arcname)


def test_cifar10_download_and_extract(tmp_path, monkeypatch):
    syn = make_cifar10(tmp_path / "src")
    patch_md5s(monkeypatch, dl.CIFAR10_MD5, syn["dir"])
    server = tmp_path / "server"
    server.mkdir()
    _tar_dir(syn["dir"], server / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    monkeypatch.setattr(
        dl,
        "CIFAR10_URLS",
        ((tmp_path / "nowhere.tar.gz").as_uri(), (server / "cifar-10-python.tar.gz").as_uri()),
    )
    monkeypatch.setattr(dl, "CIFAR10_ARCHIVE_MD5", md5(server / "cifar-10-python.tar.gz"))
    data = tmp_path / "data"
    ds = load_dataset("cifar10", data, download=True)
    assert np.array_equal(ds.x_test.numpy(), syn["imgs"][20:].transpose(0, 3, 1, 2))
    assert (data / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cifar100_missing_no_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", tmp_path / "empty", download=False)
    assert "cifar-100-python" in one_line(e)


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "link"])
def test_safe_extract_rejects_unsafe_members(tmp_path, bad):
    arc = tmp_path / "bad.tar.gz"
    with tarfile.open(arc, "w:gz") as t:
        info = tarfile.TarInfo(bad)
        if bad == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
        else:
            info.size = 3
            t.addfile(info, io.BytesIO(b"bad"))
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        dl.safe_extract(arc, out)
    assert "bad.tar.gz" in one_line(e)
    assert not (tmp_path / "evil.txt").exists() and list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Generic npz
# --------------------------------------------------------------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("layout", ["hwc", "chw", "gray"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"hwc": (5, 8, 6, 3), "chw": (5, 3, 8, 6), "gray": (5, 8, 6)}[layout]
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    p = _npz(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.arange(5) % 3,
        x_test=x[:2],
        y_test=np.array([0, 2]),
        class_names=np.array(["a", "b", "c"]),
    )
    ds = load_dataset("npz", path=p)
    expected = {"hwc": lambda: x.transpose(0, 3, 1, 2), "chw": lambda: x, "gray": lambda: x[:, None]}[
        layout
    ]()
    assert np.array_equal(ds.x_train.numpy(), expected)
    assert ds.image_shape == expected.shape[1:] and ds.classes == ["a", "b", "c"]
    assert ds.y_train.dtype == torch.int64 and ds.y_test.tolist() == [0, 2]


def test_npz_without_names(tmp_path):
    x = np.zeros((4, 4, 4), np.uint8)
    p = _npz(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.array([0, 1, 4, 2], np.uint8),
        x_test=x[:1],
        y_test=np.array([3]),
    )
    assert load_dataset("npz", path=p).num_classes == 5


@pytest.mark.parametrize(
    "change, words",
    [
        ({"x_train": np.zeros((4, 8, 8, 3), np.float32)}, ["x_train", "uint8", "float32"]),
        ({"y_train": np.zeros(3, np.int64)}, ["y_train", "3 labels", "4 images"]),
        ({"y_test": np.array([0.0, 1.0])}, ["y_test", "integer"]),
        ({"y_test": np.array([0, 7])}, ["label 7", "3 class names"]),
        ({"x_test": np.zeros((2, 4, 4, 3), np.uint8)}, ["x_test"]),
        ({"x_train": np.zeros((4, 8), np.uint8)}, ["x_train", "shape"]),
        ({"y_test": None}, ["missing", "y_test"]),
    ],
)
def test_npz_bad_inputs(tmp_path, change, words):
    arrays = {
        "x_train": np.zeros((4, 8, 8, 3), np.uint8),
        "y_train": np.zeros(4, np.int64),
        "x_test": np.zeros((2, 8, 8, 3), np.uint8),
        "y_test": np.array([0, 1]),
        "class_names": np.array(["a", "b", "c"]),
    }
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    p = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as e:
        load_dataset("npz", path=p)
    msg = one_line(e)
    assert "bad.npz" in msg
    for w in words:
        assert w in msg


def test_npz_missing_and_garbage(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("npz")
    assert "path" in one_line(e)
    with pytest.raises(DataError) as e:
        load_dataset("npz", path=tmp_path / "nope.npz")
    assert "nope.npz" in one_line(e) and "missing" in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError) as e:
        load_dataset("npz", path=tmp_path / "junk.npz")
    assert "junk.npz" in one_line(e)


def test_unknown_dataset():
    with pytest.raises(DataError) as e:
        load_dataset("cifar-10")
    assert "did you mean 'cifar10'" in one_line(e)
    assert set(DATASETS) == {"mnist", "cifar10", "cifar100", "mnist-sample", "npz"}


# --------------------------------------------------------------------------------------------------
# MNIST checksums, IDX checks, missing files
# --------------------------------------------------------------------------------------------------


def _copy_mnist(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for n in dl.MNIST_MD5:
        shutil.copyfile(MNIST_RAW / n, dst / n)
    return dst


@have_mnist
def test_mnist_corrupt_file(tmp_path):
    raw = _copy_mnist(tmp_path / "MNIST" / "raw")
    f = raw / "t10k-labels-idx1-ubyte.gz"
    b = bytearray(f.read_bytes())
    b[100] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, download=False)
    msg = one_line(e)
    assert "t10k-labels-idx1-ubyte.gz" in msg and dl.MNIST_MD5[f.name] in msg and md5(f) in msg
    assert "MD5 mismatch" in msg and "delete it" in msg


@have_mnist
def test_mnist_truncated_file(tmp_path):
    raw = _copy_mnist(tmp_path / "raw")
    f = raw / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, download=False)
    msg = one_line(e)
    assert "train-labels-idx1-ubyte.gz" in msg and "truncated" in msg and dl.MNIST_MD5[f.name] in msg


def _idx_gz(path: Path, magic: int, dims: list[int], payload: bytes) -> Path:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(gzip.compress(head + payload))
    return path


def test_read_idx_checks(tmp_path):
    good = _idx_gz(tmp_path / "g.gz", 0x0803, [2, 2, 3], bytes(range(12)))
    assert dsmod.read_idx(good, 3).tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    with pytest.raises(DataError) as e:
        dsmod.read_idx(_idx_gz(tmp_path / "m.gz", 0x0801, [2, 2, 3], bytes(12)), 3)
    assert "magic" in one_line(e) and "m.gz" in str(e.value)
    with pytest.raises(DataError) as e:
        dsmod.read_idx(_idx_gz(tmp_path / "s.gz", 0x0803, [2, 2, 3], bytes(11)), 3)
    assert "truncated" in one_line(e)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(bytes(5000))[:30])  # truncated gzip stream -> no zlib traceback
    with pytest.raises(DataError) as e:
        dsmod.read_idx(cut, 1)
    assert "cut.gz" in one_line(e) and "gzip" in str(e.value)


def test_missing_dir_no_download(tmp_path):
    for name in ("mnist", "cifar10"):
        with pytest.raises(DataError) as e:
            load_dataset(name, tmp_path / "nothing", download=False)
        msg = one_line(e)
        assert str(tmp_path / "nothing") in msg and "--data-dir" in msg
    assert not (tmp_path / "nothing").exists()


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFEAT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(DataError) as e:
        load_dataset("mnist", download=False)
    assert str(tmp_path / "env") in one_line(e)
    monkeypatch.delenv("ROBUSTFEAT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "robustfeat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "robustfeat"


# --------------------------------------------------------------------------------------------------
# Downloads (file:// URLs and a local HTTP server)
# --------------------------------------------------------------------------------------------------


@have_mnist
def test_mnist_download_with_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "MNIST_MIRRORS", ((tmp_path / "dead").as_uri() + "/", MNIST_RAW.as_uri() + "/"))
    ds = load_dataset("mnist", tmp_path / "data", download=True)
    assert ds.x_train.shape == (60000, 1, 28, 28)
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(dl.MNIST_MD5)


def test_download_bad_md5_not_left(tmp_path):
    src = tmp_path / "srv" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(b"hello" * 100)
    dest = tmp_path / "dl" / "f.bin"
    with pytest.raises(DataError) as e:
        dl.download_file([src.as_uri()], dest, "0" * 32, progress=False)
    msg = one_line(e)
    assert "MD5 mismatch" in msg and "0" * 32 in msg and src.as_uri() in msg
    assert list(dest.parent.iterdir()) == []  # neither the bad file nor a temp file remains
    dl.download_file([src.as_uri()], dest, md5(src), progress=False)
    assert dest.read_bytes() == src.read_bytes()


def test_mnist_download_bad_md5(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    for n in dl.MNIST_MD5:
        (srv / n).write_bytes(b"fake")
    monkeypatch.setattr(dl, "MNIST_MIRRORS", (srv.as_uri() + "/",))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path / "data")
    msg = one_line(e)
    assert "train-images-idx3-ubyte.gz" in msg and dl.MNIST_MD5["train-images-idx3-ubyte.gz"] in msg
    assert "--data-dir" in msg
    assert list((tmp_path / "data" / "MNIST" / "raw").iterdir()) == []


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_download(tmp_path, http_root):
    root, base = http_root
    payload = bytes(range(256)) * 1000
    (root / "good.bin").write_bytes(payload)
    dest = tmp_path / "out" / "good.bin"
    dl.download_file(
        [base + "missing.bin", base + "good.bin"], dest, hashlib.md5(payload).hexdigest(), progress=False
    )
    assert dest.read_bytes() == payload
    with pytest.raises(DataError) as e:
        dl.download_file([base + "missing.bin"], tmp_path / "out" / "x.bin", None, progress=False)
    msg = one_line(e)
    assert base + "missing.bin" in msg and "--data-dir" in msg
    assert sorted(p.name for p in dest.parent.iterdir()) == ["good.bin"]


# --------------------------------------------------------------------------------------------------
# DeviceLoader, augmentation, split
# --------------------------------------------------------------------------------------------------


def _toy(n=50, c=3, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)


@pytest.mark.parametrize("augment", [False, True])
def test_loader_deterministic_and_stateless(augment):
    x, y = _toy()
    a = DeviceLoader(x, y, batch_size=8, device="cpu", augment=augment, seed=3)
    b = DeviceLoader(x, y, batch_size=8, device="cpu", augment=augment, seed=3)
    assert a.steps_per_epoch == 6 and len(a) == 50
    for s in range(20):
        a.batch(s)
    xa, ya = a.batch(7)
    xb, yb = b.batch(7)  # fresh loader, jumps straight to step 7 (resume)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.dtype == torch.float32 and xa.shape == (8, 3, 8, 8) and ya.dtype == torch.int64
    assert 0.0 <= xa.min() and xa.max() <= 1.0
    assert not torch.equal(a.batch(8)[1], ya)
    c = DeviceLoader(x, y, batch_size=8, device="cpu", augment=augment, seed=4)
    assert not torch.equal(c.batch(7)[0], xa)
    if not augment:
        assert torch.equal(xa, x[ya].float() / 255)
    else:  # each image is one of its pad-4 crops and flips, and the batch is not the plain images
        assert not torch.equal(xa, x[ya].float() / 255)
        for img, label in zip(xa, ya):
            assert any(torch.equal(img, crop.float() / 255) for crop in _all_crops(x[label], 4))


def test_loader_epoch_coverage():
    x, y = _toy(n=48)
    ld = DeviceLoader(x, y, batch_size=8, device="cpu", seed=1)
    for epoch in range(2):
        seen = torch.cat([ld.batch(epoch * ld.steps_per_epoch + i)[1] for i in range(ld.steps_per_epoch)])
        assert sorted(seen.tolist()) == list(range(48))
    first = torch.cat([ld.batch(i)[1] for i in range(6)])
    second = torch.cat([ld.batch(6 + i)[1] for i in range(6)])
    assert not torch.equal(first, second)  # reshuffled every epoch
    ld2 = DeviceLoader(x[:50], y[:50], batch_size=7, device="cpu", drop_last=False)
    assert ld2.steps_per_epoch == 7
    assert sorted(torch.cat([ld2.batch(i)[1] for i in range(7)]).tolist()) == list(range(48))


def test_loader_eval_and_channels_last():
    x, y = _toy(n=21)
    ld = DeviceLoader(x, y, batch_size=4, device="cpu", augment=True, channels_last=True)
    batches = list(ld.iter_eval(8))
    assert [len(b[1]) for b in batches] == [8, 8, 5]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(xs, x.float() / 255) and torch.equal(torch.cat([b[1] for b in batches]), y)
    assert ld.batch(0)[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(DataError):
        DeviceLoader(x, y, batch_size=64, device="cpu")


def _all_crops(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    _, h, w = img.shape
    p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_batch_is_pad_crop_flip(dtype):
    x, _ = _toy(n=16, hw=8, seed=5)
    x = x.to(dtype) if dtype == torch.uint8 else x.float() / 255
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=4)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= (255 if dtype == torch.uint8 else 1)
    for i in range(len(x)):
        assert any(torch.equal(out[i], c) for c in _all_crops(x[i], 4))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0), pad=4))


def test_augment_batch_flips_and_crops_happen():
    x = torch.arange(32, dtype=torch.uint8).repeat(64, 3, 32, 1) + 1  # (64,3,32,32), column index + 1
    flipped = augment_batch(x, torch.Generator().manual_seed(1), pad=0)
    is_flip = [torch.equal(f, x[0].flip(-1)) for f in flipped]
    is_same = [torch.equal(f, x[0]) for f in flipped]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 10 < sum(is_flip) < 54
    cropped = augment_batch(x, torch.Generator().manual_seed(2), pad=4)
    has_zero_border = (cropped == 0).flatten(1).any(1)
    assert 32 < int(has_zero_border.sum())  # most random offsets expose some zero padding
    assert len({tuple(c[0, 16].tolist()) for c in cropped}) > 10  # many different offsets


def test_train_val_split():
    x, y = _toy(n=30)
    ds = Dataset("toy", x, y, x[:5], y[:5], [str(i) for i in range(30)])
    (xt, yt), (xv, yv) = train_val_split(ds, 7, seed=1)
    assert len(yv) == 7 and len(yt) == 23
    assert set(yt.tolist()).isdisjoint(yv.tolist()) and sorted(yt.tolist() + yv.tolist()) == list(range(30))
    assert torch.equal(xv, x[yv]) and torch.equal(xt, x[yt])
    (_, _yt2), (_, yv2) = train_val_split(ds, 7, seed=1)
    assert torch.equal(yv, yv2)
    assert not torch.equal(yv, train_val_split(ds, 7, seed=2)[1][1])
    (xt0, _), (xv0, yv0) = train_val_split(ds, 0)
    assert len(xt0) == 30 and xv0.shape == (0, 3, 8, 8) and len(yv0) == 0
    for bad in (30, 31):
        with pytest.raises(DataError):
            train_val_split(ds, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda():
    x, y = _toy(n=40, hw=32)
    a = DeviceLoader(x, y, batch_size=8, device="cuda", augment=True, seed=2)
    b = DeviceLoader(x, y, batch_size=8, device="cuda", augment=True, seed=2)
    xa, ya = a.batch(11)
    assert xa.is_cuda and ya.is_cuda and xa.dtype == torch.float32
    assert torch.equal(xa, b.batch(11)[0]) and torch.equal(ya, b.batch(11)[1])
    seen = torch.cat([a.batch(i)[1] for i in range(a.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(40))
