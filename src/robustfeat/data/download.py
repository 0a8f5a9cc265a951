"""Official dataset URLs and checksums, atomic downloads, MD5 verification and safe tar extraction.

Every failure raises :class:`DataError` with a single-line, user-facing message that names the file
or URL, says what is wrong and how to fix it. The CLI prints ``str(e)`` and exits with status 2.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ..fsutil import fsync_dir

FIX_HINT = "delete it and rerun to download it again, or pass --data-dir DIR holding the official files"


class DataError(Exception):
    """A dataset problem with a one-line message meant for the user (missing, corrupt, bad format)."""


# --------------------------------------------------------------------------------------------------
# Official sources. The MD5s are the published checksums of the original files.
# --------------------------------------------------------------------------------------------------

#: Base URLs tried in order; the original site first, then the PyTorch-hosted mirror.
MNIST_MIRRORS: tuple[str, ...] = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
#: file name -> MD5 of the original gzip files.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: file name -> size in bytes of the original gzip files (used to tell "truncated" from "corrupt").
MNIST_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 9912422,
    "train-labels-idx1-ubyte.gz": 28881,
    "t10k-images-idx3-ubyte.gz": 1648877,
    "t10k-labels-idx1-ubyte.gz": 4542,
}

CIFAR10_URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

CIFAR100_URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_DIR = "cifar-100-python"
CIFAR100_MD5: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def md5_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(
    path: str | os.PathLike,
    expected: str,
    *,
    expected_size: int | None = None,
    hint: str = FIX_HINT,
) -> None:
    """Raise DataError unless ``path`` exists and has MD5 ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file is missing; rerun with download enabled, or pass --data-dir DIR holding the official files"
        )
    actual = md5_file(path)
    if actual == expected:
        return
    size = path.stat().st_size
    what = "MD5 mismatch"
    if expected_size is not None and size < expected_size:
        what = f"truncated ({size} of {expected_size} bytes), MD5 mismatch"
    raise DataError(f"{path}: {what} (expected MD5 {expected}, got {actual}); {hint}")


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def _fetch_to(url: str, tmp, *, desc: str, progress: bool) -> str:
    """Stream ``url`` into the open binary file ``tmp``; return the hex MD5 of what was written."""
    from ..progress import progress_bar

    h = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
        total = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
        total = int(total) if total and str(total).isdigit() else None
        with progress_bar(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
            leave=False,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                tmp.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if total is not None and tmp.tell() != total:
            raise DataError(f"{url}: connection closed after {tmp.tell()} of {total} bytes")
    return h.hexdigest()


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    md5: str | None,
    *,
    progress: bool = True,
) -> Path:
    """Download the first URL that works to ``dest`` atomically and verify its MD5.

    The data goes to a temporary file in ``dest``'s directory, is fsync'ed, checked, and only then
    moved into place with :func:`os.replace`, so ``dest`` is never left half-written or with a bad
    checksum. URLs are tried in order; a network error or a checksum mismatch moves on to the next.
    """
    if isinstance(urls, str):
        urls = [urls]
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{dest.parent}: cannot create the data directory ({e.strerror or e}); pass --data-dir DIR that is writable"
        ) from None
    errors: list[str] = []
    for url in urls:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except OSError as e:
            raise DataError(
                f"{dest.parent}: cannot write there ({e.strerror or e}); pass --data-dir DIR that is writable"
            ) from None
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as tmp:
                actual = _fetch_to(url, tmp, desc=dest.name, progress=progress)
                tmp.flush()
                os.fsync(tmp.fileno())
            if md5 is not None and actual != md5:
                errors.append(f"{url}: MD5 mismatch (expected MD5 {md5}, got {actual})")
                continue
            os.replace(tmp_path, dest)
            fsync_dir(dest.parent)
            return dest
        except DataError as e:
            errors.append(str(e))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            errors.append(f"{url}: {reason}")
        finally:
            if tmp_path.exists():
                try:
                    tmp_path.unlink()
                except OSError:  # pragma: no cover
                    pass
    tried = "; ".join(errors) if errors else "no URL given"
    raise DataError(
        f"could not download {dest.name} ({tried}); check your network, or download it by hand "
        f"into {dest.parent}, or pass --data-dir DIR holding the official files"
    )


# --------------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------------


def _check_member(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: refusing to extract member with absolute path {name!r}; {FIX_HINT}")
    if ".." in p.parts or "\\" in name:
        raise DataError(f"{archive}: refusing to extract member with unsafe path {name!r}; {FIX_HINT}")
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive}: refusing to extract member {name!r} that is not a regular file or directory; {FIX_HINT}"
        )
    return p


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar(.gz) archive into ``dest``, rejecting absolute paths, '..', links and devices.

    Everything is extracted into a temporary directory next to ``dest`` first, and each top-level
    entry is then moved into place, so an interrupted extraction leaves no partial folder behind.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the `with tar:` below
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: not a readable tar archive ({e}); {FIX_HINT}") from None
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tar:
            try:
                members = tar.getmembers()
                for m in members:
                    _check_member(archive, m)
                for m in members:
                    target = staging.joinpath(*PurePosixPath(m.name).parts)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    if src is None:  # pragma: no cover - isfile() members always have data
                        continue
                    with src, open(target, "wb") as out:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is not None:
                    raise DataError(
                        f"{dest}: cannot extract {archive.name} there ({e.strerror}); pass --data-dir DIR that is writable"
                    ) from None
                raise DataError(f"{archive}: truncated or corrupt archive ({e}); {FIX_HINT}") from None
        for top in staging.iterdir():
            final = dest / top.name
            if final.exists():
                _rmtree(final)
            os.replace(top, final)
    finally:
        _rmtree(staging)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
