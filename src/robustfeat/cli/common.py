"""What every subcommand shares: the user-error types (one line, exit status 2) and their formatting."""

from __future__ import annotations

from ..analysis.measures import AnalysisError
from ..attacks import InvalidAdversary
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..train import TrainingError


class CLIError(Exception):
    """A command line that cannot work as given (e.g. --resume with overrides)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError, ConfigError, DataError, CheckpointError, TrainingError, InvalidAdversary, AnalysisError)
"""Errors of the user's making: printed as one line, exit status 2."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
