"""Matplotlib figures of the analyses (Agg backend, PNG files): Figures 2, 3 and 4 of the paper.

Inputs are plain arrays/tensors from ``robustfeat.analysis.measures``; nothing here touches a model.
Images are (C, H, W) floats in [0, 1] and are shown in their true colours (grayscale for one channel).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from .measures import RankAverage

MAX_COLS = 10
DPI = 150


def _hwc(img: torch.Tensor | np.ndarray) -> tuple[np.ndarray, dict]:
    """(C, H, W) in [0, 1] -> an array imshow draws in true colour, and the imshow options for it."""
    a = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float32)
    a = np.clip(a, 0.0, 1.0)
    if a.shape[0] == 1:
        return a[0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return np.transpose(a, (1, 2, 0)), {}


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


# ---------------------------------------------------------------------------------------------------
# Figure 2


def plot_attention_robustness(
    panels: dict[str, RankAverage], path: str | os.PathLike, *, title: str = "",
    controls: dict[str, RankAverage] | None = None,
) -> Path:
    """One panel per split (e.g. {"Training set": ..., "Test set": ...}): mean attention weight at each
    robustness rank, with a 95% band (1.96 standard errors over images) and the uniform 1/N line.
    ``controls`` (same keys): the same curve for an untrained model of the architecture, drawn grey, so
    a slope the architecture produces by itself is not read as something training taught."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], panels.items(), strict=True):
        ranks = np.arange(len(r.mean))
        ax.fill_between(ranks, r.mean - 1.96 * r.sem, r.mean + 1.96 * r.sem, color="C0", alpha=0.25,
                        linewidth=0, label="95% band (1.96 s.e. over images)")
        ax.plot(ranks, r.mean, "o-", color="C0", markersize=3, linewidth=1.2,
                label=f"mean attention weight (Spearman $\\rho$ = {r.spearman:+.2f})")
        c = (controls or {}).get(name)
        if c is not None:
            ax.plot(np.arange(len(c.mean)), c.mean, "s--", color="0.45", markersize=2.5, linewidth=1,
                    label=f"untrained control (Spearman $\\rho$ = {c.spearman:+.2f})")
        ax.axhline(1.0 / len(r.mean), color="0.4", linestyle="--", linewidth=1,
                   label=f"uniform weight 1/{len(r.mean)}")
        ax.set_title(f"{name} ({r.n:,} images)")
        ax.set_xlabel(f"robustness rank (0 = most robust, {len(r.mean) - 1} = least robust)")
        ax.set_xlim(-0.5, len(r.mean) - 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("attention weight")
    fig.suptitle(title or "Attention weight vs. feature robustness")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Figures 3 and 4: image grids


def _grid(n: int, rows_per_block: int):
    cols = min(n, MAX_COLS)
    blocks = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_per_block * blocks, cols, figsize=(1.45 * cols + 1.2, 1.55 * rows_per_block * blocks + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        _blank(ax)
    cells = []  # (block row offset, column) of image i
    for i in range(n):
        cells.append((rows_per_block * (i // cols), i % cols))
    return fig, axes, cells


def plot_attention_maps(
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    predictions: Sequence[str] | None = None,
    title: str = "",
    alpha: float = 0.5,
    colorbar_label: str = "attention weight (1 = uniform)",
) -> Path:
    """Figure 3: the input images (top row) and their attention maps upsampled to the image size and
    overlaid as a semi-transparent heatmap (bottom row) on one colour scale shared by all images;
    column titles are the true classes (and the prediction where it differs)."""
    n = len(images)
    fig, axes, cells = _grid(n, 2)
    vmax = float(maps.max())
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=vmax)
    for i, (r, c) in enumerate(cells):
        img, kw = _hwc(images[i])
        axes[r][c].imshow(img, **kw)
        t = labels[i]
        if predictions is not None and predictions[i] != labels[i]:
            t += f"\n(pred. {predictions[i]})"
        axes[r][c].set_title(t, fontsize=8)
        axes[r + 1][c].imshow(img, **kw)
        axes[r + 1][c].imshow(np.asarray(maps[i].cpu()), cmap="jet", alpha=alpha, norm=norm,
                              interpolation="bilinear")
        if c == 0:
            axes[r][c].set_ylabel("input", fontsize=9)
            axes[r + 1][c].set_ylabel("attention", fontsize=9)
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap="jet")  # opaque colour scale for the legend
    cb = fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    cb.set_label(colorbar_label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title or "Attention maps at the last residual block")
    return _save(fig, path)


def plot_gradient_maps(
    images: torch.Tensor,
    rows: Sequence[tuple[str, torch.Tensor]],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    note: str = "",
) -> Path:
    """Figure 4: a row of input images, then one row per model with its prepared gradient maps
    ((C, H, W) in [0, 1], shown like images)."""
    n = len(images)
    fig, axes, cells = _grid(n, 1 + len(rows))
    for i, (r, c) in enumerate(cells):
        img, kw = _hwc(images[i])
        axes[r][c].imshow(img, **kw)
        axes[r][c].set_title(labels[i], fontsize=8)
        for k, (name, maps) in enumerate(rows):
            m, kw = _hwc(maps[i])
            axes[r + 1 + k][c].imshow(m, **kw)
            if c == 0:
                axes[r + 1 + k][c].set_ylabel(name, fontsize=8)
        if c == 0:
            axes[r][c].set_ylabel("input", fontsize=8)
    fig.suptitle(title or "Gradient maps (d loss / d input)")
    if note:
        fig.text(0.5, 0.0, note, ha="center", va="top", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
