"""The evaluation suite: attack rows, black-box plumbing, masking checks, AutoAttack, run files, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustfeat.attacks import InvalidAdversary, cw_margin_loss, pgd
from robustfeat.cli import main
from robustfeat.config import ConfigError
from robustfeat.eval import suite
from robustfeat.eval.checks import masking_checks
from robustfeat.eval.suite import Row, evaluate_model, pgd_budgets, suite_rows

TINY = [  # as in test_train: trains in seconds on the embedded MNIST sample
    "data.train_size=400",
    "data.val_size=100",
    "optim.batch_size=20",
    "optim.steps=6",
    "optim.milestones=[]",  # the demo's milestone (750) lies beyond these runs
    "attack.steps=2",
    "attack.step_size=0.15",
    "attack.eps_warmup_examples=60",
    "eval_attack.steps=2",
    "eval_attack.step_size=0.15",
    "run.eval_every=3",
    "run.eval_size=40",
    "run.log_every=2",
]
EPS, STEP = 4 / 255, 1 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


@pytest.fixture(scope="module")
def tiny():
    """A tiny CNN (with BatchNorm) and 8x8 images labelled with its own predictions (clean accuracy 100%)."""
    torch.manual_seed(0)
    model = _tiny_cnn()
    x = torch.rand(12, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


# ---------------------------------------------------------------------------------------------------------
# attack rows


def test_one_run_per_group_equals_separate_pgd_calls(tiny):
    model, x, y = tiny
    for loss, restarts, keep_best in [("ce", 1, True), ("cw", 2, True), ("ce", 2, False)]:
        advs = pgd_budgets(
            model,
            x,
            y,
            eps=EPS,
            step_size=STEP,
            budgets=[1, 3, 6],
            restarts=restarts,
            loss=loss,
            generator=torch.Generator().manual_seed(5),
            keep_best=keep_best,
        )
        for k in (1, 3, 6):
            ref = pgd(
                model,
                x,
                y,
                eps=EPS,
                step_size=STEP,
                steps=k,
                restarts=restarts,
                loss=loss,
                generator=torch.Generator().manual_seed(5),
                keep_best=keep_best,
            )
            assert torch.equal(advs[k], ref), (loss, restarts, keep_best, k)


def test_paper_rows():
    ids = [r.id for r in suite_rows("paper", eps=0.3, step_size=0.01, black_box=True, extra_pgd_steps=[40])]
    assert ids[:8] == [
        "natural",
        "whitebox/pgd-5",
        "whitebox/pgd-20",
        "whitebox/pgd-40",
        "whitebox/pgd-100",
        "whitebox/pgd-200",
        "whitebox/cw-30",
        "whitebox/cw-100",
    ]
    assert "blackbox/cw-100" in ids and ids[-1] == "sanity/pgd-50-eps0.5"
    assert [r.id for r in suite_rows("quick", eps=EPS, step_size=STEP)] == [
        "natural",
        "whitebox/pgd-20",
        "whitebox/cw-30",
    ]
    assert suite_rows("full", eps=EPS, step_size=STEP)[-1].id == "autoattack"


def test_rows_are_valid_deterministic_and_monotone(tiny, monkeypatch):
    model, x, y = tiny
    checked = []
    real_check = suite.check_adversary

    def counting_check(xs, xa, eps):
        real_check(xs, xa, eps)
        assert xa.min() >= 0 and xa.max() <= 1 and (xa - xs).abs().max() <= eps + 1e-6
        checked.append(eps)

    monkeypatch.setattr(suite, "check_adversary", counting_check)
    rows = [
        Row("natural"),
        *(Row("whitebox", "ce", k, EPS, STEP) for k in (2, 5, 10)),
        *(Row("whitebox", "cw", k, EPS, STEP) for k in (3, 6)),
        Row("sanity", "ce", 10, 0.5, 0.125),
    ]
    kw = {"eps": EPS, "step_size": STEP, "rows": rows, "seed": 3, "batch_size": 8, "progress": False}
    a = evaluate_model(model, x, y, **kw)
    # every batch of every budget of every attack group was validated: 2 batches x (3 PGD + 2 CW + sanity)
    assert len(checked) == 2 * 6
    b = evaluate_model(model, x, y, **kw)
    assert sorted(set(checked)) == [EPS, 0.5]
    assert [r["accuracy"] for r in a["rows"]] == [r["accuracy"] for r in b["rows"]]
    for k in a["per_example"]:
        assert torch.equal(a["per_example"][k], b["per_example"][k]), k
    rows = {r["id"]: r for r in a["rows"]}
    assert rows["natural"]["accuracy"] == 1.0 and rows["natural"]["n"] == len(y)
    flags = a["per_example"]
    # per example: robust to the longest PGD implies robust to every shorter one
    for lo, hi in [(2, 5), (5, 10)]:
        assert not (flags[f"whitebox/pgd-{hi}"] & ~flags[f"whitebox/pgd-{lo}"]).any()
    assert not (flags["whitebox/cw-6"] & ~flags["whitebox/cw-3"]).any()
    assert 0 < rows["whitebox/pgd-10"]["accuracy"] < 1.0  # the attack does something on this model
    assert rows["sanity/pgd-10-eps0.5"]["accuracy"] == 0.0
    assert {c["name"]: c["status"] for c in a["checks"]}["monotone_pgd"] == "pass"
    for r in a["rows"]:
        lo, hi = r["ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1


def test_invalid_adversaries_abort_instead_of_counting(tiny, monkeypatch):
    model, x, y = tiny
    real = suite.pgd_budgets

    def too_far(*args, **kw):
        return {k: (v + 2 * kw["eps"]).clamp(0, 1) for k, v in real(*args, **kw).items()}

    monkeypatch.setattr(suite, "pgd_budgets", too_far)
    with pytest.raises(InvalidAdversary, match="exceeds eps"):
        evaluate_model(model, x, y, eps=EPS, step_size=STEP, suite="quick", progress=False)
    monkeypatch.setattr(
        suite, "pgd_budgets", lambda *a, **kw: {k: torch.full_like(a[1], float("nan")) for k in kw["budgets"]}
    )
    with pytest.raises(InvalidAdversary, match="non-finite"):
        evaluate_model(model, x, y, eps=EPS, step_size=STEP, suite="quick", progress=False)


def test_margin_loss_masks_the_true_class():
    logits = torch.tensor([[1.0, -1e6, -1e6], [10.0, 2.0, -3.0], [10.0, 2.0, -3.0]])
    y = torch.tensor([0, 0, 1])
    loss = cw_margin_loss(logits, y)
    # without the mask the first row would be -relu(1 - 1 + 50) = -50
    assert loss[0].item() == pytest.approx(-(1.0 + 1e6 + 50.0))
    assert loss[1].item() == pytest.approx(-(10.0 - 2.0 + 50.0))
    assert loss[2].item() == pytest.approx(-(2.0 - 10.0 + 50.0))


# ---------------------------------------------------------------------------------------------------------
# black box


class Recorder(nn.Module):
    """Wraps a model and records whether each forward pass ran with gradients enabled."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.grad_calls, self.calls = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.grad_calls += torch.is_grad_enabled() or x.requires_grad
        return self.inner(x)


