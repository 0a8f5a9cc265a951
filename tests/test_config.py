"""Presets, overrides and validation."""

import itertools

import pytest

from robustfeat.config import ConfigError, config_from_dict, list_presets, load_config, preset_budgets


def test_every_preset_and_budget_loads():
    names = list_presets()
    assert len(names) >= 19
    for name in names:
        for budget in preset_budgets(name):
            cfg = load_config(name, budget)
            assert cfg.name == name
            # the budgets only change the schedule and sizes, never the attacks' radius or the model
            assert cfg.model == load_config(name).model
            assert cfg.attack.eps == load_config(name).attack.eps


def test_paper_hyperparameters():
    c = load_config("cifar10-at-att-reg")
    assert c.model.name == "resnet_att" and c.lam == 0.01
    assert c.attack.eps == pytest.approx(8 / 255) and c.attack.step_size == pytest.approx(2 / 255)
    assert c.attack.steps == 5 and c.data.augment
    assert (c.optim.name, c.optim.lr, c.optim.batch_size, c.optim.steps) == ("sgd", 0.1, 128, 80000)
    assert c.optim.milestones == (40000, 60000) and c.optim.weight_decay == 2e-4
    m = load_config("mnist-at-reg")
    assert (m.attack.eps, m.attack.step_size, m.attack.steps, m.lam) == (0.3, 0.01, 40, 0.01)
    assert (m.optim.name, m.optim.lr, m.optim.batch_size, m.optim.steps) == ("adam", 1e-4, 50, 100000)
    assert load_config("cifar10-wide3-at").model.name == "resnet_wide3"
    assert load_config("cifar100-at-reg").data.name == "cifar100"
    assert load_config("cifar10-natural").method.name == "natural"


