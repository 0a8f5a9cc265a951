"""The paper's analyses (sections 4.3 and 4.4) as pure functions of models and tensors.

    attention_vs_robustness(model, x, y, attack)   # Figure 2: mean attention weight per robustness rank
    attention_maps(model, x)                      # Figure 3: attention weights upsampled to the image size
    gradient_maps(model, x, y)                    # Figure 4: d CE / d input, (B, C, H, W)
    prepare_maps(g, clip=True)                    # Figure 4 / Table 4: +-3 std clip, rescale to [0, 1]
    gradient_map_accuracy(model, classifier, ...) # Table 4: a natural classifier labels the maps

Every function takes images in [0, 1] (or uint8, converted batch by batch) in (B, C, H, W), the
layout every robustfeat model reads; nothing here loads runs, plots or writes files (see
``robustfeat.analysis.pipeline`` and ``robustfeat.analysis.figures``).

Readings of the paper where it leaves room (documented once, here):

* Robustness of a spatial feature (section 4.3) = ||l_n(x) - l_n(x')||_2 over the C channels of
  the last residual block's local feature at position n, x' = the PGD adversary of x made with the
  run's *training* attack (see ``analysis_attack``: bn_mode "eval", since we analyse the trained
  model, and the training-only start/projection options dropped). Rank 0 =
  smallest distance = most robust; ties are broken by position index (stable sort). The attention
  weights are those the model assigns to the *clean* image.
* Figure 2's curve is the mean over images of "the weight at the position with robustness rank r".
  Because each image's weights sum to 1 over positions, the curve sums to 1 too; a model that
  ignored robustness would give a flat line at 1 / (H' W').
* Gradient maps are the gradient of the per-example cross-entropy at the true label with respect to
  the [0, 1] input pixels, the model in eval mode (sum over the batch, so a map does not depend on
  the batch it was computed in).
* "Clipped to +-3 standard deviations": per image, over all its C*H*W values, to
  [mean - 3 std, mean + 3 std]; then rescaled to [0, 1] by the clipped map's own min and max.
  "Without clipping" (Table 4) = the same min/max rescale of the raw gradient. A constant map
  (zero gradient) becomes 0.5 everywhere.
* Table 4's classifier sees the maps exactly as it saw its training images: float (B, C, H, W) in
  [0, 1] with the dataset's channel count (colour gradient maps stay colour); the model normalizes
  inside, as it did in training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import attack_from_config, eval_mode
from ..build import build_model
from ..config import AttackConfig
from ..data import batch_starts, to_float_images

CLIP_STD = 3.0


def analysis_attack(train_attack: AttackConfig) -> AttackConfig:
    """Figure 2's adversary: the run's training attack (eps, step, steps, restarts, loss) on the trained
    model in eval mode, as a plain ``AttackConfig``, so the training-only options of a
    ``TrainAttackConfig`` (N-FGSM's wider start and missing projection, an unclipped start) cannot
    carry over: the analysis adversary always stays in the eps-ball and in [0, 1]."""
    plain = {f.name: getattr(train_attack, f.name) for f in dataclasses.fields(AttackConfig)}
    return AttackConfig(**{**plain, "bn_mode": "eval"})


class AnalysisError(ValueError):
    """An analysis asked of a model or data it does not apply to (e.g. attention without attention)."""


def require_attention(model: nn.Module, what: str = "this analysis") -> None:
    if not getattr(model, "has_attention", False):
        raise AnalysisError(
            f"{what} needs a model with attention, but {type(model).__name__} has none; "
            "use a run of an attention preset (AT-att or AT-att-reg, model name ending in '_att')"
        )


# ---------------------------------------------------------------------------------------------------
# Figure 2: attention weight versus feature robustness


def feature_robustness(local_clean: torch.Tensor, local_adv: torch.Tensor) -> torch.Tensor:
    """L2 distance per spatial position: (B, C, H', W') x 2 -> (B, H' * W'); smaller = more robust."""
    if local_clean.shape != local_adv.shape or local_clean.dim() != 4:
        raise ValueError(f"local features must be two (B, C, H', W') tensors, got "
                         f"{tuple(local_clean.shape)} and {tuple(local_adv.shape)}")
    return (local_clean - local_adv).flatten(2).norm(dim=1)


def robustness_order(dist: torch.Tensor) -> torch.Tensor:
    """(B, N) distances -> (B, N) position indices sorted from most robust (rank 0) to least robust.

    ``order[b, r]`` is the position with robustness rank r; each row is a permutation of 0..N-1.
    """
    return torch.sort(dist, dim=1, stable=True).indices


def weights_by_rank(weights: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Attention weights reordered by robustness rank: (B, N) x (B, N) -> (B, N), column r = rank r."""
    weights = weights.flatten(1)
    if weights.shape != dist.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and distances {tuple(dist.shape)} differ in shape")
    return weights.gather(1, robustness_order(dist))


@dataclass
class RankAverage:
    """Mean (and spread) of the attention weight at each robustness rank over ``n`` images."""

    mean: np.ndarray  # (N,) mean weight at rank r; sums to 1
    std: np.ndarray  # (N,) standard deviation over images
    n: int
    grid: tuple[int, int]  # (H', W') of the attention map

    @property
    def sem(self) -> np.ndarray:
        return self.std / np.sqrt(max(self.n, 1))

    @property
    def spearman(self) -> float:
        """Spearman correlation between robustness rank and mean attention weight (negative = the
        model puts more weight on more robust features)."""
        return spearman(np.arange(len(self.mean)), self.mean)


class RankAccumulator:
    """Running sums of (B, N) weights-by-rank batches, in float64."""

    def __init__(self) -> None:
        self.s: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.n = 0

    def add(self, by_rank: torch.Tensor) -> None:
        b = by_rank.detach().double().cpu()
        if self.s is None:
            self.s, self.s2 = b.sum(0), (b * b).sum(0)
        else:
            self.s += b.sum(0)
            self.s2 += (b * b).sum(0)
        self.n += b.shape[0]

    def result(self, grid: tuple[int, int]) -> RankAverage:
        if self.s is None or self.n == 0:
            raise AnalysisError("no images to average over")
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0.0)
        return RankAverage(mean.numpy(), var.sqrt().numpy(), self.n, grid)


