"""Reliability and safety (issues 7 and 25): killed and interrupted runs resume bit-identically, writes
are atomic, nothing unsafe is loaded, and bad input of every kind gets one clear error and leaves
nothing behind: no file of a run directory is changed or lost by a command that refuses.

The kill test SIGKILLs a real ``robustfeat train`` process at seeded random moments aimed at the three
phases that matter (a training step, a validation evaluation, a checkpoint write), and interrupts it
with SIGINT and SIGTERM (exit 130 and 143, ``last`` saved where it stopped), resumes it with
``--resume`` and compares every tensor of the final checkpoints with an uninterrupted run. The
catalogues (c) and (f) hold the bad inputs; (g) what a user may do to a run directory; (h) signals
in process, where the step they arrive at is exact.

Determinism on CPU: the kernels these models use (conv, linear, max-pool, BatchNorm, Adam/SGD) give
bit-identical results for a fixed thread count, so no ``torch.use_deterministic_algorithms`` is needed
(the kill test pins ``run.threads=1`` for both runs). All randomness after initialisation is a
function of (seed, step), so the step in the checkpoint is the whole random state of a resume.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robustfeat.analysis.measures import AnalysisError
from robustfeat.api import load_model, load_run
from robustfeat.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_write_text,
    read_checkpoint,
    save_checkpoint,
)
from robustfeat.cli import main
from robustfeat.config import ConfigError, config_from_dict, load_config
from robustfeat.data import DataError, load_dataset
from robustfeat.data.datasets import read_idx
from robustfeat.train import BEST, LAST, Extension, Interrupted, TrainingError, train

SRC = Path(__file__).resolve().parents[1] / "src"
# the module, not the function that robustfeat/__init__.py exports under the same name
train_mod = importlib.import_module("robustfeat.train.loop")

# 6 steps of the MNIST CNN on 200 embedded images: about a second.
TINY = [
    "data.train_size=200", "data.val_size=100", "optim.batch_size=10", "optim.steps=6", "optim.milestones=[]",
    "attack.steps=1", "attack.step_size=0.3", "attack.eps_warmup_examples=30",
    "eval_attack.steps=1", "eval_attack.step_size=0.3",
    "run.eval_every=3", "run.eval_size=20", "run.log_every=1",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robustfeat", *args]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its SHA-256 (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _stat_snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root`` with its size, mtime and inode: cheaper than ``_snapshot`` for the shared
    runs the cases only read (any write, atomic or in place, changes one of them)."""
    return {str(p.relative_to(root)): (st.st_size, st.st_mtime_ns, st.st_ino)
            for p in sorted(root.rglob("*")) for st in [p.stat()]}


@pytest.fixture(scope="module")
def good_run(cfg, splits, tmp_path_factory):
    """A finished tiny run (checkpoints best + last), trained once for the whole module."""
    run = tmp_path_factory.mktemp("good") / "run"
    train(cfg, run, splits=splits, progress=False)
    return run


# =========================================================================================================
# (a) SIGKILL at random moments, resume, bit-identical result

KILL_OVERRIDES = [
    "data.train_size=200", "data.val_size=100", "optim.batch_size=10", "optim.steps=16", "optim.milestones=[]",
    "attack.steps=1", "attack.step_size=0.3", "attack.eps_warmup_examples=60",
    "eval_attack.steps=3", "eval_attack.step_size=0.1",
    "run.eval_every=4", "run.eval_size=60", "run.log_every=1", "run.checkpoint_every=1", "run.threads=1",
]
EVAL_EVERY, TOTAL = 4, 16


def _tmp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


def _metrics_lines(run: Path) -> list[str]:
    p = run / "metrics.jsonl"
    return p.read_text().splitlines() if p.exists() else []