def test_black_box_uses_only_the_source_gradients(tiny):
    source, x, y = tiny
    torch.manual_seed(1)
    target = Recorder(_tiny_cnn())
    rows = [Row("natural"), Row("blackbox", "ce", 4, EPS, STEP)]
    target.train()  # the suite evaluates in eval mode and restores the mode afterwards
    res = evaluate_model(
        target, x, y, eps=EPS, step_size=STEP, rows=rows, source=source, seed=2, batch_size=64, progress=False
    )
    assert target.training and target.inner.training
    target.eval()
    # the target's only gradient is the pre-attack zero-gradient check on the clean batch (one batch here);
    # the attack never asks the target for one
    assert target.calls > 0 and target.grad_calls == 1
    assert all(p.grad is None for p in target.parameters())
    # the same numbers as: craft on the source (last iterate), classify with the target
    with torch.no_grad():
        clean = target(x).argmax(1) == y
    idx = clean.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(suite.derived_seed(2, suite._seed_tag(repr(rows[1].group)), 0))
    x_adv = pgd(source, x[idx], y[idx], eps=EPS, step_size=STEP, steps=4, generator=gen, keep_best=False)
    expected = torch.zeros(len(y), dtype=torch.bool)
    with torch.no_grad():
        expected[idx] = target(x_adv).argmax(1) == y[idx]
    assert torch.equal(res["per_example"]["blackbox/pgd-4"], expected)
    with pytest.raises(ConfigError, match=r"black-box rows need a source model \(--source RUN_DIR\)"):
        evaluate_model(target, x, y, eps=EPS, step_size=STEP, rows=rows, progress=False)


# ---------------------------------------------------------------------------------------------------------
# gradient masking


