"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM at a step boundary, with a resumable checkpoint.

While the training loop runs, the first signal only sets a flag: the loop finishes the step it is in
(with its validation and checkpoint when the step has them), saves ``last`` at that step, records the
session in run.json and raises :class:`Interrupted`. A second signal stops at once (``last`` keeps the
previous checkpoint). Before the loop (data, model, run directory) a signal stops at once: nothing has
been trained yet. SIGKILL cannot be caught; the atomic checkpoints make it resumable all the same.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Self

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal (a KeyboardInterrupt, so code that catches Ctrl-C catches it);
    ``exit_code`` is the shell's 128 + signal number: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: SIGINT and SIGTERM raise :class:`Interrupted` at once, or, after ``defer()``,
    the first one only sets ``signum`` (the loop checks it after every step). The previous handlers
    are restored on exit. Outside the main thread (where Python cannot install handlers) it does
    nothing, and signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on the first signal asks for a stop at the next step boundary."""
        self.deferred = True

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.deferred and self.signum is None:
            self.signum = signum
            print(f"\n{signal_name(signum)}: finishing this step and saving a resumable checkpoint; send it "
                  "again to stop at once without saving", file=sys.stderr, flush=True)
            return
        self.signum = signum
        raise Interrupted(f"stopped by {signal_name(signum)}", signum)
