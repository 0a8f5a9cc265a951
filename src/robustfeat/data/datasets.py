"""Dataset readers (MNIST IDX, CIFAR-10/100 official batches, generic .npz, embedded MNIST sample).

All readers return a :class:`Dataset` of uint8 CHW image tensors and int64 labels on the CPU, and
report every problem as a one-line :class:`DataError` that names the file, says what is wrong and
how to fix it.

Checksums: the official MNIST gzip files and CIFAR batches are MD5-verified every time they are
read (a few hundred milliseconds at most). The generic ``cifar10_lossless.npz`` layout and
user-supplied ``.npz`` files have no official checksum and are only validated structurally.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import download as dl
from .download import FIX_HINT, DataError

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "load_dataset",
    "read_idx",
    "resolve_data_dir",
]

_GET_FILES = "allow downloading, or pass --data-dir DIR holding the official files"


@dataclass(repr=False)
class Dataset:
    """Train and test splits as uint8 (N, C, H, W) CPU tensors with int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The explicit ``data_dir``, else ``$ROBUSTFEAT_DATA``, else ``$XDG_CACHE_HOME/robustfeat``
    (``~/.cache/robustfeat`` when XDG_CACHE_HOME is unset). The directory is not created."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("ROBUSTFEAT_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "robustfeat"


def _to_dataset(name, x_train, y_train, x_test, y_test, classes) -> Dataset:
    def t(a, dtype):
        a = np.ascontiguousarray(a, dtype=dtype)
        if not a.flags.writeable:  # e.g. np.frombuffer over decompressed bytes
            a = a.copy()
        return torch.from_numpy(a)

    return Dataset(
        name=name,
        x_train=t(x_train, np.uint8),
        y_train=t(y_train, np.int64),
        x_test=t(x_test, np.uint8),
        y_test=t(y_test, np.int64),
        classes=[str(c) for c in classes],
    )


# --------------------------------------------------------------------------------------------------
# MNIST (IDX gzip files)
# --------------------------------------------------------------------------------------------------

_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes with ``ndim`` dimensions.

    Checks the magic number, the declared sizes against the payload length, and turns gzip/zlib
    errors (truncated or corrupt file) into a DataError.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing; {_GET_FILES}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); {FIX_HINT}") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, header needs {header}); {FIX_HINT}")
    magic = int.from_bytes(data[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x}); "
            f"not an MNIST file of this kind; {FIX_HINT}"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected_len = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "oversized"
        raise DataError(
            f"{path}: {what} IDX file ({len(data)} bytes, header {dims} needs {expected_len}); {FIX_HINT}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_dirs(d: Path) -> list[Path]:
    return [d / "MNIST" / "raw", d / "raw", d]


def _mnist_download_target(d: Path) -> Path:
    if d.name == "raw":
        return d
    if d.name == "MNIST":
        return d / "raw"
    return d / "MNIST" / "raw"


def _find_mnist(d: Path, download: bool) -> Path:
    names = list(dl.MNIST_MD5)
    candidates = _mnist_dirs(d)
    for c in candidates:
        if all((c / n).is_file() for n in names):
            return c
    partial = next((c for c in candidates if any((c / n).is_file() for n in names)), None)
    target = partial if partial is not None else _mnist_download_target(d)
    missing = [n for n in names if not (target / n).is_file()]
    if not download:
        raise DataError(f"{target}: MNIST file(s) missing ({', '.join(missing)}); {_GET_FILES}")
    for n in missing:
        dl.download_file([base + n for base in dl.MNIST_MIRRORS], target / n, dl.MNIST_MD5[n])
    return target


def _load_mnist(data_dir, *, path=None, download=True, coarse=False) -> Dataset:
    root = _find_mnist(resolve_data_dir(data_dir), download)
    arrays = {}
    for split, (img_name, lbl_name) in _MNIST_SPLITS.items():
        for n in (img_name, lbl_name):
            dl.verify_md5(root / n, dl.MNIST_MD5[n], expected_size=dl.MNIST_SIZES.get(n))
        x = read_idx(root / img_name, 3)
        y = read_idx(root / lbl_name, 1)
        if len(x) != len(y):
            raise DataError(
                f"{root / lbl_name}: {len(y)} labels for {len(x)} images in {img_name}; {FIX_HINT}"
            )
        if y.size and y.max() > 9:
            raise DataError(f"{root / lbl_name}: label {int(y.max())} out of range 0-9; {FIX_HINT}")
        arrays[split] = (x[:, None], y)
    return _to_dataset("mnist", *arrays["train"], *arrays["test"], [str(i) for i in range(10)])


def _load_mnist_sample(data_dir=None, *, path=None, download=True, coarse=False) -> Dataset:
    res = importlib.resources.files(__package__).joinpath("mnist_sample.npz")
    try:
        blob = res.read_bytes()
    except (FileNotFoundError, OSError):
        raise DataError(
            f"{res}: the embedded MNIST sample is missing from the installed package; reinstall "
            "robustfeat, or use data.name=mnist with --data-dir DIR"
        ) from None
    ds = _read_npz(io.BytesIO(blob), name="mnist-sample", label=str(res))
    return ds


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official python pickle batches)
# --------------------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    # pickle is only ever used here, on the official CIFAR batches, after their MD5 has been
    # verified against the published checksums (see download.CIFAR10_MD5 / CIFAR100_MD5).
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing; {FIX_HINT}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e}); {FIX_HINT}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (expected a dict, got {type(obj).__name__}); {FIX_HINT}")
    return obj


