"""``robustfeat bench``: training and evaluation throughput on the current device, against a textbook loop.

For each case (a preset: its model, method, batch, optimizer and training attack, unchanged):

* **train / ours**: the step of ``robustfeat.train`` (on-device uint8 data with batched augmentation,
  channels_last per ``run.channels_last``, attack steps with input gradients only, the non-finite check);
* **train / textbook**: an independent plain implementation of the same step as most public
  adversarial-training code writes it (``textbook_trainer``): a ``DataLoader`` over a dataset with
  per-sample transforms, batches copied to the device each step, default (NCHW) memory layout, PGD
  whose ``loss.backward()`` also computes (and then zeroes) the parameters' gradients, ``loss.item()``
  each step. Same model, batch, optimizer and attack;
* **eval**: PGD with the preset's evaluation attack (PGD-20 on CIFAR, PGD-40 on MNIST) plus the
  final prediction, model in eval mode, keep-best iterates as ``robustfeat eval`` uses them.

Each is warmed up (``--warmup`` steps), then timed ``--repeats`` times over ``--steps`` steps; the
median, min and max examples/s are reported. Floating-point work per example is counted with
``torch.utils.flop_counter.FlopCounterMode`` on one step (attack included; it counts matmuls and
convolutions, i.e. the dense work), giving the achieved GFLOP/s and its ratio to the device's dense
fp32 matrix-multiply rate, measured here by timing an N x N ``torch.mm`` (``--matmul-size``).

Optional variants isolate single choices: ``ours-nchw`` (channels_last off), ``ours-nosync`` (no
per-step ``isfinite`` host sync), ``ours-bf16`` (``run.precision=bf16``: attack and update under bf16
autocast) and ``ours-bf16-attack32`` (bf16 update, fp32 attack: ``run.attack_fp32=true``). With a bf16
variant the bf16 matrix-multiply rate is measured too, and the bf16 rows also report their fraction
of it (on CPUs with AMX it is several times the fp32 rate). The ``-compile`` variants add
``run.compile=true`` (``robustfeat.compiled``: torch.compile of the PGD iteration and the loss) with
mode default; ``-compile-cg`` with mode reduce-overhead, which on CUDA also captures CUDA graphs. A
compiled variant warms up at least 3 steps, and its row records the first step's seconds (the
compilation) as ``first_step_s``; its FLOPs are counted on the eager step of the same settings (the
same arithmetic). ``--profile`` adds the operator profile of one step of the first case.

On CUDA every row also reports the peak memory torch allocated (``max_memory_mib``), and the report
records whether TF32 is allowed for matmuls and cuDNN (PyTorch's defaults: no and yes).

**suites** (``--suite-run RUN_DIR``): throughput of whole evaluation suites (``--suites paper,full``)
on a trained run's checkpoint and ``--suite-n`` of its test images, as ``robustfeat eval`` runs them.
A trained model is needed because the suites' attacks stop on examples once they are broken (an
untrained model falls in a step or two), so the rate depends on how robust the model is: the report
gives clean and robust accuracy beside it, and each row's share of the time.

Data are synthetic uint8 images of the dataset's shape (speed does not depend on pixel values, and
no download is needed), except for the suites. Results: ``--json`` prints JSON; ``--out results/bench`` writes
``<device>-<date>.json`` and ``.md`` with the command, machine, revision and date.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PRESETS = (
    "mnist-at", "mnist-at-reg",
    "cifar10-at", "cifar10-at-att-reg",
    "cifar10-wide3-at", "cifar10-wide3-at-att-reg",
)
DEFAULT_VARIANTS = ("ours", "textbook")
ALL_VARIANTS = ("ours", "ours-nchw", "ours-nosync", "ours-bf16", "ours-bf16-attack32", "ours-compile",
                "ours-bf16-compile", "ours-compile-cg", "ours-bf16-compile-cg", "textbook")
BF16_VARIANTS = {"ours-bf16": False, "ours-bf16-attack32": True, "ours-bf16-compile": False,
                 "ours-bf16-compile-cg": False}
"""bf16 variant -> run.attack_fp32."""
COMPILE_VARIANTS = {"ours-compile": "default", "ours-bf16-compile": "default",
                    "ours-compile-cg": "reduce-overhead", "ours-bf16-compile-cg": "reduce-overhead"}
"""compiled variant -> run.compile_mode."""


# ---------------------------------------------------------------------------------------------------------
# timing helpers


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {"median": round(med, 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "spread": round((max(values) - min(values)) / med, 4) if med else 0.0, "n": len(values)}


def time_throughput(step: Callable[[int], Any], examples_per_step: int, device, *, warmup: int, repeats: int,
                    steps: int) -> dict[str, float]:
    """examples/s of ``step(i)`` for i = 0, 1, ...: ``warmup`` untimed steps, then ``repeats`` timings of
    ``steps`` steps each (device synchronized around each timing)."""
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    _sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step(i)
            i += 1
        _sync(device)
        rates.append(steps * examples_per_step / (time.perf_counter() - t0))
    return _stats(rates)


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: its backward hooks break ``torch.autograd.grad``
    with respect to a leaf input (what PGD does), and only the global total is needed here."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and convolutions, forward and backward),
    with ``torch.utils.flop_counter``'s formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(device, n: int = 2048, repeats: int = 5, warmup: int = 2, dtype: str = "float32"
                  ) -> dict[str, Any]:
    """Dense matrix-multiply rate of ``device`` in ``dtype`` (float32 or bfloat16): GFLOP/s of
    ``torch.mm`` on n x n matrices."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, generator=g).to(dt)
    b = torch.randn(n, n, device=device, generator=g).to(dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    _sync(device)
    rates = []
    inner = max(1, int(4e9 // (2 * n**3))) if device.type == "cuda" else 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        _sync(device)
        rates.append(inner * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "dtype": dtype, "gflops": _stats(rates)}


# ---------------------------------------------------------------------------------------------------------
# the two training steps


def _synthetic(cfg, n: int, seed: int = 0):
    import torch

    shape = (1, 28, 28) if cfg.data.name.startswith("mnist") else (3, 32, 32)
    classes = 100 if cfg.data.name == "cifar100" and not cfg.data.coarse_labels else (
        20 if cfg.data.name == "cifar100" else 10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, classes


def our_trainer(cfg, x_u8, y, num_classes: int, device, *, channels_last: bool | None = None,
                sync: bool = True, precision: str | None = None, attack_fp32: bool | None = None,
                compile: bool | None = None, compile_mode: str | None = None):
    """(model, step) with ``step(i)`` = one step of ``robustfeat.train`` at full attack strength;
    ``precision``, ``attack_fp32``, ``compile`` and ``compile_mode`` override the ``run.*`` keys of those
    names (None: the config's)."""
    import dataclasses

    import torch

    from .build import build_model, training_autocast
    from .compiled import StepFunctions
    from .data import DeviceLoader
    from .methods import METHODS
    from .seeding import derived_seed
    from .train import ATTACK_STREAM, make_optimizer

    cl = cfg.run.channels_last if channels_last is None else channels_last
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, x_u8.shape[1]).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    loader = DeviceLoader(x_u8, y, batch_size=cfg.optim.batch_size, device=device, augment=cfg.data.augment,
                          seed=0, channels_last=cl)
    spec = METHODS.get(cfg.method.name)
    lam = cfg.lam
    gen = torch.Generator(device=device)
    run = dataclasses.replace(
        cfg.run, precision=cfg.run.precision if precision is None else precision,
        attack_fp32=cfg.run.attack_fp32 if attack_fp32 is None else attack_fp32,
        compile=cfg.run.compile if compile is None else compile,
        compile_mode=cfg.run.compile_mode if compile_mode is None else compile_mode)
    fns = StepFunctions(run)

    def step(i: int) -> None:
        model.train()
        fns.begin_step()
        x, yb = loader.batch(i)
        x_adv = None
        if spec.adversarial:
            gen.manual_seed(derived_seed(0, ATTACK_STREAM, i))
            with training_autocast(run, device, attack=True):
                x_adv = fns.adversary(model, x, yb, cfg.attack, generator=gen)
        model.train()
        with training_autocast(run, device):
            loss, _ = fns.loss(model, x, x_adv, yb, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync and not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        opt.step()

    return model, step


class _PerSampleDataset:
    """A map-style dataset of uint8 CHW images with a per-sample transform (the usual torchvision way)."""

    def __init__(self, x_u8, y, transform):
        self.x, self.y, self.transform = x_u8, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), int(self.y[i])


def _to_tensor(img):
    return img.float() / 255.0


def _crop_flip(img, pad: int = 4):
    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    top = int(torch.randint(0, 2 * pad + 1, (1,)))
    left = int(torch.randint(0, 2 * pad + 1, (1,)))
    out = padded[:, top : top + h, left : left + w]
    if torch.rand(1).item() < 0.5:
        out = out.flip(2)
    return out


def textbook_trainer(cfg, x_u8, y, num_classes: int, device, workers: int = 0):
    """(model, step): the plain adversarial-training step of typical public code, same model and attack."""
    import torch
    import torch.nn.functional as F

    from .build import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, x_u8.shape[1]).to(device)
    params = list(model.parameters())
    wd = [p for p in params if p.ndim > 1]
    nd = [p for p in params if p.ndim <= 1]
    groups = [{"params": wd, "weight_decay": cfg.optim.weight_decay}, {"params": nd, "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.optim.lr)

    def transform(img):
        img = _to_tensor(img)
        return _crop_flip(img) if cfg.data.augment else img

    ds = _PerSampleDataset(x_u8, y, transform)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                                     num_workers=workers)
    a = cfg.attack
    lam = cfg.lam
    regularized = cfg.method.name in ("at-reg", "at-att-reg") and lam > 0
    state = {"it": iter(dl)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(dl)
            return next(state["it"])

    def attack(x, yb):
        x_adv = x + torch.empty_like(x).uniform_(-a.eps, a.eps) if a.random_start else x.clone()
        x_adv = torch.clamp(x_adv, 0, 1)
        for _ in range(a.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), yb)
            model.zero_grad()
            loss.backward()  # parameters' gradients are computed too, then thrown away
            with torch.no_grad():
                x_adv = x_adv + a.step_size * x_adv.grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - a.eps), x + a.eps).clamp(0, 1)
        return x_adv.detach()

    def step(i: int) -> float:
        model.train()
        x, yb = next_batch()
        x, yb = x.to(device), yb.to(device)
        x_adv = attack(x, yb) if cfg.method.name != "natural" else x
        feats_adv = model.forward_features(x_adv)
        loss = F.cross_entropy(model.forward_head(feats_adv), yb)
        if regularized:
            feats = model.forward_features(x)
            loss = loss + lam * (feats - feats_adv).norm(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


# ---------------------------------------------------------------------------------------------------------
# one case


def _eval_step(model, cfg, x_u8, y, device, batch: int, channels_last: bool):
    import torch

    from .attacks import attack_from_config
    from .data import to_float_images

    xb = to_float_images(x_u8[:batch], device, channels_last)
    yb = y[:batch].to(device)
    gen = torch.Generator(device=device)

    def step(i: int) -> None:
        model.eval()
        gen.manual_seed(i)
        x_adv = attack_from_config(model, xb, yb, cfg.eval_attack, generator=gen, keep_best=True)
        with torch.no_grad():
            model(x_adv).argmax(1)

    return step


def _case_config(preset: str, batch: int | None, attack_steps: int | None, eval_steps: int | None,
                 overrides: list[str] | None):
    from .config import load_config

    ov = list(overrides or [])
    if batch:
        ov.append(f"optim.batch_size={batch}")
    if attack_steps is not None:
        ov.append(f"attack.steps={attack_steps}")
    if eval_steps is not None:
        ov.append(f"eval_attack.steps={eval_steps}")
    return load_config(preset, overrides=ov)


def _achieved(flops_per_example: float, rate: dict[str, float], peak: float | None) -> dict[str, Any]:
    """GFLOP/s at the median rate, and its fraction of the matmul ``peak`` when there is one."""
    out = {"gflops": round(flops_per_example * rate["median"] / 1e9, 2)}
    if peak:
        out["peak_fraction"] = round(out["gflops"] / peak, 4)
    return out


def _compare(t: dict[str, dict], peak: float | None, peak_bf16: float | None) -> None:
    """Rates of every variant against our step's FLOPs (the useful work) and speedups between variants."""
    if "ours" in t:  # achieved rates are of the useful work: our step's FLOPs
        useful = t["ours"]["flops_per_example"]
        for row in t.values():
            row.update(_achieved(useful, row["examples_per_s"], peak))
            row["useful_flops_per_example"] = useful
        for v, row in t.items():
            if v != "ours":
                t["ours"][f"speedup_vs_{v}"] = round(t["ours"]["examples_per_s"]["median"]
                                                    / row["examples_per_s"]["median"], 3)
    for v, row in t.items():
        if v in BF16_VARIANTS and peak_bf16:
            row["bf16_peak_fraction"] = round(row["gflops"] / peak_bf16, 4)
        if v in BF16_VARIANTS or v in COMPILE_VARIANTS:
            for base in ("textbook", "ours"):
                if base in t:
                    row[f"speedup_vs_{base}"] = round(row["examples_per_s"]["median"]
                                                      / t[base]["examples_per_s"]["median"], 3)


def _trainer(v: str, cfg, x_u8, y, classes: int, device, workers: int, *, eager: bool = False):
    """The variant's (model, step); ``eager``: the same settings without compilation."""
    if v == "textbook":
        return textbook_trainer(cfg, x_u8, y, classes, device, workers=workers)
    bf16 = v in BF16_VARIANTS
    compile = False if eager else (True if v in COMPILE_VARIANTS else None)
    return our_trainer(cfg, x_u8, y, classes, device, channels_last=False if v == "ours-nchw" else None,
                       sync=v != "ours-nosync", precision="bf16" if bf16 else None,
                       attack_fp32=BF16_VARIANTS.get(v), compile=compile, compile_mode=COMPILE_VARIANTS.get(v))


def _peak_memory_mib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def bench_train_variant(v: str, cfg, x_u8, y, classes: int, device, *, warmup: int, repeats: int, steps: int,
                        workers: int, peak: float | None):
    """(model, row) of one training variant: examples/s, FLOPs, first-step seconds, peak memory."""
    b = cfg.optim.batch_size
    compiled = v in COMPILE_VARIANTS or (cfg.run.compile and v != "textbook")
    if compiled:  # a fresh compile cache per compiled model (torch.compile's per-function recompile limit)
        from .compiled import reset

        reset()
    model, step = _trainer(v, cfg, x_u8, y, classes, device, workers)
    t0 = time.perf_counter()
    step(0)  # the first step (compilation, for a compiled variant)
    _sync(device)
    first = time.perf_counter() - t0
    if compiled:  # FLOPs of the same arithmetic, counted on the eager step (the counter sees no compiled kernels)
        _, counted = _trainer(v, cfg, x_u8, y, classes, device, workers, eager=True)
    else:
        counted = step
    flops = count_flops(lambda: counted(10_000)) / b
    _reset_peak_memory(device)  # the peak of the timed steps: model, optimizer, data and one step's tensors
    rate = time_throughput(lambda i: step(i + 1), b, device, warmup=max(warmup, 3) if compiled else warmup,
                           repeats=repeats, steps=steps)
    row = {"examples_per_s": rate, "flops_per_example": round(flops), **_achieved(flops, rate, peak),
           "first_step_s": round(first, 3)}
    mem = _peak_memory_mib(device)
    if mem is not None:
        row["max_memory_mib"] = mem
    return model, row


def bench_case(preset: str, device, *, variants, warmup: int, repeats: int, steps: int, batch: int | None,
               attack_steps: int | None, eval_steps: int | None, do_eval: bool, data_size: int,
               workers: int, peak: float | None, overrides: list[str] | None = None,
               peak_bf16: float | None = None) -> dict[str, Any]:
    cfg = _case_config(preset, batch, attack_steps, eval_steps, overrides)
    b = cfg.optim.batch_size
    x_u8, y, classes = _synthetic(cfg, max(data_size, 2 * b))
    a, ea = cfg.attack, cfg.eval_attack
    case: dict[str, Any] = {
        "preset": preset, "model": cfg.model.name, "method": cfg.method.name, "lam": cfg.lam, "batch": b,
        "optimizer": cfg.optim.name, "augment": cfg.data.augment, "channels_last": cfg.run.channels_last,
        "attack": {"steps": a.steps, "eps": round(a.eps, 6), "step_size": round(a.step_size, 6),
                   "bn_mode": a.bn_mode},
        "train": {},
    }
    ours_model = None
    for v in variants:
        model, case["train"][v] = bench_train_variant(v, cfg, x_u8, y, classes, device, warmup=warmup,
                                                      repeats=repeats, steps=steps, workers=workers, peak=peak)
        if v == "ours":
            ours_model = model
    _compare(case["train"], peak, peak_bf16)
    if do_eval:
        if ours_model is None:
            ours_model, _ = our_trainer(cfg, x_u8, y, classes, device)
        eb = min(max(b, 200), len(x_u8))
        step = _eval_step(ours_model, cfg, x_u8, y, device, eb, cfg.run.channels_last)
        flops = count_flops(lambda: step(0)) / eb
        _reset_peak_memory(device)
        rate = time_throughput(step, eb, device, warmup=max(1, min(warmup, 2)), repeats=repeats,
                               steps=max(1, steps // 2))
        case["eval"] = {"attack": f"PGD-{ea.steps}", "restarts": ea.restarts, "batch": eb,
                        "examples_per_s": rate, "flops_per_example": round(flops), **_achieved(flops, rate, peak)}
        mem = _peak_memory_mib(device)
        if mem is not None:
            case["eval"]["max_memory_mib"] = mem
    return case


def bench_suites(run_dir: str, suites: list[str], n: int, device, seed: int = 0) -> list[dict[str, Any]]:
    """Examples/s of each evaluation suite on ``n`` test images of a trained run (the suite's own time:
    loading the run and data excluded); nothing is kept, every suite starts from nothing."""
    import tempfile

    from .eval.run import evaluate_run

    out = []
    for suite in suites:
        with tempfile.TemporaryDirectory() as tmp:
            res = evaluate_run(run_dir, suite=suite, n=n, device=str(device), progress=False, out_dir=tmp, seed=seed)
        sec = res["settings"]["seconds"]
        out.append({"suite": suite, "run": str(run_dir), "n": res["n"], "seconds": sec,
                    "examples_per_s": round(res["n"] / sec, 3) if sec else None, "clean_acc": res["clean_acc"],
                    "robust_acc": res.get("robust_acc"),
                    "row_seconds": {r["id"]: r["seconds"] for r in res["rows"] if r["seconds"]}})
    return out


def profile_step(preset: str, device, overrides: list[str], row_limit: int = 20) -> str:
    """torch.profiler table (self time) of 3 steps of our training step, after 2 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    from .config import load_config

    cfg = load_config(preset, overrides=overrides)
    x_u8, y, classes = _synthetic(cfg, 2 * cfg.optim.batch_size)
    _, step = our_trainer(cfg, x_u8, y, classes, device)
    step(0)
    step(1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(2, 5):
            step(i)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


# ---------------------------------------------------------------------------------------------------------
# report


_MINIMUM = {"warmup": 0, "repeats": 1, "steps": 1, "batch": 1, "attack_steps": 0, "eval_steps": 1,
            "data_size": 1, "workers": 0, "matmul_size": 0, "threads": 0}
"""The least value of each numeric option (None, where allowed, means the preset's)."""


def check_args(args) -> tuple[list[str], list[str]]:
    """(presets, variants) of ``robustfeat bench``'s options, after refusing what would time nothing or
    report a number of something else: counts below their minimum, unknown presets and variants,
    overrides the presets refuse, an --out that is a file. Nothing runs before this."""
    from .config import ConfigError, as_overrides, list_presets, load_config

    for name, lo in _MINIMUM.items():
        v = getattr(args, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid: expected an integer >= {lo}")
    presets = [p.strip() for p in str(args.presets).split(",") if p.strip()]
    variants = [v.strip() for v in str(args.variants).split(",") if v.strip()]
    if not variants or not (presets or getattr(args, "suite_run", None)):
        # no training preset is fine when only evaluation suites are timed (--suite-run)
        raise ConfigError("--presets and --variants each need at least one name (--presets '' only with "
                          "--suite-run)")
    for v in variants:
        if v not in ALL_VARIANTS:
            raise ConfigError(f"--variants: unknown variant {v!r}; known: {', '.join(ALL_VARIANTS)}")
    for p in presets:
        if p not in list_presets():
            raise ConfigError(f"--presets: unknown preset {p!r}; known: {', '.join(list_presets())}")
        load_config(p, overrides=as_overrides(getattr(args, "set", None)))
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out!r} exists and is not a directory")
    return presets, variants


def run_bench(args) -> dict[str, Any]:
    """The whole benchmark; ``args`` has the options of ``robustfeat bench`` as attributes (an
    ``argparse.Namespace`` or any object with them) and ``command_line``, the command recorded."""
    import torch

    from .build import resolve_device
    from .train import git_revision, machine_info

    presets, variants = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "command": getattr(args, "command_line", None) or "robustfeat bench (from Python)",
        "revision": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "steps": args.steps, "batch": args.batch,
                     "attack_steps": args.attack_steps, "eval_steps": args.eval_steps,
                     "data_size": args.data_size, "textbook_workers": args.workers, "variants": variants,
                     "data": "synthetic uint8 images of the dataset's shape"},
    }
    if device.type == "cuda":  # what "fp32" means there: TF32 convolutions unless switched off
        report["cuda"] = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                          "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                          "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    mm = None if args.matmul_size == 0 else matmul_gflops(device, args.matmul_size, repeats=max(3, args.repeats))
    report["matmul"] = mm
    peak = mm["gflops"]["median"] if mm else None
    mm16 = None
    if args.matmul_size and any(v in BF16_VARIANTS for v in variants):
        mm16 = matmul_gflops(device, args.matmul_size, repeats=max(3, args.repeats), dtype="bfloat16")
        report["matmul_bf16"] = mm16
    cases = []
    for p in presets:
        if not args.json:
            print(f"[bench] {p} ...", file=sys.stderr, flush=True)
        cases.append(bench_case(p, device, variants=variants, warmup=args.warmup, repeats=args.repeats,
                                steps=args.steps, batch=args.batch, attack_steps=args.attack_steps,
                                eval_steps=args.eval_steps, do_eval=not args.no_eval,
                                data_size=args.data_size, workers=args.workers, peak=peak,
                                overrides=list(args.set or []),
                                peak_bf16=mm16["gflops"]["median"] if mm16 else None))
    report["cases"] = cases
    if getattr(args, "suite_run", None):
        suites = [x.strip() for x in (args.suites or "paper,full").split(",") if x.strip()]
        if not args.json:
            print(f"[bench] suites {', '.join(suites)} on {args.suite_run} ...", file=sys.stderr, flush=True)
        report["suites"] = bench_suites(args.suite_run, suites, args.suite_n or 200, device)
    if args.profile and presets:
        report["profile"] = {"preset": presets[0], "table": profile_step(presets[0], device, _overrides(args))}
    return report


def _overrides(args) -> list[str]:
    ov = list(args.set or [])
    if args.batch:
        ov.append(f"optim.batch_size={args.batch}")
    if args.attack_steps is not None:
        ov.append(f"attack.steps={args.attack_steps}")
    return ov


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    mm = report.get("matmul")
    lines = [f"robustfeat bench on {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
             + f", {m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}, rev {report['revision']}",
             f"date {report['date']}; command: {report['command']}"]
    if mm:
        g = mm["gflops"]
        lines.append(f"fp32 matmul {mm['n']}x{mm['n']}: {g['median']:.1f} GFLOP/s (min {g['min']:.1f}, "
                     f"max {g['max']:.1f})")
    mm16 = report.get("matmul_bf16")
    if mm16:
        g = mm16["gflops"]
        lines.append(f"bf16 matmul {mm16['n']}x{mm16['n']}: {g['median']:.1f} GFLOP/s (min {g['min']:.1f}, "
                     f"max {g['max']:.1f})")
    head = ("preset", "what", "ex/s median", "min-max", "MFLOP/ex", "GFLOP/s", "% matmul", "% bf16 mm",
            "speedup", "peak MiB")
    rows = [head]
    for c in report["cases"]:
        items = [(f"train {v} (PGD-{c['attack']['steps']})", d) for v, d in c["train"].items()]
        if "eval" in c:
            items.append((f"eval {c['eval']['attack']}", c["eval"]))
        for what, d in items:
            r = d["examples_per_s"]
            sp = d.get("speedup_vs_textbook")
            rows.append((c["preset"], what, f"{r['median']:.1f}", f"{r['min']:.1f}-{r['max']:.1f}",
                         f"{d['flops_per_example'] / 1e6:.1f}", f"{d['gflops']:.1f}",
                         f"{100 * d['peak_fraction']:.1f}" if "peak_fraction" in d else "-",
                         f"{100 * d['bf16_peak_fraction']:.1f}" if "bf16_peak_fraction" in d else "",
                         f"{sp:.2f}x" if sp else "", f"{d['max_memory_mib']:.0f}" if "max_memory_mib" in d else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for sr in report.get("suites", []):
        lines.append(f"eval suite {sr['suite']} on {sr['n']} test images of {sr['run']}: {sr['examples_per_s']} "
                     f"examples/s ({sr['seconds']} s; clean {sr['clean_acc']:.2%}, robust {sr['robust_acc']:.2%})")
    lines.append("")
    lines.append("MFLOP/ex: the variant's own matmul+conv work per example; GFLOP/s and % matmul: useful work "
                 "(our step's FLOPs) per second, against the fp32 matmul rate (% bf16 mm: against the bf16 "
                 "rate). speedup: over the textbook loop (fp32, NCHW, per-sample DataLoader). peak MiB: CUDA "
                 "memory allocated at most during the timed steps.")
    if "cuda" in report:
        lines.append(f"CUDA settings: {json.dumps(report['cuda'])}")
    return "\n".join(lines)


def write_results(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    from .checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = report["machine"]
    dev = m["device"].split(":")[0]
    if "gpu" in m:
        dev = "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in m["gpu"]).strip("-").lower()
    stem = f"{dev}-{report['date'][:10]}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(js, json.dumps(report, indent=2) + "\n")
    text = [f"# robustfeat bench: {stem}", "", f"- command: `{report['command']}`",
            f"- revision: {report['revision']}", f"- date: {report['date']}",
            f"- machine: {json.dumps(m)}", f"- settings: {json.dumps(report['settings'])}", "",
            "```", format_table(report), "```", ""]
    if "profile" in report:
        text += [f"## Profile of our step ({report['profile']['preset']})", "", "```",
                 report["profile"]["table"], "```", ""]
    atomic_write_text(md, "\n".join(text))
    return js, md
