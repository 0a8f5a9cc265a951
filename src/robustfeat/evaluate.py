"""Compatibility module: these names live in ``robustfeat.attacks`` and ``robustfeat.data`` now.

Kept so that code written against the earlier layout (``from robustfeat.evaluate import accuracy``)
keeps working; new code imports from ``robustfeat.attacks``.
"""

from .attacks import InvalidAdversary, accuracy, check_adversary
from .data import to_float_images

__all__ = ["InvalidAdversary", "accuracy", "check_adversary", "to_float_images"]