def _get(obj: dict, key: bytes, path: Path):
    if key in obj:
        return obj[key]
    skey = key.decode()
    if skey in obj:
        return obj[skey]
    raise DataError(f"{path}: CIFAR batch has no {skey!r} entry; {FIX_HINT}")


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path)
    data = np.asarray(_get(obj, b"data", path))
    labels = np.asarray(_get(obj, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: CIFAR 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}; {FIX_HINT}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images; {FIX_HINT}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels outside 0-{num_classes - 1} (min {labels.min()}, max {labels.max()}); {FIX_HINT}"
        )
    # rows hold the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _names(obj: dict, key: bytes, path: Path, n: int) -> list[str]:
    names = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in _get(obj, key, path)]
    if len(names) != n:
        raise DataError(f"{path}: {len(names)} {key.decode()} for {n} classes; {FIX_HINT}")
    return names


def _find_cifar_dir(d: Path, dirname: str, alias: str, marker: str) -> Path | None:
    for c in (d / dirname, d / alias / dirname):
        if c.is_dir():
            return c
    if (d / marker).is_file():  # data_dir points at the batches folder itself
        return d
    return None


def _fetch_cifar(d: Path, urls, archive: str, archive_md5: str, dirname: str, download: bool) -> Path:
    arc = d / archive
    if not arc.is_file():
        if not download:
            raise DataError(f"{d / dirname}: CIFAR folder missing (and no {archive} in {d}); {_GET_FILES}")
        dl.download_file(urls, arc, archive_md5)
    else:
        dl.verify_md5(arc, archive_md5)
    dl.safe_extract(arc, d)
    out = d / dirname
    if not out.is_dir():
        raise DataError(f"{arc}: archive does not contain {dirname}/; {FIX_HINT}")
    return out


def _load_cifar10(data_dir, *, path=None, download=True, coarse=False) -> Dataset:
    d = resolve_data_dir(data_dir)
    root = _find_cifar_dir(d, dl.CIFAR10_DIR, "cifar10", "data_batch_1")
    if root is None:
        for npz in (d / "cifar10_lossless.npz", d / "cifar10" / "cifar10_lossless.npz"):
            if npz.is_file():
                # generic lossless layout; it has no official MD5 and is only checked structurally
                ds = _read_npz(npz, name="cifar10", label=str(npz))
                if ds.image_shape != (3, 32, 32) or ds.num_classes != 10:
                    raise DataError(
                        f"{npz}: expected 10-class 3x32x32 CIFAR-10 images, got "
                        f"{ds.num_classes} classes of {ds.image_shape}"
                    )
                return ds
        root = _fetch_cifar(
            d, dl.CIFAR10_URLS, dl.CIFAR10_ARCHIVE, dl.CIFAR10_ARCHIVE_MD5, dl.CIFAR10_DIR, download
        )
    for n, md5 in dl.CIFAR10_MD5.items():
        dl.verify_md5(root / n, md5)
    xs, ys = zip(*(_cifar_batch(root / f"data_batch_{i}", b"labels", 10) for i in range(1, 6)))
    x_test, y_test = _cifar_batch(root / "test_batch", b"labels", 10)
    meta = root / "batches.meta"
    classes = _names(_unpickle(meta), b"label_names", meta, 10)
    return _to_dataset("cifar10", np.concatenate(xs), np.concatenate(ys), x_test, y_test, classes)


def _load_cifar100(data_dir, *, path=None, download=True, coarse=False) -> Dataset:
    d = resolve_data_dir(data_dir)
    root = _find_cifar_dir(d, dl.CIFAR100_DIR, "cifar100", "meta")
    if root is None:
        root = _fetch_cifar(
            d, dl.CIFAR100_URLS, dl.CIFAR100_ARCHIVE, dl.CIFAR100_ARCHIVE_MD5, dl.CIFAR100_DIR, download
        )
    for n, md5 in dl.CIFAR100_MD5.items():
        dl.verify_md5(root / n, md5)
    key, n_cls = (b"coarse_labels", 20) if coarse else (b"fine_labels", 100)
    x_train, y_train = _cifar_batch(root / "train", key, n_cls)
    x_test, y_test = _cifar_batch(root / "test", key, n_cls)
    meta = root / "meta"
    names_key = b"coarse_label_names" if coarse else b"fine_label_names"
    classes = _names(_unpickle(meta), names_key, meta, n_cls)
    name = "cifar100-coarse" if coarse else "cifar100"
    return _to_dataset(name, x_train, y_train, x_test, y_test, classes)


