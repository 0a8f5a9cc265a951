"""The tools under scripts/ on tiny run directories built here (no training, no data, a second or two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def _eval_row(rid: str, n: int, accuracy: float) -> dict:
    return {"id": rid, "n": n, "accuracy": accuracy}


def make_run(root: Path, name: str, *, seed: int, val_pgd: list[float], test_pgd: float, ci: tuple[float, float],
             threads: int = 2, sessions: int = 1, grad_align: float | None = None,
             full: tuple[int, float, float] | None = None) -> Path:
    """A run directory with the files a finished, evaluated robustfeat run has (the parts the script reads)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: mnist-at-reg\nrun:\n  seed: {seed}\n  device: auto\n")
    (run / "run.json").write_text(json.dumps({"sessions": [
        {"git_revision": f"abcdef{i}0123456789", "machine": {"threads": threads}, "wall_seconds": 600.0}
        for i in range(sessions)]}))
    recs = []
    for i, acc in enumerate(val_pgd, start=1):
        step = 1000 * i
        for s in (step - 500, step):
            rec = {"kind": "train", "step": s, "loss": 1.0}
            if grad_align is not None:
                rec["grad_align"] = grad_align + (0.01 if s % 1000 else -0.01)
            recs.append(rec)
        recs.append({"kind": "eval", "step": step, "split": "val", "pgd_acc": acc, "clean_acc": 0.98,
                     "wall_s": 60.0 * i})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "eval" / "eval.json").write_text(json.dumps(
        {"clean_acc": 0.9884, "pgd_acc": test_pgd, "pgd_acc_ci95": list(ci)}))
    if full is not None:
        n, pgd, aa = full
        (run / "eval-full").mkdir()
        (run / "eval-full" / "eval.json").write_text(json.dumps({"rows": [
            _eval_row("natural", n, 0.99), _eval_row("whitebox/pgd-40", n, pgd), _eval_row("autoattack", n, aa)]}))
    return run


def test_seed_table_rows_and_summary(tmp_path):
    a = make_run(tmp_path, "A-seed0", seed=0, val_pgd=[0.5, 0.9, 0.88], test_pgd=0.9408, ci=(0.936, 0.9453),
                 grad_align=0.98, full=(300, 0.93, 0.8167))
    b = make_run(tmp_path, "B-seed3", seed=3, val_pgd=[0.4, 0.85, 0.869], test_pgd=0.8714, ci=(0.8647, 0.8778),
                 threads=1, sessions=2)
    res = _run("seed_table.py", a, b)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("| run | seed | threads | rev | training | validation first >= 89% (step, min) |")
    assert lines[2] == ("| `A-seed0` | 0 | 2 | abcdef0 | 10.0 min | 2,000, 2.0 min | 90.0% (2,000) | 98.84% "
                        "| **94.08%** (93.60-94.53) | 0.98 | 93.00 / 81.67% (300) |")
    # never at the target on validation, resumed once, no GradAlign term, no full evaluation
    assert lines[3] == ("| `B-seed3` | 3 | 1 | abcdef1 | 20.0 min (resumed) | never | 86.9% (3,000) | 98.84% "
                        "| **87.14%** (86.47-87.78) | - | - |")
    assert lines[-1] == "2 runs: test PGD-40 mean 90.61%, min 87.14%, max 94.08%; 1 of 2 at or above 89%."


def test_seed_table_target(tmp_path):
    a = make_run(tmp_path, "A", seed=0, val_pgd=[0.5, 0.9], test_pgd=0.9408, ci=(0.936, 0.9453))
    res = _run("seed_table.py", a, "--target", "0.95")
    assert res.returncode == 0, res.stderr
    assert "validation first >= 95% (step, min)" in res.stdout
    assert "| never |" in res.stdout
    assert res.stdout.splitlines()[-1].endswith("0 of 1 at or above 95%.")


def _per_example(run: Path, flags: list[int], indices: list[int], eval_dir: str = "eval") -> None:
    (run / eval_dir).mkdir(parents=True, exist_ok=True)
    save_file({"whitebox.pgd-40": torch.tensor(flags, dtype=torch.uint8),
               "natural": torch.ones(len(flags), dtype=torch.uint8),
               "indices": torch.tensor(indices, dtype=torch.int64)},
              str(run / eval_dir / "per_example.safetensors"))


