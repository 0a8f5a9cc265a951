"""On-device batching, batched CIFAR augmentation and the train/validation split.

:class:`DeviceLoader` keeps a whole split as uint8 on the target device and builds each batch with
one gather, so there are no worker processes and no host-to-device copies per step. Batches are a
pure function of ``(seed, step)``, so resuming at step ``k`` reproduces exactly the batches an
uninterrupted run would have seen, with no RNG state to save.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..seeding import derived_seed
from .datasets import Dataset
from .download import DataError

__all__ = ["DeviceLoader", "augment_batch", "batch_starts", "to_float_images", "train_val_split"]

_PERM_STREAM = 0x5045524D  # "PERM"
_AUG_STREAM = 0x41554721  # "AUG!"


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the generator that draws epoch ``epoch``'s permutation."""
    return derived_seed(seed, _PERM_STREAM, epoch)


def step_seed(seed: int, step: int) -> int:
    """Seed of the generator that draws step ``step``'s augmentation."""
    return derived_seed(seed, _AUG_STREAM, step)


def to_float_images(
    x: torch.Tensor, device: torch.device | str | None = None, channels_last: bool = False
) -> torch.Tensor:
    """Images as float in [0, 1] on ``device``: uint8 is divided by 255 (and laid out channels_last if
    asked), float images are only moved and cast to float32."""
    if x.dtype != torch.uint8:
        return x.to(device).float()
    x = x.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def batch_starts(n: int, batch_size: int, *, desc: str = "", progress: bool = False, unit: str = "batch",
                 leave: bool = False) -> Iterable[int]:
    """0, batch_size, 2 * batch_size, ... below ``n``, with a progress bar when ``progress``."""
    from ..progress import progress_bar

    return progress_bar(range(0, n, batch_size), desc=desc, unit=unit, disable=not progress, leave=leave)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a whole batch, on ``x``'s device, with no per-image loop.

    Each image is zero-padded by ``pad`` pixels, cropped back to its size at an independent random
    offset, and flipped horizontally with probability 1/2. Works on any dtype (uint8 or float);
    ``generator`` must live on ``x``'s device. Returns a new (B, C, H, W) tensor of ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    dev = x.device
    if b == 0:
        return x.clone()
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand((b,), generator=generator, device=dev) < 0.5
    # source coordinates (in the unpadded image) of every output pixel
    rows = oy[:, None] - pad + torch.arange(h, device=dev)[None, :]  # (B, H)
    cols = ox[:, None] - pad + torch.arange(w, device=dev)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B,H,W)
    bi = torch.arange(b, device=dev)[:, None, None]
    # advanced indices around a slice: the broadcast (B, H, W) dims come first, channels last
    out = x[bi, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (B,H,W,C)
    out = out.permute(0, 3, 1, 2)
    out = torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype, device=dev))
    return out.contiguous()


class DeviceLoader:
    """Holds a split's uint8 images and labels on ``device``; yields float batches in [0, 1].

    ``batch(step)`` is stateless: epoch ``step // steps_per_epoch`` is a permutation drawn from a
    generator seeded with ``epoch_seed(seed, epoch)`` (cached, so computed once per epoch), and the
    augmentation of that step uses a generator seeded with ``step_seed(seed, step)``.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        channels_last: bool = False,
    ):
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise ValueError(
                f"DeviceLoader expects uint8 (N, C, H, W) images, got {x_uint8.dtype} {tuple(x_uint8.shape)}"
            )
        if y.ndim != 1 or len(y) != len(x_uint8):
            raise ValueError(f"DeviceLoader got {tuple(y.shape)} labels for {len(x_uint8)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(x_uint8)
        if n == 0:
            raise DataError("cannot build batches from an empty split")
        if drop_last and n < batch_size:
            raise DataError(
                f"batch size {batch_size} is larger than the {n} examples of the split; lower optim.batch_size"
            )
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    def _generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of examples in ``epoch`` (cached for the current epoch)."""
        if self._perm_epoch != epoch:
            g = self._generator(epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(len(self.x), generator=g, device=self.device)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Indices into the split of the examples in global step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def _finish(self, xb: torch.Tensor) -> torch.Tensor:
        return to_float_images(xb, self.device, self.channels_last)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 in [0, 1] of shape (B, C, H, W), y int64) for global training step ``step``."""
        idx = self.indices(step)
        xb = self.x[idx]
        if self.augment:
            xb = augment_batch(xb, self._generator(step_seed(self.seed, step)))
        return self._finish(xb), self.y[idx]

    def iter_eval(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All examples in order, without augmentation, the last partial batch included."""
        bs = int(batch_size or self.batch_size)
        for s in range(0, len(self.x), bs):
            yield self._finish(self.x[s : s + bs]), self.y[s : s + bs]


def train_val_split(
    ds: Dataset, val_size: int, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded random split of the *training* set into (train, validation).

    Both parts keep the original order of the examples. ``val_size=0`` gives an empty validation
    set; the test set is never touched.
    """
    n = len(ds.x_train)
    val_size = int(val_size)
    if val_size < 0:
        raise DataError(f"validation size must be >= 0, got {val_size}")
    if val_size >= n:
        raise DataError(
            f"validation size {val_size} leaves no training data ({ds.name} has {n} training examples); "
            "lower data.val_size"
        )
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    val_idx = perm[:val_size].sort().values
    tr_idx = perm[val_size:].sort().values
    return (ds.x_train[tr_idx], ds.y_train[tr_idx]), (ds.x_train[val_idx], ds.y_train[val_idx])