LEVELS = torch.tensor([0.35, 0.45, 0.55, 0.65])


class MeanLevel(nn.Module):
    """Classifies an image by its mean intensity; quantize=True adds an 8-bit rounding of the input,
    whose gradient is zero everywhere: a deliberately gradient-masked model with the same decisions."""

    def __init__(self, quantize: bool = False):
        super().__init__()
        self.quantize = quantize
        self.scale = nn.Parameter(torch.tensor(400.0))

    def forward(self, x):
        if self.quantize:
            x = torch.round(x * 255) / 255
        m = x.mean(dim=(1, 2, 3))
        return -self.scale * (m[:, None] - LEVELS.to(x)) ** 2


def _level_data(n=40):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = (LEVELS[y][:, None, None, None] + 0.02 * (2 * torch.rand(n, 1, 16, 16, generator=g) - 1)).clamp(0, 1)
    return x, y


def _status(res):
    return {c["name"]: c["status"] for c in res["checks"]}


def test_masking_checks_fire_on_a_masked_model_and_stay_quiet_on_a_normal_one():
    x, y = _level_data()
    kw = {
        "eps": 0.1,
        "step_size": 0.025,
        "suite": "paper",
        "source": MeanLevel(),
        "batch_size": 64,
        "progress": False,
    }
    normal = evaluate_model(MeanLevel(), x, y, **kw)
    masked = evaluate_model(MeanLevel(quantize=True), x, y, **kw)
    assert not normal["masking_suspected"]
    assert set(_status(normal).values()) <= {"pass", "skipped"}
    assert _status(normal)["large_eps_near_zero"] == "pass"
    assert _status(normal)["blackbox_not_below_whitebox"] == "pass"
    rows = {r["id"]: r["accuracy"] for r in masked["rows"]}
    assert rows["natural"] == 1.0 and rows["whitebox/pgd-200"] > 0.9 and rows["blackbox/pgd-200"] < 0.1
    assert masked["masking_suspected"]
    assert _status(masked)["large_eps_near_zero"] == "flagged"
    assert _status(masked)["blackbox_not_below_whitebox"] == "flagged"


def test_masking_check_rules():
    def row(id_, kind, loss, steps, acc, n=100):
        return {
            "id": id_,
            "kind": kind,
            "loss": loss,
            "steps": steps,
            "accuracy": acc,
            "correct": round(acc * n),
            "title": id_,
            "eps": 0.03,
        }

    rows = [
        row("whitebox/pgd-5", "whitebox", "ce", 5, 0.40),
        row("whitebox/pgd-200", "whitebox", "ce", 200, 0.45),
        row("autoattack", "autoattack", "ce", 0, 0.30),
    ]
    st = {c["name"]: c["status"] for c in masking_checks(rows)}
    assert st["monotone_pgd"] == "flagged" and st["autoattack_vs_pgd"] == "flagged"
    assert st["blackbox_not_below_whitebox"] == "skipped" and st["large_eps_near_zero"] == "skipped"
    rows[1]["accuracy"], rows[1]["correct"], rows[2]["accuracy"] = 0.38, 38, 0.36
    st = {c["name"]: c["status"] for c in masking_checks(rows)}
    assert st["monotone_pgd"] == "pass" and st["autoattack_vs_pgd"] == "pass"


# ---------------------------------------------------------------------------------------------------------
# AutoAttack


def test_autoattack_row_runs_and_resumes(tiny, tmp_path, monkeypatch):
    model, x, y = tiny
    x, y = x[:8], y[:8]
    eps = 0.1  # large enough that APGD-CE breaks every point and the slower attacks are skipped
    rows = [Row("natural"), Row("whitebox", "ce", 10, eps, eps / 4), Row("autoattack", eps=eps)]
    kw = {
        "eps": eps,
        "step_size": eps / 4,
        "rows": rows,
        "batch_size": 8,
        "progress": False,
        "autoattack_dir": tmp_path,
    }
    res = evaluate_model(model, x, y, **kw)
    acc = {r["id"]: r["accuracy"] for r in res["rows"]}
    assert acc["natural"] == 1.0 and acc["autoattack"] <= acc["whitebox/pgd-10"] + 1 / 8
    assert _status(res)["autoattack_vs_pgd"] == "pass"
    assert len(list(tmp_path.glob("aa-*.safetensors"))) == 1

    import pyautoattack

    def fail(*a, **kw):
        raise AssertionError("a finished chunk was attacked again")

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", fail)
    again = evaluate_model(model, x, y, **kw)
    assert torch.equal(again["per_example"]["autoattack"], res["per_example"]["autoattack"])


