"""Properties every attack must have, checked on tiny models."""

import itertools

import pytest
import torch
from torch import nn

from robustfeat.attacks import (
    InvalidAdversary,
    attack_mode,
    check_adversary,
    cw_margin_loss,
    pgd,
    pgd_budgets,
)
from robustfeat.models import create_model


class Linear(nn.Module):
    def __init__(self, d=12, k=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=g))
            self.fc.bias.copy_(torch.randn(k, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _data(n=16, shape=(1, 3, 4), seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_threat_model(loss, random_start):
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1)
    x = torch.rand(6, 3, 32, 32)
    y = torch.randint(0, 10, (6,))
    eps = 8 / 255
    xa = pgd(model, x, y, eps=eps, step_size=2 / 255, steps=4, loss=loss, random_start=random_start,
             generator=torch.Generator().manual_seed(1))
    assert (xa - x).abs().max() <= eps + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    check_adversary(x, xa, eps)  # the evaluation's validity check accepts it


def test_linear_model_reaches_closed_form_worst_case():
    """For a 2-class linear model the l_inf worst case is x - eps * sign(w_y - w_other) (interior x)."""
    model = Linear()
    eps = 0.1
    x, y = _data(lo=0.2, hi=0.8)  # far enough from 0 and 1 that clipping is inactive
    w = model.fc.weight.detach()
    direction = (w[y] - w[1 - y]).sign().view_as(x)
    expected = x - eps * direction
    xa = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=10, random_start=True,
             generator=torch.Generator().manual_seed(0), keep_best=False)
    assert torch.allclose(xa, expected, atol=1e-6)
    # the margin drops by exactly eps * ||w_y - w_o||_1
    margin = lambda z: (z.gather(1, y[:, None]) - z.gather(1, (1 - y)[:, None])).squeeze(1)
    drop = margin(model(x)) - margin(model(xa))
    assert torch.allclose(drop, eps * (w[y] - w[1 - y]).abs().sum(1), atol=1e-4)


def test_loss_increases_on_average():
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    ce = nn.functional.cross_entropy
    xa = pgd(model, x, y, eps=0.3, step_size=0.05, steps=5, generator=torch.Generator().manual_seed(0))
    assert ce(model(xa), y) > ce(model(x), y)


def test_more_steps_never_help_the_defender():
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    x = torch.rand(32, 1, 28, 28)
    y = model(x).argmax(1)  # start from points the model gets right
    robust = []  # per example: still classified correctly after 1, 3, 10, 30 steps
    for steps in (1, 3, 10, 30):
        xa = pgd(model, x, y, eps=0.05, step_size=0.01, steps=steps, generator=torch.Generator().manual_seed(5))
        robust.append(model(xa).argmax(1) == y)
    accs = [r.float().mean().item() for r in robust]
    # an eps where the budgets differ (1.0 / 0.81 / 0.06 / 0.03 here), so the order is really tested
    assert accs[0] > accs[1] > accs[2] > 0 and accs[-1] < accs[2], accs
    for fewer, more in itertools.pairwise(robust):  # each example a longer run leaves robust, a shorter did too
        assert not (more & ~fewer).any()


def test_restarts_keep_the_worst_case_and_determinism():
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    x = torch.rand(32, 1, 28, 28)
    y = model(x).argmax(1)
    kw = {"eps": 0.05, "step_size": 0.01, "steps": 3}  # one start fools some examples, not all
    a1 = pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(2), **kw)
    a3 = pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(2), **kw)
    robust1, robust3 = model(a1).argmax(1) == y, model(a3).argmax(1) == y
    assert 0 < robust1.float().mean() < 1
    # the first of the three starts is the single run's start, so its fooled examples stay fooled, and
    # the other two starts fool more (0.875 -> 0.781 here): restarts that did nothing would fail this
    assert not (robust3 & ~robust1).any()
    assert robust3.float().mean() < robust1.float().mean()
    assert ((a3 - x).abs().amax(dim=(1, 2, 3)) <= kw["eps"] + 1e-6).all() and a3.min() >= 0 and a3.max() <= 1
    again = pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a3, again)


