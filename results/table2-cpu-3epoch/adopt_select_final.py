"""Record `run.select: final` in the config.yaml of cpu-3epoch runs trained before the key existed.

The budget's checkpoint rule changed from best-by-validation to the final step (NOTES.md says why).
Training never reads `run.select`, so a run trained before it only differs in which weights it named
`best`. This script adopts the new rule for a run only when its `best` already holds its final step
(so its weights are exactly what the new rule writes), then checks that the edited config is the one
`reproduce table2 --budget cpu-3epoch` asks for. Any other run must be trained again.

Usage, from the repository root: python results/table2-cpu-3epoch/adopt_select_final.py RUN_DIR...
"""

import sys
from pathlib import Path

from robustfeat.checkpoint import read_checkpoint
from robustfeat.config import read_config_file
from robustfeat.reproduce import RunSpec, run_config
from robustfeat.train.rundir import BEST, experiment_differences, same_experiment


def adopt(run_dir: Path) -> str:
    cfg = read_config_file(run_dir / "config.yaml")
    if cfg.run.select == "final":
        return "already run.select=final"
    step = read_checkpoint(run_dir / BEST)[1]["step"]
    if step != cfg.optim.steps:
        raise SystemExit(f"{run_dir}: best holds step {step} of {cfg.optim.steps}; train it again instead")
    lines = (run_dir / "config.yaml").read_text().splitlines(keepends=True)
    at = lines.index("  checkpoint_every: 100\n")  # inside run:, where the budget file puts the key
    lines.insert(at + 1, "  select: final\n")
    (run_dir / "config.yaml").write_text("".join(lines))
    asked = run_config(RunSpec(cfg.name, cfg.run.seed, ""), "cpu-3epoch", [], None).to_dict()
    saved = read_config_file(run_dir / "config.yaml").to_dict()
    if not same_experiment(saved, asked):
        raise SystemExit(f"{run_dir}: config differs from the budget's: {experiment_differences(saved, asked)}")
    return f"best holds the final step {step}: run.select=final recorded"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {adopt(Path(arg))}")