def test_autoattack_stopped_mid_row_resumes_after_its_last_finished_chunk(tiny, tmp_path, monkeypatch):
    import pyautoattack

    from robustfeat.eval import autoattack

    model, x, y = tiny
    x, y = x[:8], y[:8]
    clean = model(x).argmax(1) == y
    assert clean.all()
    kw = {"eps": 0.1, "seed": 0, "batch_size": 8, "device": torch.device("cpu"), "state_dir": tmp_path,
          "progress": False, "fingerprint": "m"}
    real, calls = pyautoattack.AutoAttack.run_standard_evaluation, []

    def stop_after_first_chunk(self, xc, yc, **k):
        calls.append(len(yc))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends in the second chunk
        return real(self, xc, yc, **k)

    monkeypatch.setattr(autoattack, "CPU_CHUNK", 3)  # the CPU default: chunks of 3, 3 and 2 images
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", stop_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        autoattack.run_autoattack(model, x, y, clean, **kw)
    assert calls == [3, 3] and len(list(tmp_path.glob("aa-*.safetensors"))) == 1

    calls.clear()
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        lambda self, xc, yc, **k: (calls.append(len(yc)), real(self, xc, yc, **k))[1])
    resumed = autoattack.run_autoattack(model, x, y, clean, **kw)
    assert calls == [3, 2]  # the first chunk came from its saved adversaries
    fresh = autoattack.run_autoattack(model, x, y, clean, **{**kw, "state_dir": tmp_path / "fresh"})
    assert torch.equal(resumed, fresh)


def test_autoattack_reports_its_stages_as_lines_when_progress_is_on(tiny, capsys):
    import logging

    from robustfeat.eval.autoattack import run_autoattack

    model, x, y = tiny
    x, y = x[:8], y[:8]
    clean = torch.ones(8, dtype=torch.bool)
    kw = {"eps": 0.1, "seed": 0, "batch_size": 8, "device": torch.device("cpu")}
    quiet = run_autoattack(model, x, y, clean, progress=False, **kw)
    assert "AutoAttack, images" not in capsys.readouterr().err
    loud = run_autoattack(model, x, y, clean, progress=True, **kw)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("AutoAttack, images 0-7 ")]
    assert lines[0].endswith(": running apgd-ce") and "robust accuracy after APGD-CE" in lines[1]
    assert "(8 correctly classified; accuracies below are of these)" in lines[0]
    assert torch.equal(quiet, loud)  # the lines change nothing
    log = logging.getLogger("auto-attack")
    assert log.level == logging.WARNING and not log.handlers  # the handler does not outlive the call


# ---------------------------------------------------------------------------------------------------------
# run directories, files, CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny AT-reg runs of the mnist-at-reg preset on the embedded sample: seeds 0 and 1."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        args = [
            "train",
            "--preset",
            "mnist-at-reg",
            "--out",
            str(root / f"s{seed}"),
            "--quiet",
            "data.name=mnist-sample",
            "optim.lr=1e-3",
            f"run.seed={seed}",
            *TINY,
        ]
        assert main(args) == 0
    return root / "s0", root / "s1"


