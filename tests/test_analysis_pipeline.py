"""One analysis pipeline: ``robustfeat analyze`` and ``robustfeat reproduce`` give the same numbers on the
same runs (Figure 2, Table 4) and show the same images (Figures 3 and 4)."""

import json

import pytest
from shared_data import SHARED_DATA

from robustfeat import reproduce as rp
from robustfeat.cli import main

TINY_CIFAR = [f"data.dir={SHARED_DATA}", "model.widths=[4,4,8,8]", "data.train_size=32", "data.val_size=16",
              "optim.batch_size=16", "optim.steps=2", "run.eval_every=2", "run.eval_size=8",
              "attack.steps=1", "eval_attack.steps=1"]
N = 8

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (SHARED_DATA / "cifar10").exists(), reason="needs ../shared/data/cifar10")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Table 4's three tiny runs (AT, AT-att-reg, the natural classifier), trained once by reproduce."""
    mp = pytest.MonkeyPatch()
    mp.setitem(rp.ANALYSIS_N, "smoke", N)
    tmp = tmp_path_factory.mktemp("pipeline")
    table4 = rp.reproduce("table4", "smoke", tmp / "table4", runs_dir=tmp / "runs", overrides=TINY_CIFAR)
    figure2 = rp.reproduce("figure2", "smoke", tmp / "figure2", runs_dir=tmp / "runs", overrides=TINY_CIFAR)
    figure3 = rp.reproduce("figure3", "smoke", tmp / "figure3", runs_dir=tmp / "runs", overrides=TINY_CIFAR)
    figure4 = rp.reproduce("figure4", "smoke", tmp / "figure4", runs_dir=tmp / "runs", overrides=TINY_CIFAR)
    mp.undo()
    return tmp, {"table4": table4, "figure2": figure2, "figure3": figure3, "figure4": figure4}


def test_figure2_numbers_agree(runs, tmp_path, capsys):
    tmp, summaries = runs
    run = tmp / "runs" / "cifar10-at-att-reg-seed0"
    assert main(["analyze", "attention-robustness", str(run), "--n", str(N), "--out", str(tmp_path),
                 "--quiet"]) == 0
    ours = json.loads((tmp_path / "attention_robustness.json").read_text())["splits"]
    theirs = summaries["figure2"]["analysis"]["splits"]
    assert set(ours) == set(theirs) == {"train", "test"}
    for split in ("train", "test"):
        assert ours[split] == theirs[split], split  # every number, the untrained control's included
        assert ours[split]["n"] == N


def test_table4_numbers_agree(runs, tmp_path, capsys):
    tmp, summaries = runs
    r = tmp / "runs"
    assert main(["analyze", "gradient-classification", "--classifier", str(r / "cifar10-natural-seed0"),
                 str(r / "cifar10-at-seed0"), str(r / "cifar10-at-att-reg-seed0"), "--n", str(N),
                 "--out", str(tmp_path), "--quiet"]) == 0
    ours = json.loads((tmp_path / "gradient_classification.json").read_text())
    theirs = summaries["table4"]["analysis"]
    assert ours["n"] == theirs["n"] == {"train": N, "test": N}
    assert ours["classifier"]["clean_test_acc"] == theirs["classifier"]["clean_test_acc"]
    for row, name in zip(ours["rows"], ("cifar10-at-seed0", "cifar10-at-att-reg-seed0"), strict=True):
        assert {k: row[k] for k in theirs["rows"][name]["ours"]} == theirs["rows"][name]["ours"]


def test_figures_3_and_4_show_the_same_images(runs, tmp_path, capsys):
    tmp, summaries = runs
    r = tmp / "runs"
    assert main(["analyze", "attention-maps", str(r / "cifar10-at-att-reg-seed0"), "--out", str(tmp_path),
                 "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert f"test images {summaries['figure3']['analysis']['images']}" in shown
    assert main(["analyze", "gradient-maps", str(r / "cifar10-at-seed0"), str(r / "cifar10-at-att-reg-seed0"),
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert f"test images {summaries['figure4']['analysis']['images']}" in capsys.readouterr().out
