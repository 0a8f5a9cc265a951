"""What depends on the device, run on the test device (the CPU by default; on a GPU machine
``pytest -m device --device cuda``): attack validity and determinism, BatchNorm frozen during attacks,
the losses, bf16 autocast, the compiled step, exact resume, the loader and its augmentation,
AutoAttack, and a one-process torchrun (NCCL on CUDA, gloo on the CPU).

Tolerances: on the CPU the eager kernels are deterministic and the compiled step's aot_eager backend
runs the same kernels, so most comparisons are exact there. On CUDA, cuDNN computes fp32 convolutions
in TF32 by default (10-bit mantissa); the tests that compare numbers switch TF32 off (``fp32``) and
allow 1e-4 relative for the other summation orders of CUDA kernels.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from robustfeat.attacks import attack_from_config, ce_loss, check_adversary, pgd
from robustfeat.build import build_splits, deterministic_kernels, training_autocast
from robustfeat.compiled import StepFunctions, reset
from robustfeat.config import load_config
from robustfeat.data import DeviceLoader
from robustfeat.methods import feature_distance, method_loss
from robustfeat.models import create_model
from robustfeat.train import train

pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = [  # the demo preset shrunk; SGD, whose steps do not amplify rounding as Adam's do (test_distributed)
    "data.train_size=400", "data.val_size=100", "optim.batch_size=20", "optim.steps=6", "optim.milestones=[]",
    "optim.name=sgd", "optim.lr=0.05",
    "attack.steps=2", "attack.step_size=0.15", "attack.eps_warmup_examples=60",
    "eval_attack.steps=2", "eval_attack.step_size=0.15",
    "run.eval_every=3", "run.eval_size=40", "run.log_every=2", "run.deterministic=true",
]
EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    from torch._dynamo.utils import counters

    reset()  # each test compiles its own models: keep torch.compile's per-function limit out of reach
    counters.clear()
    yield


@pytest.fixture
def fp32():
    """True fp32 convolutions and matrix products on CUDA (no TF32) inside the test."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _rtol(device: torch.device) -> float:
    return 1e-4 if device.type == "cuda" else 1e-5


def _model(device: torch.device, name: str = "resnet_att", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1).to(device)


def _batch(device: torch.device, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# attacks and losses


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_attack_stays_in_the_threat_model_and_repeats(device, loss):
    model = _model(device).eval()
    x, y = _batch(device)
    with deterministic_kernels(True):
        xa = pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, loss=loss, generator=_gen(device, 1))
        again = pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, loss=loss, generator=_gen(device, 1))
    assert xa.device == x.device and xa.dtype == torch.float32
    check_adversary(x, xa, EPS)
    assert torch.equal(xa, again)
    with torch.no_grad():
        assert ce_loss(model(xa), y).mean() > ce_loss(model(x), y).mean()


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_attack_never_changes_batchnorm_statistics(device, bn_mode):
    model = _model(device).train()
    model(_batch(device, seed=3)[0])  # some non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(device)
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, bn_mode=bn_mode, generator=_gen(device, 0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_losses_on_the_device_equal_the_cpu_values(device, fp32):
    model = _model(device).train()
    cpu_model = copy.deepcopy(model).cpu()
    x, y = _batch(device)
    x_adv = (x + EPS * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).to(device)).clamp(0, 1)
    for lam in (0.0, 0.01):
        loss, parts = method_loss(model, x, x_adv, y, lam)
        ref, ref_parts = method_loss(cpu_model, x.cpu(), x_adv.cpu(), y.cpu(), lam)
        assert loss.device == x.device and loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref.item(), rel=_rtol(device))
        assert set(parts) == set(ref_parts)
        for k in parts:
            assert parts[k].item() == pytest.approx(ref_parts[k].item(), rel=_rtol(device), abs=1e-6), k
    # eq. 7 by hand, on the device
    hand = F.cross_entropy(model(x_adv), y) + 0.01 * (model.forward_features(x) - model.forward_features(x_adv)
                                                      ).norm(dim=1).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert torch.allclose(feature_distance(x[:, 0, 0], x_adv[:, 0, 0]), (x - x_adv)[:, 0, 0].norm(dim=1))