def test_cli_paper_suite_with_black_box_writes_every_output(runs, capsys):
    target, source = runs
    assert (
        main(["eval", str(target), "--suite", "paper", "--source", str(source), "--n", "16", "--quiet"]) == 0
    )
    text = capsys.readouterr().out
    assert "Black box, PGD 200 steps" in text and "Table 1" in text
    out = target / "eval"
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 16 and len(res["indices"]) == 16 and res["subset"].startswith("seeded subset")
    assert res["model"]["sha256"] and res["model"]["preset"] == "mnist-at-reg" and res["source"]["seed"] == 1
    # what computed the numbers travels with them: the code's revision (this checkout's) and versions
    from robustfeat.train.rundir import git_revision

    assert res["produced_by"]["git_revision"] == git_revision() and res["produced_by"]["torch"] == torch.__version__
    assert f"at `{git_revision()}`" in (out / "eval.md").read_text()
    ids = [r["id"] for r in res["rows"]]
    assert {
        "natural",
        "whitebox/pgd-40",
        "whitebox/cw-100",
        "blackbox/pgd-40",
        "sanity/pgd-50-eps0.5",
    } <= set(ids)
    assert res["rows"][ids.index("whitebox/pgd-5")]["eps"] == pytest.approx(0.3)
    assert res["paper"]["rows"]["whitebox/pgd-40"] == 95.69 and "short budget" in res["paper"]["note"]
    assert {c["name"] for c in res["checks"]} >= {
        "monotone_pgd",
        "blackbox_not_below_whitebox",
        "large_eps_near_zero",
        "independent_source",
    }
    md = (out / "eval.md").read_text()
    assert "| White box, PGD 40 steps |" in md and "95.69%" in md
    csv_lines = (out / "eval.csv").read_text().splitlines()
    assert csv_lines[0].startswith("id,title") and len(csv_lines) == len(ids) + 1
    flags = load_file(str(out / "per_example.safetensors"))
    assert flags["indices"].tolist() == res["indices"] and flags["whitebox.pgd-40"].shape == (16,)
    # the same subset and seed give the same numbers
    assert main(["eval", str(target), "--suite", "quick", "--n", "16", "--quiet", "--json"]) == 0
    quick = json.loads(capsys.readouterr().out)
    q = {r["id"]: r["accuracy"] for r in quick["rows"]}
    assert q["natural"] == res["rows"][0]["accuracy"]
    assert main(["eval", str(target), "--source", str(target), "--n", "4", "--quiet"]) == 2
    assert "same checkpoint" in capsys.readouterr().err


def test_corrupt_or_mismatched_checkpoints_are_refused(runs, tmp_path, capsys):
    import shutil

    target, _ = runs
    bad = tmp_path / "bad"
    shutil.copytree(target, bad, ignore=shutil.ignore_patterns("eval"))
    ckpt = bad / "checkpoints" / "best.safetensors"
    # mismatched: a weight of another shape, metadata intact
    tensors = load_file(str(ckpt))
    with open(ckpt, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(ckpt), metadata=header["__metadata__"])
    assert main(["eval", str(bad), "--n", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model architecture" in err and err.count("\n") == 1
    # corrupt: truncated file
    data = (target / "checkpoints" / "best.safetensors").read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert main(["eval", str(bad), "--n", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and err.count("\n") == 1
    assert not (bad / "eval" / "eval.json").exists()


def test_interrupted_pgd_rows_resume_from_finished_batches(tiny, tmp_path, monkeypatch):
    """A PGD evaluation killed after some batches redoes only the rest, with identical results."""
    model, x, y = tiny
    rows = [r for r in suite_rows("paper", eps=EPS, step_size=STEP) if r.kind == "whitebox"][:2]
    kw = {"eps": EPS, "step_size": STEP, "rows": rows, "batch_size": 4, "progress": False, "seed": 3}
    reference = evaluate_model(model, x, y, **kw)

    calls = {"n": 0}
    real = suite.pgd_budgets

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands for a kill in the middle of the evaluation
        return real(*a, **k)

    monkeypatch.setattr(suite, "pgd_budgets", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, x, y, state_dir=tmp_path, **kw)
    assert len(list(tmp_path.glob("pgd-*.safetensors"))) == 2  # two finished batches were kept

    calls["n"] = 0
    monkeypatch.setattr(suite, "pgd_budgets", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    resumed = evaluate_model(model, x, y, state_dir=tmp_path, **kw)
    assert calls["n"] == 1  # only the unfinished third batch was attacked again
    for a, b in zip(reference["rows"], resumed["rows"], strict=True):
        assert a["correct"] == b["correct"], a["id"]
    for k in reference["per_example"]:
        assert torch.equal(reference["per_example"][k], resumed["per_example"][k])


def test_autoattack_gets_nchw_images_even_when_the_suite_uses_channels_last(tiny, tmp_path, monkeypatch):
    """pyautoattack flattens gradients with .view, which fails on channels_last tensors (its APGD-T crashed
    on the CIFAR-10 presets, which evaluate channels_last): it is given NCHW images."""
    import pyautoattack

    model, x, _ = tiny
    x = (x * 255).round().to(torch.uint8)  # uint8 images are laid out channels_last by the suite
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    seen = []

    def record(self, xs, ys, batch_size=250, **kw):
        seen.append(xs.is_contiguous())
        return xs.clone(), ys

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", record)
    rows = [Row("natural"), Row("autoattack", eps=EPS)]
    res = evaluate_model(model, x, y, eps=EPS, step_size=STEP, rows=rows, channels_last=True, batch_size=8,
                         progress=False)
    assert seen == [True] and res["rows"][-1]["accuracy"] == 1.0  # the clean images, classified in either layout
