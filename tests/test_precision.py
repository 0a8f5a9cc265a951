"""run.precision=bf16 (autocast) changes the arithmetic of training, not the method: same loss and
gradients up to bf16 rounding, fp32 weights and checkpoints, attacks that keep their guarantees,
fp32 validation; run.attack_fp32 crafts exactly the fp32 adversary."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from robustfeat import build
from robustfeat.attacks import attack_from_config, ce_loss
from robustfeat.build import build_model, precision_warning, training_autocast
from robustfeat.config import ConfigError, load_config
from robustfeat.data import DeviceLoader
from robustfeat.methods import method_loss
from robustfeat.train import same_experiment, train

TINY = [
    "data.train_size=400", "data.val_size=100", "optim.batch_size=20", "optim.steps=4", "optim.milestones=[]",
    "attack.steps=3", "attack.step_size=0.1", "eval_attack.steps=2", "eval_attack.step_size=0.15",
    "run.eval_every=4", "run.eval_size=40", "run.log_every=2",
]
CPU = torch.device("cpu")


def _run(cfg, **kw):
    return dataclasses.replace(cfg.run, **kw)


@pytest.fixture(scope="module")
def batch(cfg, splits):
    x, y = DeviceLoader(splits.x_train, splits.y_train, batch_size=32, device=CPU, seed=0).batch(0)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    return model, x, y


def test_precision_is_validated():
    with pytest.raises(ConfigError, match=r"run.precision.*'fp16'.*fp32, bf16"):
        load_config("demo", overrides=["run.precision=fp16"])
    with pytest.raises(ConfigError, match="run.attack_fp32"):
        load_config("demo", overrides=["run.attack_fp32=3"])


def test_bf16_loss_and_gradients_match_fp32(cfg, batch, one_thread):
    model, x, y = batch
    x_adv = (x + 0.2 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    grads, losses = {}, {}
    for prec in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with training_autocast(_run(cfg, precision=prec), CPU):
            loss, parts = method_loss(model, x, x_adv, y, lam=0.01)
        assert loss.dtype == torch.float32 and parts["reg"].dtype == torch.float32
        loss.backward()
        losses[prec] = loss.item() if not loss.requires_grad else loss.detach().item()
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos > 0.99
    assert not torch.equal(grads["bf16"], grads["fp32"])  # autocast really ran in bf16


def test_bf16_attack_keeps_its_guarantees_and_its_strength(cfg, batch, one_thread):
    model, x, y = batch
    a = dataclasses.replace(cfg.attack, eps=0.3, step_size=0.05, steps=10)
    out, advs = {}, {}
    for prec in ("fp32", "bf16"):
        with training_autocast(_run(cfg, precision=prec), CPU, attack=True):
            x_adv = attack_from_config(model, x, y, a, generator=torch.Generator().manual_seed(0), keep_best=False)
        advs[prec] = x_adv
        assert x_adv.dtype == torch.float32
        assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            out[prec] = ce_loss(model(x_adv), y).mean().item()
    with torch.no_grad():
        clean = ce_loss(model(x), y).mean().item()
    # the bf16 adversary raises the (fp32) loss as much as the fp32 one, up to a few percent
    assert out["bf16"] > clean + 0.5 * (out["fp32"] - clean)
    assert out["bf16"] == pytest.approx(out["fp32"], rel=5e-2)
    assert not torch.equal(advs["bf16"], advs["fp32"])  # the attack's passes really ran in bf16


def test_attack_fp32_crafts_exactly_the_fp32_adversary(cfg, batch, one_thread):
    model, x, y = batch
    advs = []
    for run in (_run(cfg), _run(cfg, precision="bf16", attack_fp32=True), _run(cfg, precision="bf16")):
        with training_autocast(run, CPU, attack=True):
            advs.append(attack_from_config(model, x, y, cfg.attack, generator=torch.Generator().manual_seed(3),
                                           keep_best=False))
    assert torch.equal(advs[0], advs[1])
    assert not torch.equal(advs[0], advs[2])  # without attack_fp32 the bf16 adversary is another one


def test_bf16_on_a_cpu_without_bf16_hardware_is_warned_about(monkeypatch):
    bf16 = load_config("demo", overrides=["run.precision=bf16"]).run
    fp32 = load_config("demo").run
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: False)
    w = precision_warning(bf16, CPU)
    assert w is not None and "\n" not in w
    assert "run.precision=bf16" in w and "run.precision=fp32" in w and "AVX512-BF16 or AMX" in w
    assert precision_warning(fp32, CPU) is None
    assert precision_warning(bf16, torch.device("cuda")) is None  # GPUs are judged by their own bench
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: True)
    assert precision_warning(bf16, CPU) is None


def test_bf16_training_run_keeps_fp32_weights_and_validates(cfg, splits, tmp_path, one_thread, monkeypatch,
                                                            capsys):
    import importlib

    train_module = importlib.import_module("robustfeat.train.loop")  # where the loop looks up its pieces
    validate, under_autocast = train_module.evaluate_split, []

    def spy(*args, **kwargs):  # records whether a validation ran under autocast
        under_autocast.append(torch.is_autocast_enabled("cpu"))
        return validate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", spy)
    c = load_config("demo", overrides=[*TINY, "run.precision=bf16"])
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: False)
    res = train(c, tmp_path / "r", splits=splits, progress=False)
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("robustfeat train: warning: run.precision=bf16")
    assert under_autocast == [False]  # one validation (step 4), in fp32
    assert res.step == 4
    w = load_file(str(tmp_path / "r/checkpoints/last.safetensors"))
    assert all(t.dtype in (torch.float32, torch.int64) for t in w.values())
    train(cfg, tmp_path / "ref", splits=splits, progress=False)
    # four Adam steps (lr 1e-3, each moving a weight by about lr) from the same initialisation: the bf16
    # run's weights differ from the fp32 run's by a fraction of one step on average, never by more
    # than the 4 steps could move them
    wr = load_file(str(tmp_path / "ref/checkpoints/last.safetensors"))
    lr = c.optim.lr
    weights = [k for k, t in w.items() if k.startswith("model.") and t.is_floating_point()]
    for k in weights:
        d = (w[k] - wr[k]).abs()
        assert d.max() < 2 * 4 * lr and d.mean() < 0.5 * lr, (k, d.max(), d.mean())
    assert any(not torch.equal(w[k], wr[k]) for k in weights)  # the steps really ran in bf16
    assert set(res.last_val) == {"clean_acc", "pgd_acc"}


def test_configs_saved_before_a_new_key_still_match():
    cfg = load_config("demo")
    old = cfg.to_dict()
    del old["run"]["precision"], old["run"]["attack_fp32"]  # as written before the keys existed
    assert same_experiment(old, cfg.to_dict())
    assert not same_experiment(old, load_config("demo", overrides=["run.precision=bf16"]).to_dict())
