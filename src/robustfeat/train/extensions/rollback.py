"""``run.rollback_drop``: a guard against catastrophic overfitting.

When a validation's PGD accuracy (the run's selection metric: clean accuracy for natural training)
falls more than ``drop`` below the best so far (both from step
``after`` on), the run goes back to ``best`` (weights and optimizer state, which ``best`` then also
stores) and its learning rate is scaled by ``lr_factor`` from then on; the scale is kept in ``last``,
so a resumed run goes on with it. The schedule and the data order go on from the current step.
"""

from __future__ import annotations

from ..rundir import BEST
from ..state import METRIC_NAMES
from .base import Extension, Run, Verdict


class RollbackGuard(Extension):
    resumable_best = True  # best is a state to go back to

    def __init__(self, drop: float, lr_factor: float, after: int):
        self.drop, self.lr_factor, self.after = drop, lr_factor, after

    def on_validation_end(self, run: Run, step: int, val: dict[str, float]) -> Verdict | None:
        # Rank 0's verdict, on every rank. Only a best from `after` on is a state to go back to: an
        # earlier one is still near chance.
        st = run.state
        fire = run.dctx.main and step >= self.after and st.best_step >= self.after and val[st.metric] < st.best - self.drop
        if not run.dctx.broadcast_object(fire):
            return None
        # every rank reads best from the run directory, as resuming does (a shared file system)
        meta = run.load(run.out_dir / BEST)
        st.lr_scale *= self.lr_factor
        st.rollbacks += 1
        run.log.write({"kind": "rollback", "step": step, "to_step": meta["step"], f"val_{st.metric}": val[st.metric],
                       f"best_val_{st.metric.removesuffix('_acc')}": st.best, "lr_scale": st.lr_scale, "rollbacks": st.rollbacks,
                       "wall_s": run.wall_s()})
        run.say(f"step {step}: validation {METRIC_NAMES[st.metric]} {val[st.metric]:.3f} is more than {self.drop:g} below "
                f"the best {st.best:.3f}; back to step {meta['step']} with the learning rate x{st.lr_scale:g}")
        return Verdict(meta["extra"].get("val") or val)  # best's validation
