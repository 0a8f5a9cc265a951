"""``run.restart_below``: a guard against dead starts.

When a validation's clean accuracy is below the threshold (the network gives one class for every
image), the weights are drawn afresh (the seed's next initialization) and the optimizer state is
cleared; the schedule and the data order go on from the current step, and the dead model is no
candidate for ``best``. At most ``MAX_RESTARTS`` times, then training stops with an error.
"""

from __future__ import annotations

import torch

from ...build import build_model
from ...seeding import derived_seed
from ..rundir import LAST
from .base import Extension, Run, Verdict

MAX_RESTARTS = 3  # re-initializations of a dead start before training gives up


class DeadStartGuard(Extension):
    def __init__(self, below: float):
        self.below = below

    def on_validation_end(self, run: Run, step: int, val: dict[str, float]) -> Verdict | None:
        fire = run.dctx.main and val["clean_acc"] < self.below  # rank 0's verdict, on every rank
        if not run.dctx.broadcast_object(fire):
            return None
        st = run.state
        if st.restarts >= MAX_RESTARTS:
            return Verdict(None, error=(
                f"step {step}: validation clean accuracy {val['clean_acc']:.3f} is below run.restart_below="
                f"{self.below:g} after {st.restarts} re-initializations; the network does not start "
                "learning (try a lower optim.lr, an eps warm-up (attack.eps_warmup_examples) or another "
                f"run.seed); the state is in {str(run.out_dir / LAST)!r}"))
        st.restarts += 1
        reinitialize(run)
        run.log.write({"kind": "restart", "step": step, "val_clean_acc": val["clean_acc"],
                       "val_pgd_acc": val["pgd_acc"], "restarts": st.restarts, "wall_s": run.wall_s()})
        run.say(f"step {step}: validation clean accuracy {val['clean_acc']:.3f} is below {self.below:g} (a dead "
                f"start); weights drawn afresh ({st.restarts} of at most {MAX_RESTARTS}), optimizer state cleared")
        return Verdict(None)


def reinitialize(run: Run) -> None:
    """Draw the weights afresh (initialization number ``run.state.restarts`` of the seed), clear the
    optimizer state and tell every extension (``on_reinit``)."""
    ds = run.splits.dataset
    torch.manual_seed(derived_seed(run.cfg.run.seed, 0, run.state.restarts))
    # (SyncBatchNorm and channels_last keep BatchNorm's state-dict keys and the weights' layout)
    run.model.load_state_dict(build_model(run.cfg.model, ds.num_classes, ds.image_shape[0]).state_dict())
    run.dctx.broadcast_parameters(run.model)
    run.optimizer.state.clear()
    for ext in run.extensions:
        ext.on_reinit(run)
