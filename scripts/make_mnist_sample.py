"""Build the embedded MNIST sample shipped as ``src/robustfeat/data/mnist_sample.npz``.

Reads the four official MNIST IDX gzip files (MD5-verified by robustfeat's reader) and keeps the
first 10,000 training and the first 1,000 test images, in the official order, as uint8 (N, 28, 28)
with int64 labels. The archive is written with ``np.savez_compressed`` and then re-stamped with a
fixed zip timestamp so that rebuilding it from the same sources gives a byte-identical file.

    python scripts/make_mnist_sample.py [--data-dir /work/shared/data] [--out src/robustfeat/data/mnist_sample.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from robustfeat.data import load_dataset

N_TRAIN, N_TEST = 10_000, 1_000
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def _restamp(blob: bytes) -> bytes:
    """Rewrite a zip archive with fixed member timestamps (content and order unchanged)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            new = zipfile.ZipInfo(info.filename, date_time=FIXED_DATE)
            new.compress_type = zipfile.ZIP_DEFLATED
            new.external_attr = 0o644 << 16
            dst.writestr(new, src.read(info.filename))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--out", default=str(ROOT / "src" / "robustfeat" / "data" / "mnist_sample.npz"))
    args = ap.parse_args(argv)

    ds = load_dataset("mnist", args.data_dir, download=False)
    arrays = {
        "x_train": ds.x_train[:N_TRAIN, 0].numpy().astype(np.uint8),
        "y_train": ds.y_train[:N_TRAIN].numpy().astype(np.int64),
        "x_test": ds.x_test[:N_TEST, 0].numpy().astype(np.uint8),
        "y_test": ds.y_test[:N_TEST].numpy().astype(np.int64),
        "class_names": np.array([str(i) for i in range(10)]),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    blob = _restamp(buf.getvalue())
    out = Path(args.out)
    out.write_bytes(blob)
    print(f"wrote {out} ({len(blob)} bytes, md5 {hashlib.md5(blob).hexdigest()})")
    for k, a in arrays.items():
        print(
            f"  {k}: {a.dtype} {a.shape} sha256(raw bytes)={hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
