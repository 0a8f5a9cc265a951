"""l_inf attacks as pure functions of (model, images, labels, settings), shared by training and evaluation.

One PGD loop serves every attack of the paper: PGD-k with the cross-entropy loss, "CW-k" (PGD on the
CW margin loss, as the robustness literature uses the name) and FGSM with random start (steps=1), and
the evaluation's targeted PGD (the margin of a chosen wrong class over the true one).
The attack only ever asks for gradients with respect to the input, so the parameters' gradients are
never computed, and it never touches BatchNorm running statistics (see ``attack_mode``).

Also here, because training's validation needs them as much as evaluation does: ``eval_mode`` (models
in eval mode, each module's flag restored after), ``check_adversary`` (no number is counted from a
point outside the threat model) and ``accuracy`` (clean and attacked accuracy of a split). The
evaluation suite, its checks and reports are the package ``robustfeat.eval``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttackConfig
from .data import batch_starts, to_float_images
from .registry import Registry

CW_KAPPA = 50.0

LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


@LOSSES.register("cw")
def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = CW_KAPPA) -> torch.Tensor:
    """Per-example CW margin loss -relu(z_y - max_{i != y} z_i + kappa), (B,); the attack maximises it.

    The true class is removed from the max with -inf (a finite offset can lose against very
    negative logits and silently pick the true class).
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    mask = F.one_hot(y, logits.shape[1]).bool()
    other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return -F.relu(true - other + kappa)


TARGETED = "targeted"
"""The loss name of targeted PGD (``pgd_budgets(..., loss=TARGETED, target=...)``); not a config choice."""


