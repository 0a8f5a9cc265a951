"""The training loop end to end on the embedded MNIST sample: files, resume, CLI errors."""

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustfeat.checkpoint import read_checkpoint
from robustfeat.cli import main
from robustfeat.train import train

TINY = [
    "data.train_size=400", "data.val_size=100", "optim.batch_size=20", "optim.steps=6", "optim.milestones=[]",
    "attack.steps=2", "attack.step_size=0.15", "attack.eps_warmup_examples=60",
    "eval_attack.steps=2", "eval_attack.step_size=0.15",
    "run.eval_every=3", "run.eval_size=40", "run.log_every=2",
]


def _weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "checkpoints/last.safetensors")).items()
            if k.startswith("model.")}


def test_run_directory_contents(cfg, splits, tmp_path):
    res = train(cfg, tmp_path / "run", splits=splits, progress=False)
    run = tmp_path / "run"
    assert res.step == 6
    for f in ("config.yaml", "run.json", "metrics.jsonl", "checkpoints/last.safetensors",
              "checkpoints/best.safetensors"):
        assert (run / f).is_file(), f
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds.count("eval") == 2 and kinds.count("train") == 3
    train_rec = next(r for r in recs if r["kind"] == "train")
    assert {"loss", "ce", "reg", "adv_acc", "lr", "eps", "examples_per_s"} <= set(train_rec)
    info = json.loads((run / "run.json").read_text())
    assert info["git_revision"] and info["sessions"][0]["to_step"] == 6
    # the hardware a bit-for-bit rerun needs: CPU kernels round differently on other CPUs
    assert info["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["machine"]["cpu"], str)
    if Path("/proc/cpuinfo").is_file():  # Linux: the CPU generation, beyond a virtual machine's model name
        assert " family " in info["machine"]["cpu_id"] and " model " in info["machine"]["cpu_id"]


def test_git_revision_is_read_once_per_process(monkeypatch):
    """A process that trains one run after another records the revision of the code it imported, even
    when the checkout moves on (a commit) while it runs."""
    import subprocess

    from robustfeat.train import rundir
    calls = []
    heads = iter(["aaaa", "bbbb"])  # HEAD as git would answer before and after a commit

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = next(heads) if cmd[1] == "rev-parse" else ""
        return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")
    rundir.git_revision.cache_clear()
    monkeypatch.setattr(rundir.subprocess, "run", fake_run)
    try:
        assert rundir.git_revision() == "aaaa" and rundir.git_revision() == "aaaa"
        assert len(calls) == 2  # one rev-parse and one status, at the first call only
    finally:
        rundir.git_revision.cache_clear()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cfg, splits, tmp_path):
    train(cfg, tmp_path / "full", splits=splits, progress=False)
    train(cfg, tmp_path / "cut", splits=splits, progress=False, stop_after=4)  # stops mid-way (not at an eval)
    train(cfg, tmp_path / "cut", splits=splits, progress=False, resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k not in ("examples_per_s", "wall_s")} for s in lines]
    assert strip(full) == strip(cut)


