"""Robustness evaluation, one entry point per level.

    robustfeat.attacks           attack primitives (PGD, CW, FGSM-RS), adversary validation, accuracy
    evaluate_model(model, x, y)  the suite on any [0, 1] -> logits model        (eval.suite)
    evaluate_run(run_dir)        the suite on a run directory, writing eval/    (eval.run)
    evaluate_external(spec, ...) the suite on a model from elsewhere (MODULE:FUNCTION, weights, dataset)
    render_markdown / render_csv reports in the paper's layout                  (eval.report, eval.paper)
    masking_checks(rows)         gradient-masking and validity checks           (eval.checks)

Modules: ``suite`` (rows, one multi-budget PGD run per row group, resumable batches, the worst case),
``precheck`` (the clean pass and the checks before attacking), ``targeted`` (the targeted row),
``curves`` (accuracy against eps and PGD steps), ``autoattack`` (the AutoAttack row, resumable),
``checks``, ``load`` (a run's checkpoint and model), ``run``, ``external`` (models from elsewhere),
``report``, ``paper`` (published numbers), ``stats`` (Wilson and paired intervals).
"""

from .checks import masking_checks
from .external import evaluate_external
from .load import checkpoint_path, load_model, load_run
from .report import render_csv, render_markdown
from .run import evaluate_run
from .suite import SUITES, Row, evaluate_model, suite_rows

__all__ = [
    "SUITES",
    "Row",
    "checkpoint_path",
    "evaluate_external",
    "evaluate_model",
    "evaluate_run",
    "load_model",
    "load_run",
    "masking_checks",
    "render_csv",
    "render_markdown",
    "suite_rows",
]