def test_bf16_autocast_keeps_fp32_weights_losses_and_valid_adversaries(device):
    cfg = load_config("cifar10-at-att-reg", overrides=["run.precision=bf16"])
    model = _model(device).train()
    x, y = _batch(device)
    with training_autocast(cfg.run, device, attack=True):
        xa = attack_from_config(model, x, y, cfg.attack, generator=_gen(device, 0), keep_best=False)
    assert xa.dtype == torch.float32
    check_adversary(x, xa, cfg.attack.eps)
    grads = {}
    for prec in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with training_autocast(dataclasses.replace(cfg.run, precision=prec), device):
            loss, parts = method_loss(model, x, xa, y, 0.01)
        assert loss.dtype == torch.float32 and parts["reg"].dtype == torch.float32
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.99
    assert not torch.equal(grads["bf16"], grads["fp32"])  # autocast really ran in bf16


# ---------------------------------------------------------------------------------------------------------
# the compiled step


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_computes_what_the_eager_step_computes(device, backend, fp32):
    cfg = load_config("cifar10-at-att-reg", overrides=["attack.steps=3"])
    eager = StepFunctions(cfg.run)
    comp = StepFunctions(dataclasses.replace(cfg.run, compile=True, compile_backend=backend))
    model = _model(device).train()
    model(_batch(device, seed=3)[0])
    twin = copy.deepcopy(model)
    x, y = _batch(device)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    saved = []  # tensors the compiled attack keeps for a backward pass (hooked once compiled: tracing refuses hooks)
    for eps in (cfg.attack.eps, cfg.attack.eps / 2):  # a new eps (a warm-up) reuses the compiled iteration
        step = cfg.attack.step_size * eps / cfg.attack.eps
        a = eager.adversary(model, x, y, cfg.attack, generator=_gen(device, 1), eps=eps, step_size=step)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t)
        with hooks if eps != cfg.attack.eps else contextlib.nullcontext():
            b = comp.adversary(twin, x, y, cfg.attack, generator=_gen(device, 1), eps=eps, step_size=step)
        check_adversary(x, b, eps)
        # the same draws and steps: pixels differ only where a gradient entry is within rounding of zero
        assert (a != b).float().mean() <= (0 if device.type == "cpu" and backend == "aot_eager" else 0.01)
    from torch._dynamo.utils import counters

    # really compiled, and each part one graph (CUDA graphs capture a whole graph only); the compiled
    # attack keeps no activations for a backward through itself (the weights' gradients come from the loss)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert saved == []
    for k, v in twin.state_dict().items():  # BatchNorm statistics frozen in the compiled attack too
        assert torch.equal(v, stats[k]), k
    assert twin.training
    losses, grads = [], []
    for fns, m in ((eager, model), (comp, twin)):
        loss, _ = fns.loss(m, x, a, y, 0.01)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    tol = 0 if device.type == "cpu" and backend == "aot_eager" else 1e-4
    assert losses[1] == pytest.approx(losses[0], rel=tol, abs=tol)
    assert torch.allclose(grads[1], grads[0], rtol=10 * tol, atol=tol)
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    for (k, u), v in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):  # running stats
        assert torch.allclose(u.float(), v.float(), rtol=10 * tol, atol=tol), k


def test_compile_settings_are_validated():
    from robustfeat.config import ConfigError

    with pytest.raises(ConfigError, match=r"run.compile=true with attack.restarts=2: .*attack.restarts=1"):
        load_config("demo", overrides=["run.compile=true", "attack.restarts=2"])
    with pytest.raises(ConfigError, match=r"run.compile_mode='fast' is invalid: expected one of default, "):
        load_config("demo", overrides=["run.compile_mode=fast"])
    with pytest.raises(ConfigError, match=r"run.compile_backend='eager' is invalid.*inductor, aot_eager"):
        load_config("demo", overrides=["run.compile_backend=eager"])
    with pytest.raises(ConfigError, match=r"run.deterministic=2 is invalid: expected true or false"):
        load_config("demo", overrides=["run.deterministic=2"])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "checkpoints/last.safetensors")).items()
            if k.startswith("model.")}


