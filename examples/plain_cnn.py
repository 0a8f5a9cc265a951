"""A model defined outside robustfeat, evaluated with robustfeat's suite (docs/evaluation.md).

The model is a plain ``torch.nn.Module`` that knows nothing of robustfeat: it takes [0, 1] MNIST images
(B, 1, 28, 28), normalizes them itself and returns logits (B, 10). Training it below uses torch,
numpy and the official MNIST files only.

    python examples/plain_cnn.py --mnist /work/shared/data/MNIST/raw --out plain_cnn.safetensors
    robustfeat eval --model examples/plain_cnn.py:build --weights plain_cnn.safetensors \\
        --dataset mnist --data-dir /work/shared/data --suite paper --n 500 --curves
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics


class PlainCNN(nn.Module):
    """conv5x5-16, ReLU, max-pool 2, conv5x5-32, ReLU, max-pool 2, FC 128, ReLU, FC 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD  # (B, 1, 28, 28) in [0, 1] -> standardized
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 7, 7)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, 10) logits


def build() -> PlainCNN:
    """The factory ``robustfeat eval --model examples/plain_cnn.py:build`` calls."""
    return PlainCNN()


def _idx(path: Path) -> np.ndarray:
    """An IDX file of the MNIST distribution (gzip): uint8 images (N, 28, 28) or labels (N,)."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def train(mnist_dir: str, out: str, steps: int = 1500, batch: int = 64, seed: int = 0) -> float:
    """Natural training with Adam; saves the state dict as safetensors; returns test accuracy."""
    from safetensors.torch import save_file

    d = Path(mnist_dir)
    x = torch.from_numpy(_idx(d / "train-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64))
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    xt = torch.from_numpy(_idx(d / "t10k-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    yt = torch.from_numpy(_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    with torch.no_grad():
        acc = (model.eval()(xt).argmax(1) == yt).float().mean().item()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print(f"test accuracy {acc:.2%}; weights written to {out}")
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", required=True, help="directory with the four MNIST .gz files")
    p.add_argument("--out", default="plain_cnn.safetensors")
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args()
    train(a.mnist, a.out, a.steps)