def test_existing_run_is_not_overwritten(cfg, splits, tmp_path):
    train(cfg, tmp_path / "r", splits=splits, progress=False, stop_after=3)
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg, tmp_path / "r", splits=splits, progress=False)


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, *args, **kwargs):  # the data directory is empty and there is no network
        raise urllib.error.URLError("offline in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "never"
    assert main(["train", "--preset", "mnist-atreg", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'mnist-at-reg'" in err and err.count("\n") == 1
    assert main(["train", "--preset", "mnist-at", "--out", str(out), "optim.lr=-1"]) == 2
    assert "optim.lr=-1 is invalid" in capsys.readouterr().err
    assert main(["train", "--preset", "mnist-at", "--out", str(out), "--data-dir", str(tmp_path / "nodata"),
                 "optim.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "offline in this test" in err and err.count("\n") == 1
    assert str(tmp_path / "nodata") in err  # the error says where the files were looked for
    assert not out.exists()
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_train_eval_and_load_model(tmp_path, capsys):
    import robustfeat

    out = tmp_path / "cli"
    assert main(["train", "--preset", "demo", "--out", str(out), "--quiet", *TINY]) == 0
    assert main(["eval", str(out), "--n", "50", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| Natural |" in text and "| White box, PGD 2 steps |" in text
    res = json.loads((out / "eval" / "eval.json").read_text())
    assert res["n"] == 50 and res["attack"]["name"] == "PGD-2"
    assert 0 <= res["pgd_acc"] <= res["clean_acc"] <= 1
    model = robustfeat.load_model(out)
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert main(["presets"]) == 0
    assert "cifar10-at-att-reg" in capsys.readouterr().out


def test_single_step_training_with_grad_align_and_a_cyclic_lr(cfg, splits, tmp_path):
    from robustfeat.config import load_config

    fast = load_config("demo", overrides=TINY + ["attack.steps=1", "attack.step_size=0.375",
                                                 "method.grad_align=0.5", "optim.schedule=cyclic",
                                                 "optim.milestones=[]"])
    res = train(fast, tmp_path / "run", splits=splits, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert res.step == 6 and all(0 < r["grad_align"] < 2 for r in train_recs)
    assert [r["lr"] for r in train_recs] == pytest.approx([fast.optim.lr * f for f in (2 / 2.4, 2 / 3.6, 0.0)])
    # the penalty changes the update: the same run without it ends with other weights
    plain = replace(fast, method=replace(fast.method, grad_align=0.0))
    train(plain, tmp_path / "plain", splits=splits, progress=False)
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _tensors(run_dir, prefix, name="last"):
    return {k[len(prefix):]: v for k, v in load_file(str(run_dir / f"checkpoints/{name}.safetensors")).items()
            if k.startswith(prefix)}


def test_weight_average_is_the_ema_of_the_trained_weights(cfg, splits, tmp_path):
    """optim.ema leaves training untouched and saves, as the model, the EMA of the per-step weights."""
    d = 0.6
    cfg = replace(cfg, optim=replace(cfg.optim, steps=3))
    ema_cfg = replace(cfg, optim=replace(cfg.optim, ema=d))
    train(ema_cfg, tmp_path / "ema", splits=splits, progress=False)
    trained = _tensors(tmp_path / "ema", "train.")
    averaged = _tensors(tmp_path / "ema", "model.")
    # the weights after each step, from runs of the plain config stopped there (same trajectory)
    per_step = []
    for k in range(1, cfg.optim.steps + 1):
        train(cfg, tmp_path / f"plain{k}", splits=splits, progress=False, stop_after=k)
        per_step.append(_tensors(tmp_path / f"plain{k}", "model."))
    assert trained.keys() == per_step[-1].keys()
    for name in trained:
        assert torch.equal(trained[name], per_step[-1][name]), name  # training itself is unchanged
    floats = [n for n, v in averaged.items() if v.is_floating_point()]
    assert floats
    for name in floats:
        expected = per_step[0][name].clone()  # the average starts as the weights after step 1
        for w in per_step[1:]:
            expected = d * expected + (1 - d) * w[name]
        torch.testing.assert_close(averaged[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(averaged[n], trained[n]) for n in floats)
    # best holds the average too (validation measures it), never the raw weights
    best = _tensors(tmp_path / "ema", "model.", "best")
    assert not any(k.startswith("train.") for k in load_file(str(tmp_path / "ema/checkpoints/best.safetensors")))
    assert best.keys() == averaged.keys()


def test_weight_average_resumes_exactly(cfg, splits, tmp_path):
    ema_cfg = replace(cfg, optim=replace(cfg.optim, ema=0.6))
    train(ema_cfg, tmp_path / "full", splits=splits, progress=False)
    train(ema_cfg, tmp_path / "cut", splits=splits, progress=False, stop_after=4)
    train(ema_cfg, tmp_path / "cut", splits=splits, progress=False, resume=True)
    for prefix in ("model.", "train."):
        a, b = _tensors(tmp_path / "full", prefix), _tensors(tmp_path / "cut", prefix)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), prefix + k


def test_weight_average_refuses_a_checkpoint_without_trained_weights(cfg, splits, tmp_path):
    from robustfeat.build import build_model
    from robustfeat.checkpoint import CheckpointError, load_into
    from robustfeat.train import make_optimizer

    train(cfg, tmp_path / "plain", splits=splits, progress=False, stop_after=3)
    ds = splits.dataset
    model = build_model(cfg.model, ds.num_classes, ds.image_shape[0])
    averaged = build_model(cfg.model, ds.num_classes, ds.image_shape[0])
    with pytest.raises(CheckpointError, match=r"no training weights \(train\.\*\)"):
        load_into(tmp_path / "plain/checkpoints/last.safetensors", model, make_optimizer(cfg, model),
                  averaged=averaged)


class ScriptedValidation:
    """Stands in for the periodic validation: the n-th call reports the n-th PGD accuracy of ``pgd``
    (the rollback guard acts on these numbers only, so a script makes its decisions deterministic)."""

    def __init__(self, pgd, clean=None):
        self.pgd, self.calls = list(pgd), 0
        self.clean = [0.9] * len(self.pgd) if clean is None else list(clean)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return {"clean_acc": self.clean[self.calls - 1], "pgd_acc": self.pgd[self.calls - 1]}


@pytest.mark.parametrize("select", ["best-val", "final"])
def test_select_decides_which_weights_best_holds(cfg, splits, tmp_path, monkeypatch, select):
    """best-val keeps the highest validation (step 2 here); final keeps the last step's weights
    although its validation is the lowest, and records that validation as the best's."""
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    every = replace(cfg, run=replace(cfg.run, eval_every=1, log_every=1, select=select))
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation([0.5, 0.8, 0.6, 0.4, 0.3, 0.2]))
    res = train(every, tmp_path / "run", splits=splits, progress=False)
    meta = read_checkpoint(tmp_path / "run/checkpoints/best.safetensors")[1]
    best, last = _tensors(tmp_path / "run", "model.", "best"), _tensors(tmp_path / "run", "model.")
    same = all(torch.equal(best[k], last[k]) for k in last)
    if select == "final":
        assert (meta["step"], meta["extra"]["best_step"], res.best_val) == (6, 6, 0.2) and same
    else:
        assert (meta["step"], meta["extra"]["best_step"], res.best_val) == (2, 2, 0.8) and not same


def test_a_run_that_adopts_select_final_keeps_its_checkpoints(cfg, splits, tmp_path):
    """run.select names a checkpoint best and changes no weights: a finished run whose config.yaml
    records it afterwards (results/table2-cpu-3epoch/adopt_select_final.py) still loads, while a
    config.yaml that changes what training does is still refused."""
    import yaml

    from robustfeat import load_model
    from robustfeat.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(cfg, run, splits=splits, progress=False)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**raw, "run": {**raw["run"], "select": "final"}}))
    load_model(run)
    (run / "config.yaml").write_text(yaml.safe_dump({**raw, "run": {**raw["run"], "select": "final", "seed": 5}}))
    with pytest.raises(CheckpointError, match=r"was not written by the run .*run.seed"):
        load_model(run)


def _guarded(cfg, **run):
    return replace(cfg, run=replace(cfg.run, eval_every=1, log_every=1, rollback_drop=0.1, rollback_lr=0.5, **run))


def _check_exact_resume(cfg, splits, tmp_path, monkeypatch, script, stop_after, kind, between=lambda: None):
    """A run cut at ``stop_after`` and resumed ends with the weights and the records of a run that was
    never cut; ``script()`` makes the scripted validation, one over both sessions of the cut run, and
    ``between()`` runs between the two sessions."""
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    monkeypatch.setattr(train_module, "evaluate_split", script())
    train(cfg, tmp_path / "full", splits=splits, progress=False)
    cut = script()
    monkeypatch.setattr(train_module, "evaluate_split", cut)
    train(cfg, tmp_path / "cut", splits=splits, progress=False, stop_after=stop_after)
    between()
    train(cfg, tmp_path / "cut", splits=splits, progress=False, resume=True)
    assert cut.calls == cfg.optim.steps
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "wall_s")} for r in rs]
    for k in ("train", kind):
        assert strip(_records(tmp_path / "full", k)) == strip(_records(tmp_path / "cut", k))
    assert _records(tmp_path / "full", kind)


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("ema", [0.0, 0.6])
def test_rollback_restores_best_and_lowers_the_lr(cfg, splits, tmp_path, monkeypatch, ema):
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    from robustfeat.train import learning_rate

    guarded = _guarded(replace(cfg, optim=replace(cfg.optim, ema=ema)))
    # steps 1-6: best at step 2; step 3 falls 0.2 below it (rollback), step 4 only 0.05 (none),
    # step 5 falls again (second rollback, to step 2 again), step 6 is a new best
    script = [0.5, 0.6, 0.4, 0.55, 0.45, 0.7]
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    res = train(guarded, tmp_path / "run", splits=splits, progress=False)
    run = tmp_path / "run"
    rollbacks = _records(run, "rollback")
    assert [(r["step"], r["to_step"], r["lr_scale"]) for r in rollbacks] == [(3, 2, 0.5), (5, 2, 0.25)]
    assert (res.best_metric, res.best_val) == ("pgd_acc", 0.7)
    # the lr of each step: the schedule times 1, then 0.5 after the first rollback, 0.25 after the second
    lrs = [r["lr"] for r in _records(run, "train")]
    scales = [1, 1, 1, 0.5, 0.5, 0.25]
    assert lrs == pytest.approx([learning_rate(guarded, s) * scales[s] for s in range(6)])

    # what a rollback leaves is exactly best's state: the run stopped at step 3 equals a run stopped at 2
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    train(guarded, tmp_path / "at3", splits=splits, progress=False, stop_after=3)
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    train(guarded, tmp_path / "at2", splits=splits, progress=False, stop_after=2)
    for prefix in ("model.", "train.", "optim.") if ema else ("model.", "optim."):
        a, b = _tensors(tmp_path / "at3", prefix), _tensors(tmp_path / "at2", prefix)
        assert a.keys() == b.keys() and a, prefix
        for k in a:
            assert torch.equal(a[k], b[k]), prefix + k
    # ... and it differs from the state step 3 would have had without the guard
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    plain = replace(guarded, run=replace(guarded.run, rollback_drop=0.0))
    train(plain, tmp_path / "plain3", splits=splits, progress=False, stop_after=3)
    a, b = _tensors(tmp_path / "at3", "model."), _tensors(tmp_path / "plain3", "model.")
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("old_last", [False, True])
def test_rollback_resumes_exactly(cfg, splits, tmp_path, monkeypatch, old_last):
    """Cut after one rollback and resumed; with ``old_last``, the cut run's ``last`` is one written
    before best_step was kept, and the resumed run takes best's own step as the best's step."""
    guarded = _guarded(cfg)
    script = [0.5, 0.6, 0.4, 0.55, 0.45, 0.7]
    last = tmp_path / "cut/checkpoints/last.safetensors"
    _check_exact_resume(guarded, splits, tmp_path, monkeypatch, lambda: ScriptedValidation(script),
                        stop_after=4, kind="rollback", between=lambda: old_last and _drop_best_step(last))


def _drop_best_step(path):
    _edit_extra(path, lambda extra: extra.pop("best_step") == 2)


def _edit_extra(path, edit):
    """Rewrites the checkpoint's ``extra`` metadata in place; ``edit`` changes the dict and returns
    whether the old content was as expected."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    extra = json.loads(meta["extra"])
    assert edit(extra)
    save_file(load_file(str(path)), str(path), metadata={**meta, "extra": json.dumps(extra)})


@pytest.mark.parametrize("bad", ["2", 2.0, True, -2, 99])
def test_resume_refuses_a_damaged_best_step(cfg, splits, tmp_path, monkeypatch, bad):
    """A best_step that is no step of this run (a string, a float, a bool, below -1, past the resumed
    step) would aim the rollback guard at a wrong state: the resume stops and names the file."""
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    from robustfeat.checkpoint import CheckpointError

    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation([0.5, 0.6, 0.4, 0.55, 0.45, 0.7]))
    run = tmp_path / "cut"
    train(_guarded(cfg), run, splits=splits, progress=False, stop_after=4)
    last = run / "checkpoints/last.safetensors"

    def damage(extra):
        ok = extra["best_step"] == 2
        extra["best_step"] = bad
        return ok

    _edit_extra(last, damage)
    with pytest.raises(CheckpointError, match=rf"last\.safetensors.* has damaged metadata \(best_step {bad!r}\)"):
        train(_guarded(cfg), run, splits=splits, progress=False, resume=True)


def _natural(cfg):
    return replace(cfg, method=replace(cfg.method, name="natural"),
                   run=replace(cfg.run, eval_every=1, log_every=1))


def test_natural_training_keeps_the_best_clean_accuracy(cfg, splits, tmp_path, monkeypatch):
    """A naturally trained model's PGD accuracy is near 0 and ranks nothing: its best is the step of the
    best clean accuracy (here step 5), not of the best PGD accuracy (step 1)."""
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    script = ScriptedValidation([0.02, 0.0, 0.01, 0.0, 0.0, 0.0], clean=[0.3, 0.5, 0.4, 0.6, 0.8, 0.7])
    monkeypatch.setattr(train_module, "evaluate_split", script)
    res = train(_natural(cfg), tmp_path / "run", splits=splits, progress=False)
    assert (res.best_metric, res.best_val) == ("clean_acc", 0.8)
    meta = read_checkpoint(tmp_path / "run/checkpoints/best.safetensors")[1]
    assert meta["step"] == 5
    assert {k: meta["extra"][k] for k in ("best_val", "best_metric", "best_step")} == {
        "best_val": 0.8, "best_metric": "clean_acc", "best_step": 5}


def test_a_natural_run_chosen_by_pgd_accuracy_chooses_again_on_resume(cfg, splits, tmp_path, monkeypatch):
    """A natural run whose `last` was written when best was chosen by PGD accuracy (best_val_pgd, no
    best_metric) forgets that best on resume, so the next validation writes best by clean accuracy."""
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    natural = _natural(cfg)
    script = ScriptedValidation([0.02, 0.0, 0.01, 0.0, 0.0, 0.0], clean=[0.3, 0.5, 0.4, 0.6, 0.8, 0.7])
    monkeypatch.setattr(train_module, "evaluate_split", script)
    train(natural, tmp_path / "run", splits=splits, progress=False, stop_after=3)

    def as_old(extra):  # what the older code wrote: best by PGD accuracy, at step 1
        extra.pop("best_metric")
        extra.pop("best_val")
        extra.update(best_val_pgd=0.02, best_step=1)
        return True
    _edit_extra(tmp_path / "run/checkpoints/last.safetensors", as_old)
    res = train(natural, tmp_path / "run", splits=splits, progress=False, resume=True)
    assert (res.best_metric, res.best_val) == ("clean_acc", 0.8)
    assert read_checkpoint(tmp_path / "run/checkpoints/best.safetensors")[1]["step"] == 5


def test_rollback_waits_for_rollback_after_and_is_off_by_default(cfg, splits, tmp_path, monkeypatch):
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces

    # a large drop at step 2 (too early to act on), a best at step 3, drops at steps 4 and 6
    script = [0.3, 0.1, 0.5, 0.35, 0.45, 0.2]
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    train(_guarded(cfg, rollback_after=3), tmp_path / "late", splits=splits, progress=False)
    assert [(r["step"], r["to_step"]) for r in _records(tmp_path / "late", "rollback")] == [(4, 3), (6, 3)]
    # a best from before rollback_after is no state to go back to, however far later validations fall
    # below it (a slow seed at a lower lr: 21% PGD accuracy at step 1,000, 13% at step 4,000)
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation([0.6, 0.1, 0.45, 0.3, 0.2, 0.1]))
    train(_guarded(cfg, rollback_after=3), tmp_path / "early", splits=splits, progress=False)
    assert _records(tmp_path / "early", "rollback") == []
    off = replace(cfg, run=replace(cfg.run, eval_every=1))
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script))
    train(off, tmp_path / "off", splits=splits, progress=False)
    assert _records(tmp_path / "off", "rollback") == []
    assert "optim." not in "".join(load_file(str(tmp_path / "off/checkpoints/best.safetensors")))


def _restarting(cfg, **run):
    return replace(cfg, run=replace(cfg.run, eval_every=1, log_every=1, restart_below=0.2, **run))


@pytest.mark.parametrize("ema", [0.0, 0.6])
def test_dead_start_draws_new_weights_and_clears_the_optimizer(cfg, splits, tmp_path, monkeypatch, ema):
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    from robustfeat.build import build_model
    from robustfeat.seeding import derived_seed
    from robustfeat.train import learning_rate

    guarded = _restarting(replace(cfg, optim=replace(cfg.optim, ema=ema)))
    # step 1 is dead (clean 0.1) with the highest PGD accuracy of the run: it must not become best
    script = ScriptedValidation([0.9, 0.3, 0.4, 0.35, 0.2, 0.1], clean=[0.1, 0.9, 0.9, 0.9, 0.9, 0.9])
    monkeypatch.setattr(train_module, "evaluate_split", script)
    res = train(guarded, tmp_path / "run", splits=splits, progress=False)
    assert [(r["step"], r["restarts"], r["val_clean_acc"]) for r in _records(tmp_path / "run", "restart")] == [
        (1, 1, 0.1)]
    assert (res.best_metric, res.best_val) == ("pgd_acc", 0.4)
    # the schedule goes on: every step's lr is the schedule's
    lrs = [r["lr"] for r in _records(tmp_path / "run", "train")]
    assert lrs == pytest.approx([learning_rate(guarded, s) for s in range(6)])

    # what a restart leaves: the seed's next initialization, bit for bit, and no optimizer moments
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation(script.pgd, script.clean))
    train(guarded, tmp_path / "at1", splits=splits, progress=False, stop_after=1)
    torch.manual_seed(derived_seed(guarded.run.seed, 0, 1))
    fresh = build_model(guarded.model, splits.dataset.num_classes, splits.dataset.image_shape[0]).state_dict()
    for prefix in ("model.", "train.") if ema else ("model.",):
        saved = _tensors(tmp_path / "at1", prefix)
        assert saved.keys() == fresh.keys(), prefix
        for k in fresh:
            assert torch.equal(saved[k], fresh[k]), prefix + k
    tensors, meta = read_checkpoint(tmp_path / "at1/checkpoints/last.safetensors")
    assert not any(k.startswith("optim.") for k in tensors) and meta["extra"]["restarts"] == 1


def test_dead_start_resumes_exactly_and_gives_up_after_three(cfg, splits, tmp_path, monkeypatch):
    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    from robustfeat.train import TrainingError

    guarded = _restarting(cfg)
    pgd, clean = [0.1, 0.1, 0.3, 0.4, 0.5, 0.6], [0.1, 0.15, 0.9, 0.9, 0.9, 0.9]  # two dead validations
    _check_exact_resume(guarded, splits, tmp_path, monkeypatch, lambda: ScriptedValidation(pgd, clean),
                        stop_after=1, kind="restart")  # cut between the two restarts
    assert [r["restarts"] for r in _records(tmp_path / "full", "restart")] == [1, 2]

    # never learning: three restarts, then a clear error at the fourth dead validation, state kept
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation([0.1] * 6, [0.1] * 6))
    with pytest.raises(TrainingError, match=r"step 4: validation clean accuracy 0.100 is below "
                                            r"run.restart_below=0.2 after 3 re-initializations"):
        train(guarded, tmp_path / "dead", splits=splits, progress=False)
    assert len(_records(tmp_path / "dead", "restart")) == 3
    assert (tmp_path / "dead/checkpoints/last.safetensors").exists()

    # off by default
    monkeypatch.setattr(train_module, "evaluate_split", ScriptedValidation([0.1] * 6, [0.1] * 6))
    train(replace(cfg, run=replace(cfg.run, eval_every=1)), tmp_path / "off", splits=splits, progress=False)
    assert _records(tmp_path / "off", "restart") == []


def test_eps_final_ramps_the_training_attack_over_the_end_of_the_run(splits, tmp_path):
    from robustfeat.api import describe_config
    from robustfeat.config import ConfigError, load_config
    from robustfeat.train import attack_strength

    base = ["optim.steps=10", "optim.milestones=[]", "attack.eps=0.3", "attack.step_size=0.3", "attack.eps_warmup_examples=0"]
    plain = load_config("demo", overrides=base)
    assert [attack_strength(plain, s) for s in (0, 9)] == [(0.3, 0.3), (0.3, 0.3)]  # off by default
    ramp = load_config("demo", overrides=[*base, "attack.eps_final=0.4", "attack.eps_final_from=0.5"])
    assert "then from 50% of the run towards eps=0.4 at its end" in describe_config(ramp)
    assert "towards" not in describe_config(plain)
    eps = [attack_strength(ramp, s)[0] for s in range(10)]
    # steps 0-4 at 0.3; then linear to 0.4 at the last step (step s+1 of 10, ramp over steps 5-10)
    assert eps == pytest.approx([0.3] * 5 + [0.3 + 0.1 * k / 5 for k in range(1, 6)])
    assert all(a == pytest.approx(e) for e, a in (attack_strength(ramp, s) for s in range(10)))  # alpha = eps
    both = load_config("demo", overrides=[*base, "attack.eps_final=0.4", "attack.eps_warmup_examples=100",
                                          "optim.batch_size=50"])  # warm-up over steps 0-1
    assert attack_strength(both, 0)[0] == pytest.approx(0.15)
    assert attack_strength(both, 9)[0] == pytest.approx(0.4)
    for bad, msg in (("attack.eps_final=-0.1", "attack.eps_final=-0.1 is invalid"),
                     ("attack.eps_final=1.5", r"a number in \[0, 1\]"),
                     ("attack.eps_final_from=1", r"a fraction of the run in \[0, 1\)")):
        with pytest.raises(ConfigError, match=msg):
            load_config("demo", overrides=[*base, bad])
    # the run's training records carry the ramped eps
    cfg = load_config("demo", overrides=[*TINY, "attack.eps_final=0.4", "attack.eps_final_from=0.5"])
    train(cfg, tmp_path / "r", splits=splits, progress=False)
    recs = _records(tmp_path / "r", "train")
    assert [r["eps"] for r in recs] == pytest.approx([attack_strength(cfg, r["step"] - 1)[0] for r in recs])
    assert recs[-1]["eps"] == pytest.approx(0.4)


# 60 training images in batches of 20: an epoch is 3 steps, the run's 6 steps are two epochs
CARRY = [*TINY, "data.train_size=60", "attack.steps=1", "attack.step_size=0.3", "attack.eps_warmup_examples=0"]


def test_carry_starts_each_image_where_its_last_attack_ended(tmp_path, monkeypatch):
    from robustfeat.build import build_splits
    from robustfeat.config import load_config

    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    real = train_module.attack_from_config
    carry, plain = load_config("demo", overrides=[*CARRY, "attack.carry=true"]), load_config("demo", overrides=CARRY)
    sp = build_splits(carry)
    order = train_module.DeviceLoader(sp.x_train, sp.y_train, batch_size=20, seed=carry.run.seed)

    def recording(into):
        def attack(model, x, y, cfg, **kw):
            out = real(model, x, y, cfg, **kw)
            into.append((order.indices(len(into)).tolist(), kw.get("start"), out - x))
            return out
        return attack

    runs: dict[str, list] = {"carry": [], "plain": []}
    for name, c in (("carry", carry), ("plain", plain)):
        monkeypatch.setattr(train_module, "attack_from_config", recording(runs[name]))
        train(c, tmp_path / name, splits=sp, progress=False)
    monkeypatch.undo()
    assert all(start is None for _, start, _ in runs["plain"])
    # epoch 1 (steps 0-2): random starts, the very draws of the plain run, so the same adversaries
    for (idx, start, d), (pidx, _, pd) in zip(runs["carry"][:3], runs["plain"][:3]):
        assert idx == pidx and torch.equal(d, pd)
        assert start.abs().max() <= 0.3 and start.abs().mean() == pytest.approx(0.15, abs=0.03)
    # epoch 2: every image starts where its epoch-1 attack ended (kept in float16, clipped to the eps-ball
    # again: float16's 0.3 is 0.30005)
    ended = {i: d[j] for idx, _, d in runs["carry"][:3] for j, i in enumerate(idx)}
    assert sorted(ended) == list(range(60))
    from robustfeat.api import describe_config
    assert "previous epoch" in describe_config(carry) and "previous epoch" not in describe_config(plain)
    for idx, start, _ in runs["carry"][3:]:
        for j, i in enumerate(idx):
            assert torch.equal(start[j], ended[i].half().float().clamp(-0.3, 0.3)), i
    # ... which the plain run does not, so its weights end elsewhere; last keeps epoch 2's ends
    a, b = _weights(tmp_path / "carry"), _weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    kept = _tensors(tmp_path / "carry", "carry.")
    assert kept["seen"].all() and kept["delta"].dtype == torch.float16
    for idx, _, d in runs["carry"][3:]:
        assert torch.equal(kept["delta"][idx], d.half())


def test_carry_resumes_exactly_and_is_refused_where_it_cannot_work(tmp_path, monkeypatch):
    from robustfeat.build import build_splits
    from robustfeat.checkpoint import CheckpointError
    from robustfeat.config import ConfigError, load_config

    carry = load_config("demo", overrides=[*CARRY, "attack.carry=true"])
    sp = build_splits(carry)
    train(carry, tmp_path / "full", splits=sp, progress=False)
    train(carry, tmp_path / "cut", splits=sp, progress=False, stop_after=4)  # in epoch 2
    train(carry, tmp_path / "cut", splits=sp, progress=False, resume=True)
    for prefix in ("model.", "carry."):
        a, b = _tensors(tmp_path / "full", prefix), _tensors(tmp_path / "cut", prefix)
        assert a.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    # a checkpoint without carried starts (another config's), or of another split's size, is refused
    train(load_config("demo", overrides=CARRY), tmp_path / "plain", splits=sp, progress=False, stop_after=3)
    starts = importlib.import_module("robustfeat.train").CarriedStarts
    for n, run in ((60, "plain"), (59, "full")):
        with pytest.raises(CheckpointError, match="no carried attack starts of this training split"):
            starts(n, (1, 28, 28), torch.device("cpu")).load(tmp_path / run / "checkpoints/last.safetensors")
    # under torchrun (each rank would keep only its own rows' perturbations) it stops before writing anything
    train_module = importlib.import_module("robustfeat.train.loop")
    monkeypatch.setattr(train_module.distributed, "setup",
                        lambda device: train_module.distributed.Dist(rank=0, world=2, device=device))
    with pytest.raises(train_module.TrainingError, match="does not support torchrun"):
        train(carry, tmp_path / "ddp", splits=sp, progress=False)
    assert not (tmp_path / "ddp").exists()
    for bad, msg in (("attack.steps=0", "attack.carry=True is invalid"), ("attack.restarts=2", "restarts = 1"),
                     ("attack.project=false", "project = true"), ("attack.random_start=false", "random_start"),
                     ("data.augment=true", "last epoch's crop and flip")):
        with pytest.raises(ConfigError, match=msg):
            load_config("demo", overrides=[*CARRY, "attack.carry=true", bad])
