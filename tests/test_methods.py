"""The method losses (eq. 7) against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from robustfeat.methods import METHODS, feature_distance, grad_align_penalty, method_loss
from robustfeat.models.base import RobustModel


class Tiny(RobustModel):
    num_classes, feature_dim = 3, 2

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(4, 2)
        self.h = torch.nn.Linear(2, 3)
        with torch.no_grad():
            self.f.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, -1.0]]))
            self.f.bias.zero_()
            self.h.weight.copy_(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]]))
            self.h.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))

    def forward_features(self, x):
        return self.f(x.flatten(1))

    def forward_head(self, feats):
        return self.h(feats)


def test_eq7_equals_hand_computation():
    m = Tiny()
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    xa = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    lam = 0.3
    # by hand: G(x) = [[1,0],[0,1]], G(x') = [[1,2],[0,2]]; distances 2 and 1 -> mean 1.5
    ga = torch.tensor([[1.0, 2.0], [0.0, 2.0]])
    logits = torch.stack([ga[:, 0], ga[:, 1] + 0.5, ga.sum(1) - 0.5], 1)
    ce = -(F.log_softmax(logits, 1)[0, 0] + F.log_softmax(logits, 1)[1, 2]) / 2
    expected = ce + lam * 1.5
    loss, parts = method_loss(m, x, xa, y, lam)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    assert math.isclose(parts["reg"].item(), 1.5, rel_tol=1e-6)
    assert math.isclose(parts["ce"].item(), ce.item(), rel_tol=1e-6)


def test_regularizer_gradient_flows_through_clean_and_adversarial_features():
    m = Tiny()
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    xa = torch.tensor([[1.0, 1.0, 0.0, 0.0]], requires_grad=True)
    loss, _ = method_loss(m, x, xa, torch.tensor([0]), lam=1.0)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # through G(x)
    assert xa.grad is not None and xa.grad.abs().sum() > 0  # through G(x') (CE and L2)


def test_plain_at_skips_the_regularizer_and_natural_uses_clean_images():
    m = Tiny()
    x, xa, y = torch.rand(5, 4), torch.rand(5, 4), torch.randint(0, 3, (5,))
    loss, parts = method_loss(m, x, xa, y, lam=0.0)
    assert "reg" not in parts
    assert torch.allclose(loss, F.cross_entropy(m(xa), y))
    loss, _ = method_loss(m, x, None, y)
    assert torch.allclose(loss, F.cross_entropy(m(x), y))


def test_feature_distance_is_the_plain_l2_norm():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert feature_distance(a, b).item() == pytest.approx(5.0)


def test_paper_lambdas():
    assert METHODS.get("at-reg").default_lam("mnist") == 0.01
    assert METHODS.get("at-reg").default_lam("cifar10") == 0.1
    assert METHODS.get("at-att-reg").default_lam("cifar100") == 0.01
    assert METHODS.get("at").default_lam("cifar10") == 0.0
    assert METHODS.get("at-att").attention and not METHODS.get("at-reg").attention


def _input_grad_by_hand(m, x, y):
    """Tiny is linear: d CE / d x = (H F)^T (softmax(logits) - onehot(y)), per example."""
    w = m.h.weight @ m.f.weight
    p = F.softmax(m(x), 1)
    return (p - F.one_hot(y, 3).float()) @ w


def test_grad_align_equals_hand_computation():
    m = Tiny()
    x = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.6, 0.3, 0.0, 0.7]])
    y = torch.tensor([1, 2])
    eta = torch.tensor([[0.1, -0.2, 0.1, 0.2], [-0.1, 0.3, 0.2, -0.3]])
    g1 = _input_grad_by_hand(m, x, y) / 2  # CE is averaged over the batch of 2
    g2 = _input_grad_by_hand(m, (x + eta).clamp(0, 1), y) / 2
    expected = (1 - F.cosine_similarity(g1, g2, dim=1)).mean()
    got = grad_align_penalty(m, x, y, eta)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and 0 < got.item() < 2
    assert grad_align_penalty(m, x, y, torch.zeros_like(x)).item() == pytest.approx(0.0, abs=1e-6)


def test_grad_align_gradient_in_the_weights_is_the_true_one():
    """The double backward through g(x + eta) agrees with finite differences of the hand formula (float64),
    with g(x) held at its value (the authors' formulation: only g(x + eta) carries gradient)."""
    m = Tiny().double()
    x = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.6, 0.3, 0.0, 0.7]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    eta = torch.tensor([[0.1, -0.2, 0.1, 0.2], [-0.1, 0.3, 0.2, -0.3]], dtype=torch.float64)
    w0 = m.h.weight.detach().clone()
    with torch.no_grad():
        g_clean = _input_grad_by_hand(m, x, y)

    def by_hand(w):
        with torch.no_grad():
            m.h.weight.copy_(w)
            g_near = _input_grad_by_hand(m, (x + eta).clamp(0, 1), y)
            return (1 - F.cosine_similarity(g_clean, g_near, dim=1)).mean().item()

    by_hand(w0)
    grad = torch.autograd.grad(grad_align_penalty(m, x, y, eta), m.h.weight)[0]
    assert grad.abs().sum() > 0
    for i, j in [(0, 0), (1, 1), (2, 0)]:
        d = torch.zeros_like(w0)
        d[i, j] = 1e-6
        numeric = (by_hand(w0 + d) - by_hand(w0 - d)) / 2e-6
        assert grad[i, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
