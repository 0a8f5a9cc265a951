"""The extension interface of the training loop: user regularizers and guards, the documented
examples, the training state's round trip, and resuming a run directory written by older code."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustfeat.checkpoint import CheckpointError, read_checkpoint
from robustfeat.train import Extension, TrainState, Verdict, train
from robustfeat.train import extensions as extensions_module
from robustfeat.train.extensions import base as base_module

TINY = [
    "data.train_size=400", "data.val_size=100", "optim.batch_size=20", "optim.steps=6", "optim.milestones=[]",
    "attack.steps=2", "attack.step_size=0.15", "attack.eps_warmup_examples=60",
    "eval_attack.steps=2", "eval_attack.step_size=0.15",
    "run.eval_every=3", "run.eval_size=40", "run.log_every=2",
]
ROOT = Path(__file__).resolve().parents[1]


def _tensors(run_dir, name="last"):
    return load_file(str(run_dir / f"checkpoints/{name}.safetensors"))


def _assert_same_tensors(a_dir, b_dir, prefixes=("model.", "train.", "optim.", "carry.")):
    a, b = _tensors(a_dir), _tensors(b_dir)
    keep = lambda d: {k: v for k, v in d.items() if k.startswith(prefixes)}
    a, b = keep(a), keep(b)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _records(run_dir, kind=None, drop=("examples_per_s", "wall_s")):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in recs if kind is None or r["kind"] == kind]


class WeightPenalty(Extension):
    """A regularizer: weight * sum of squared weights, logged as ``weight_penalty``."""

    def __init__(self, weight):
        self.weight = weight

    def extra_loss(self, run, batch):
        penalty = sum(p.square().sum() for p in run.model.parameters())
        return self.weight * penalty, {"weight_penalty": penalty.detach()}


class StopAfterValidation(Extension):
    """A guard that ends the run at the first validation from step ``n`` on."""

    def __init__(self, n):
        self.n, self.seen = n, []

    def on_validation_end(self, run, step, val):
        self.seen.append(step)
        return Verdict(val, stop=True) if step >= self.n else None


def test_a_regularizer_of_weight_zero_is_the_baseline_bit_for_bit(cfg, splits, tmp_path):
    train(cfg, tmp_path / "base", splits=splits, progress=False)
    train(cfg, tmp_path / "zero", splits=splits, progress=False, extensions=[WeightPenalty(0.0)])
    _assert_same_tensors(tmp_path / "base", tmp_path / "zero")
    zero = _records(tmp_path / "zero")
    assert all(r["weight_penalty"] > 0 for r in zero if r["kind"] == "train")
    assert [{k: v for k, v in r.items() if k != "weight_penalty"} for r in zero] == _records(tmp_path / "base")
    # a real weight changes the update
    train(cfg, tmp_path / "reg", splits=splits, progress=False, extensions=[WeightPenalty(1e-3)])
    a, b = _tensors(tmp_path / "base"), _tensors(tmp_path / "reg")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.") and a[k].is_floating_point())


def test_a_guard_stops_the_run_and_the_run_stays_resumable(cfg, splits, tmp_path):
    from dataclasses import replace

    each = replace(cfg, run=replace(cfg.run, eval_every=1))
    guard = StopAfterValidation(2)
    res = train(each, tmp_path / "stopped", splits=splits, progress=False, extensions=[guard])
    assert res.step == 2 and guard.seen == [1, 2]
    assert read_checkpoint(tmp_path / "stopped/checkpoints/last.safetensors")[1]["step"] == 2
    assert json.loads((tmp_path / "stopped/run.json").read_text())["sessions"][0]["to_step"] == 2
    # the stopped run is what a run cut at step 2 is, and resumed without the guard it finishes as a
    # run that never stopped
    train(each, tmp_path / "cut", splits=splits, progress=False, stop_after=2)
    _assert_same_tensors(tmp_path / "stopped", tmp_path / "cut")
    train(each, tmp_path / "stopped", splits=splits, progress=False, resume=True)
    train(each, tmp_path / "full", splits=splits, progress=False)
    _assert_same_tensors(tmp_path / "stopped", tmp_path / "full")
    assert _records(tmp_path / "stopped") == _records(tmp_path / "full")


def test_eps_scale_and_attack_start_hooks(cfg, splits, tmp_path, monkeypatch):
    import importlib

    loop = importlib.import_module("robustfeat.train.loop")
    real, starts = loop.attack_from_config, []

    def recording(model, x, y, c, **kw):
        starts.append(kw["start"])
        return real(model, x, y, c, **kw)

    class Half(Extension):
        def eps_scale(self, step):
            return 0.5

    class ZeroStart(Extension):
        def attack_start(self, run, batch):
            return torch.zeros(batch.shape, device=run.device)

    monkeypatch.setattr(loop, "attack_from_config", recording)
    train(cfg, tmp_path / "r", splits=splits, progress=False, extensions=[Half(), ZeroStart()])
    monkeypatch.undo()
    eps = [r["eps"] for r in _records(tmp_path / "r", "train")]
    expected = [round(loop.attack_strength(cfg, s - 1)[0] * 0.5, 6) for s in (2, 4, 6)]
    assert eps == pytest.approx(expected)
    assert len(starts) == 6 and all(s is not None and not s.any() for s in starts)


def _doc_examples(module):
    """The code blocks (after '::') of a module's docstring."""
    blocks, lines = [], module.__doc__.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::"):
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith("    "):
                    break
                block.append(nxt)
            blocks.append(textwrap.dedent("\n".join(block)))
    return blocks