# --------------------------------------------------------------------------------------------------
# Generic .npz
# --------------------------------------------------------------------------------------------------


def _to_chw(x: np.ndarray, key: str, label: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(
            f"{label}: {key} must be uint8 images (0-255), got dtype {x.dtype}; convert with "
            "(x * 255).round().astype(np.uint8) if it holds floats in [0, 1]"
        )
    if x.ndim == 3:  # (N, H, W) grayscale
        return x[:, None]
    if x.ndim == 4:
        chw, hwc = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
        if hwc:
            return x.transpose(0, 3, 1, 2)
        if chw:
            return x
        raise DataError(
            f"{label}: {key} has shape {x.shape}; expected (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4"
        )
    raise DataError(f"{label}: {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")


def _npz_labels(y: np.ndarray, key: str, x: np.ndarray, label: str) -> np.ndarray:
    """The labels ``key`` of an .npz dataset as int64, checked against their images ``x``."""
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{label}: {key} must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if len(y) != len(x):
        xk = "x" + key[1:]
        raise DataError(f"{label}: {key} has {len(y)} labels but {xk} has {len(x)} images")
    if y.size and y.min() < 0:
        raise DataError(f"{label}: {key} has negative label {int(y.min())}")
    return y.astype(np.int64)


def _read_npz(src, *, name: str, label: str) -> Dataset:
    try:
        f = np.load(src, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{label}: file is missing; set data.path=FILE.npz to an existing file") from None
    except Exception as e:  # noqa: BLE001 - zip/format errors of many kinds
        raise DataError(f"{label}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not hasattr(f, "files"):
        raise DataError(f"{label}: not an .npz archive (a single array); save with np.savez")
    with f:
        need = ("x_train", "y_train", "x_test", "y_test")
        missing = [k for k in need if k not in f.files]
        if missing:
            raise DataError(
                f"{label}: missing array(s) {', '.join(missing)} (has {', '.join(f.files) or 'none'}); "
                "save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
            )
        try:
            arrays = {k: f[k] for k in need}
            names = None
            for k in ("class_names", "label_names", "classes"):
                if k in f.files:
                    names = [str(v) for v in f[k].reshape(-1)]
                    break
        except Exception as e:  # noqa: BLE001 - truncated member, object array, ...
            raise DataError(
                f"{label}: cannot read arrays ({type(e).__name__}: {e}); the file may be truncated"
            ) from None
    x_train = _to_chw(arrays["x_train"], "x_train", label)
    x_test = _to_chw(arrays["x_test"], "x_test", label)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{label}: x_train images are {x_train.shape[1:]} (CHW) but x_test images are {x_test.shape[1:]}"
        )
    ys = {k: _npz_labels(arrays[k], k, x, label) for k, x in (("y_train", x_train), ("y_test", x_test))}
    if len(x_train) == 0:
        raise DataError(f"{label}: x_train is empty")
    top = max(int(y.max()) for y in ys.values() if y.size)
    if names is None:
        # without class names the labels say how many classes there are: a test label no training
        # image has would add classes (one label 1000 among 0-9: a 1001-class model)
        train_top = int(ys["y_train"].max())
        if ys["y_test"].size and int(ys["y_test"].max()) > train_top:
            raise DataError(
                f"{label}: y_test has label {int(ys['y_test'].max())}, but the training labels are 0-{train_top}; "
                "fix the labels, or save class_names=[...] with the file if the training set lacks some classes"
            )
        names = [str(i) for i in range(top + 1)]
    elif top >= len(names):
        raise DataError(f"{label}: label {top} out of range for {len(names)} class names")
    return _to_dataset(name, x_train, ys["y_train"], x_test, ys["y_test"], names)


def _load_npz(data_dir=None, *, path=None, download=True, coarse=False) -> Dataset:
    if path is None:
        raise DataError("dataset 'npz' needs a file: set data.path=FILE.npz")
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{p}: is a directory; set data.path to an .npz file with x_train, y_train, x_test, y_test")
    if not p.is_file():
        raise DataError(
            f"{p}: file is missing; pass the path of an existing .npz with x_train, y_train, x_test, y_test"
        )
    return _read_npz(p, name="npz", label=str(p))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "mnist-sample": _load_mnist_sample,
    "npz": _load_npz,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    download: bool = True,
    coarse: bool = False,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as uint8 CHW CPU tensors.

    ``data_dir`` defaults to :func:`resolve_data_dir`'s choice; ``path`` is the file for ``"npz"``;
    ``download=False`` never touches the network; ``coarse=True`` selects CIFAR-100's 20 superclasses.
    """
    key = str(name).strip().lower()
    loader = _LOADERS.get(key)
    if loader is None:
        from robustfeat.registry import suggest

        raise DataError(f"unknown dataset {name!r}{suggest(key, DATASETS)}; known: {', '.join(DATASETS)}")
    if coarse and key != "cifar100":
        raise DataError(f"coarse labels exist only for cifar100, not {key!r}")
    return loader(data_dir, path=path, download=download, coarse=coarse)