def attention_vs_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    batch_size: int = 200,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "attention vs robustness",
) -> RankAverage:
    """Figure 2 on one split: the mean clean-image attention weight at each robustness rank.

    ``attack`` makes the adversaries (the run's training attack with bn_mode="eval"); the last PGD
    iterate is used, as in training.
    """
    require_attention(model, "attention vs robustness")
    device = torch.device(device)
    acc = RankAccumulator()
    grid = (0, 0)
    with eval_mode(model):
        for i in batch_starts(len(y), batch_size, desc=desc, progress=progress):
            xb = to_float_images(x[i : i + batch_size], device)
            yb = y[i : i + batch_size].to(device)
            xa = attack_from_config(model, xb, yb, attack, generator=generator, keep_best=False)
            with torch.no_grad():
                clean = model.attention(xb)
                adv_local = model.attention(xa).local
            grid = tuple(clean.weights.shape[1:])
            acc.add(weights_by_rank(clean.weights, feature_robustness(clean.local, adv_local)))
    return acc.result(grid)


def untrained_control(cfg, num_classes: int, in_channels: int, device: torch.device | str,
                      seed: int) -> nn.Module:
    """Figure 2's control: a freshly initialised model of the run's architecture (seeded, without
    touching the global RNG). A rank-weight slope it shows too comes from the architecture, not from
    training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model, num_classes, in_channels).to(device)


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, ties given their average rank."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks); nan if constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb):
        raise ValueError("spearman: arrays differ in length")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------
# Figure 3: attention maps


def attention_maps(
    model: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 200
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (B, H', W'), the same upsampled bilinearly to the image size (B, H, W), predictions (B,)).

    The upsampled map is rescaled by (H' W') / (H W) so that it still sums to 1 over the image.
    """
    require_attention(model, "attention maps")
    device = torch.device(device)
    ws, preds = [], []
    with eval_mode(model), torch.no_grad():
        for i in batch_starts(len(x), batch_size):
            out = model.attention(to_float_images(x[i : i + batch_size], device))
            ws.append(out.weights.cpu())
            preds.append(out.logits.argmax(1).cpu())
    w = torch.cat(ws)
    return w, upsample_map(w, tuple(x.shape[-2:])), torch.cat(preds)


