#!/usr/bin/env python3
"""The GPU acceptance run: ``benchmarks/gpu_check.sh OUTDIR`` installs the project and calls ``run``.

    python benchmarks/gpu_check.py run OUTDIR [--tiny] [--device cuda] [--data-dir DIR] [--budget-s 480]
    python benchmarks/gpu_check.py subset --data-dir DIR [--out .data] [--train 7000]   # data for the GPU box

``run`` does, within ``--budget-s`` seconds of wall time (each stage is a subprocess with a timeout, so
one that hangs or crashes costs only its own time):

    env            the machine, torch, CUDA and GPU                          env.json
    tests          the device tests on the device (pytest -m device --slow)  tests.xml, logs/tests.log
    bench-main     robustfeat bench, every paper model: ours, ours-bf16,     bench-main.json/.md
                   textbook (training and PGD evaluation rows)
    slice-paper    a timed slice of cifar10-at-att-reg at the paper budget,  slice-paper.json, runs/paper/
                   its full time extrapolated (80,000 steps + 40 validations)
    eval-paper     the quick suite on that slice's checkpoint                 eval-paper/
    bench-bf16-compile-cg, bench-compile-cg
                   AT-att-reg compiled with CUDA graphs, bf16 and fp32        bench-*.json/.md
    slice-fast     the slice with bf16 + compile + CUDA graphs               slice-fast.json, runs/fast/
    bench-batch512 AT-att-reg at batch 512 (opt-in larger batches)           bench-batch512.json/.md
    bench-bf16-compile  compiled without CUDA graphs                         bench-bf16-compile.json/.md
    concurrent     two bench processes at once on one device                 concurrent.json
    summary        every stage's status, time and key numbers                summary.json, README.md

Every file stays small: logs keep their last 32,000 characters, and the runs' checkpoints are deleted
once evaluated. Data: CIFAR-10 from ``--data-dir`` (official batches or ``cifar10_lossless.npz``, e.g.
the subset ``subset`` writes into the ignored ``.data/``), else synthetic CIFAR-shaped images with
random labels, written to a temporary directory and labelled as such (their times are real, their
accuracies mean nothing). ``--tiny`` does every kind of stage at toy sizes on the CPU (about 35 s of
CPU time; tests/test_scripts.py runs it) so the script does not rot.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("mnist-at", "mnist-at-reg", "cifar10-at", "cifar10-at-att-reg", "cifar10-wide3-at",
                 "cifar10-wide3-at-att-reg")
CASE = "cifar10-at-att-reg"
TARGET_EX_S = 17_000  # the paper's 80,000 steps x 128 in 10 minutes
TARGET_S = 600
DEFAULT_BUDGET_S = 480.0
LOG_TAIL = 32_000
RESERVE_S = 15  # kept for the summary
TINY_CAP_S = 240  # every stage's cap in --tiny mode: toy work, so what it takes is the machine's load

TINY_BENCH = ["--batch", "4", "--attack-steps", "1", "--eval-steps", "1", "--repeats", "2", "--warmup", "0",
              "--steps", "1", "--matmul-size", "128", "--data-size", "16"]
GPU_BENCH = ["--warmup", "3", "--repeats", "3", "--steps", "10"]
TINY_SLICE = ["model.widths=[4,4,8,8]", "optim.batch_size=8", "attack.steps=1", "data.val_size=16",
              "run.eval_size=16", "eval_attack.steps=2"]


# ---------------------------------------------------------------------------------------------------------
# stages as subprocesses


def _tail(text: str) -> str:
    return text if len(text) <= LOG_TAIL else "[... cut ...]\n" + text[-LOG_TAIL:]


class Check:
    """The stages of one acceptance run: their subprocesses, time budget and records."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out, self.args = out, args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.stages: list[dict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def python(self) -> list[str]:
        return [sys.executable]

    def cap(self, gpu_s: float) -> float:
        return TINY_CAP_S if self.args.tiny else gpu_s

    def run(self, name: str, cmd: list[str], cap_s: float, *, min_s: float = 5.0) -> dict:
        """Run ``cmd`` for at most ``cap_s`` seconds (less when the budget is short): its record."""
        limit = min(self.cap(cap_s), self.left())
        rec = {"stage": name, "command": " ".join(cmd), "limit_s": round(limit, 1)}
        if limit < min_s:
            rec.update(status="skipped", note=f"{max(self.left(), 0):.0f} s of the budget left")
            self.stages.append(rec)
            return rec
        t = time.monotonic()
        # own process group: a timeout ends the stage's children too (torchrun, compile workers)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            rec["status"] = "ok" if proc.returncode == 0 else "failed"
            rec["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            rec["status"] = "timeout"
        rec["seconds"] = round(time.monotonic() - t, 1)
        (self.out / "logs" / f"{name}.log").write_text(_tail(output or ""))
        rec["log"] = f"logs/{name}.log"
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
        self.stages.append(rec)
        return rec


def _bench(check: Check, name: str, presets: str, variants: str, extra: list[str], cap_s: float) -> dict:
    """A ``robustfeat bench --json`` stage; its JSON and table land in OUT/<name>.json and .md."""
    a = check.args
    cmd = [*check.python(), "-m", "robustfeat", "bench", "--device", a.device, "--presets", presets,
           "--variants", variants, *extra, "--json"]
    rec = check.run(name, cmd, cap_s)
    log = check.out / "logs" / f"{name}.log"
    if rec["status"] == "ok":
        text = log.read_text()
        report = json.loads(text[text.index("{"):text.rindex("}") + 1])
        from robustfeat.bench import format_table

        (check.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (check.out / f"{name}.md").write_text(f"# {name}\n\n```\n{format_table(report)}\n```\n")
        key = lambda c, v: f"{c['preset']} {v} batch {c['batch']}"
        rec["rates"] = {key(c, v): d["examples_per_s"]["median"] for c in report["cases"] for v, d in c["train"].items()}
        rec["memory_mib"] = {key(c, v): d["max_memory_mib"]
                             for c in report["cases"] for v, d in c["train"].items() if "max_memory_mib" in d}
    return rec


def stage_tests(check: Check) -> None:
    a = check.args
    select = ["-k", "loader or threat_model"] if a.tiny else ["--slow"]
    cmd = [*check.python(), "-m", "pytest", "tests/test_device.py", "-m", "device", "--device", a.device, "-q",
           "-rfEs", "-p", "no:cacheprovider", f"--junit-xml={check.out / 'tests.xml'}", *select]
    rec = check.run("tests", cmd, 170)
    xml = check.out / "tests.xml"
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        rec["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def stage_slice(check: Check, name: str, overrides: list[str], cap_s: float) -> dict:
    a = check.args
    cmd = [*check.python(), str(Path(__file__).resolve()), "slice", str(check.out), "--name", name,
           "--device", a.device, "--tmp", str(check.tmp), "--seconds", str(2 if a.tiny else 25),
           *(["--tiny"] if a.tiny else []), *(["--data-dir", a.data_dir] if a.data_dir else []),
           *[x for o in overrides for x in ("--set", o)]]
    rec = check.run(f"slice-{name}", cmd, cap_s)
    js = check.out / f"slice-{name}.json"
    if js.is_file():
        rec["result"] = json.loads(js.read_text())
    return rec


def stage_eval(check: Check, name: str, cap_s: float) -> None:
    a = check.args
    run_dir = check.out / "runs" / name
    if not (run_dir / "checkpoints" / "last.safetensors").is_file():
        check.stages.append({"stage": f"eval-{name}", "status": "skipped", "note": "no checkpoint of the slice"})
        return
    cmd = [*check.python(), "-m", "robustfeat", "eval", str(run_dir), "--suite", "quick", "--checkpoint", "last",
           "--device", a.device, "--out", str(check.out / f"eval-{name}"), "--quiet",
           *(["--n", "16", "--batch-size", "16"] if a.tiny else []),
           *(["--data-dir", a.data_dir] if a.data_dir else [])]
    rec = check.run(f"eval-{name}", cmd, cap_s)
    js = check.out / f"eval-{name}" / "eval.json"
    if js.is_file():
        rows = json.loads(js.read_text()).get("rows", [])
        rec["accuracy"] = {r["id"]: r["accuracy"] for r in rows}


def stage_concurrent(check: Check, variant: str, n: int) -> None:
    """``n`` bench processes of ``variant`` started together: the sum of their rates (several independent
    runs sharing one device)."""
    a = check.args
    extra = TINY_BENCH if a.tiny else ["--warmup", "3", "--repeats", "3", "--steps", "20"]
    preset = "mnist-at-reg" if a.tiny else CASE
    cmd = [*check.python(), "-m", "robustfeat", "bench", "--device", a.device, "--presets", preset, "--variants",
           variant, *extra, "--no-eval", "--matmul-size", "0", "--json"]
    limit = min(check.cap(120), check.left())
    rec: dict = {"stage": "concurrent", "processes": n, "variant": variant, "command": " ".join(cmd)}
    if limit < 10:
        check.stages.append({**rec, "status": "skipped", "note": f"{max(check.left(), 0):.0f} s left"})
        return
    t = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True) for _ in range(n)]
    rates, status = [], "ok"
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, limit - (time.monotonic() - t)))
            if p.returncode != 0:
                status = "failed"
                continue
            rep = json.loads(out[out.index("{"):out.rindex("}") + 1])
            rates.append(rep["cases"][0]["train"][variant]["examples_per_s"]["median"])
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            status = "timeout"
    rec.update(status=status, seconds=round(time.monotonic() - t, 1), process_rates=rates, total=round(sum(rates), 1),
               note="each process's median over its own timed window; the windows overlap only roughly")
    (check.out / "concurrent.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"[gpu_check] concurrent: {status} in {rec['seconds']} s", flush=True)
    check.stages.append(rec)


def stage_env(check: Check) -> None:
    """The machine, in this process (torch is imported here anyway; CUDA is only queried)."""
    import importlib.util
    import platform

    import torch

    import robustfeat

    t = time.monotonic()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
           "pyautoattack": importlib.util.find_spec("pyautoattack") is not None, "robustfeat": robustfeat.__file__,
           "install": os.environ.get("ROBUSTFEAT_GPU_CHECK_INSTALL", "PYTHONPATH=src (not installed)")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    smi = shutil.which("nvidia-smi")
    if smi and not check.args.tiny:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
        env["nvidia_smi"] = q.stdout.strip()
    (check.out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    check.stages.append({"stage": "env", "status": "ok", "seconds": round(time.monotonic() - t, 1), "env": env})


# ---------------------------------------------------------------------------------------------------------
# the summary


def _fastest(stages: list[dict]) -> tuple[str, float] | None:
    rates = {k: v for s in stages for k, v in (s.get("rates") or {}).items() if k.startswith(CASE + " ")}
    if not rates:
        return None
    best = max(rates, key=rates.get)
    return best, rates[best]


def _stage_line(s: dict) -> str:
    detail = []
    if "counts" in s:
        c = s["counts"]
        detail.append(f"{c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, {c['failures']} failed, "
                      f"{c['errors']} errors, {c['skipped']} skipped")
    if "rates" in s:
        detail.append(", ".join(f"{k}: {v:,.0f} ex/s" for k, v in s["rates"].items() if k.startswith(CASE + " "))
                      or f"{len(s['rates'])} rows")
    if "result" in s:
        r = s["result"]
        detail.append(f"{r['examples_per_s']:,.0f} ex/s, paper budget extrapolated to {r['extrapolated_min']:.1f} min "
                      f"({r['data']})")
    if "accuracy" in s:
        detail.append(", ".join(f"{k} {100 * v:.1f}%" for k, v in s["accuracy"].items()))
    if s.get("process_rates"):
        detail.append(f"{s['processes']} x {s['variant']}: total {s['total']:,.0f} ex/s")
    if s.get("note"):
        detail.append(s["note"])
    secs = f"{s['seconds']:.0f}" if "seconds" in s else "-"
    return f"| {s['stage']} | {s['status']} | {secs} | {'; '.join(detail)} |"


def write_summary(check: Check) -> dict:
    wall = round(time.monotonic() - check.t0, 1)
    fastest = _fastest(check.stages)
    slices = {s["stage"]: s["result"] for s in check.stages if "result" in s}
    summary = {"mode": "tiny" if check.args.tiny else "gpu", "device": check.args.device, "wall_s": wall,
               "budget_s": check.args.budget_s, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "targets": {"train_examples_per_s": TARGET_EX_S, "paper_budget_s": TARGET_S},
               "fastest": {"row": fastest[0], "examples_per_s": fastest[1], "meets_target": fastest[1] >= TARGET_EX_S}
               if fastest else None,
               "slices": slices, "stages": check.stages}
    (check.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# GPU acceptance run ({summary['mode']}, device {check.args.device})", "",
             (f"{summary['date']}; {wall:.0f} s of a {check.args.budget_s:.0f} s budget. Every number is in "
              "summary.json; bench tables in bench-*.md; logs in logs/."), ""]
    if fastest:
        lines.append(f"Fastest training row of {CASE} (PGD-5): {fastest[0]} at {fastest[1]:,.0f} examples/s against "
                     f"the target of {TARGET_EX_S:,} ({'met' if fastest[1] >= TARGET_EX_S else 'not met'}).")
    for name, r in slices.items():
        lines.append(f"{name}: {r['examples_per_s']:,.0f} examples/s; the paper budget (80,000 steps, 40 validations) "
                     f"extrapolates to {r['extrapolated_min']:.1f} min against {TARGET_S // 60} min; data: {r['data']}.")
    lines += ["", "| stage | status | s | details |", "|---|---|---|---|", *map(_stage_line, check.stages), ""]
    (check.out / "README.md").write_text("\n".join(lines))
    return summary


def tiny_stages(check: Check) -> None:
    """Every kind of stage once, at toy sizes on the CPU (the compiled variant through aot_eager)."""
    stage_env(check)
    stage_tests(check)
    _bench(check, "bench-main", "mnist-at-reg", "ours,textbook", TINY_BENCH, 0)
    stage_slice(check, "paper", [], 0)
    stage_eval(check, "paper", 0)
    _bench(check, "bench-compile-cg", "mnist-at-reg", "ours-compile-cg",
           [*TINY_BENCH, "--set", "run.compile_backend=aot_eager"], 0)
    stage_concurrent(check, "ours", 2)


def gpu_stages(check: Check) -> None:
    """The acceptance run, most important first; each compiled variant is its own stage (a compilation
    that overruns loses only its own row)."""
    stage_env(check)
    stage_tests(check)
    _bench(check, "bench-main", ",".join(PAPER_PRESETS), "ours,ours-bf16,textbook", GPU_BENCH, 150)
    stage_slice(check, "paper", [], 75)
    stage_eval(check, "paper", 45)
    one_case = [*GPU_BENCH, "--no-eval", "--matmul-size", "0"]
    _bench(check, "bench-bf16-compile-cg", CASE, "ours-bf16-compile-cg", one_case, 150)
    _bench(check, "bench-compile-cg", CASE, "ours-compile-cg", one_case, 120)
    stage_slice(check, "fast", ["run.precision=bf16", "run.compile=true", "run.compile_mode=reduce-overhead"], 100)
    _bench(check, "bench-batch512", CASE, "ours-bf16,ours-bf16-compile-cg", [*one_case, "--batch", "512"], 120)
    _bench(check, "bench-bf16-compile", CASE, "ours-bf16-compile", one_case, 100)
    fast = any(s["stage"] == "bench-bf16-compile-cg" and s["status"] == "ok" for s in check.stages)
    stage_concurrent(check, "ours-bf16-compile-cg" if fast else "ours-bf16", 2)


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir:  # the stages run from the repository root
        args.data_dir = str(Path(args.data_dir).resolve())
    if args.tiny:
        args.device = "cpu" if args.device == "auto" else args.device
        args.budget_s = 4 * TINY_CAP_S if args.budget_s == DEFAULT_BUDGET_S else args.budget_s
    elif args.device == "auto":
        args.device = "cuda"
    check = Check(out, args)
    with tempfile.TemporaryDirectory(prefix="robustfeat-gpu-check-") as tmp:
        check.tmp = Path(tmp)
        (tiny_stages if args.tiny else gpu_stages)(check)
    for ckpt in (out / "runs").glob("*/checkpoints"):  # evaluated: keep the directory small
        shutil.rmtree(ckpt, ignore_errors=True)
    summary = write_summary(check)
    bad = [s["stage"] for s in summary["stages"] if s["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] {out / 'README.md'}; {'all stages ok' if not bad else 'not ok: ' + ', '.join(bad)}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------
# the timed training slice (a stage's subprocess)


def _cifar_splits(args: argparse.Namespace, cfg):
    """(splits, data_dir, label, overrides): CIFAR-10 from --data-dir, else synthetic images in --tmp."""
    import numpy as np

    from robustfeat.build import build_splits
    from robustfeat.data import DataError

    if args.data_dir:
        try:
            return build_splits(cfg, args.data_dir, download=False), args.data_dir, f"CIFAR-10 from {args.data_dir}", []
        except DataError as e:
            print(f"no CIFAR-10 in {args.data_dir} ({e}); using synthetic images", flush=True)
    n_train, n_test = (96, 16) if args.tiny else (50_000, 1_000)
    rng = np.random.default_rng(0)
    path = Path(args.tmp) / "synthetic-cifar10.npz"
    if not path.is_file():
        np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
                 y_train=rng.integers(0, 10, n_train), x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
                 y_test=rng.integers(0, 10, n_test))
    ov = ["data.name=npz", f"data.path={path}"]
    from robustfeat.config import load_config

    cfg2 = load_config(CASE, "paper", overrides=[*_slice_overrides(args), *ov])
    label = f"synthetic ({n_train:,} random images, random labels: accuracies mean nothing)"
    return build_splits(cfg2), None, label, ov


def _slice_overrides(args: argparse.Namespace) -> list[str]:
    return [f"run.device={args.device}", *(TINY_SLICE if args.tiny else []), *(args.set or [])]


def cmd_slice(args: argparse.Namespace) -> int:
    """Train the first steps of a paper-budget run in two sessions (the second resumes the first and is
    timed per step), time one validation, and extrapolate the whole run."""
    import torch

    from robustfeat.build import build_model
    from robustfeat.config import load_config
    from robustfeat.train import Extension, evaluate_split, train

    class StepTimes(Extension):
        """Wall time at the end of each step (the loop's non-finite check synchronizes the device)."""

        def __init__(self):
            self.t: list[float] = []

        def after_update(self, run, batch):
            self.t.append(time.perf_counter())

    out = Path(args.out)
    cfg = load_config(CASE, "paper", overrides=_slice_overrides(args))
    splits, data_dir, label, data_ov = _cifar_splits(args, cfg)
    cfg = load_config(CASE, "paper", overrides=[*_slice_overrides(args), *data_ov])
    run_dir = out / "runs" / args.name
    warm = 3 if args.tiny else 30
    first = StepTimes()
    t = time.perf_counter()
    train(cfg, run_dir, splits=splits, data_dir=data_dir, progress=False, stop_after=warm, extensions=[first])
    first_s = time.perf_counter() - t
    # the second session (a resume) runs for about --seconds at the first session's last rate
    guess = statistics.median(b - a for a, b in itertools.pairwise(first.t[-10:]))
    steps = max(3, min(5000, int(args.seconds / max(guess, 1e-4))))
    timer = StepTimes()
    t = time.perf_counter()
    train(cfg, run_dir, splits=splits, data_dir=data_dir, progress=False, resume=True, stop_after=warm + steps,
          extensions=[timer])
    second_s = time.perf_counter() - t
    step_s = statistics.median(b - a for a, b in itertools.pairwise(timer.t))
    # one validation as the run does it (PGD on run.eval_size validation images), after a warm-up call
    device = torch.device(args.device)
    model = build_model(cfg.model, splits.dataset.num_classes, 3).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_val = min(cfg.run.eval_size or len(splits.y_val), len(splits.y_val))
    evaluate_split(model, cfg, splits.x_val[:n_val], splits.y_val[:n_val], device)
    t = time.perf_counter()
    evaluate_split(model, cfg, splits.x_val[:n_val], splits.y_val[:n_val], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    val_s = time.perf_counter() - t
    validations = cfg.optim.steps // cfg.run.eval_every
    full_s = step_s * cfg.optim.steps + validations * val_s
    res = {"name": args.name, "preset": CASE, "budget": "paper", "overrides": args.set or [], "data": label,
           "batch": cfg.optim.batch_size, "steps_first_session": warm, "first_session_s": round(first_s, 2),
           "steps_timed": steps, "second_session_s": round(second_s, 2), "step_s_median": round(step_s, 5),
           "examples_per_s": round(cfg.optim.batch_size / step_s, 1),
           "validation": {"images": n_val, "attack": f"PGD-{cfg.eval_attack.steps}", "seconds": round(val_s, 3),
                          "count": validations},
           "paper_steps": cfg.optim.steps, "extrapolated_s": round(full_s, 1),
           "extrapolated_min": round(full_s / 60, 2), "target_s": TARGET_S}
    (out / f"slice-{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------------------
# data for the GPU box


def cmd_subset(args: argparse.Namespace) -> int:
    """Write the first ``--train`` training images and the test images of CIFAR-10 (as robustfeat reads
    them from ``--data-dir``) into OUT/cifar10/cifar10_lossless.npz, small enough to travel with the
    repository's ignored files."""
    import numpy as np

    from robustfeat.data import load_dataset

    ds = load_dataset("cifar10", args.data_dir, download=False)
    dest = Path(args.out) / "cifar10"
    dest.mkdir(parents=True, exist_ok=True)
    hwc = lambda t: t[: args.train].permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
    np.savez_compressed(dest / "cifar10_lossless.npz", x_train=hwc(ds.x_train), y_train=ds.y_train[: args.train].numpy(),
                        x_test=ds.x_test.permute(0, 2, 3, 1).contiguous().numpy(), y_test=ds.y_test.numpy(),
                        label_names=np.array(ds.classes))
    (dest / "SUBSET.md").write_text(
        f"A subset of CIFAR-10 for the GPU acceptance run (benchmarks/gpu_check.py subset): the first "
        f"{min(args.train, len(ds.x_train)):,} training images in the order robustfeat reads them from "
        f"{args.data_dir}, and all {len(ds.x_test):,} test images there. Not the whole training set.\n")
    print(dest / "cifar10_lossless.npz", f"{(dest / 'cifar10_lossless.npz').stat().st_size / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole acceptance run into OUT")
    r.add_argument("out")
    r.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (CI)")
    r.add_argument("--device", default="auto", help="auto (cuda; cpu with --tiny), cpu, cuda, cuda:N")
    r.add_argument("--data-dir", help="CIFAR-10 directory (default: none, synthetic images)")
    r.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget of all stages (default {DEFAULT_BUDGET_S:.0f}; {4 * TINY_CAP_S} with --tiny)")
    s = sub.add_parser("slice", help="(a stage) the timed paper-budget slice")
    s.add_argument("out")
    s.add_argument("--name", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--tmp", required=True)
    s.add_argument("--seconds", type=float, default=25.0)
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--data-dir")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    d = sub.add_parser("subset", help="write a CIFAR-10 subset for the GPU box into OUT/cifar10/")
    d.add_argument("--data-dir", required=True)
    d.add_argument("--out", default=str(ROOT / ".data"))
    d.add_argument("--train", type=int, default=7_000, help="training images (default 7,000: 21.6 MiB, which fits beside .whl/ in a 64 MiB carry)")
    args = p.parse_args(argv)
    if args.cmd == "run" and args.budget_s <= RESERVE_S:
        p.error(f"--budget-s={args.budget_s:g} is invalid: expected more than {RESERVE_S} seconds")
    return {"run": cmd_run, "slice": cmd_slice, "subset": cmd_subset}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