def test_overrides_and_fractions():
    c = load_config("cifar10-at", overrides=["optim.lr=0.05", "attack.eps=4/255", "optim.milestones=[10, 20]"])
    assert c.optim.lr == 0.05 and c.attack.eps == pytest.approx(4 / 255) and c.optim.milestones == (10, 20)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["attack.eps=-0.1"], r"attack.eps=-0.1 is invalid: expected a number >= 0"),
        (["attack.eps=8"], r"attack.eps=8 is invalid"),
        (["attack.step_size=0"], r"attack.step_size=0 is invalid: expected a number > 0"),
        (["attack.steps=2.5"], r"attack.steps=2.5 is invalid: expected an integer"),
        (["method.lam=-1"], r"method.lam=-1 is invalid"),
        (["model.widths=[16, 0, 32, 64]"], r"model.widths=0 is invalid"),
        (["optim.lr=abc"], r"optim.lr='abc' is invalid: expected a finite number"),
        (["optim.stepz=3"], r"unknown key optim.stepz \(did you mean 'steps'\?\)"),
        (["optimm.lr=3"], r"unknown config section 'optimm' \(did you mean 'optim'\?\)"),
        (["optim.lr"], r"expected KEY=VALUE"),
        (["method.name=at-regg"], r"did you mean 'at-reg'"),
        (["model.name=resnet_att"], r"has an attention module"),
        (["attack.loss=xent"], r"attack.loss='xent' is invalid: expected one of ce, cw"),
        (["attack.clip_start=false", "attack.restarts=2"], r"attack.clip_start=False is invalid: expected true unless"),
        (["optim.schedule=cosine"], r"optim.schedule='cosine' is invalid: expected one of step, cyclic"),
        (["run.rollback_drop=3"], r"run.rollback_drop=3 is invalid: expected a drop of validation PGD accuracy"),
        (["run.select=best"], r"run.select='best' is invalid: expected one of best-val, final"),
        (["run.select=final", "run.rollback_drop=0.05"], r"run.select='final' is invalid: expected best-val with run.rol"),
        (["run.rollback_drop=-0.1"], r"run.rollback_drop=-0.1 is invalid: expected a number >= 0"),
        (["run.rollback_lr=0"], r"run.rollback_lr=0 is invalid: expected a number > 0"),
        (["run.rollback_lr=2"], r"run.rollback_lr=2 is invalid: expected a learning-rate factor in \(0, 1\]"),
        (["run.rollback_after=-5"], r"run.rollback_after=-5 is invalid: expected an integer >= 0"),
        (["run.restart_below=1"], r"run.restart_below=1 is invalid: expected a clean validation accuracy"),
        (["run.restart_below=-0.2"], r"run.restart_below=-0.2 is invalid: expected a number >= 0"),
        (["optim.schedule=cyclic", "optim.peak=1"], r"optim.peak=1 is invalid: expected a fraction"),
        (["optim.ema=1"], r"optim.ema=1 is invalid: expected a decay in \[0, 1\)"),
        (["optim.schedule=cyclic"], r"optim.milestones=\[40000, 60000\] is invalid: expected \[\] with"),
        (["data.val_size=0"], r"data.val_size=0 is invalid: expected an integer >= 1: periodic validation"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("cifar10-at-reg", overrides=overrides)


def test_unknown_preset_and_budget_suggest():
    with pytest.raises(ConfigError, match=r"unknown preset 'mnist-atreg' \(did you mean 'mnist-at-reg'\?\)"):
        load_config("mnist-atreg")
    with pytest.raises(ConfigError, match=r"unknown budget 'cpuu'.*did you mean 'cpu'"):
        load_config("mnist-at", "cpuu")


def test_attention_method_needs_attention_model():
    with pytest.raises(ConfigError, match="needs an attention model.*resnet_att"):
        config_from_dict({"data": {"name": "cifar10"}, "model": {"name": "resnet"}, "method": {"name": "at-att"}})


def test_resolved_config_round_trips():
    c = load_config("cifar10-at-att-reg", "cpu")
    assert config_from_dict(c.to_dict()) == c


def test_cyclic_learning_rate_is_one_triangle():
    from robustfeat.train import learning_rate

    cfg = load_config("mnist-at", overrides=["optim.schedule=cyclic", "optim.lr=0.005", "optim.steps=100",
                                             "optim.peak=0.4"])
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.005 / 40)          # the first update is not a zero step
    assert max(lrs) == pytest.approx(0.005) and lrs.index(max(lrs)) == 39
    assert all(a < b for a, b in itertools.pairwise(lrs[:40]))      # rising to the peak ...
    assert all(a > b for a, b in itertools.pairwise(lrs[39:]))     # ... then falling ...
    assert lrs[-1] == 0.0 and lrs[69] == pytest.approx(0.0025)  # ... linearly, to 0 at the end
    step = load_config("cifar10-at")                     # the paper's step schedule is unchanged
    assert [learning_rate(step, s) for s in (0, 39999, 40000, 60000)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_choices_are_typed_literals_checked_on_construction():
    from typing import get_args, get_type_hints

    from robustfeat import config as C

    for cls, key, alias in ((C.DataConfig, "name", C.DatasetName), (C.AttackConfig, "loss", C.AttackLoss),
                            (C.AttackConfig, "bn_mode", C.BnMode), (C.OptimConfig, "name", C.OptimName),
                            (C.OptimConfig, "schedule", C.Schedule), (C.RunConfig, "precision", C.Precision),
                            (C.ModelConfig, "init", C.ModelInit)):
        assert get_type_hints(cls)[key] == alias
        with pytest.raises(ConfigError, match=f"expected one of {', '.join(get_args(alias))}"):
            cls(**{key: "nonsense"})
    assert C.DATASET_NAMES == get_args(C.DatasetName) and set(C.DATASET_FAMILIES) == set(C.DATASET_NAMES)


def test_single_step_keys_exist_and_keep_their_paths():
    from robustfeat.config import SINGLE_STEP_KEYS

    d = load_config("mnist-at", "fast").to_dict()
    for key in SINGLE_STEP_KEYS:
        section, name = key.split(".")
        assert name in d[section], key
    # today's key paths work as overrides
    c = load_config("mnist-at", overrides=["attack.carry=true", "run.rollback_drop=0.05", "method.grad_align=0.5",
                                           "optim.ema=0.9", "run.restart_below=0.2"])
    assert (c.attack.carry, c.run.rollback_drop, c.method.grad_align, c.optim.ema) == (True, 0.05, 0.5, 0.9)


def test_compatibility_comes_from_the_models_metadata(monkeypatch):
    from robustfeat.models import MODEL_INFO, MODELS, MnistCNN, ModelInfo, register_model

    @register_model(ModelInfo("tiny_grey", (1, 28, 28), "mnist", options=()))
    def tiny(num_classes, in_channels, **kw):
        return MnistCNN(num_classes=num_classes, in_channels=in_channels, hidden=8)

    try:
        c = load_config("mnist-at", overrides=["model.name=tiny_grey"])  # no name prefix needed
        assert not c.model.has_attention and c.lam == 0.0 and c.data_family == "mnist"
        with pytest.raises(ConfigError, match="model.name='tiny_grey' expects 28x28 MNIST images, not CIFAR"):
            load_config("cifar10-at", overrides=["model.name=tiny_grey"])
        with pytest.raises(ConfigError, match="tiny_grey has fixed widths"):
            load_config("mnist-at", overrides=["model.name=tiny_grey", "model.widths=[4,4,8,8]"])
    finally:
        MODELS._items.pop("tiny_grey")
        MODEL_INFO._items.pop("tiny_grey")


def test_parse_fraction():
    from robustfeat.config import parse_fraction

    assert parse_fraction("8/255") == 8 / 255 and parse_fraction("1e-3") == 0.001
    assert parse_fraction("a/b") == "a/b" and parse_fraction("1/0") == "1/0" and parse_fraction("x") == "x"


def test_no_lab_notes_in_packaged_yaml_or_config_docstrings():
    import re
    from importlib import resources
    from pathlib import Path

    import robustfeat

    texts = {p.name: p.read_text() for p in (resources.files("robustfeat") / "presets").iterdir()
             if p.name.endswith(".yaml")}
    src = Path(robustfeat.__file__).parent
    for rel in ("config.py", "methods.py", "build.py", "models/__init__.py", "models/mnist_cnn.py"):
        texts[rel] = (src / rel).read_text()
    for name, text in texts.items():
        assert not re.search(r"[Ss]ession \d|MEASURED|[Mm]easured (here|on)|results/fast-mnist", text), name