def test_cw_margin_masks_the_true_class():
    logits = torch.tensor([[5.0, 1.0, -1e6], [0.0, 3.0, 2.0]])
    y = torch.tensor([0, 1])
    # the max over the other classes must be 1.0 (not the true logit 5.0) and 2.0
    assert torch.allclose(cw_margin_loss(logits, y), -torch.relu(torch.tensor([4.0, 1.0]) + 50))
    # even when all other logits are hugely negative, the true class never wins the max
    # (a fixed offset of -1e4 on the true logit would tie with the best other class here)
    logits = torch.tensor([[-1e4, -2e4, -3e4]])
    assert cw_margin_loss(logits, torch.tensor([0])).item() == -(1e4 + 50)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_attack_never_changes_batchnorm_statistics(bn_mode):
    torch.manual_seed(0)
    model = create_model("resnet_att", num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1)
    model.train()
    model(torch.rand(8, 3, 32, 32))  # some non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, bn_mode=bn_mode)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training  # mode restored
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_mode_selects_batch_or_running_statistics():
    torch.manual_seed(0)
    model = create_model("resnet", num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1)
    x = torch.rand(4, 3, 32, 32)
    with attack_mode(model, "eval"):
        eval_out = model(x)
    with attack_mode(model, "train"):
        train_out = model(x)
    model.eval()
    assert torch.allclose(eval_out, model(x))
    model.train()
    assert not torch.allclose(eval_out, train_out, atol=1e-4)


def test_attack_computes_no_parameter_gradients():
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    pgd(model, x, y, eps=0.3, step_size=0.1, steps=2)
    assert all(p.grad is None for p in model.parameters())


def test_validity_check_refuses_bad_adversaries():
    x = torch.full((2, 1, 4, 4), 0.5)
    with pytest.raises(InvalidAdversary, match="exceeds eps"):
        check_adversary(x, x + 0.2, eps=0.1)
    with pytest.raises(InvalidAdversary, match="outside"):
        check_adversary(x, x * 3, eps=2.0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidAdversary, match="non-finite"):
        check_adversary(x, bad, eps=0.1)


def test_unprojected_training_adversary_is_bounded_by_its_start_and_steps():
    """N-FGSM's training adversary (start_scale=2, project=False) leaves the eps-ball by design, but only
    as far as its start and step allow, and stays a valid image; the default still projects."""
    model = Linear()
    x, y = _data(n=64, lo=0.3, hi=0.7)
    eps, alpha = 0.1, 0.1
    g = lambda: torch.Generator().manual_seed(5)
    xa = pgd(model, x, y, eps=eps, step_size=alpha, steps=1, start_scale=2.0, project=False, generator=g(),
             keep_best=False)
    d = (xa - x).abs()
    assert d.max() > eps + 1e-3 and d.max() <= 2 * eps + alpha + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    # the same start with projection lands back in the ball
    xp = pgd(model, x, y, eps=eps, step_size=alpha, steps=1, start_scale=2.0, project=True, generator=g(),
             keep_best=False)
    assert (xp - x).abs().max() <= eps + 1e-6
    # defaults are the ball-start, projected PGD of every earlier result
    assert torch.equal(pgd(model, x, y, eps=eps, step_size=alpha, steps=3, generator=g()),
                       pgd(model, x, y, eps=eps, step_size=alpha, steps=3, generator=g(), start_scale=1.0,
                           project=True))


def _fgsm_rs_by_hand(model, x, y, u, eps, alpha, clip_start):
    start = x + (2 * u - 1) * eps
    if clip_start:
        start = start.clamp(0, 1)
    start.requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(start), y, reduction="sum"), start)
    step = start.detach() + alpha * g.sign()
    return torch.minimum(torch.maximum(step, x - eps), x + eps).clamp(0, 1)


def test_unclipped_start_takes_the_first_gradient_outside_the_image_range():
    """clip_start=False (Wong et al.'s FGSM-RS code): the gradient is taken at x + noise before clipping;
    the adversary is still a valid image in the ball. The default clips the start first."""
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=2, in_channels=1).eval()
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(8, 1, 28, 28, generator=g) > 0.7).float()  # MNIST-like: every pixel 0 or 1
    y = torch.randint(0, 2, (8,), generator=g)
    u = torch.rand(1, *x.shape, generator=g)
    eps, alpha = 0.3, 0.375
    for clip in (True, False):
        xa = pgd(model, x, y, eps=eps, step_size=alpha, steps=1, noise=u, keep_best=False, clip_start=clip)
        assert torch.allclose(xa, _fgsm_rs_by_hand(model, x, y, u[0], eps, alpha, clip), atol=1e-6)
        assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    unclipped = pgd(model, x, y, eps=eps, step_size=alpha, steps=1, noise=u, keep_best=False, clip_start=False)
    assert not torch.equal(unclipped, pgd(model, x, y, eps=eps, step_size=alpha, steps=1, noise=u,
                                          keep_best=False))
    with pytest.raises(ValueError, match="training adversaries only"):  # never returned as an adversary
        pgd(model, x, y, eps=eps, step_size=alpha, steps=1, noise=u, clip_start=False)