def _metrics(run_dir: Path) -> list[dict]:
    keep = lambda r: {k: v for k, v in r.items() if k not in ("examples_per_s", "wall_s")}
    return [keep(json.loads(s)) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_splits():
    return build_splits(load_config("demo", overrides=TINY))


@pytest.mark.parametrize("compiled", [False, True])
def test_training_resumes_exactly_on_the_device(device, tiny_splits, tmp_path, compiled):
    extra = [f"run.device={device}", *(["run.compile=true", "run.compile_backend=aot_eager"] if compiled else [])]
    cfg = load_config("demo", overrides=[*TINY, *extra])
    train(cfg, tmp_path / "full", splits=tiny_splits, progress=False)
    train(cfg, tmp_path / "cut", splits=tiny_splits, progress=False, stop_after=4)  # between two validations
    train(cfg, tmp_path / "cut", splits=tiny_splits, progress=False, resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].double() - b[k].double()).abs().max().item())
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")
    if compiled:  # and it trains what the eager step trains
        train(load_config("demo", overrides=[*TINY, f"run.device={device}"]), tmp_path / "eager",
              splits=tiny_splits, progress=False)
        e = _weights(tmp_path / "eager")
        worst = max((a[k].double() - e[k].double()).abs().max().item() for k in a)
        assert worst <= (0.0 if device.type == "cpu" else 1e-3), worst


# ---------------------------------------------------------------------------------------------------------
# data, AutoAttack, torchrun


def _all_crops(img: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    _, h, w = img.shape
    p = F.pad(img, (pad, pad, pad, pad))
    crops = [p[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_loader_and_augmentation_on_the_device(device):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(40)
    a = DeviceLoader(x, y, batch_size=8, device=device, augment=True, seed=2, channels_last=True)
    b = DeviceLoader(x, y, batch_size=8, device=device, augment=True, seed=2, channels_last=True)
    xa, ya = a.batch(11)
    assert xa.device.type == device.type and ya.device.type == device.type and xa.dtype == torch.float32
    assert xa.is_contiguous(memory_format=torch.channels_last)
    xb, yb = b.batch(11)  # a fresh loader jumps straight to step 11 (resume)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for img, i in zip(xa.cpu(), ya.cpu(), strict=True):  # each image is one of its pad-4 crops and flips
        assert any(torch.equal(img, c.float() / 255) for c in _all_crops(x[i]))
    assert not torch.equal(xa.cpu(), x[ya.cpu()].float() / 255)
    seen = torch.cat([a.batch(i)[1] for i in range(a.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(40))


def test_autoattack_on_the_device(device, tmp_path):
    pytest.importorskip("pyautoattack", reason="AutoAttack needs pyautoattack (benchmarks/gpu_wheels.sh on a GPU box)")
    from robustfeat.eval.suite import Row, evaluate_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).to(device).eval()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x.to(device)).argmax(1).cpu()
    eps = 0.1  # large enough that APGD-CE breaks every point and the slower attacks are skipped
    rows = [Row("natural"), Row("whitebox", "ce", 10, eps, eps / 4), Row("autoattack", eps=eps)]
    res = evaluate_model(model, x, y, eps=eps, step_size=eps / 4, rows=rows, batch_size=8, progress=False,
                         device=device, autoattack_dir=tmp_path)
    acc = {r["id"]: r["accuracy"] for r in res["rows"]}
    assert acc["natural"] == 1.0 and acc["autoattack"] <= acc["whitebox/pgd-10"] + 1 / 8
    assert len(list(tmp_path.glob("aa-*.safetensors"))) == 1


TORCHRUN_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from robustfeat import distributed
    from robustfeat.config import load_config
    from robustfeat.train import train

    device, out, overrides = torch.device(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cuda = device.type == "cuda"
    if cuda:  # NCCL binds the group to one indexed device
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))

    class Forced(distributed.Dist):  # a group of one: make the collectives run anyway
        active = True

    ctx = Forced(rank=0, world=1, device=device)
    p = torch.nn.Parameter(torch.ones(3, device=device))
    p.grad = torch.full((3,), 2.0, device=device)
    loss = ctx.average_gradients([p], torch.tensor(1.5, device=device))
    assert torch.equal(p.grad.cpu(), torch.full((3,), 2.0)) and float(loss) == 1.5
    assert float(ctx.average({"acc": torch.tensor(0.25, device=device)})["acc"]) == 0.25
    assert ctx.broadcast_object({"step": 3}) == {"step": 3}
    ctx.broadcast_parameters(torch.nn.Linear(2, 2).to(device))
    # training inside torchrun uses the caller's group of one as it is
    res = train(load_config("demo", overrides=overrides), out, progress=False)
    dist.barrier()
    dist.destroy_process_group()
    print("backend", "nccl" if cuda else "gloo", "step", res.step)
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_torchrun_on_the_device(device, tmp_path):
    script = tmp_path / "one.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(device),
           str(tmp_path / "run"), *TINY, f"run.device={device}", "optim.steps=3"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"backend {backend} step 3" in res.stdout
    assert (tmp_path / "run/checkpoints/last.safetensors").is_file()