def _wait_until(pred, proc: subprocess.Popen, timeout: float = 90.0, poll: float = 0.002) -> bool:
    """Poll ``pred`` until it holds (True) or the process ends (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("the training process made no progress")


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _ckpt_step(run: Path) -> int:
    return read_checkpoint(run / LAST)[1]["step"] if (run / LAST).exists() else 0


def _classify(run: Path, ckpt_step: int, session_mark: int) -> str:
    """Which phase a SIGKILL interrupted, judged from what it left on disk."""
    if _mtime(run / "run.json") == session_mark:  # the session never reached its training loop
        return "start-up"
    if _tmp_files(run):
        return "checkpoint write"
    recs = []
    for line in _metrics_lines(run):
        try:
            recs.append(json.loads(line))
        except ValueError:
            return "metrics write"
    last = recs[-1] if recs else None
    if last and last["step"] > ckpt_step:
        if last["kind"] == "train" and last["step"] % EVAL_EVERY == 0:
            return "evaluation"
        return "between metrics and checkpoint"
    return "training step" if ckpt_step > 0 else "start-up"


def _interrupt(proc: subprocess.Popen, run: Path, phase: str) -> tuple[str, int] | None:
    """Send SIGINT or SIGTERM: the command saves ``last`` where it stopped, records the session and
    exits with 130 or 143 and one line that says how to continue."""
    signum = getattr(signal, phase)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1].decode()
    if proc.returncode == 0:  # it finished first
        return None
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1].startswith(f"robustfeat train: stopped by {phase} after step"), err
    session = json.loads((run / "run.json").read_text())["sessions"][-1]
    step = _ckpt_step(run)
    assert session["ended"] == f"interrupted ({phase})" and session["to_step"] == step, session
    return phase, step


def _kill_once(run: Path, phase: str, rng: random.Random, first: bool) -> tuple[str, int] | None:
    """Start (or resume) the run, SIGKILL it in ``phase`` (or send the signal ``phase`` names); None if it
    finished first."""
    args = (["train", "--preset", "demo", "--out", str(run), "--quiet", *KILL_OVERRIDES] if first
            else ["train", "--resume", str(run), "--quiet"])
    session_mark = _mtime(run / "run.json")  # run.json is rewritten when a session starts its loop
    metrics_mark = _mtime(run / "metrics.jsonl")  # rewritten (stale lines dropped) just after it
    resumed_at = _ckpt_step(run)
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if phase == "start-up":
            time.sleep(rng.uniform(0.3, 1.5))
            alive = proc.poll() is None
        else:
            alive = _wait_until(lambda: _mtime(run / "run.json") != session_mark, proc)
            if alive and phase in ("training step", "SIGINT", "SIGTERM"):
                time.sleep(rng.uniform(0.2, 1.0))
            elif alive and phase == "checkpoint write":
                alive = _wait_until(lambda: bool(_tmp_files(run)), proc, poll=0.0005)
            elif alive and phase == "evaluation":
                def in_eval() -> bool:
                    if _mtime(run / "metrics.jsonl") == metrics_mark:  # stale lines of the last kill
                        return False
                    lines = _metrics_lines(run)
                    try:
                        rec = json.loads(lines[-1]) if lines else None
                    except ValueError:
                        return False
                    return bool(rec and rec["kind"] == "train" and rec["step"] % EVAL_EVERY == 0
                                and rec["step"] > resumed_at)
                alive = _wait_until(in_eval, proc)
                time.sleep(rng.uniform(0.0, 0.15))
        if not alive or proc.poll() is not None:
            proc.wait()
            assert proc.returncode == 0, proc.stderr.read().decode()
            return None
        if phase in ("SIGINT", "SIGTERM"):
            return _interrupt(proc, run, phase)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:  # pragma: no cover - only on a failed assertion above
            proc.kill()
            proc.wait()
        proc.stderr.close()
    step = _ckpt_step(run)  # the checkpoint is never torn: read_checkpoint would raise
    return _classify(run, step, session_mark), step


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _strip(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(s).items() if k not in ("examples_per_s", "wall_s")} for s in lines]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted reference runs beside the killed one (two processes, one thread each)
    ref_proc = subprocess.Popen(
        _cli("train", "--preset", "demo", "--out", str(ref), "--quiet", *KILL_OVERRIDES),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    rng = random.Random(20240607)
    plan = ["training step", "SIGINT", "checkpoint write", "evaluation", "SIGTERM", "start-up", "checkpoint write",
            "evaluation"]
    seen, steps = [], []
    try:
        for i, phase in enumerate(plan):
            res = _kill_once(run, phase, rng, first=(i == 0))
            if res is None:
                break
            seen.append(res[0])
            steps.append(res[1])
            # after every kill: checkpoints readable, never behind the previous kill's
            assert steps == sorted(steps)
            for f in (LAST, BEST):
                if (run / f).exists():
                    read_checkpoint(run / f)
        final = subprocess.run(_cli("train", "--resume", str(run), "--quiet"), env=_env(),
                               capture_output=True, text=True, timeout=300, check=False)
        assert final.returncode == 0, final.stderr
        assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read().decode()
    finally:
        if ref_proc.poll() is None:  # pragma: no cover
            ref_proc.kill()
            ref_proc.wait()
        ref_proc.stderr.close()
    print(f"kills ({len(seen)}): {list(zip(seen, steps, strict=True))}")
    assert len(seen) >= 5, seen
    assert {"checkpoint write", "evaluation", "SIGINT", "SIGTERM"} <= set(seen), seen

    # bit-identical weights, optimizer state and best checkpoint
    for f in (LAST, BEST):
        a, b = _all_tensors(ref / f), _all_tensors(run / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
        assert read_checkpoint(ref / f)[1]["step"] == read_checkpoint(run / f)[1]["step"]
    # metrics: every step exactly once, equal to the uninterrupted run's
    recs = _strip(_metrics_lines(run))
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, TOTAL + 1))
    assert [r["step"] for r in recs if r["kind"] == "eval"] == list(range(EVAL_EVERY, TOTAL + 1, EVAL_EVERY))
    assert recs == _strip(_metrics_lines(ref))
    assert not _tmp_files(run) and not (run / ".write-test").exists()


def test_kill_between_metrics_and_checkpoint_keeps_metrics_consistent(cfg, splits, tmp_path):
    """A process killed after writing metrics of steps the checkpoint does not hold: on resume those
    lines (and a torn last line) are dropped and written again exactly once."""
    run = tmp_path / "r"
    train(cfg, run, splits=splits, progress=False, stop_after=3)
    # what a kill after step 5's metrics but before its checkpoint leaves behind, plus a torn line
    extra = [json.dumps({"kind": "train", "step": s, "loss": 9.0}) for s in (4, 5)]
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n".join(extra) + '\n{"kind": "eval", "st')
    (run / "checkpoints" / ".last.safetensors.deadbeef0000.tmp").write_bytes(b"torn")
    train(cfg, run, splits=splits, progress=False, resume=True)
    recs = [json.loads(s) for s in _metrics_lines(run)]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
    assert all(r.get("loss") != 9.0 for r in recs)
    assert not _tmp_files(run)


def test_atomically_written_files_have_normal_permissions(good_run):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("config.yaml", "run.json", LAST, BEST):
        assert (good_run / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


# =========================================================================================================
# (e) atomic writes: a crash mid-save never replaces the last good file


@pytest.mark.parametrize("where", ["serialize", "write", "os.replace", "fsync"])
def test_crash_during_checkpoint_write_keeps_the_previous_file(good_run, tmp_path, monkeypatch, where):
    import robustfeat.checkpoint as ck

    path = tmp_path / "checkpoints" / "last.safetensors"
    path.parent.mkdir()
    path.write_bytes((good_run / LAST).read_bytes())
    before = _snapshot(tmp_path)
    model, cfg, _ = load_run(good_run, "last")

    def torn_serialize(tensors, metadata=None):
        raise OSError(12, "Cannot allocate memory")

    real_fdopen = ck.os.fdopen

    def torn_write(fd, mode):  # writes half the bytes, then the disk is full
        f = real_fdopen(fd, mode)
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        f.write = write
        return f

    def fail(*a, **k):
        raise OSError(5, "Input/output error")

    if where == "serialize":
        monkeypatch.setattr(ck, "save", torn_serialize)
    elif where == "write":
        monkeypatch.setattr(ck.os, "fdopen", torn_write)
    elif where == "os.replace":
        monkeypatch.setattr(ck.os, "replace", fail)
    else:
        monkeypatch.setattr(ck.os, "fsync", fail)
    with pytest.raises(OSError):
        save_checkpoint(path, model, step=99, config=cfg.to_dict())
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # old file intact, no temporary file left
    assert read_checkpoint(path)[1]["step"] == 6


def test_crash_during_text_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import robustfeat.checkpoint as ck

    f = tmp_path / "metrics.json"
    atomic_write_text(f, "good\n")
    monkeypatch.setattr(ck.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        atomic_write_text(f, "new")
    assert f.read_text() == "good\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# =========================================================================================================
# (b) hostile checkpoints: never unpickled, refused with CheckpointError / exit 2


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_run(tmp_path: Path, cfg, kind: str) -> tuple[Path, Path]:
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    for name in ("last.safetensors", "best.safetensors"):
        target = run / "checkpoints" / name
        if kind == "torch.save":
            torch.save({"model": _Evil(marker), "w": torch.zeros(2)}, target)
        else:
            target.write_bytes(pickle.dumps({"state": _EvilOpen(marker)}))
    return run, marker


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_pickled_checkpoint_is_refused_without_running_it(cfg, tmp_path, capsys, kind):
    run, marker = _hostile_run(tmp_path, cfg, kind)
    before = _snapshot(tmp_path)
    for which in ("best", "last", str(run / LAST)):
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_model(run, which)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "safetensors" in err and "Traceback" not in err
    rc = main(["eval", str(run), "--quiet"])
    assert rc == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()
    after = _snapshot(tmp_path)
    after.pop("run/eval", None)
    assert {k: v for k, v in after.items() if not k.startswith("run/eval/")} == before


def test_pickled_checkpoint_is_refused_by_a_fresh_process(cfg, tmp_path):
    run, marker = _hostile_run(tmp_path, cfg, "torch.save")
    r = subprocess.run(_cli("train", "--resume", str(run), "--quiet"), env=_env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not marker.exists()


def _forge(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def _hostile_metadata(good_run: Path, tmp_path: Path, case: str) -> Path:
    tensors, meta = read_checkpoint(good_run / BEST)
    raw = {"format": FORMAT, "step": str(meta["step"]), "config": json.dumps(meta["config"]),
           "extra": json.dumps(meta["extra"])}
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(marker)).hex()
    if case == "pickle-in-config":
        raw["config"] = payload
    elif case == "pickle-in-extra":
        raw["extra"] = json.dumps({**meta["extra"], "num_classes": payload})
    elif case == "huge-model":
        raw["config"] = json.dumps({**meta["config"], "model": {"name": "resnet", "widths": [10**6] * 4}})
        raw["config"] = raw["config"].replace('"mnist-sample"', '"npz"').replace('"path": null', '"path": "x.npz"')
    elif case == "huge-num-classes":
        raw["extra"] = json.dumps({**meta["extra"], "num_classes": 10**12})
    elif case == "deep-json":
        raw["extra"] = "[" * 100000 + "]" * 100000
    elif case == "negative-step":
        raw["step"] = "-5"
    elif case == "config-not-mapping":
        raw["config"] = json.dumps(["rm", "-rf", "/"])
    elif case == "wrong-format":
        raw["format"] = "pickle"
    out = tmp_path / "hostile" / BEST
    _forge(out, tensors, raw)
    return out


@pytest.mark.parametrize("case", ["pickle-in-config", "pickle-in-extra", "huge-model", "huge-num-classes",
                                  "deep-json", "negative-step", "config-not-mapping", "wrong-format"])
def test_safetensors_with_hostile_metadata_is_refused(good_run, tmp_path, case):
    path = _hostile_metadata(good_run, tmp_path, case)
    with pytest.raises(CheckpointError):
        load_model(path.parents[1])
    assert not (tmp_path / "PWNED").exists()


# =========================================================================================================
# (d) numerical faults and unusable output locations


def test_non_finite_loss_stops_with_step_and_parts_and_keeps_the_checkpoint(cfg, splits, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.method_loss

    def poisoned(model, x, x_adv, y, lam):
        loss, parts = real(model, x, x_adv, y, lam)
        calls["n"] += 1
        if calls["n"] == 5:  # step index 4, after the checkpoint of step 3
            parts = {**parts, "ce": parts["ce"] * float("nan")}
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(train_mod, "method_loss", poisoned)
    run = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4: .*'ce': nan") as ei:
        train(cfg, run, splits=splits, progress=False)
    assert str(out := run / LAST) in str(ei.value) and "\n" not in str(ei.value)
    assert read_checkpoint(out)[1]["step"] == 3
    model = load_model(run, "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exploding_learning_rate_is_caught_before_a_bad_checkpoint(splits, tmp_path):
    cfg = load_config("demo", overrides=[*TINY, "optim.lr=1e30", "run.checkpoint_every=1"])
    with pytest.raises(TrainingError, match="non-finite loss at step 1") as ei:
        train(cfg, tmp_path / "r", splits=splits, progress=False)
    # the first update (by about 1e30) still gave finite weights, saved at step 1; the second step's
    # loss is NaN and is refused before it is applied or saved: what is kept is step 1, loadable, finite
    assert str(tmp_path / "r" / LAST) in str(ei.value)
    assert read_checkpoint(tmp_path / "r" / LAST)[1]["step"] == 1
    model = load_model(tmp_path / "r", "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _count_steps(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = train_mod.method_loss

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "method_loss", counting)
    return calls


@pytest.mark.parametrize("where", ["under-a-file", "proc", "full-disk"])
def test_unusable_output_location_is_detected_before_training(cfg, splits, tmp_path, monkeypatch, where):
    calls = _count_steps(monkeypatch)
    (tmp_path / "afile").write_text("x")
    if where == "under-a-file":
        out = tmp_path / "afile" / "run"
    elif where == "proc":
        out = Path("/proc/robustfeat-test-run")
    else:
        import shutil

        out = tmp_path / "new" / "run"
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    before = _snapshot(tmp_path)
    with pytest.raises(TrainingError, match="cannot write|not enough free space|not a directory"):
        train(cfg, out, splits=splits, progress=False)
    assert calls["n"] == 0
    assert _snapshot(tmp_path) == before  # nothing created (the new directories were removed again)


# =========================================================================================================
# (c) the catalogue of bad input: exact error, nothing lost, nothing left behind


def _yaml(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "cfg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _npz(tmp: Path, **over) -> Path:
    r = np.random.default_rng(0)
    arrays = {"x_train": r.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), "y_train": np.arange(20) % 4,
              "x_test": r.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(6) % 4}
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    p = tmp / "d.npz"
    np.savez(p, **arrays)
    return p


def _mnist_dir(tmp: Path, damage: str) -> Path:
    d = tmp / "mnist"
    d.mkdir()
    blob = gzip.compress(b"\x00\x00\x08\x03" + (1).to_bytes(4, "big") * 3 + b"\x00")
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (d / n).write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"\x1f\x8bgarbage")
    return d


def _ckpt(tmp: Path, good_run: Path, damage: str) -> Path:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((good_run / "config.yaml").read_bytes())
    src = (good_run / BEST).read_bytes()
    tensors, meta = read_checkpoint(good_run / BEST)
    raw = {"format": FORMAT, "step": str(meta["step"]), "config": json.dumps(meta["config"]),
           "extra": json.dumps(meta["extra"])}
    if damage == "truncated":
        (run / BEST).write_bytes(src[: len(src) // 3])
    elif damage == "empty":
        (run / BEST).write_bytes(b"")
    elif damage == "nan":
        k = next(k for k in tensors if k.endswith("weight"))
        tensors[k] = tensors[k].clone()
        tensors[k][0] = float("nan")
        _forge(run / BEST, tensors, raw)
    elif damage == "architecture":  # tensors of the MNIST CNN, a config asking for fc width 16
        tensors = {k: (v[:16] if k == "model.fc1.weight" else v) for k, v in tensors.items()}
        _forge(run / BEST, tensors, raw)
    elif damage == "other-model":
        cfg2 = dict(meta["config"], model={"name": "resnet", "widths": [2, 2, 2, 2], "att_hidden": 64,
                                           "init": "torch"},
                    data={**meta["config"]["data"], "name": "npz", "path": "x.npz"})
        _forge(run / BEST, tensors, {**raw, "config": json.dumps(cfg2)})
    else:  # "none": an intact copy of the finished run
        (run / BEST).write_bytes(src)
        (run / LAST).write_bytes((good_run / LAST).read_bytes())
    return run


def _train_argv(tmp: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "demo", "--out", str(tmp / "out"), "--quiet", *extra]


def _resume_after(tmp: Path, good_run: Path, name: str, content: str | bytes):
    """A copy of a finished run with ``name`` replaced by ``content``, and its ``--resume``."""
    run = _ckpt(tmp, good_run, "none")
    (run / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return lambda: main(["train", "--resume", str(run), "--quiet"])


def _train_into_file(tmp: Path):
    (tmp / "file").write_text("x")
    return lambda: main(["train", "--preset", "demo", "--out", str(tmp / "file"), "--quiet", *TINY])


# Each case: setup(tmp, good_run) -> thunk (setup creates the files, eagerly: partial(f, ...)); the expected exception class, or 2 for the CLI exit status.
CATALOGUE = {
    # --- config files and the Python API
    "yaml-negative-eps": (lambda t, g: partial(load_config, path=_yaml(t, "attack: {eps: -0.1}")), ConfigError),
    "yaml-unknown-key": (lambda t, g: partial(load_config, path=_yaml(t, "optim: {lrr: 0.1}")), ConfigError),
    "yaml-unknown-section": (lambda t, g: partial(load_config, path=_yaml(t, "optimizer: {lr: 0.1}")), ConfigError),
    "yaml-wrong-type": (lambda t, g: partial(load_config, path=_yaml(t, "optim: {steps: ten}")), ConfigError),
    "yaml-float-steps": (lambda t, g: partial(load_config, path=_yaml(t, "attack: {steps: 2.5}")), ConfigError),
    "yaml-not-mapping": (lambda t, g: partial(load_config, path=_yaml(t, "- a\n- b\n")), ConfigError),
    "yaml-section-not-mapping": (lambda t, g: partial(load_config, path=_yaml(t, "optim: 3\n")), ConfigError),
    "yaml-syntax": (lambda t, g: partial(load_config, path=_yaml(t, "optim: {lr: [\n")), ConfigError),
    "yaml-binary": (lambda t, g: partial(load_config, path=_yaml(t, b"\xff\xfe\x00garbage")), ConfigError),
    "yaml-missing-file": (lambda t, g: partial(load_config, path=t / "nope.yaml"), ConfigError),
    "yaml-zero-width": (lambda t, g: partial(load_config, 
        path=_yaml(t, "data: {name: cifar10}\nmodel: {name: resnet, widths: [16, 0, 32, 64]}\n"
                   "method: {name: at}\noptim: {name: sgd}")), ConfigError),
    "dict-negative-lambda": (lambda t, g: partial(config_from_dict, {"method": {"name": "at-reg", "lam": -1}}),
                             ConfigError),
    "dict-zero-step-size": (lambda t, g: partial(config_from_dict, {"attack": {"step_size": 0}}), ConfigError),
    "dict-bool-batch": (lambda t, g: partial(config_from_dict, {"optim": {"batch_size": True}}), ConfigError),
    "dict-bad-device": (lambda t, g: partial(config_from_dict, {"run": {"device": "gpu"}}), ConfigError),
    "dict-path-name": (lambda t, g: partial(config_from_dict, {"name": "../../etc"}), ConfigError),
    "dict-nan-eps": (lambda t, g: partial(config_from_dict, {"attack": {"eps": float("nan")}}), ConfigError),
    "dict-not-mapping": (lambda t, g: partial(config_from_dict, ["data"]), ConfigError),
    "dict-model-method-mismatch": (lambda t, g: partial(config_from_dict, 
        {"data": {"name": "cifar10"}, "model": {"name": "resnet"}, "method": {"name": "at-att"}}), ConfigError),
    # --- overrides and presets
    "override-no-equals": (lambda t, g: partial(load_config, "demo", overrides=["optim.lr"]), ConfigError),
    "override-empty-key": (lambda t, g: partial(load_config, "demo", overrides=[".lr=1"]), ConfigError),
    "override-deep-key": (lambda t, g: partial(load_config, "demo", overrides=["optim.lr.x=1"]), ConfigError),
    "override-section": (lambda t, g: partial(load_config, "demo", overrides=["optim=3"]), ConfigError),
    "override-div-zero": (lambda t, g: partial(load_config, "demo", overrides=["attack.eps=8/0"]), ConfigError),
    "override-bad-yaml": (lambda t, g: partial(load_config, "demo", overrides=["attack.eps=[1"]), ConfigError),
    "override-eps-255": (lambda t, g: partial(load_config, "demo", overrides=["attack.eps=8"]), ConfigError),
    "unknown-preset": (lambda t, g: partial(load_config, "mnist-atreg"), ConfigError),
    "unknown-budget": (lambda t, g: partial(load_config, "demo", "cpux"), ConfigError),
    # --- data files
    "gz-corrupt": (lambda t, g: partial(read_idx, _mnist_dir(t, "corrupt") / "train-images-idx3-ubyte.gz", 3),
                   DataError),
    "gz-truncated": (lambda t, g: partial(read_idx, _mnist_dir(t, "truncated") / "train-labels-idx1-ubyte.gz", 1),
                     DataError),
    "mnist-dir-damaged": (lambda t, g: partial(load_dataset, "mnist", _mnist_dir(t, "corrupt"), download=False),
                          DataError),
    "mnist-dir-missing": (lambda t, g: partial(load_dataset, "mnist", t / "no-such-dir", download=False), DataError),
    "npz-float-images": (lambda t, g: partial(load_dataset, "npz", path=_npz(t, x_train=np.zeros((20, 8, 8, 3)))),
                         DataError),
    "npz-length-mismatch": (lambda t, g: partial(load_dataset, "npz", path=_npz(t, y_train=np.arange(19) % 4)),
                            DataError),
    "npz-missing-key": (lambda t, g: partial(load_dataset, "npz", path=_npz(t, y_test=None)), DataError),
    "npz-not-a-zip": (lambda t, g: partial(load_dataset, "npz", path=_yaml(t, b"PK\x03\x04 nope")), DataError),
    "npz-missing-file": (lambda t, g: partial(load_dataset, "npz", path=t / "none.npz"), DataError),
    "npz-pickled-object": (lambda t, g: partial(load_dataset, 
        "npz", path=_npz(t, y_test=np.array([_Evil(t / "PWNED")] * 6, dtype=object))), DataError),
    # --- checkpoints
    "ckpt-truncated": (lambda t, g: partial(load_model, _ckpt(t, g, "truncated")), CheckpointError),
    "ckpt-empty": (lambda t, g: partial(load_model, _ckpt(t, g, "empty")), CheckpointError),
    "ckpt-non-finite": (lambda t, g: partial(load_model, _ckpt(t, g, "nan")), CheckpointError),
    "ckpt-wrong-shape": (lambda t, g: partial(load_model, _ckpt(t, g, "architecture")), CheckpointError),
    "ckpt-other-architecture": (lambda t, g: partial(load_model, _ckpt(t, g, "other-model")), CheckpointError),
    "ckpt-missing-run": (lambda t, g: partial(load_model, t / "no-run"), CheckpointError),
    "ckpt-missing-file": (lambda t, g: partial(load_model, t, str(t / "none.safetensors")), CheckpointError),
    # --- command lines (exit status 2, one line, no traceback)
    "cli-unknown-preset": (lambda t, g: partial(main, ["train", "--preset", "mnist-atreg", "--out", str(t / "o")]), 2),
    "cli-unknown-subcommand": (lambda t, g: partial(main, ["trian"]), 2),
    "cli-no-preset": (lambda t, g: partial(main, ["train", "--out", str(t / "o")]), 2),
    "cli-bad-override": (lambda t, g: partial(main, _train_argv(t, "optim.lr=-1")), 2),
    "cli-override-syntax": (lambda t, g: partial(main, _train_argv(t, "optim.lr")), 2),
    "cli-unknown-key": (lambda t, g: partial(main, _train_argv(t, "optim.lrr=0.1")), 2),
    "cli-bad-budget": (lambda t, g: partial(main, _train_argv(t, "--budget", "turbo")), 2),
    "cli-bad-device": (lambda t, g: partial(main, _train_argv(t, "run.device=cuda:x")), 2),
    "cli-missing-npz": (lambda t, g: partial(main, _train_argv(t, "data.name=npz", f"data.path={t}/x.npz")), 2),
    "cli-missing-config-file": (lambda t, g: partial(main, ["train", "--config", str(t / "c.yaml"),
                                                           "--out", str(t / "o")]), 2),
    "cli-resume-not-a-run": (lambda t, g: partial(main, ["train", "--resume", str(t)]), 2),
    "cli-resume-missing-dir": (lambda t, g: partial(main, ["train", "--resume", str(t / "none")]), 2),
    "cli-resume-with-overrides": (lambda t, g: partial(main, ["train", "--resume", str(_ckpt(t, g, "none")),
                                                             "optim.lr=0.5"]), 2),
    "cli-resume-damaged-config": (lambda t, g: _resume_after(t, g, "config.yaml", "optim: {lr: [unclosed\n"), 2),
    "cli-resume-invalid-config": (lambda t, g: _resume_after(t, g, "config.yaml", "optim: {lr: -3}\n"), 2),
    "cli-resume-binary-config": (lambda t, g: _resume_after(t, g, "config.yaml", b"\xff\xfe\x00\x81"), 2),
    "cli-resume-truncated-ckpt": (lambda t, g: _resume_after(t, g, LAST, (g / LAST).read_bytes()[:1000]), 2),
    "cli-out-is-a-file": (lambda t, g: _train_into_file(t), 2),
    "cli-out-holds-a-run": (lambda t, g: partial(main, ["train", "--preset", "demo", "--out",
                                                       str(_ckpt(t, g, "none")), *TINY]), 2),
    "cli-eval-missing-dir": (lambda t, g: partial(main, ["eval", str(t / "none")]), 2),
    "cli-eval-bad-n": (lambda t, g: partial(main, ["eval", str(t), "--n", "abc"]), 2),
    "cli-eval-truncated-ckpt": (lambda t, g: partial(main, ["eval", str(_ckpt(t, g, "truncated"))]), 2),
}


def _assert_refused(name: str, thunk, expected, capsys, fragment: str | None = None) -> str:
    """Run ``thunk``: the exact exception class ``expected`` (or exit status 2 from the command line)
    with a one-line message holding ``fragment``; returns the message."""
    capsys.readouterr()
    if expected == 2:
        try:
            rc = thunk()
        except SystemExit as e:  # argparse's own errors: usage line + one error line
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines and "error:" in lines[-1], err
        if not lines[0].startswith("usage:"):
            assert len(lines) == 1, err
        msg = lines[-1]
    else:
        with pytest.raises(expected) as ei:
            thunk()
        assert type(ei.value) is expected, repr(ei.value)  # exactly this class, not a subclass
        msg = str(ei.value)
        assert msg and "\n" not in msg and "Traceback" not in msg
    if fragment is not None:
        assert fragment in msg, f"{name}: {fragment!r} not in {msg!r}"
    return msg


def _run_case(name, setup, expected, fragment, sources: dict[str, Path], tmp_path, monkeypatch, capsys):
    """The catalogue's harness: ``setup`` builds its files in a fresh folder; the call must be refused
    as ``expected`` and leave every file of that folder and of ``sources`` byte for byte as it was."""
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)  # a default run directory (runs/...) would appear here
    sources_before = {k: _stat_snapshot(v) for k, v in sources.items()}
    thunk = setup(work, *sources.values())
    before = _snapshot(work)
    _assert_refused(name, thunk, expected, capsys, fragment)
    after = _snapshot(work)
    for k in set(after) - set(before):  # eval may write its report only on success: never here
        raise AssertionError(f"{name} left {k} behind")
    assert after == before, f"{name} changed files"
    assert {k: _stat_snapshot(v) for k, v in sources.items()} == sources_before
    assert not (work / "PWNED").exists()


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_catalogue(name, good_run, tmp_path, monkeypatch, capsys):
    setup, expected = CATALOGUE[name]
    _run_case(name, setup, expected, None, {"good": good_run}, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.name=resnet_atn"], "did you mean 'resnet_att'"),
        (["method.name=at_reg"], "did you mean 'at-reg'"),
        (["data.name=mnist_sample"], "did you mean 'mnist-sample'"),
        (["attack.loss=cw2"], "did you mean 'cw'"),
        (["optim.lrr=0.1"], "did you mean 'lr'"),
        (["optimm.lr=0.1"], "did you mean 'optim'"),
    ],
)
def test_near_misses_get_a_suggestion(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("demo", overrides=overrides)


def test_cli_error_in_a_fresh_process_is_one_line(tmp_path):
    r = subprocess.run(_cli("train", "--preset", "demo", "--out", str(tmp_path / "o"), "attack.eps=-1"),
                       env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "attack.eps=-1" in r.stderr and "expected" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_accepts_another_data_dir(cfg, splits, tmp_path):
    """--data-dir on --resume (the data moved) is not a different experiment."""
    import dataclasses

    run = tmp_path / "r"
    train(cfg, run, splits=splits, progress=False, stop_after=3)
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(tmp_path / "elsewhere")))
    assert train(moved, run, splits=splits, progress=False, resume=True).step == 6


# =========================================================================================================
# (f) the catalogue, second pass (issue 25): no silent data loss, no silent wrong number. Each case is
# (setup(tmp, good_run, cut_run) -> thunk, the exact error class or 2 for the command line, a fragment
# of the one-line message); the harness checks that no file of the case's folder, of the finished run
# or of the cut run changed, appeared or disappeared.


@pytest.fixture(scope="module")
def cut_run(cfg, splits, tmp_path_factory):
    """A run stopped at step 5 of 6: ``last`` at 5, ``best`` from the validation of step 3."""
    run = tmp_path_factory.mktemp("cut") / "run"
    train(cfg, run, splits=splits, progress=False, stop_after=5)
    return run


def _copy_run(tmp: Path, src: Path, drop: tuple[str, ...] = (), name: str = "run", **files: str | bytes) -> Path:
    """A copy of the run directory ``src`` without ``drop`` and with ``files`` (path: content) written;
    ``files`` keys use '__' for '/'."""
    run = tmp / name
    shutil.copytree(src, run)
    for f in drop:
        p = run / f
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for key, content in files.items():
        p = run / key.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return run


def _foreign(path: Path, **run_keys) -> None:
    """Rewrite the checkpoint ``path`` as if another run (``run`` keys changed, e.g. seed) had written it."""
    tensors, meta = read_checkpoint(path)
    config = {**meta["config"], "run": {**meta["config"]["run"], **run_keys}}
    raw = {"format": FORMAT, "step": str(meta["step"]), "config": json.dumps(config),
           "extra": json.dumps(meta["extra"])}
    if meta["optimizer"] is not None:
        raw["optimizer"] = json.dumps(meta["optimizer"])
    _forge(path, tensors, raw)


def _with_eval(run: Path) -> Path:
    """A good earlier evaluation beside the run: a refused eval must leave it as it is."""
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "eval.json").write_text('{"clean_acc": 0.97, "note": "the good evaluation"}\n')
    return run


def _resume_cli(run: Path):
    return partial(main, ["train", "--resume", str(run), "--quiet"])


def _eval_cli(run: Path, *args: str):
    return partial(main, ["eval", str(run), "--quiet", *args])


def _model_and_data(g: Path, n: int = 4):
    from robustfeat.data import load_dataset

    ds = load_dataset("mnist-sample")
    return load_model(g), ds.x_test[:n], ds.y_test[:n]


def _evaluate_model(g: Path, *, x=None, y=None, **kw):
    from robustfeat.eval import evaluate_model

    model, x0, y0 = _model_and_data(g)
    options = {"eps": 0.3, "step_size": 0.1, "suite": "quick", "progress": False, **kw}
    return partial(evaluate_model, model, x0 if x is None else x, y0 if y is None else y, **options)


def _npz_8x8(t: Path) -> Path:
    r = np.random.default_rng(1)
    return _npz(t, x_train=r.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 4)


NPZ_RUN = ["data.name=npz", "data.train_size=null", "data.val_size=8", "run.eval_size=8", "optim.batch_size=4"]


def _train_api(t: Path, *overrides: str, out: str = "out", resume: bool = False):
    return partial(train, load_config("demo", overrides=[*TINY, *overrides]), t / out, progress=False,
                   resume=resume)


CATALOGUE_2 = {
    # --- resuming and retraining over what a run directory holds
    "resume-finished-run-whose-last-was-deleted": (
        lambda t, g, c: _resume_cli(_copy_run(t, g, drop=(LAST,))), 2, "finished at step 6"),
    "resume-finished-run-whose-last-was-deleted-api": (
        lambda t, g, c: partial(train, load_config("demo", overrides=TINY), _copy_run(t, g, drop=(LAST,)),
                                progress=False, resume=True), TrainingError, "cannot be continued"),
    "resume-run-without-any-checkpoint": (
        lambda t, g, c: _resume_cli(_copy_run(t, g, drop=("checkpoints",))), 2, "finished at step 6"),
    "resume-unfinished-run-whose-last-was-deleted": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=(LAST,))), 2, "holds results up to step 5"),
    "resume-unfinished-run-without-last-or-best": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=("checkpoints",))), 2, "retrain from step 0"),
    "resume-damaged-best-without-last": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=(LAST,), **{"checkpoints__best.safetensors": "torn"})), 2,
        "best.safetensors' is not a readable safetensors file"),
    "resume-checkpoints-is-a-file": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=("checkpoints",), checkpoints="x")), 2,
        "is not a directory"),
    "resume-last-is-a-directory": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=(LAST,), **{"checkpoints__last.safetensors__x": "x"})), 2,
        "is not a file"),
    "resume-metrics-is-a-directory": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, drop=("metrics.jsonl",), **{"metrics.jsonl__x": "x"})), 2,
        "metrics.jsonl' is not a file"),
    "resume-empty-config": (lambda t, g, c: _resume_cli(_copy_run(t, c, **{"config.yaml": ""})), 2, "is empty"),
    "resume-config-of-comments-only": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, **{"config.yaml": "# emptied to save space\n"})), 2, "is empty"),
    "resume-config-with-a-duplicate-section": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, **{"config.yaml": (c / "config.yaml").read_text() + "optim: {}\n"})),
        2, "given twice"),
    "resume-last-of-another-run": (
        lambda t, g, c: _resume_cli((r := _copy_run(t, c), _foreign(r / LAST, seed=7))[0]), 2,
        "written by another config"),
    "resume-config-changed-under-last": (
        lambda t, g, c: _resume_cli(_copy_run(t, c, **{"config.yaml": (c / "config.yaml").read_text().replace(
            "seed: 0", "seed: 3")})), 2, "another config"),
    "resume-damaged-run-json": (lambda t, g, c: _resume_cli(_copy_run(t, c, **{"run.json": '{"sessions": [{"fr'})),
                                2, "run.json' is damaged"),
    "resume-a-file": (lambda t, g, c: partial(main, ["train", "--resume", str(_yaml(t, "x: 1"))]), 2, "is a file"),
    "train-over-finished-run-without-last": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--quiet", "--out",
                                       str(_copy_run(t, g, drop=(LAST,))), *TINY]), 2, "already holds a run"),
    "train-over-records-without-checkpoints": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--quiet", "--out",
                                       str(_copy_run(t, c, drop=("checkpoints",))), *TINY]), 2, "cannot be resumed"),
    "train-inside-a-run-directory": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--quiet", "--out",
                                       str(_copy_run(t, c) / "checkpoints"), *TINY]), 2, "inside the run directory"),
    "train-into-checkpoints-file": (
        lambda t, g, c: (_yaml(t, "x"), (t / "out").mkdir(), (t / "out" / "checkpoints").write_text("x"),
                         partial(main, ["train", "--preset", "demo", "--quiet", "--out", str(t / "out"), *TINY]))[-1],
        2, "is not a directory"),
    # --- evaluation: never a number from invalid settings, never over a good eval.json
    "eval-negative-batch-size": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--batch-size", "-5"), 2,
                                 "batch_size=-5"),
    "eval-zero-batch-size": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--batch-size", "0"), 2,
                             "batch_size=0"),
    "eval-zero-n": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--n", "0"), 2, "n=0"),
    "eval-negative-n": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--n", "-3"), 2, "n=-3"),
    "eval-zero-restarts": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--restarts", "0"), 2,
                           "restarts=0"),
    "eval-eps-in-255-units": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--eps", "8"), 2,
                              "eps=8.0"),
    "eval-zero-step": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--step-size", "0"), 2,
                       "step_size=0.0"),
    "eval-seed-above-64-bits": (lambda t, g, c: _eval_cli(_with_eval(_copy_run(t, g)), "--seed", str(2**64)), 2,
                                "seed="),
    "eval-out-is-a-file": (lambda t, g, c: _eval_cli(_copy_run(t, g), "--out", str(_yaml(t, "x"))), 2,
                           "not a directory"),
    "eval-out-cannot-be-written": (lambda t, g, c: _eval_cli(_copy_run(t, g), "--out", "/proc/robustfeat-test-eval"),
                                   2, "cannot write the evaluation"),
    "eval-best-of-another-run": (
        lambda t, g, c: _eval_cli(_with_eval((r := _copy_run(t, g), _foreign(r / BEST, seed=7))[0])), 2,
        "was not written by the run"),
    "eval-a-file": (lambda t, g, c: _eval_cli(_copy_run(t, g) / BEST), 2, "is a file, not a run directory"),
    "eval-run-without-weights": (lambda t, g, c: _eval_cli(_copy_run(t, g, drop=("checkpoints",))), 2,
                                 "holds no checkpoint"),
    "load-best-of-another-run": (
        lambda t, g, c: partial(load_model, (r := _copy_run(t, g), _foreign(r / BEST, seed=7))[0]),
        CheckpointError, "was not written by the run"),
    "load-last-when-deleted": (lambda t, g, c: partial(load_model, _copy_run(t, g, drop=(LAST,)), "last"),
                               CheckpointError, "use --checkpoint best"),
    "load-a-file-as-run": (lambda t, g, c: partial(load_model, _yaml(t, "x")), CheckpointError, "is a file"),
    "load-a-number-as-run": (lambda t, g, c: partial(load_model, 42), CheckpointError, "run_dir=42"),
    "load-bad-device": (lambda t, g, c: partial(load_model, g, device="gpu"), ConfigError, "'gpu'"),
    "evaluate-labels-outside-the-model": (
        lambda t, g, c: _evaluate_model(g, y=torch.tensor([0, 1, 2, 12])), DataError, "label 12"),
    "evaluate-negative-label": (lambda t, g, c: _evaluate_model(g, y=torch.tensor([0, -1, 2, 3])), DataError,
                                "label -1"),
    "evaluate-images-in-0-255": (
        lambda t, g, c: _evaluate_model(g, x=_model_and_data(g)[1].float()), DataError, "divide by 255"),
    "evaluate-non-finite-images": (
        lambda t, g, c: _evaluate_model(g, x=torch.full((4, 1, 28, 28), float("nan"))), DataError, "non-finite"),
    "evaluate-more-labels-than-images": (
        lambda t, g, c: _evaluate_model(g, y=torch.tensor([0, 1, 2, 3, 4])), DataError, "4 images but y 5"),
    "evaluate-float-labels": (lambda t, g, c: _evaluate_model(g, y=torch.tensor([0.0, 1.0, 2.0, 3.0])), DataError,
                              "integer labels"),
    "evaluate-images-of-another-size": (
        lambda t, g, c: _evaluate_model(g, x=torch.rand(4, 3, 8, 8)), DataError, "cannot take images"),
    "evaluate-negative-batch-size": (lambda t, g, c: _evaluate_model(g, batch_size=-5), ConfigError,
                                     "batch_size=-5"),
    # --- what cannot be meant
    "yaml-duplicate-section": (lambda t, g, c: partial(load_config, path=_yaml(t, "optim: {lr: 0.1}\noptim: {steps: 5}\n")),
                               ConfigError, "'optim' is given twice (lines 1 and 2)"),
    "yaml-duplicate-key": (lambda t, g, c: partial(load_config, path=_yaml(t, "optim:\n  lr: 0.1\n  lr: 0.2\n")),
                           ConfigError, "'lr' is given twice"),
    "yaml-duplicate-key-on-one-line": (lambda t, g, c: partial(load_config, path=_yaml(t, "run: {seed: 1, seed: 2}\n")),
                                       ConfigError, "'seed' is given twice (line 1)"),
    "yaml-empty-file": (lambda t, g, c: partial(load_config, path=_yaml(t, "")), ConfigError, "is empty"),
    "yaml-a-directory": (lambda t, g, c: partial(load_config, path=t), ConfigError, "is a directory"),
    "yaml-inherits-an-unknown-preset": (lambda t, g, c: partial(load_config, path=_yaml(t, "inherit: mnist-att\n")),
                                        ConfigError, "unknown preset 'mnist-att'"),
    "preset-and-config-file": (lambda t, g, c: partial(load_config, "demo", path=_yaml(t, "optim: {lr: 0.1}")),
                               ConfigError, "a run has one config"),
    "cli-preset-and-config": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--config", str(_yaml(t, "optim: {lr: 0.1}")),
                                       "--out", str(t / "o")]), 2, "a run has one config"),
    "overrides-as-a-string": (lambda t, g, c: partial(load_config, "demo", overrides="optim.lr=0.1"), ConfigError,
                              "is a string"),
    "reproduce-overrides-as-a-string": (
        lambda t, g, c: partial(importlib.import_module("robustfeat.reproduce").reproduce, "table1", "smoke",
                                t / "r", overrides="optim.steps=2"), ConfigError, "is a string"),
    "milestone-after-the-last-step": (lambda t, g, c: partial(load_config, "cifar10-at", overrides=["optim.steps=1000"]),
                                      ConfigError, "never decay at 40000"),
    "milestone-at-the-last-step": (lambda t, g, c: partial(load_config, "demo", overrides=["optim.steps=750"]),
                                   ConfigError, "never decay at 750"),
    "cli-milestone-after-the-last-step": (
        lambda t, g, c: partial(main, ["train", "--preset", "cifar10-at", "--out", str(t / "o"), "optim.steps=1000"]),
        2, "optim.milestones"),
    "eval-size-above-val-size": (lambda t, g, c: partial(load_config, "demo", overrides=["run.eval_size=600"]),
                                 ConfigError, "run.eval_size=600"),
    "train-size-beyond-the-data": (lambda t, g, c: _train_api(t, "data.train_size=20000"), ConfigError,
                                   "data.train_size=20000"),
    "cli-train-size-beyond-the-data": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--out", str(t / "o"), "--quiet", *TINY,
                                       "data.train_size=9950"]), 2, "data.train_size=9950"),
    "npz-test-label-without-training-images": (
        lambda t, g, c: partial(load_dataset, "npz", path=_npz(t, y_test=np.array([0, 1, 2, 3, 1000, 1]))),
        DataError, "y_test has label 1000"),
    "npz-path-is-a-directory": (lambda t, g, c: partial(load_dataset, "npz", path=t), DataError, "is a directory"),
    "seed-above-64-bits": (lambda t, g, c: partial(load_config, "demo", overrides=[f"run.seed={2**64 + 1}"]),
                           ConfigError, "would give the run of seed 1"),
    "train-a-dict": (lambda t, g, c: partial(train, {"optim": {"lr": 0.1}}, t / "o"), ConfigError, "needs a Config"),
    "train-into-none": (lambda t, g, c: partial(train, load_config("demo", overrides=TINY), None), ConfigError,
                        "out_dir=None"),
    "analysis-run-dirs-as-a-string": (
        lambda t, g, c: partial(importlib.import_module("robustfeat.analysis.pipeline").gradient_maps_of_runs, str(g)),
        AnalysisError, "expected a list of run directories"),
    # --- errors that say what is wrong
    "npz-8x8-images-on-the-mnist-model": (lambda t, g, c: _train_api(t, *NPZ_RUN, f"data.path={_npz_8x8(t)}"),
                                          ConfigError, "cannot take the 3x8x8 images"),
    "cli-npz-8x8-images-on-the-mnist-model": (
        lambda t, g, c: partial(main, ["train", "--preset", "demo", "--out", str(t / "o"), "--quiet", *TINY, *NPZ_RUN,
                                       f"data.path={_npz_8x8(t)}"]), 2, "mnist_cnn"),
    "analyze-out-is-a-file": (
        lambda t, g, c: partial(main, ["analyze", "gradient-maps", str(g), "--out", str(_yaml(t, "x"))]), 2,
        "not a directory"),
    "analyze-unknown-split": (
        lambda t, g, c: partial(main, ["analyze", "attention-robustness", str(g), "--splits", "train,tset"]), 2,
        "unknown split 'tset'"),
    "bench-zero-repeats": (lambda t, g, c: partial(main, ["bench", "--repeats", "0"]), 2, "--repeats 0"),
    "bench-zero-batch": (lambda t, g, c: partial(main, ["bench", "--batch", "0"]), 2, "--batch 0"),
    "bench-unknown-preset": (lambda t, g, c: partial(main, ["bench", "--presets", "mnist-atreg"]), 2,
                             "unknown preset 'mnist-atreg'"),
    "bench-out-is-a-file": (lambda t, g, c: partial(main, ["bench", "--out", str(_yaml(t, "x"))]), 2,
                            "not a directory"),
    "reproduce-out-is-a-file": (
        lambda t, g, c: partial(main, ["reproduce", "table1", "--budget", "smoke", "--out", str(_yaml(t, "x"))]), 2,
        "not a directory"),
}


@pytest.mark.parametrize("name", list(CATALOGUE_2))
def test_bad_input_catalogue_second_pass(name, good_run, cut_run, tmp_path, monkeypatch, capsys):
    setup, expected, fragment = CATALOGUE_2[name]
    _run_case(name, setup, expected, fragment, {"good": good_run, "cut": cut_run}, tmp_path, monkeypatch, capsys)


# =========================================================================================================
# (g) what a user may do to a run directory (docs/run-directory.md): a finished run keeps working
# without `last`, and without any weights it still counts as finished


def test_a_finished_run_without_last_is_finished_everywhere(cfg, good_run, tmp_path, capsys):
    from robustfeat import reproduce as rp
    from robustfeat.train import finished_step

    published = _copy_run(tmp_path, good_run, drop=(LAST,), name="published")  # as under results/*/runs/
    bare = _copy_run(tmp_path, good_run, drop=("checkpoints",), name="bare")  # records only
    for run in (published, bare):
        assert finished_step(run, cfg.optim.steps) == 6
        assert rp.run_state(run, cfg) == ("done", 6)  # never trained again by reproduce
        assert rp.run_record(run, cfg)["step"] == 6
    before = _snapshot(tmp_path)
    msg = _assert_refused("resume", _resume_cli(published), 2, capsys, "finished at step 6")
    assert "robustfeat eval" in msg
    assert _snapshot(tmp_path) == before
    # eval and load_model need only best and config.yaml
    assert torch.equal(next(load_model(published).parameters()), next(load_model(good_run).parameters()))
    res = evaluate_run_quick(published)
    assert res["model"]["checkpoint"].endswith(BEST) and (published / "eval" / "eval.json").is_file()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(bare)


def evaluate_run_quick(run: Path) -> dict:
    from robustfeat.eval import evaluate_run

    return evaluate_run(run, n=10, progress=False, batch_size=10)


def test_resuming_a_finished_run_writes_nothing(cfg, splits, good_run, tmp_path, capsys):
    run = _copy_run(tmp_path, good_run)
    before = _snapshot(run)
    res = train(cfg, run, splits=splits, progress=False, resume=True)
    assert res.step == 6 and "already finished" in res.note
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert _snapshot(run) == before


def test_an_unfinished_run_with_nothing_to_lose_restarts_from_step_0(cfg, splits, tmp_path):
    """Killed before its first checkpoint (config.yaml, run.json and metrics of the first steps only):
    --resume starts at step 0, and the result is the run that never stopped."""
    run = tmp_path / "r"
    train(cfg, run, splits=splits, progress=False, stop_after=2)
    (run / LAST).unlink()  # what a kill before the first checkpoint leaves (plus metrics lines)
    recs = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**recs, "sessions": []}))
    assert train(cfg, run, splits=splits, progress=False, resume=True).step == 6
    assert [json.loads(s)["step"] for s in _metrics_lines(run) if '"train"' in s] == [1, 2, 3, 4, 5, 6]


def test_a_packaged_preset_file_works_as_config():
    from importlib import resources

    path = resources.files("robustfeat") / "presets" / "cifar10-at.yaml"
    assert load_config(path=str(path), budget="cpu") == load_config("cifar10-at", "cpu")


# =========================================================================================================
# (h) interruptions: SIGINT / SIGTERM stop at a step boundary with `last` saved there and the session
# recorded; a resumed run ends bit-identical to one that never stopped


class _Signal(Extension):
    """Sends ``signum`` to this process ``times`` times at the end of step ``at`` (1-based)."""

    def __init__(self, at: int, signum: int, times: int = 1):
        self.at, self.signum, self.times = at, signum, times

    def after_update(self, run, batch):
        if batch.step + 1 == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


def _assert_same_run(a: Path, b: Path) -> None:
    for f in (LAST, BEST):
        ta, tb = _all_tensors(a / f), _all_tensors(b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert _strip(_metrics_lines(a)) == _strip(_metrics_lines(b))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_last_where_it_stopped_and_the_run_resumes_exactly(cfg, splits, good_run, tmp_path,
                                                                         signum, code, capsys):
    run, handler = tmp_path / "r", signal.getsignal(signum)
    with pytest.raises(Interrupted) as ei:  # step 2: between the validations (3, 6)
        train(cfg, run, splits=splits, progress=False, extensions=[_Signal(2, signum)])
    assert ei.value.exit_code == code and "--resume" in str(ei.value) and "\n" not in str(ei.value)
    assert read_checkpoint(run / LAST)[1]["step"] == 2
    (session,) = json.loads((run / "run.json").read_text())["sessions"]
    assert (session["from_step"], session["to_step"]) == (0, 2) and session["ended"].startswith("interrupted")
    assert signal.getsignal(signum) is handler  # the handler of before the run is back
    train(cfg, run, splits=splits, progress=False, resume=True)
    _assert_same_run(run, good_run)
    assert [s["ended"] for s in json.loads((run / "run.json").read_text())["sessions"]] == [
        session["ended"], "finished"]


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(cfg, splits, good_run, tmp_path):
    run = tmp_path / "r"
    with pytest.raises(Interrupted, match="second SIGINT.*holds step 3") as ei:
        train(cfg, run, splits=splits, progress=False, extensions=[_Signal(5, signal.SIGINT, times=2)])
    assert ei.value.exit_code == 130
    assert read_checkpoint(run / LAST)[1]["step"] == 3
    (session,) = json.loads((run / "run.json").read_text())["sessions"]
    assert session["to_step"] == 3 and session["ended"] == "interrupted (SIGINT)"
    train(cfg, run, splits=splits, progress=False, resume=True)
    _assert_same_run(run, good_run)


def test_a_signal_during_start_up_leaves_nothing_and_does_not_advise_resume(tmp_path, monkeypatch, capsys):
    real = train_mod.build_splits

    def interrupted(*a, **k):
        signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "build_splits", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "demo", "--out", str(tmp_path / "o"), "--quiet", *TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was trained" in err[0] and "--resume" not in err[0]
    assert list(tmp_path.iterdir()) == []
