"""Data-parallel training: 2 gloo CPU processes under torchrun equal 1 process with the same global batch.

The model is the BN-free MNIST CNN, so the only difference between the runs is the order of float
reductions (a 10-row shard instead of 20 rows in the convolution/GEMM kernels, then a 2-way all-reduce).
The schedule uses SGD: Adam divides each gradient entry by sqrt(v) + 1e-8, so a 1e-9 rounding
difference on an entry whose gradient is itself ~1e-9 becomes a step of up to lr in that entry
(measured: 1e-3 = lr with the demo's Adam, against 1.5e-8 with SGD below). That is a property of
Adam on near-zero gradients, not of the sharding, which the SGD run pins down to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustfeat.attacks import pgd, start_noise
from robustfeat.build import build_splits
from robustfeat.config import load_config
from robustfeat.distributed import Dist, DistributedError, convert_sync_batchnorm
from robustfeat.models import create_model
from robustfeat.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src")

TINY = [
    "data.train_size=400", "data.val_size=100", "optim.batch_size=20", "optim.steps=6", "optim.milestones=[]",
    "optim.name=sgd", "optim.lr=0.05",
    "attack.steps=2", "attack.step_size=0.15", "attack.eps_warmup_examples=60",
    "eval_attack.steps=2", "eval_attack.step_size=0.15",
    "run.eval_every=3", "run.eval_size=40", "run.log_every=2",
]
TOL = 1e-6  # measured on 2 CPU cores: 1.5e-8 (largest |difference| of any weight)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-5000:]
    return out


def _torchrun(args: list[str], cwd: Path) -> str:
    return _wait(_start_torchrun(args, cwd))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "checkpoints/last.safetensors")).items()
            if k.startswith("model.")}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process run (in this process) and one 2-process run through the CLI, same config."""
    root = tmp_path_factory.mktemp("ddp")
    proc = _start_torchrun(["-m", "robustfeat", "train", "--preset", "demo", "--out", str(root / "two"),
                            "--quiet", *TINY], cwd=root)
    try:
        cfg = load_config("demo", overrides=TINY)
        train(cfg, root / "one", splits=build_splits(cfg), progress=False)
    finally:
        out = _wait(proc)
    return root, out


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    root, _ = runs
    a, b = _weights(root / "one"), _weights(root / "two")
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= TOL, f"largest weight difference {worst:.3g}"
    one, two = _metrics(root / "one"), _metrics(root / "two")
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for r1, r2 in zip(one, two, strict=True):
        for k in ("loss", "ce", "reg", "adv_acc", "clean_acc", "pgd_acc", "examples"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], abs=1e-5), (r1, r2)


def test_rank_zero_alone_writes_the_run_directory(runs):
    root, out = runs
    assert out.count("done: step 6") == 1  # printed by rank 0 only
    two = root / "two"
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 5  # 3 train + 2 eval records, none written twice
    assert len(json.loads((two / "run.json").read_text())["sessions"]) == 1


def test_resume_under_two_processes_is_exact(runs, tmp_path):
    root, _ = runs
    script = tmp_path / "cut.py"
    script.write_text(textwrap.dedent(f"""
        from robustfeat.config import load_config
        from robustfeat.train import train
        train(load_config("demo", overrides={TINY!r}), {str(tmp_path / "cut")!r}, progress=False, stop_after=4)
    """))
    _torchrun([str(script)], cwd=tmp_path)  # stops at step 4, between two evaluations
    assert json.loads((tmp_path / "cut/run.json").read_text())["sessions"][0]["to_step"] == 4
    _torchrun(["-m", "robustfeat", "train", "--resume", str(tmp_path / "cut"), "--quiet"], cwd=tmp_path)
    a, b = _weights(root / "two"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("examples_per_s", "wall_s")} for r in recs]
    assert strip(_metrics(root / "two")) == strip(_metrics(tmp_path / "cut"))


GUARDED = [*TINY, "run.eval_every=1", "run.rollback_drop=0.1", "run.restart_below=0.2"]
# the validation numbers, scripted (only rank 0 validates): step 1 is dead (a restart), step 4 falls
# 0.2 below the best of step 3 (a rollback); the guards' decisions must reach every rank
GUARD_SCRIPT = textwrap.dedent("""
    import importlib, sys
    from robustfeat.config import load_config
    from robustfeat.train import train
    clean, pgd = [0.1, 0.9, 0.9, 0.9, 0.9, 0.9], [0.1, 0.5, 0.6, 0.4, 0.55, 0.7]
    calls = []
    def scripted(*args, **kwargs):
        calls.append(1)
        return {{"clean_acc": clean[len(calls) - 1], "pgd_acc": pgd[len(calls) - 1]}}
    importlib.import_module("robustfeat.train.loop").evaluate_split = scripted
    train(load_config("demo", overrides={overrides!r}), sys.argv[1], progress=False)
""")


def test_guards_act_on_every_rank(tmp_path):
    """A restart and a rollback under two processes give the one-process run's weights and records."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARD_SCRIPT.format(overrides=GUARDED))
    _torchrun([str(script), str(tmp_path / "two")], cwd=tmp_path)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")})
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    guard = lambda recs: [(r["kind"], r["step"], r.get("to_step")) for r in recs if r["kind"] in ("restart", "rollback")]
    assert guard(one) == guard(two) == [("restart", 1, None), ("rollback", 4, 3)]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= TOL, f"largest weight difference {worst:.3g}"


# ---------------------------------------------------------------------------------------------------------
# pieces, in one process


def test_pgd_with_explicit_start_noise_equals_the_generator_path():
    torch.manual_seed(0)
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    kw = {"eps": 0.3, "step_size": 0.1, "steps": 2, "restarts": 2}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = pgd(model, x, y, generator=g1, **kw)
    noise = start_noise(x.shape, 2, generator=g2)
    assert torch.equal(a, pgd(model, x, y, noise=noise, **kw))
    # a shard's rows of the global draws reproduce the global attack's rows
    b = torch.cat([pgd(model, x[i : i + 3], y[i : i + 3], noise=noise[:, i : i + 3], **kw) for i in (0, 3)])
    assert (a - b).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="noise has shape"):
        pgd(model, x, y, noise=noise[:1], **kw)


def test_sharding_and_its_errors():
    d = Dist(rank=1, world=2)
    assert d.check_batch(20) == 10
    assert torch.equal(d.shard(torch.arange(20)), torch.arange(10, 20))
    with pytest.raises(DistributedError, match="does not divide by the 3 processes"):
        Dist(rank=0, world=3).check_batch(20)
    assert Dist().shard(torch.arange(4)).tolist() == [0, 1, 2, 3]
    model = create_model("resnet", num_classes=10, in_channels=3)
    with pytest.raises(DistributedError, match="needs CUDA"):
        convert_sync_batchnorm(model, Dist(rank=0, world=2))
    assert convert_sync_batchnorm(model, Dist()) is model
