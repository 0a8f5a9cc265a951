"""Seeds derived from (seed, stream, index...): the only source of randomness after initialisation.

Data order, augmentation, attack starts and evaluation subsets each draw from a generator seeded
with ``derived_seed(run_seed, STREAM, step)``. Nothing random is carried from step to step, so a run
resumed at step k sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derived_seed(seed: int, *tags: int) -> int:
    """A well-spread 63-bit seed for (seed, tags...); distinct tag tuples give independent streams."""
    h = _splitmix64(int(seed) & _MASK64)
    for t in tags:
        h = _splitmix64(h ^ (int(t) & _MASK64))
    return h & ((1 << 63) - 1)