def test_the_documented_examples_work(cfg, splits, tmp_path):
    blocks = _doc_examples(base_module)
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        ast.parse(block)
        exec(block, ns)  # noqa: S102 - the package's own docstring
    ext = [ns["WeightNorm"](0.0), ns["StopAt"](0.0)]  # StopAt(0.0): stops at the first validation
    res = train(cfg, tmp_path / "doc", splits=splits, progress=False, extensions=ext)
    assert res.step == cfg.run.eval_every
    assert all("weight_norm" in r for r in _records(tmp_path / "doc", "train"))
    assert "train(cfg" in base_module.__doc__  # the usage line names the keyword it documents
    assert extensions_module.Extension is Extension


def test_train_state_round_trips_and_refuses_damage(tmp_path):
    from types import SimpleNamespace

    ds = SimpleNamespace(num_classes=10, image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
    st = TrainState(step=5, best=0.5, best_step=4, lr_scale=0.25, rollbacks=2, restarts=1)
    extra = st.extra({"clean_acc": 0.9, "pgd_acc": 0.4}, ds)
    assert list(extra) == ["best_val", "best_metric", "best_step", "val", "num_classes", "in_channels", "classes",
                           "lr_scale", "rollbacks", "restarts"]
    back = TrainState.from_checkpoint(tmp_path / "last", {"step": 5, "extra": extra}, 10, tmp_path / "best")
    assert back == st
    # a checkpoint from before best_metric: best_val_pgd, a PGD accuracy, kept by an adversarial run and
    # forgotten by a natural one (chosen by clean accuracy)
    old = {("best_val_pgd" if k == "best_val" else k): v for k, v in extra.items() if k != "best_metric"}
    assert TrainState.from_checkpoint(tmp_path / "last", {"step": 5, "extra": old}, 10, tmp_path / "best") == st
    natural = TrainState.from_checkpoint(tmp_path / "last", {"step": 5, "extra": old}, 10, tmp_path / "best",
                                         "clean_acc")
    assert (natural.best, natural.best_step, natural.metric) == (-1.0, -1, "clean_acc")
    for key, bad in (("lr_scale", 0), ("rollbacks", -1), ("restarts", 1.5), ("best_step", 6), ("best_val", "x"),
                     ("best_metric", "loss")):
        with pytest.raises(CheckpointError, match="has damaged metadata") as ei:
            TrainState.from_checkpoint(tmp_path / "last", {"step": 5, "extra": {**extra, key: bad}}, 10,
                                       tmp_path / "best")
        assert "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------------------
# run directories written by older code (d0a8109, before training became a package)

OLD = "d0a8109"
# every piece of state a `last` carries: carried starts, the EMA's trained weights, a rollback's lr
# scale and count (60 training images in batches of 20: the cut at step 4 is in the second epoch)
OLD_CFG = [*TINY, "data.train_size=60", "attack.steps=1", "attack.step_size=0.3", "attack.eps_warmup_examples=0",
           "attack.carry=true", "method.grad_align=0.5", "optim.ema=0.6", "run.eval_every=1", "run.log_every=1",
           "run.rollback_drop=0.1"]
SCRIPT = [0.5, 0.6, 0.4, 0.55, 0.45, 0.7]  # a rollback at step 3 (to step 2) and at step 5
OLD_RUN = textwrap.dedent("""
    import importlib, sys
    import torch
    torch.set_num_threads(1)  # as the test's own runs (the thread count changes the float sums)
    from robustfeat.config import load_config
    from robustfeat.train import train
    calls = []
    def scripted(*args, **kwargs):
        calls.append(1)
        return {{"clean_acc": 0.9, "pgd_acc": {script!r}[len(calls) - 1]}}
    importlib.import_module("robustfeat.train").evaluate_split = scripted
    train(load_config("demo", overrides={overrides!r}), sys.argv[1], progress=False, stop_after=4)
""")


class Scripted:
    def __init__(self, skip=0):
        self.calls = skip

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return {"clean_acc": 0.9, "pgd_acc": SCRIPT[self.calls - 1]}


# SLOW: runs the older code in a subprocess (about 10-20 s on two idle cores, mostly imports)
def test_a_run_directory_of_the_older_code_resumes_bit_identically(tmp_path, monkeypatch, one_thread):
    """A run cut at step 4 by the code of d0a8109 resumes under this code and finishes as an
    uninterrupted run of it: weights, optimizer state, EMA, carried starts and metrics."""
    import importlib

    from robustfeat.build import build_splits
    from robustfeat.config import load_config

    if shutil.which("git") is None:
        pytest.skip("git is not available")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD, "src"], capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD} is not in this checkout")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    script = tmp_path / "old_run.py"
    script.write_text(OLD_RUN.format(overrides=OLD_CFG, script=SCRIPT))
    subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHONPATH": str(old / "src")})
    assert read_checkpoint(tmp_path / "run/checkpoints/last.safetensors")[1]["extra"]["rollbacks"] == 1

    loop = importlib.import_module("robustfeat.train.loop")
    cfg = load_config("demo", overrides=OLD_CFG)
    sp = build_splits(cfg)
    monkeypatch.setattr(loop, "evaluate_split", Scripted(skip=4))  # the old session validated 4 times
    train(cfg, tmp_path / "run", splits=sp, progress=False, resume=True)
    monkeypatch.setattr(loop, "evaluate_split", Scripted())
    train(cfg, tmp_path / "new", splits=sp, progress=False)
    _assert_same_tensors(tmp_path / "run", tmp_path / "new")
    assert _records(tmp_path / "run") == _records(tmp_path / "new")
    assert [r["step"] for r in _records(tmp_path / "run", "rollback")] == [3, 5]
