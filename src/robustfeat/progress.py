"""Progress bars that stay readable in a log file.

On a terminal a bar redraws itself in place (tqdm). Written to a file or a pipe (``nohup ... > log``),
the same redraws would pile up as one line of carriage returns megabytes long; there the bar prints
a plain line at most every ``interval`` seconds instead (``$ROBUSTFEAT_PROGRESS_INTERVAL``, default 60).
tqdm has no line mode of its own, so ``LineStream`` turns its redraws into lines.
"""

from __future__ import annotations

import os
import re
import sys
import weakref
from typing import Any, TextIO

from tqdm.auto import tqdm

DEFAULT_INTERVAL = 60.0
_LIVE: weakref.WeakSet[LineStream] = weakref.WeakSet()
"""The LineStreams of bars still alive: ``write_line`` ends their open lines before its own."""


class LineStream:
    """A text stream for tqdm: every redraw (``\\r``) becomes a line of its own, blank redraws vanish."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.fresh = True  # at the start of a line
        _LIVE.add(self)

    def write(self, text: str) -> int:
        out = []
        for part in re.split(r"([\r\n])", text):
            if part in ("\r", "\n"):
                if not self.fresh:
                    out.append("\n")
                    self.fresh = True
            elif part.strip():
                out.append(part)
                self.fresh = False
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _interval() -> float:
    raw = os.environ.get("ROBUSTFEAT_PROGRESS_INTERVAL", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        value = DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def progress_bar(iterable: Any = None, *, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; elsewhere a bar that writes one line per
    ``interval`` seconds (and one at the end)."""
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("ncols", 110)
    interval = _interval()
    kwargs.update(mininterval=interval, maxinterval=max(interval, 10.0), ascii=True)
    return tqdm(iterable, file=LineStream(stream), **kwargs)


def write_line(msg: str, stream: TextIO | None = None) -> None:
    """One line of text among progress bars: on a terminal above the bars (tqdm.write); elsewhere on a
    line of its own, after ending any bar line left open on the same stream."""
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        tqdm.write(msg, file=stream)
        return
    for ls in list(_LIVE):
        if ls.stream is stream and not ls.fresh:
            stream.write("\n")
            ls.fresh = True
    stream.write(msg + "\n")
    stream.flush()
