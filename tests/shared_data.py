"""Where the real data of ../shared lives: beside the repository (as on CI), or $ROBUSTFEAT_SHARED_DATA."""

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("ROBUSTFEAT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