def test_an_explicit_start_replaces_the_random_one():
    """``start`` (attack.carry's carried perturbation): the first gradient is taken at x + start, the
    step is projected as usual, and a zero start is the attack without a random start."""
    model = Linear()
    x, y = _data(n=32, lo=0.2, hi=0.8)
    eps, alpha = 0.1, 0.1
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps
    xa = pgd(model, x, y, eps=eps, step_size=alpha, steps=1, start=start, keep_best=False)
    x0 = (x + start).requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x0), y, reduction="sum"), x0)
    by_hand = torch.minimum(torch.maximum(x0.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(xa, by_hand, atol=1e-6)
    # a carried start at the ball's edge and a step along it: the adversary stays there (not 2 eps)
    assert (xa - x).abs().max() <= eps + 1e-6 and ((xa - x).abs() > eps - 1e-6).float().mean() > 0.4
    zero = pgd(model, x, y, eps=eps, step_size=alpha, steps=3, start=torch.zeros_like(x), keep_best=False)
    assert torch.equal(zero, pgd(model, x, y, eps=eps, step_size=alpha, steps=3, random_start=False,
                                 keep_best=False))
    with pytest.raises(ValueError, match="one start of the images' shape"):
        pgd(model, x, y, eps=eps, step_size=alpha, steps=1, start=start[:4])
    with pytest.raises(ValueError, match="2 restarts"):
        pgd(model, x, y, eps=eps, step_size=alpha, steps=1, start=start, restarts=2)


class CountingModel(nn.Module):
    """Counts the examples it is asked to compute (forward passes, summed over batch sizes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.examples = inner, 0

    def forward(self, x):
        self.examples += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("restarts", [1, 3])
def test_pruned_pgd_gives_the_same_adversaries_for_less_work(restarts):
    """prune=True stops computing an example once it is misclassified: with keep-best its adversary is then
    fixed, so every budget's adversaries are those of the full run, and far fewer examples are computed."""
    torch.manual_seed(0)
    model = CountingModel(create_model("mnist_cnn", num_classes=10, in_channels=1).eval())
    x = torch.rand(32, 1, 28, 28)
    y = model(x).argmax(1)
    kw = {"eps": 0.05, "step_size": 0.005, "budgets": [1, 3, 10, 30], "restarts": restarts}
    model.examples = 0
    full = pgd_budgets(model, x, y, generator=torch.Generator().manual_seed(1), **kw)
    work_full, model.examples = model.examples, 0
    pruned = pgd_budgets(model, x, y, generator=torch.Generator().manual_seed(1), prune=True, **kw)
    robust = []
    for k in kw["budgets"]:
        assert torch.equal(pruned[k], full[k]), k
        check_adversary(x, pruned[k], kw["eps"])
        robust.append(model(pruned[k]).argmax(1) == y)
    assert robust[0].all() and robust[-1].float().mean() < 0.1  # budgets the attack really separates
    assert model.examples < 0.6 * work_full


def test_pruning_applies_only_where_it_is_exact():
    """Without keep-best the last iterate counts, and with batch statistics (bn_mode="train") a dropped
    example would change the others' logits: prune is then ignored and nothing changes."""
    torch.manual_seed(0)
    model = CountingModel(create_model("resnet", num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1))
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    for extra in ({"keep_best": False}, {"bn_mode": "train"}):
        kw = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3, **extra}
        model.examples = 0
        a = pgd(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
        work, model.examples = model.examples, 0
        b = pgd(model, x, y, generator=torch.Generator().manual_seed(0), prune=True, **kw)
        assert torch.equal(a, b) and model.examples == work, extra


def test_targeted_pgd_stays_in_the_threat_model_and_more_steps_never_help_the_defender():
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10, in_channels=1).eval()
    x = torch.rand(32, 1, 28, 28)
    y = model(x).argmax(1)
    target = (y + 1) % 10
    eps = 0.05
    advs = pgd_budgets(model, x, y, eps=eps, step_size=0.005, budgets=[1, 3, 10, 30], loss="targeted",
                       target=target, generator=torch.Generator().manual_seed(2), prune=True)
    robust, margin = [], []
    for xa in advs.values():
        check_adversary(x, xa, eps)
        with torch.no_grad():
            z = model(xa)
        robust.append(z.argmax(1) == y)
        margin.append((z.gather(1, target[:, None]) - z.gather(1, y[:, None])).mean().item())
    assert robust[0].float().mean() > robust[-1].float().mean()
    for fewer, more in itertools.pairwise(robust):
        assert not (more & ~fewer).any()
    with torch.no_grad():
        z0 = model(x)
    assert margin[0] > (z0.gather(1, target[:, None]) - z0.gather(1, y[:, None])).mean().item()
    with pytest.raises(ValueError, match=r"needs target: one class per example, shape \(32,\)"):
        pgd_budgets(model, x, y, eps=eps, step_size=0.01, budgets=[1], loss="targeted")
    with pytest.raises(ValueError, match="target is for loss='targeted' only"):
        pgd_budgets(model, x, y, eps=eps, step_size=0.01, budgets=[1], target=target)
