"""A model defined outside robustfeat (examples/plain_cnn.py), evaluated from the command line with the
same suite, and the one-line errors for models and weights that do not fit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robustfeat.cli import main
from robustfeat.data import load_dataset
from robustfeat.eval.external import build_external
from robustfeat.eval.run import subset_indices
from robustfeat.eval.suite import evaluate_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/plain_cnn.py:build"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The example model's (untrained, seeded) weights as safetensors and as a weights-only torch file."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_external(str(ROOT / EXAMPLE), None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "plain.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, d / "plain.pt")
    return d / "plain.safetensors", d / "plain.pt"


def _eval(args, capsys):
    code = main(["eval", *args, "--quiet"])
    return code, capsys.readouterr()


def test_a_plain_module_defined_outside_robustfeat_is_evaluated_from_the_cli(weights, tmp_path, capsys,
                                                                              monkeypatch):
    st, pt = weights
    monkeypatch.chdir(ROOT)  # MODULE:FUNCTION is found from the current directory, as with python -m
    out = tmp_path / "out"
    code, io = _eval(["--model", EXAMPLE, "--weights", str(st), "--dataset", "mnist-sample", "--n", "24",
                      "--out", str(out)], capsys)
    assert code == 0, io.err
    assert "Robust accuracy" in io.out and "examples/plain_cnn.py:build" in io.out
    res = json.loads((out / "eval.json").read_text())
    assert res["model"]["factory"] == EXAMPLE and res["model"]["dataset"] == "mnist-sample"
    assert res["settings"]["eps"] == pytest.approx(0.3) and res["num_classes"] == 10
    assert [r["id"] for r in res["rows"]] == ["natural", "worst_case", "whitebox/pgd-40", "whitebox/cw-30"]
    # the same numbers as the library on the same model and images: nothing is special about the CLI path
    model = build_external(EXAMPLE, st)
    data = load_dataset("mnist-sample")
    idx = subset_indices(len(data.y_test), 24, 0)
    ref = evaluate_model(model, data.x_test[idx], data.y_test[idx], eps=0.3, step_size=0.01, suite="quick",
                         extra_pgd_steps=[40], progress=False)
    assert [r["correct"] for r in ref["rows"]] == [r["correct"] for r in res["rows"]]
    assert res["rows"][0]["correct"] > 0
    # the module spelling and a weights-only torch file (wrapped, DataParallel prefixes) give the same
    code, io = _eval(["--model", "examples.plain_cnn:build", "--weights", str(pt), "--dataset", "mnist-sample",
                      "--n", "24", "--out", str(tmp_path / "out2"), "--json"], capsys)
    assert code == 0, io.err
    again = json.loads(io.out)
    assert [r["correct"] for r in again["rows"]] == [r["correct"] for r in res["rows"]]


BAD_MODULE = '''
import torch
from torch import nn

class FiveWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(28 * 28, 5)
    def forward(self, x):
        return self.fc(x.flatten(1))

class ColourOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 28)
    def forward(self, x):
        return self.conv(x).flatten(1)

def five(): return FiveWay()
def colour(): return ColourOnly()
def not_a_model(): return 42
'''


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{m}:five"], "returned shape (2, 5)"),
    (["--model", "{m}:colour"], "the model failed on a (2, 1, 28, 28) batch of [0, 1] mnist-sample images"),
    (["--model", "{m}:not_a_model"], "returned a int, expected a torch.nn.Module"),
    (["--model", "{m}:missing"], "has no attribute 'missing'"),
    (["--model", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
    (["--model", "{m}"], "expected MODULE:FUNCTION"),
    (["--model", EXAMPLE, "--weights", "{w}"], "do not fit --model"),
])
def test_models_that_do_not_fit_are_refused_in_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    m = tmp_path / "bad_models.py"
    m.write_text(BAD_MODULE)
    w = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(5, 784)}, str(w))
    args = [a.format(m=m, w=w) for a in args]
    code, io = _eval([*args, "--dataset", "mnist-sample", "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and io.err.count("\n") == 1, io.err
    assert message in io.err
    if "five" in args[1]:
        assert "expected logits of shape (2, 10)" in io.err


def test_run_dir_and_model_arguments_exclude_each_other(capsys, tmp_path):
    for args, message in ((["--model", EXAMPLE], "--model needs --dataset"),
                          ([], "give a RUN_DIR, or --model"),
                          ([str(tmp_path), "--dataset", "mnist"], "--dataset go with --model"),
                          ([str(tmp_path), "--model", EXAMPLE, "--dataset", "mnist"], "not both")):
        code, io = _eval(args, capsys)
        assert code == 2 and message in io.err and io.err.count("\n") == 1, (args, io.err)
