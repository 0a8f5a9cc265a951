"""The error of a training run that cannot start or cannot go on."""

from __future__ import annotations


class TrainingError(Exception):
    """A run that cannot start or cannot go on (message is one line for the user)."""