def targeted_margin_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example z_target - z_y, (B,); maximised, it lifts the target class above the true one.
    Unclipped: PGD's sign step does not depend on its scale, and the iterate is counted as soon as any
    wrong class wins (keep-best), target or not."""
    return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)


def predicts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the logits classify it as ``y``. Every correct and robust flag of the evaluation
    (and of training's validation) comes from here. A row with a NaN or infinite logit never counts as
    correct: its argmax is arbitrary (torch's picks a NaN), so a model that breaks down numerically off
    the clean images would otherwise look robust on the examples whose label happens to be picked."""
    return (logits.argmax(1) == y) & torch.isfinite(logits).all(1)


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """The given models (None entries are skipped) in eval mode inside the block; every module's own
    train/eval flag is restored afterwards, even if the block raises."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in the BatchNorm mode of an attack and restore every module's state afterwards.

    bn_mode='eval': BN normalises with its running statistics (the model as deployed).
    bn_mode='train': BN normalises with the batch's statistics (Madry et al. attack this way while
    training), but ``track_running_stats`` is switched off so the running statistics stay frozen.
    """
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode={bn_mode!r}: expected 'eval' or 'train'")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [(m, m.track_running_stats) for m in bns]
    with eval_mode(model):  # restores every module's train/eval flag on the way out
        try:
            if bn_mode == "train":
                model.train()
                for m in bns:
                    m.track_running_stats = False
            yield model
        finally:
            for m, t in tracking:
                m.track_running_stats = t


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    # clamp to the eps-box around x, then to the valid pixel range
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def start_noise(
    shape: torch.Size | tuple[int, ...],
    restarts: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The uniform [0, 1) draws of PGD's random starts, (restarts, *shape): one ``torch.rand`` call of
    ``shape`` per restart, in order, from ``generator`` (the stream ``pgd`` has always consumed)."""
    return torch.stack(
        [torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype) for _ in range(restarts)]
    )


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, **options) -> torch.Tensor:
    """l_inf PGD (Madry et al. 2017): x' <- clip_{x, eps}(x' + step_size * sign(grad_x' loss)).

    Args:
        steps: PGD iterations (0: the clean images); ``options`` are those of ``pgd_budgets``:
            eps, step_size (required), restarts=1, random_start=True, loss="ce" (or "cw"),
            bn_mode="eval" (see ``attack_mode``), generator=None, keep_best=True, noise=None,
            start_scale=1.0, project=True, clip_start=True, start=None, target=None, prune=False.
        x: clean images in [0, 1], (B, C, H, W); y: labels (B,).
        restarts: independent random starts; per example the adversary that fools the model is kept.
        keep_best: record, per example, the first iterate that is misclassified and return it even if
            later iterates are classified correctly again. This makes accuracy non-increasing in
            ``steps`` for a fixed seed (a longer run extends the shorter one's trajectory), at the cost
            of one extra forward pass. Training turns it off and uses the last iterate (Madry et al.).
        noise: the uniform [0, 1) draws of the random starts, (restarts, B, C, H, W); None draws them
            from ``generator`` (``start_noise``). A data-parallel rank passes its rows of the global
            batch's draws, so its starts equal those of a single process on the whole batch.
        start_scale, project, clip_start: training-only variants (``TrainAttackConfig``): a random start
            in +-start_scale * eps; (project=False) iterates clipped to [0, 1] only, not to the eps-ball;
            (clip_start=False) the first gradient taken at the random start before it is clipped to
            [0, 1]. Every returned iterate is clipped either way.
        start: an explicit starting perturbation (B, C, H, W) in place of the random start (one restart;
            training's ``attack.carry``). It is added as given: the caller keeps it within eps.
        target: with ``loss="targeted"``, the class (B,) each example is pushed towards.
        prune: stop computing an example once it is misclassified (AutoAttack's cascade, inside one run).
            With ``keep_best`` its adversary for every budget is then fixed, so this changes no result;
            it applies only with keep_best and bn_mode="eval" (batch statistics would let the dropped
            examples change the others' logits). The results equal the unpruned run's up to
            floating-point differences between batch sizes.
    Returns:
        x_adv, detached, with |x_adv - x|_inf <= eps and pixels in [0, 1].
    """
    if steps == 0:
        return x.detach().clone()
    return pgd_budgets(model, x, y, budgets=[steps], **options)[steps]


def pgd_budgets(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    budgets: Sequence[int],
    restarts: int = 1,
    random_start: bool = True,
    loss: str = "ce",
    bn_mode: str = "eval",
    generator: torch.Generator | None = None,
    keep_best: bool = True,
    noise: torch.Tensor | None = None,
    start_scale: float = 1.0,
    project: bool = True,
    clip_start: bool = True,
    start: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    prune: bool = False,
) -> dict[int, torch.Tensor]:
    """{k: the adversary of ``pgd(..., steps=k)``} for every k in ``budgets``, from one run.

    This is the one PGD loop of robustfeat (the arguments are documented at ``pgd``). For each
    restart the trajectory x_0, x_1, ..., x_K (K = the largest budget) does not depend on the budget,
    so budget k's adversary is read off the first k steps: with ``keep_best`` the first misclassified
    iterate among x_0..x_k, else (or if none) x_k; across restarts, an example keeps the first restart
    that fools the model. PGD-5, 20, 100 and 200 thus cost 200 steps, not 325.
    """
    loss_fn = _loss_function(loss, target, len(y))
    x = x.detach()
    budgets = sorted({int(k) for k in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive step counts, got {budgets}")
    top = budgets[-1]
    results = {k: x.clone() for k in budgets}
    if eps == 0:
        return results
    # Whether misclassification must be tracked at all: the training path (one budget, one restart,
    # last iterate) skips the per-step argmax and the final forward pass.
    track = keep_best or restarts > 1 or len(budgets) > 1
    noise = _start_draws(x, restarts, track, random_start, clip_start, noise, start, generator)
    fooled = {k: torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) for k in budgets}
    prune = prune and keep_best and bn_mode == "eval"
    with attack_mode(model, bn_mode):
        for r in range(restarts):
            # with pruning, a restart attacks only the examples no earlier restart fooled at every budget
            idx = (~fooled[budgets[0]]).nonzero().squeeze(1) if prune and r > 0 else None
            if idx is not None and len(idx) == 0:
                break
            x_adv = _start_point(x, None if noise is None else noise[r], start, eps * start_scale, clip_start)
            sub = _Subset(idx, x, y, target)
            for t in range(top + 1):
                if t == top and not track:
                    results[top] = x_adv
                    break
                logits, grad, xa = _forward(model, loss_fn, sub.take(x_adv), sub.y, sub.target, with_grad=t < top)
                if sub.idx is None:
                    x_adv = xa  # detached
                if track:
                    wrong = ~predicts(logits.detach(), sub.y)
                    _record(sub.spread(wrong), t, x_adv, budgets, keep_best, fooled, results)
                if grad is not None:
                    xa = xa + step_size * grad.sign()
                    xa = _project(xa, sub.x, eps) if project else xa.clamp_(0.0, 1.0)
                    x_adv = sub.put(x_adv, xa)
                if prune and bool(wrong.any()):  # the fooled are done: their adversary is fixed
                    sub = _Subset(sub.keep(~wrong), x, y, target)
                    if len(sub.idx) == 0:
                        break
    return {k: v.detach() for k, v in results.items()}


def _loss_function(loss: str, target: torch.Tensor | None, n: int) -> Callable:
    """The per-example loss PGD maximises: a registered name, or TARGETED with its (B,) targets."""
    if loss == TARGETED:
        if target is None or tuple(target.shape) != (n,):
            raise ValueError(f"loss={TARGETED!r} needs target: one class per example, shape ({n},)")
        return targeted_margin_loss
    if target is not None:
        raise ValueError(f"target is for loss={TARGETED!r} only, not loss={loss!r}")
    return LOSSES.get(loss)


class _Subset:
    """The examples a PGD step still computes (``idx``; None: all of them), and how their results go
    back into the whole batch."""

    def __init__(self, idx, x, y, target):
        self.idx, self.n = idx, len(y)
        self.x = x if idx is None else x[idx]
        self.y = y if idx is None else y[idx]
        self.target = target if idx is None or target is None else target[idx]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.idx is None else full[self.idx]

    def spread(self, part: torch.Tensor) -> torch.Tensor:
        """A per-example mask of the computed examples as one of the whole batch (False elsewhere)."""
        if self.idx is None:
            return part
        return torch.zeros(self.n, dtype=part.dtype, device=part.device).index_copy_(0, self.idx, part)

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part if self.idx is None else full.index_copy(0, self.idx, part)

    def keep(self, mask: torch.Tensor) -> torch.Tensor:
        """The indices (into the whole batch) of the computed examples where ``mask`` holds."""
        if self.idx is None:
            return mask.nonzero().squeeze(1)
        return self.idx[mask]


def _start_draws(x, restarts, track, random_start, clip_start, noise, start, generator) -> torch.Tensor | None:
    """Check the start options of ``pgd_budgets``; the random starts' uniform draws (None: no random start)."""
    if not clip_start and track:  # an unclipped start must never be returned as an adversary
        raise ValueError("clip_start=False is for training adversaries only (one budget, one restart, "
                         "keep_best=False)")
    if start is not None and (restarts != 1 or tuple(start.shape) != tuple(x.shape)):
        raise ValueError(f"start has shape {tuple(start.shape)} with {restarts} restarts; expected one start of "
                         f"the images' shape {tuple(x.shape)}")
    if start is not None or not random_start:
        return None
    if noise is None:
        noise = start_noise(x.shape, restarts, generator=generator, device=x.device, dtype=x.dtype)
    if tuple(noise.shape) != (restarts, *x.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(restarts, *x.shape)}")
    return noise


def _start_point(x, noise, start, radius: float, clip_start: bool) -> torch.Tensor:
    """x_0 of one restart: x + ``start``, x + a uniform draw in +-radius, or x itself."""
    if start is not None:
        x_adv = x + start.to(x.dtype)
    else:
        x_adv = x + (2.0 * noise - 1.0) * radius if noise is not None else x.clone()
    if clip_start:
        x_adv.clamp_(0.0, 1.0)
    return x_adv


def _forward(model, loss_fn, x_adv, y, target, with_grad: bool):
    """(logits, the loss's input gradient or None, x_adv detached) at one iterate."""
    if not with_grad:
        with torch.no_grad():
            return model(x_adv), None, x_adv
    x_adv.requires_grad_(True)
    logits = model(x_adv)
    loss = loss_fn(logits.float(), y) if target is None else loss_fn(logits.float(), y, target)
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits, grad, x_adv.detach()


def _record(wrong, t: int, x_adv, budgets, keep_best: bool, fooled: dict, results: dict) -> None:
    """Update each budget's adversaries with iterate ``t`` (``wrong``: the examples it misclassifies)."""
    for k in budgets:
        if t > k or not (keep_best or t == k):
            continue
        newly = wrong & ~fooled[k]
        if keep_best:
            results[k] = torch.where(_expand(newly, x_adv), x_adv, results[k])
        if t == k:  # end of this restart for budget k: the not yet fooled take x_k
            results[k] = torch.where(_expand(fooled[k], x_adv), results[k], x_adv)
        fooled[k] |= newly


def attack_from_config(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    *,
    generator: torch.Generator | None = None,
    keep_best: bool = True,
    eps: float | None = None,
    step_size: float | None = None,
    noise: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the attack an ``AttackConfig`` describes (eps / step_size may be overridden, for warm-ups)."""
    return pgd(
        model,
        x,
        y,
        eps=cfg.eps if eps is None else eps,
        step_size=cfg.step_size if step_size is None else step_size,
        steps=cfg.steps,
        restarts=cfg.restarts,
        random_start=cfg.random_start,
        loss=cfg.loss,
        bn_mode=cfg.bn_mode,
        generator=generator,
        keep_best=keep_best,
        noise=noise,
        start_scale=getattr(cfg, "start_scale", 1.0),  # training attacks only (TrainAttackConfig)
        project=getattr(cfg, "project", True),
        clip_start=getattr(cfg, "clip_start", True),
        start=start,
    )


# ---------------------------------------------------------------------------------------------------------
# counting: adversaries are validated before any accuracy is reported


class InvalidAdversary(RuntimeError):
    """An attack produced points outside the threat model: no number is reported from it."""


def check_adversary(x: torch.Tensor, x_adv: torch.Tensor, eps: float, tol: float = 1e-6) -> None:
    """Refuse adversarial examples outside the l_inf ball, outside [0, 1], or non-finite."""
    if x_adv.shape != x.shape:
        raise InvalidAdversary(f"adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise InvalidAdversary("adversarial batch contains non-finite values")
    dist = (x_adv - x).abs().amax().item()
    if dist > eps + tol:
        raise InvalidAdversary(f"adversarial perturbation {dist:.6g} exceeds eps={eps:.6g} (+{tol:g})")
    lo, hi = x_adv.amin().item(), x_adv.amax().item()
    if lo < 0.0 or hi > 1.0:
        raise InvalidAdversary(f"adversarial pixels outside [0, 1]: min {lo:.6g}, max {hi:.6g}")


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig | None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 200,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Clean accuracy and, if ``attack`` is given, accuracy under it ('pgd_acc').

    ``x`` is uint8 (N, C, H, W) or float in [0, 1]. The model's train/eval state is restored after.
    Every adversarial batch is validated before it is counted. (Training's validation; the full
    evaluation suite is ``robustfeat.eval``.)
    """
    device = torch.device(device)
    correct = adv_correct = 0
    n = len(y)
    with eval_mode(model):
        for i in batch_starts(n, batch_size, desc="evaluate", progress=progress, leave=True):
            xb = to_float_images(x[i : i + batch_size], device, channels_last)
            yb = y[i : i + batch_size].to(device)
            with torch.no_grad():
                correct += int(predicts(model(xb), yb).sum())
            if attack is not None:
                xa = attack_from_config(model, xb, yb, attack, generator=generator, keep_best=True)
                check_adversary(xb, xa, attack.eps)
                with torch.no_grad():
                    adv_correct += int(predicts(model(xa), yb).sum())
    out = {"clean_acc": correct / max(n, 1)}
    if attack is not None:
        out["pgd_acc"] = adv_correct / max(n, 1)
    return out
