"""The published numbers of the paper: the robustness tables' accuracies (%), keyed by preset and suite
row, and Table 4 (a natural classifier on gradient maps).

Copied from the paper's Tables 1, 2, 3 and 5 (``robustfeat eval`` prints them beside ours when a run
was trained from one of these presets). Row ids are those of ``robustfeat.eval.suite``: ``natural``,
``whitebox/pgd-K``, ``whitebox/cw-K``, ``blackbox/pgd-K``, ``blackbox/cw-K``. Table 1 (MNIST) reports
one white-box and one black-box number: PGD-40 with eps 0.3, step 0.01 (section 4.1).
"""

from __future__ import annotations

_CIFAR_ROWS = (
    "natural",
    "whitebox/pgd-5", "whitebox/pgd-20", "whitebox/pgd-100", "whitebox/pgd-200",
    "whitebox/cw-30", "whitebox/cw-100",
    "blackbox/pgd-5", "blackbox/pgd-20", "blackbox/pgd-100", "blackbox/pgd-200",
    "blackbox/cw-30", "blackbox/cw-100",
)

# columns of Tables 2, 3 and 5, in the paper's order: Madry et al. (2017), AT-reg, AT-att, AT-att-reg
_COLUMNS = (("at", "Madry et al. (2017)"), ("at-reg", "AT-reg"), ("at-att", "AT-att"), ("at-att-reg", "AT-att-reg"))

_TABLE2 = (  # CIFAR-10, ResNet [16, 16, 32, 64]
    (80.79, 79.52, 82.75, 81.21),
    (49.89, 52.35, 51.20, 52.81),
    (39.72, 44.25, 41.39, 44.58),
    (38.76, 43.73, 40.47, 44.04),
    (38.64, 43.70, 40.36, 44.02),
    (40.27, 42.96, 40.60, 43.09),
    (39.98, 42.87, 40.31, 42.75),
    (60.13, 61.82, 63.26, 62.32),
    (56.60, 56.40, 58.26, 57.52),
    (56.44, 56.28, 58.08, 57.53),
    (56.49, 56.25, 58.04, 57.53),
    (57.11, 56.86, 58.07, 57.57),
    (57.10, 56.79, 58.13, 57.41),
)

_TABLE3 = (  # CIFAR-10, 3x wide ResNet [16, 48, 96, 192]
    (85.41, 84.65, 86.48, 85.98),
    (49.15, 52.21, 50.91, 53.23),
    (38.19, 41.00, 39.52, 41.55),
    (37.39, 40.28, 38.98, 40.78),
    (37.20, 40.24, 38.89, 40.67),
    (38.92, 42.20, 40.75, 42.12),
    (38.71, 41.88, 40.32, 42.06),
    (68.03, 68.00, 69.78, 69.00),
    (62.77, 63.14, 64.70, 64.01),
    (62.65, 63.12, 64.78, 64.15),
    (62.73, 63.12, 64.69, 64.11),
    (63.89, 64.23, 65.65, 64.50),
    (63.77, 64.04, 65.43, 64.35),
)

_TABLE5 = (  # CIFAR-100, ResNet [16, 16, 32, 64]
    (52.70, 49.53, 53.67, 50.66),
    (25.14, 26.99, 26.33, 27.76),
    (19.65, 23.16, 20.82, 23.80),
    (19.47, 23.07, 20.59, 23.62),
    (19.41, 22.96, 20.53, 23.62),
    (18.64, 20.78, 19.39, 20.88),
    (18.61, 20.63, 19.26, 20.76),
    (35.37, 35.10, 35.95, 35.17),
    (31.99, 31.88, 32.48, 32.04),
    (32.03, 31.84, 32.38, 32.00),
    (32.00, 31.80, 32.37, 32.06),
    (32.50, 31.96, 32.75, 29.81),
    (32.46, 31.86, 32.74, 29.71),
)


def _table(prefix: str, table: str, values: tuple[tuple[float, ...], ...]) -> dict[str, dict]:
    out = {}
    for j, (method, column) in enumerate(_COLUMNS):
        out[f"{prefix}-{method}"] = {
            "table": table,
            "column": column,
            "rows": {row: vals[j] for row, vals in zip(_CIFAR_ROWS, values, strict=True)},
        }
    return out


PAPER_RESULTS: dict[str, dict] = {
    "mnist-at": {"table": "Table 1", "column": "Madry et al. (2017)",
                 "rows": {"natural": 98.72, "whitebox/pgd-40": 92.86, "blackbox/pgd-40": 95.97}},
    "mnist-at-reg": {"table": "Table 1", "column": "AT-reg",
                     "rows": {"natural": 98.66, "whitebox/pgd-40": 95.69, "blackbox/pgd-40": 96.90}},
    **_table("cifar10", "Table 2", _TABLE2),
    **_table("cifar10-wide3", "Table 3", _TABLE3),
    **_table("cifar100", "Table 5", _TABLE5),
}
"""preset name -> {"table", "column", "rows": {row id: accuracy in %}}."""


def paper_results(preset: str) -> dict | None:
    """The published numbers of a preset, or None when the paper has no column for it."""
    return PAPER_RESULTS.get(preset)


# Table 4 of the paper: accuracy of the natural ResNet (88.79% clean test accuracy) on gradient maps.
PAPER_TABLE4 = {
    "cifar10-at": {
        "label": "Madry et al. (2017)",
        "clipped": {"train": 0.2710, "test": 0.2678},
        "raw": {"train": 0.2860, "test": 0.2872},
    },
    "cifar10-at-att-reg": {
        "label": "Ours (AT-att-reg)",
        "clipped": {"train": 0.3011, "test": 0.3032},
        "raw": {"train": 0.3146, "test": 0.3159},
    },
}
PAPER_TABLE4_CLASSIFIER = "cifar10-natural"
PAPER_CLASSIFIER_TEST_ACC = 0.8879