def test_paired_test_counts_discordant_images_in_index_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # the same 8 test images, stored in different orders: a is robust on images 0-5, b on 0-2 and 7
    _per_example(a, [1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7])
    _per_example(b, [1, 0, 0, 0, 0, 1, 1, 1], [7, 6, 5, 4, 3, 2, 1, 0])
    res = _run("paired_test.py", a, b)
    assert res.returncode == 0, res.stderr
    # only a: images 3, 4, 5; only b: image 7 -> n = 4, k = 1: p = 2 * (1 + 4) / 16 = 0.625
    assert res.stdout.strip() == (f"{a}: 75.00%  {b}: 50.00%  robust only under the first 3, "
                                  "only under the second 1, sign test p = 0.62")


def test_paired_test_refuses_other_images_and_unknown_rows(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _per_example(a, [1, 0], [0, 1])
    _per_example(b, [1, 0], [0, 2])
    res = _run("paired_test.py", a, b)
    assert res.returncode == 1 and "different test images" in res.stderr
    res = _run("paired_test.py", a, a, "--row", "autoattack")
    assert res.returncode == 1 and "no row 'autoattack'" in res.stderr and "whitebox/pgd-40" in res.stderr
    res = _run("paired_test.py", a, tmp_path / "missing")
    assert res.returncode == 1 and "no such file" in res.stderr


@pytest.mark.parametrize(("only_a", "only_b", "p"), [(0, 0, 1.0), (5, 5, 1.0), (0, 10, 2 / 1024), (1, 3, 0.625)])
def test_sign_test_p(only_a, only_b, p):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import paired_test
    finally:
        sys.path.remove(str(SCRIPTS))
    assert paired_test.sign_test_p(only_a, only_b) == pytest.approx(p)


def test_gpu_check_tiny_mode_runs_every_stage(tmp_path):
    """benchmarks/gpu_check.sh --tiny: the GPU acceptance run at toy sizes on the CPU, so it does not rot."""
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHON"] = sys.executable
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny"], env=env,
                         capture_output=True, text=True, timeout=1200, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == dict.fromkeys(["env", "tests", "bench-main", "slice-paper", "eval-paper", "bench-compile-cg",
                                    "concurrent"], "ok")
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["tests"]["counts"]["failures"] == 0 and stages["tests"]["counts"]["tests"] >= 3
    assert "mnist-at-reg ours-compile-cg batch 4" in stages["bench-compile-cg"]["rates"]
    sl = summary["slices"]["slice-paper"]
    assert sl["data"].startswith("synthetic") and sl["paper_steps"] == 80_000 and sl["extrapolated_s"] > 0
    assert {"natural", "whitebox/pgd-2"} <= set(stages["eval-paper"]["accuracy"])  # the slice's eval_attack.steps=2
    assert len(stages["concurrent"]["process_rates"]) == 2
    readme = (out / "README.md").read_text()
    assert "extrapolates to" in readme and "| bench-compile-cg | ok |" in readme
    # every file small, and no checkpoint left behind
    files = [p for p in out.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 100_000
    # (evaluation caches, state/ and autoattack/, are per-batch flags, not weights)
    assert all(p.name == "per_example.safetensors" or p.parent.name in ("state", "autoattack")
               for p in out.rglob("*.safetensors"))


def test_gpu_check_usage_errors():
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2 and res.stderr.startswith("usage: benchmarks/gpu_check.sh OUTDIR")


def test_gpu_check_subset_writes_a_cifar10_robustfeat_reads(tmp_path):
    import numpy as np

    from robustfeat.data import load_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    g = np.random.default_rng(0)
    x_train, x_test = (g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (20, 10))
    np.savez(src / "cifar10_lossless.npz", x_train=x_train, y_train=np.arange(20) % 10, x_test=x_test,
             y_test=np.arange(10), label_names=np.array([f"c{i}" for i in range(10)]))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "subset", "--data-dir", str(src),
                          "--out", str(out), "--train", "12"], capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr
    ds = load_dataset("cifar10", out, download=False)
    assert len(ds.x_train) == 12 and len(ds.x_test) == 10 and ds.classes[3] == "c3"
    assert np.array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), x_train[:12])
    assert np.array_equal(ds.y_train.numpy(), np.arange(12) % 10)
    assert "first 12 training images" in (out / "cifar10" / "SUBSET.md").read_text()