def upsample_map(w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) bilinear, mass-preserving up to interpolation (scaled by hw / HW)."""
    up = F.interpolate(w[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return up * (w.shape[-2] * w.shape[-1]) / (size[0] * size[1])


# ---------------------------------------------------------------------------------------------------
# Figure 4 and Table 4: gradient maps


def gradient_maps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / d x per example, (B, C, H, W), the model in eval mode; ``x`` float in [0, 1]."""
    with eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g.detach()


def clip_std(g: torch.Tensor, k: float = CLIP_STD) -> torch.Tensor:
    """Clip each map to its own mean +- k standard deviations (over all C*H*W values of the image)."""
    flat = g.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    return torch.maximum(torch.minimum(flat, mean + k * std), mean - k * std).view_as(g)


def rescale_unit(g: torch.Tensor) -> torch.Tensor:
    """Rescale each map linearly to [0, 1] by its own min and max; a constant map becomes 0.5."""
    flat = g.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.5)
    return out.clamp_(0.0, 1.0).view_as(g)


def prepare_maps(g: torch.Tensor, clip: bool = True, k: float = CLIP_STD) -> torch.Tensor:
    """Gradient maps as images: (B, C, H, W) float in [0, 1], clipped to +-k std first if ``clip``."""
    return rescale_unit(clip_std(g, k) if clip else g)


def classify_maps(classifier: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """Predicted labels of prepared maps. The maps must look like the classifier's training images:
    float, (B, C, H, W), values in [0, 1] (the model normalizes inside)."""
    if maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be float (B, C, H, W), got {maps.dtype} {tuple(maps.shape)}")
    if maps.amin() < 0 or maps.amax() > 1:
        raise ValueError("maps must lie in [0, 1], the range of the classifier's training images")
    with torch.no_grad():
        return classifier(maps).argmax(1)


VARIANTS = ("clipped", "raw")


def gradient_map_accuracy(
    model: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "gradient maps",
) -> dict[str, float]:
    """Table 4 on one split: accuracy of ``classifier`` on ``model``'s gradient maps of (x, y),
    {"clipped": ..., "raw": ...} (raw = without the +-3 std clip)."""
    device = torch.device(device)
    correct = dict.fromkeys(VARIANTS, 0)
    with eval_mode(classifier):
        for i in batch_starts(len(y), batch_size, desc=desc, progress=progress):
            xb = to_float_images(x[i : i + batch_size], device)
            yb = y[i : i + batch_size].to(device)
            g = gradient_maps(model, xb, yb)
            for v in VARIANTS:
                pred = classify_maps(classifier, prepare_maps(g, clip=v == "clipped"))
                correct[v] += int((pred == yb).sum())
    return {v: correct[v] / max(len(y), 1) for v in VARIANTS}


# ---------------------------------------------------------------------------------------------------
# choosing images


def pick_examples(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` images for a figure: the first image of each class in class order, then the
    next of each class again, ... (so 10 columns of CIFAR-10 show the 10 classes)."""
    y = y.cpu()
    classes = torch.unique(y).tolist()
    per_class = {c: (y == c).nonzero().flatten().tolist() for c in classes}
    out: list[int] = []
    k = 0
    while len(out) < min(n, len(y)):
        for c in classes:
            if k < len(per_class[c]) and len(out) < n:
                out.append(per_class[c][k])
        k += 1
    return torch.tensor(out, dtype=torch.long)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded random subset of ``n`` examples (in their original order); all if n is None."""
    if n is None or n >= len(y):
        return x, y
    if n < 1:
        raise AnalysisError(f"--n must be at least 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]
