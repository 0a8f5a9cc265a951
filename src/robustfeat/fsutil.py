"""File-system helpers shared by checkpoints and downloads."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(Path(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
