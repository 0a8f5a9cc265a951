"""The training step's attack and loss, eager or compiled (``run.compile``).

A training step is the adversary (PGD: ``attack.steps`` iterations of forward, input gradient, signed
step and projection, from a random start) and the update (the method's loss, its backward, the
optimizer). :class:`StepFunctions` gives both parts to the training loop and to ``robustfeat bench``:

* eager (``run.compile=false``): ``attacks.attack_from_config`` and ``methods.method_loss``, unchanged;
* compiled: ``torch.compile`` of

  - one PGD iteration as one function (:func:`pgd_iteration`): forward, the input gradient
    (``torch.func.grad``, which torch.compile traces into the same graph), the signed step and the
    projection. The loop over ``attack.steps`` stays in Python, so one compiled graph serves every
    attack length, and eps and the step size enter as 0-d tensors, so an eps warm-up does not
    recompile;
  - ``method_loss`` (eq. 7): its forward, and the backward that AOTAutograd derives from it.

What stays eager, and why: the random starts (drawn by ``attacks._start_draws`` from the step's
generator, the stream the eager attack consumes, so both paths start from the same points), the
BatchNorm switch of the attack (``attacks.attack_mode``, entered around the compiled iterations:
batch statistics with running statistics frozen), the extensions' hooks and the optimizer step.
Validation and ``robustfeat eval`` always run the eager model.

The compiled step computes the eager step's arithmetic up to float rounding (fused kernels round
differently), so its adversaries can differ from the eager ones where a gradient entry is within
rounding of zero; ``tests/test_device.py`` checks the differences stay at that level. A compiled run
is deterministic for a given setting and resumes exactly, as an eager one does.

torch.compile caches its graphs per Python function, guarded on what they were traced for (the
model's structure and modes, autocast, shapes), and recompiles a function only a few times before it
falls back to eager: a process that compiles the step of many different models (tests, ``robustfeat
bench``) calls :func:`reset` between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attacks import LOSSES, _project, _start_draws, _start_point, attack_from_config, attack_mode
from .config import AttackConfig, RunConfig
from .methods import method_loss


def pgd_iteration(model: nn.Module, loss_fn: Callable, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  eps: torch.Tensor, step_size: torch.Tensor, project: bool) -> torch.Tensor:
    """One l_inf PGD iteration: x' + step_size * sign(grad_x' loss), projected onto the eps-ball
    around ``x`` and [0, 1] (``project``) or clipped to [0, 1] only; the arithmetic of
    ``attacks.pgd_budgets``'s training path, as one function of tensors."""

    def total(z: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(z).float(), y).sum()

    grad = torch.func.grad(total)(x_adv)
    x_adv = x_adv + step_size * grad.sign()
    return _project(x_adv, x, eps) if project else x_adv.clamp(0.0, 1.0)


def reset() -> None:
    """Forget every compiled graph of this process (before compiling the step of another model)."""
    torch.compiler.reset()


class StepFunctions:
    """The adversary and the loss of a training step under ``run`` (eager, or compiled with
    ``run.compile``)."""

    def __init__(self, run: RunConfig):
        self.compiled = bool(run.compile)
        self.mode = run.compile_mode
        self.backend = run.compile_backend
        self._iteration: Callable | None = None
        self._loss: Callable = method_loss
        if self.compiled:
            # inductor takes a mode; the other backends have none
            opts = {"backend": self.backend, **({"mode": self.mode} if self.backend == "inductor" else {})}
            self._iteration = torch.compile(pgd_iteration, **opts)
            self._loss = torch.compile(method_loss, **opts)
        self._cudagraphs = self.compiled and self.backend == "inductor" and self.mode == "reduce-overhead"

    def begin_step(self) -> None:
        """Call at the start of each training step: with CUDA graphs, tells torch that the previous
        step's graph outputs are no longer used (so their memory may be reused)."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def adversary(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, *,
                  generator: torch.Generator | None = None, eps: float | None = None,
                  step_size: float | None = None, noise: torch.Tensor | None = None,
                  start: torch.Tensor | None = None) -> torch.Tensor:
        """The training adversary (last iterate, ``keep_best=False``) of ``attacks.attack_from_config``
        with these arguments."""
        eps = cfg.eps if eps is None else eps
        step_size = cfg.step_size if step_size is None else step_size
        trivial = cfg.steps == 0 or eps == 0 or cfg.restarts != 1
        if not self.compiled or trivial:  # (restarts != 1 is refused by the config; the eager loop has them)
            return attack_from_config(model, x, y, cfg, generator=generator, keep_best=False, eps=eps,
                                      step_size=step_size, noise=noise, start=start)
        assert self._iteration is not None
        x = x.detach()
        clip_start = getattr(cfg, "clip_start", True)
        draws = _start_draws(x, 1, False, cfg.random_start, clip_start, noise, start, generator)
        loss_fn = LOSSES.get(cfg.loss)
        e = torch.tensor(eps, dtype=x.dtype, device=x.device)
        a = torch.tensor(step_size, dtype=x.dtype, device=x.device)
        project = getattr(cfg, "project", True)
        # no_grad outside, torch.func.grad inside: the input gradient is computed, but the iterate is not
        # differentiable in the weights, so the compiled graph keeps no activations for a backward
        # through the attack (without it, AOTAutograd would compile one and save them: twice the work)
        with attack_mode(model, cfg.bn_mode), torch.no_grad():
            x_adv = _start_point(x, None if draws is None else draws[0], start,
                                 eps * getattr(cfg, "start_scale", 1.0), clip_start)
            for _ in range(cfg.steps):
                x_adv = self._iteration(model, loss_fn, x_adv, x, y, e, a, project)
        return x_adv.detach()

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor | None, y: torch.Tensor,
             lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``methods.method_loss``, compiled with ``run.compile``."""
        return self._loss(model, x, x_adv, y, lam)
