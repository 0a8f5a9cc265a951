"""Evaluation beyond the paper's rows: the per-example worst case, the checks made before attacking,
restarts, targeted and transfer attacks, robustness curves, and the shared work that must not change
any number. Each check is shown firing on a deliberately masked toy model and quiet on a sound one."""

import pytest
import torch
from torch import nn

from robustfeat.attacks import pgd
from robustfeat.data import DataError
from robustfeat.eval import suite
from robustfeat.eval.curves import EPS_CAP, STEPS_GRID, write_curves
from robustfeat.eval.precheck import ModelOutputError
from robustfeat.eval.suite import Row, evaluate_model, suite_rows

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = torch.tensor([0.35, 0.45, 0.55, 0.65])


class Levels(nn.Module):
    """Classifies an image by its mean intensity (the nearest of LEVELS). Sound by default; each option
    masks it on purpose without changing its clean decisions:
    quantize: 8-bit rounding of the input, whose gradient is zero everywhere;
    scale=1e6: logits so large that the softmax saturates (zero cross-entropy gradient, margin intact);
    noise: Gaussian noise on the input at every call (a randomized model)."""

    def __init__(self, quantize: bool = False, scale: float = 400.0, noise: float = 0.0):
        super().__init__()
        self.quantize, self.noise = quantize, noise
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        if self.quantize:
            x = torch.round(x * 255) / 255
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        m = x.mean(dim=(1, 2, 3))
        return -self.scale * (m[:, None] - LEVELS.to(x)) ** 2


def level_data(n=40, size=16, offset=0.0, spread=0.02, seed=0):
    """Images whose mean lies ``offset`` above (classes 0-2) or below (class 3) their level."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centre = LEVELS[y] + torch.where(y < 3, offset, -offset)
    x = centre[:, None, None, None] + spread * (2 * torch.rand(n, 1, size, size, generator=g) - 1)
    return x.clamp(0, 1), y


def _status(res):
    return {c["name"]: c["status"] for c in res["checks"]}


def _detail(res, name):
    return next(c["detail"] for c in res["checks"] if c["name"] == name)


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def tiny():
    """A tiny CNN (with BatchNorm) and 8x8 images labelled with its own predictions."""
    model = _tiny_cnn()
    x = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


EPS, STEP = 4 / 255, 1 / 255


# ---------------------------------------------------------------------------------------------------------
# the worst-case row


def test_worst_case_is_the_per_example_and_of_the_white_box_rows_at_eps(tiny):
    model, x, y = tiny
    rows = [Row("natural"), Row("whitebox", "ce", 2, EPS, STEP), Row("whitebox", "ce", 6, EPS, STEP),
            Row("whitebox", "cw", 3, EPS, STEP), Row("restarts", "ce", 2, EPS, STEP, 3),
            Row("blackbox", "ce", 6, EPS, STEP), Row("sanity", "ce", 5, 0.5, 0.1)]
    res = evaluate_model(model, x, y, eps=EPS, step_size=STEP, rows=rows, source=_tiny_cnn(1), seed=2,
                         batch_size=10, progress=False)
    flags, by_id = res["per_example"], {r["id"]: r for r in res["rows"]}
    combined = ["whitebox/pgd-2", "whitebox/pgd-6", "whitebox/cw-3", "restarts/pgd-2-x3"]
    worst = by_id["worst_case"]
    assert worst["combines"] == combined and res["robust_acc_rows"] == combined
    # independently: robust only where every combined row says robust
    expect = flags["whitebox/pgd-2"] & flags["whitebox/pgd-6"] & flags["whitebox/cw-3"] & flags["restarts/pgd-2-x3"]
    assert torch.equal(flags["worst_case"], expect)
    assert worst["correct"] == int(expect.sum()) and res["robust_acc"] == worst["accuracy"]
    # PGD-6 and CW-3 break different examples here, so the worst case is below every row it combines
    assert (flags["whitebox/pgd-6"] & ~flags["whitebox/cw-3"]).any()
    assert worst["accuracy"] < min(by_id[i]["accuracy"] for i in combined)
    assert 0 < worst["accuracy"]
    # and each combined row is what a PGD call with the row's seed gives (the rows are not cascaded)
    clean = flags["natural"]
    idx = clean[:10].nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(suite.derived_seed(2, suite._seed_tag(repr(rows[2].group)), 0))
    xa = pgd(model, x[idx], y[idx], eps=EPS, step_size=STEP, steps=6, generator=gen)
    assert torch.equal(flags["whitebox/pgd-6"][idx], model(xa).argmax(1) == y[idx])


def test_worst_case_combines_only_white_box_rows_at_the_evaluated_eps():
    def row(id_, kind, eps, flags):
        return {"id": id_, "kind": kind, "eps": eps}, torch.tensor(flags, dtype=torch.bool)

    made = [row("natural", "natural", 0.0, [1, 1, 1, 1]), row("whitebox/pgd-5", "whitebox", 0.1, [1, 1, 0, 1]),
            row("whitebox/cw-5", "whitebox", 0.1, [1, 0, 1, 1]), row("autoattack", "autoattack", 0.1, [1, 1, 1, 0]),
            row("whitebox/pgd-9", "whitebox", 0.2, [0, 0, 0, 0]), row("blackbox/pgd-5", "blackbox", 0.1, [0, 0, 0, 0]),
            row("sanity/pgd-5-eps0.5", "sanity", 0.5, [0, 0, 0, 0])]
    w, f = suite.worst_case([r for r, _ in made], {r["id"]: f for r, f in made}, 0.1)
    assert w["combines"] == ["whitebox/pgd-5", "whitebox/cw-5", "autoattack"]
    assert f.tolist() == [True, False, False, False] and w["accuracy"] == 0.25
    assert suite.worst_case([made[0][0]], {"natural": made[0][1]}, 0.1) is None
    x, y = level_data(8)
    with pytest.raises(Exception, match="rows share the id whitebox/pgd-5"):
        evaluate_model(Levels(), x, y, eps=0.1, step_size=0.025, progress=False,
                       rows=[Row("whitebox", "ce", 5, 0.1, 0.025), Row("whitebox", "ce", 5, 0.2, 0.05)])


def test_restarts_row_is_its_single_start_row_and_the_extra_starts(tiny):
    model, x, y = tiny
    rows = [Row("natural"), Row("whitebox", "ce", 1, EPS, STEP), Row("restarts", "ce", 1, EPS, STEP, 5)]
    res = evaluate_model(model, x, y, eps=EPS, step_size=STEP, rows=rows, seed=5, batch_size=24, progress=False)
    base, more = res["per_example"]["whitebox/pgd-1"], res["per_example"]["restarts/pgd-1-x5"]
    assert not (more & ~base).any()  # every start of the single-start row is one of the five
    assert more.sum() < base.sum()  # and the four new ones find more here
    # exactly: the base row AND four fresh starts on the examples it left robust
    idx = base.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(suite.derived_seed(5, suite._seed_tag(repr(rows[2].group)), 0))
    xa = pgd(model, x[idx], y[idx], eps=EPS, step_size=STEP, steps=1, restarts=4, generator=gen)
    assert torch.equal(more[idx], model(xa).argmax(1) == y[idx])
    with pytest.raises(Exception, match="needs the white-box row it adds restarts to"):
        evaluate_model(model, x, y, eps=EPS, step_size=STEP, rows=[Row("natural"), rows[2]], progress=False)


def test_suites_have_the_new_rows():
    ids = lambda rows: [r.id for r in rows]
    quick = ids(suite_rows("quick", eps=EPS, step_size=STEP))
    paper = ids(suite_rows("paper", eps=0.3, step_size=0.01, extra_pgd_steps=[40], headline=40))
    assert "restarts/pgd-20-x5" in ids(suite_rows("paper", eps=0.3, step_size=0.01, extra_pgd_steps=[40]))
    full = ids(suite_rows("full", eps=EPS, step_size=STEP, transfer=True))
    assert not any(i.startswith(("restarts", "transfer")) or "targeted" in i for i in quick)
    assert "restarts/pgd-40-x5" in paper and "whitebox/targeted-100" not in paper
    assert {"whitebox/targeted-100", "restarts/pgd-20-x5", "transfer/pgd-20", "autoattack"} <= set(full)


# ---------------------------------------------------------------------------------------------------------
# checks before attacking


def _natural_only(model, x, y, **kw):
    return evaluate_model(model, x, y, eps=0.1, step_size=0.025, rows=[Row("natural")], progress=False, **kw)


def test_pre_attack_checks_fire_on_masked_models_and_stay_quiet_on_a_sound_one():
    x, y = level_data()
    sound = _status(_natural_only(Levels(), x, y))
    assert sound["zero_gradients"] == sound["deterministic_logits"] == sound["outputs_are_logits"] == "pass"
    quantized = _natural_only(Levels(quantize=True), x, y)
    assert _status(quantized)["zero_gradients"] == "flagged" and quantized["masking_suspected"]
    assert _detail(quantized, "zero_gradients").startswith("40 of 40 correctly classified examples have an "
                                                            "all-zero input gradient of the CE loss, 40 of")
    saturated = _natural_only(Levels(scale=1e6), x, y)  # the softmax saturates; the margin does not
    assert _status(saturated)["zero_gradients"] == "flagged"
    assert "CE loss, 0 of the logit margin" in _detail(saturated, "zero_gradients")
    torch.manual_seed(0)
    noisy = _natural_only(Levels(noise=0.05), x, y)
    assert _status(noisy)["deterministic_logits"] == "flagged" and _status(noisy)["zero_gradients"] == "pass"

    class Softmax(nn.Module):
        def forward(self, x):
            return Levels()(x).softmax(1)

    assert _status(_natural_only(Softmax(), x, y))["outputs_are_logits"] == "flagged"


def test_nan_logits_never_count_as_correct_and_are_flagged_on_clean_images():
    x, y = level_data()
    nan = float("nan")

    class NaNForClass0(nn.Module):  # torch's argmax of an all-NaN row is 0: these would count as correct
        def forward(self, x):
            z = Levels()(x)
            return torch.where(z.argmax(1, keepdim=True) == 0, torch.full_like(z, nan), z)

    res = _natural_only(NaNForClass0(), x, y)
    assert res["rows"][0]["accuracy"] == 0.75 and not res["per_example"]["natural"][y == 0].any()
    assert _status(res)["finite_logits"] == "flagged" and res["masking_suspected"]
    assert _detail(res, "finite_logits").startswith("10 of 40 clean images give a NaN or infinite logit")
    assert _status(_natural_only(Levels(), x, y))["finite_logits"] == "pass"

    class NaNOffTheCleanImages(nn.Module):  # sound on its test images, NaN (with a zero gradient) elsewhere
        def forward(self, xb):
            z = Levels()(xb)
            seen = (xb[:, None] == x[None]).flatten(2).all(2).any(1, keepdim=True)
            return torch.where(seen, z, torch.full_like(z, nan))

    rows = [Row("natural"), Row("whitebox", "ce", 5, 0.1, 0.025), Row("whitebox", "cw", 5, 0.1, 0.025)]
    res = evaluate_model(NaNOffTheCleanImages(), x, y, eps=0.1, step_size=0.025, rows=rows, progress=False)
    acc = {r["id"]: r["accuracy"] for r in res["rows"]}
    assert acc["natural"] == 1.0 and _status(res)["finite_logits"] == "pass"
    assert acc["whitebox/pgd-5"] == acc["whitebox/cw-5"] == 0.0  # not the 25% of class 0 argmax would give


def test_a_nan_input_gradient_is_flagged_like_a_zero_one():
    x, y = level_data()

    class NaNGradient(nn.Module):  # Levels' logits exactly, but d/dx sqrt(|x - x|) is NaN everywhere
        def forward(self, x):
            return Levels()(x) + 0 * torch.sqrt((x - x.detach()).abs()).sum((1, 2, 3))[:, None]

    rows = [Row("natural"), Row("whitebox", "ce", 5, 0.1, 0.025)]
    sound = evaluate_model(Levels(), x, y, eps=0.1, step_size=0.025, rows=rows, progress=False)
    nan = evaluate_model(NaNGradient(), x, y, eps=0.1, step_size=0.025, rows=rows, progress=False)
    acc = lambda res: {r["id"]: r["accuracy"] for r in res["rows"]}
    # PGD stands still at a NaN gradient (sign(NaN) is 0 here), so the white-box row is clean accuracy
    assert acc(sound)["whitebox/pgd-5"] == 0.0 and acc(nan)["whitebox/pgd-5"] > 0.5
    assert _status(sound)["zero_gradients"] == "pass"
    assert _status(nan)["zero_gradients"] == "flagged" and nan["masking_suspected"]
    assert "; 40 have a NaN or infinite gradient of the CE loss, 40 of the margin" in _detail(nan, "zero_gradients")


def test_a_model_that_does_not_return_logits_is_refused_in_one_line():
    x, y = level_data(8)

    class Three(nn.Module):  # one class short
        def forward(self, x):
            return Levels()(x)[:, :3]

    # labels up to 3 on a 3-logit model: refused by the label check before any attack runs
    with pytest.raises(DataError, match=r"y holds label 3, but the model gives 3 classes"):
        _natural_only(Three(), x, y)
    with pytest.raises(ModelOutputError, match=r"expected logits of shape \(8, 10\)"):
        _natural_only(Levels(), x, y, num_classes=10)

    class Pair(nn.Module):
        def forward(self, x):
            return Levels()(x), None

    with pytest.raises((ModelOutputError, DataError), match="expected (a tensor of )?logits"):
        _natural_only(Pair(), x, y)


# ---------------------------------------------------------------------------------------------------------
# restarts, targeted and transfer


def test_restarts_check_fires_when_the_start_decides():
    # 2x2 images whose mean sits just inside the class boundary: a quantized model gives PGD no gradient,
    # so each start is one random draw that crosses the boundary about a third of the time
    x, y = level_data(40, size=2, offset=0.05 - 0.012, spread=0.0)

    def run(model, eps):
        rows = [Row("natural"), Row("whitebox", "ce", 5, eps, eps / 4), Row("restarts", "ce", 5, eps, eps / 4, 5)]
        return evaluate_model(model, x, y, eps=eps, step_size=eps / 4, rows=rows, batch_size=40, progress=False)

    masked = run(Levels(quantize=True), 0.1)
    acc = {r["id"]: r["accuracy"] for r in masked["rows"]}
    assert acc["natural"] == 1.0 and acc["restarts/pgd-5-x5"] < acc["whitebox/pgd-5"] - 0.3
    assert _status(masked)["restarts_stable"] == "flagged"
    assert _status(run(Levels(), 0.1))["restarts_stable"] == "pass"  # the gradient crosses from any start
    robust = run(Levels(), 0.005)  # nothing to find from any start
    assert _status(robust)["restarts_stable"] == "pass"
    assert {r["id"]: r["accuracy"] for r in robust["rows"]}["restarts/pgd-5-x5"] == 1.0


def test_targeted_attack_finds_what_a_saturated_softmax_hides_from_pgd():
    x, y = level_data(24)

    def run(model, eps):
        rows = [Row("natural"), Row("whitebox", "ce", 10, eps, eps / 4),
                Row("whitebox", "targeted", 10, eps, eps / 4, targets=9)]
        res = evaluate_model(model, x, y, eps=eps, step_size=eps / 4, rows=rows, batch_size=24, progress=False)
        return res, {r["id"]: r["accuracy"] for r in res["rows"]}

    masked, acc = run(Levels(scale=1e6), 0.1)
    assert acc["whitebox/pgd-10"] == 1.0 and acc["whitebox/targeted-10"] == 0.0
    assert _status(masked)["targeted_vs_pgd"] == "flagged"
    assert masked["robust_acc"] == 0.0  # the worst case takes the targeted row in
    row = next(r for r in masked["rows"] if r["id"] == "whitebox/targeted-10")
    assert row["targets"] == 3 and "top 3 target classes" in row["title"]  # 4 classes: 3 wrong ones
    for eps, expected in ((0.1, 0.0), (0.04, 1.0)):  # the sound model: broken by both, or by neither
        sound, acc = run(Levels(), eps)
        assert acc["whitebox/targeted-10"] == acc["whitebox/pgd-10"] == expected
        assert _status(sound)["targeted_vs_pgd"] == "pass"


def test_targets_are_tried_most_likely_first_and_only_on_the_still_robust(monkeypatch):
    x, y = level_data(24)
    calls = []
    real = suite.targeted_robust.__globals__["pgd_budgets"]

    def spy(model, xs, ys, **kw):
        calls.append((len(ys), kw["target"].clone(), ys.clone()))
        return real(model, xs, ys, **kw)

    monkeypatch.setitem(suite.targeted_robust.__globals__, "pgd_budgets", spy)
    rows = [Row("natural"), Row("whitebox", "targeted", 10, 0.06, 0.015, targets=3)]
    evaluate_model(Levels(), x, y, eps=0.06, step_size=0.015, rows=rows, batch_size=24, progress=False)
    sizes = [c[0] for c in calls]
    assert sizes[0] == 24 and sizes == sorted(sizes, reverse=True) and len(sizes) <= 3
    # the first target is the nearest level: the neighbour on the side the image's mean leans to
    first_target, ys = calls[0][1], calls[0][2]
    assert ((first_target - ys).abs() == 1).all()


def test_transfer_check_fires_when_a_natural_model_does_better_than_the_gradients():
    x, y = level_data()
    kw = {"eps": 0.1, "step_size": 0.025, "suite": "quick", "transfer": Levels(), "batch_size": 64,
          "progress": False}
    sound = evaluate_model(Levels(), x, y, **kw)
    masked = evaluate_model(Levels(quantize=True), x, y, **kw)
    assert _status(sound)["transfer_weaker_than_whitebox"] == "pass"
    assert _status(masked)["transfer_weaker_than_whitebox"] == "flagged"
    acc = {r["id"]: r["accuracy"] for r in masked["rows"]}
    assert acc["transfer/pgd-20"] < 0.1 and acc["whitebox/pgd-20"] == 1.0
    assert "transfer/pgd-20" not in masked["robust_acc_rows"]  # not a white-box row
    with pytest.raises(Exception, match="--transfer-from"):
        evaluate_model(Levels(), x, y, eps=0.1, step_size=0.025, rows=[Row("transfer", "ce", 5, 0.1, 0.025)],
                       progress=False)


# ---------------------------------------------------------------------------------------------------------
# curves


def _curves(model, x, y, step=0.025, **kw):
    return evaluate_model(model, x, y, eps=0.1, step_size=step, suite="quick", curves=True, batch_size=64,
                          progress=False, **kw)


def test_curves_of_a_sound_model_fall_to_chance_and_converge(tmp_path):
    x, y = level_data()
    res = _curves(Levels(), x, y)
    eps_c, steps_c = res["curves"]["eps"], res["curves"]["steps"]
    eps_acc = [p["accuracy"] for p in eps_c["points"]]
    assert eps_c["points"][0]["eps"] == 0 and eps_c["points"][-1]["eps"] == pytest.approx(0.2)
    assert eps_acc[0] == 1.0 and eps_acc[-1] == 0.0 and eps_c["chance"] == 0.25
    assert eps_acc == sorted(eps_acc, reverse=True) and 0 < eps_acc[2] < 1  # a real fall, not a step
    steps_acc = [p["accuracy"] for p in steps_c["points"]]
    assert [p["steps"] for p in steps_c["points"]] == list(STEPS_GRID)
    assert steps_acc == sorted(steps_acc, reverse=True) and steps_acc[0] == 1.0 and steps_acc[-1] == 0.0
    # shared work: the curves' points at eps0 / 20 steps are the suite's PGD-20 row, example for example
    row = next(r for r in res["rows"] if r["id"] == "whitebox/pgd-20")
    at_eps0 = next(p for p in eps_c["points"] if p["eps"] == 0.1)
    assert at_eps0["correct"] == row["correct"] == steps_c["points"][STEPS_GRID.index(20)]["correct"]
    st = _status(res)
    assert st["eps_curve_reaches_chance"] == st["eps_curve_non_increasing"] == st["steps_curve_converged"] == "pass"
    files = write_curves(tmp_path, res["curves"])
    assert sorted(p.name for p in files) == ["curve_eps.csv", "curve_eps.png", "curve_steps.csv", "curve_steps.png"]
    lines = (tmp_path / "curve_eps.csv").read_text().splitlines()
    assert lines[0] == "eps,n,correct,accuracy,ci95_low,ci95_high" and len(lines) == 1 + len(eps_c["points"])
    assert (tmp_path / "curve_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eps_curve_of_a_masked_model_is_extended_to_the_cap_and_flagged():
    x, y = level_data()
    res = _curves(Levels(quantize=True), x, y)
    pts = res["curves"]["eps"]["points"]
    assert pts[-1]["eps"] == pytest.approx(EPS_CAP) and pts[-1]["accuracy"] > 0.5  # doubled 0.2 -> 0.4 -> 0.5
    assert [round(p["eps"], 6) for p in pts[-3:]] == [0.2, 0.4, 0.5]
    assert _status(res)["eps_curve_reaches_chance"] == "flagged"


def test_steps_curve_still_falling_at_200_steps_is_flagged():
    x, y = level_data()
    slow = _curves(Levels(), x, y, step=0.0004)  # 200 steps of 0.0004 only just cross the boundary
    pts = {p["steps"]: p["accuracy"] for p in slow["curves"]["steps"]["points"]}
    assert pts[100] - pts[200] > 0.5
    assert _status(slow)["steps_curve_converged"] == "flagged"
    # without curves the paper suite's PGD-100 and PGD-200 rows give the same check
    rows = [Row("natural"), Row("whitebox", "ce", 100, 0.1, 0.0004), Row("whitebox", "ce", 200, 0.1, 0.0004)]
    res = evaluate_model(Levels(), x, y, eps=0.1, step_size=0.0004, rows=rows, batch_size=64, progress=False)
    assert _status(res)["steps_curve_converged"] == "flagged"


# ---------------------------------------------------------------------------------------------------------
# shared work changes no number


def test_pruning_inside_pgd_changes_no_row(tiny, monkeypatch):
    model, x, y = tiny
    rows = [Row("natural"), *(Row("whitebox", "ce", k, EPS, STEP) for k in (1, 4, 12)),
            Row("whitebox", "cw", 6, EPS, STEP, 2), Row("whitebox", "targeted", 6, EPS, STEP, targets=2),
            Row("restarts", "ce", 4, EPS, STEP, 3)]
    kw = {"eps": EPS, "step_size": STEP, "rows": rows, "seed": 5, "batch_size": 10, "progress": False}
    pruned = evaluate_model(model, x, y, **kw)
    real = suite.pgd_budgets
    monkeypatch.setattr(suite, "pgd_budgets", lambda *a, **k: real(*a, **{**k, "prune": False}))
    monkeypatch.setitem(suite.targeted_robust.__globals__, "pgd_budgets",
                        lambda *a, **k: real(*a, **{**k, "prune": False}))
    full = evaluate_model(model, x, y, **kw)
    for k, v in full["per_example"].items():
        assert torch.equal(v, pruned["per_example"][k]), k
    acc = {r["id"]: r["accuracy"] for r in full["rows"]}
    assert 0 < acc["whitebox/pgd-12"] < acc["whitebox/pgd-1"] <= 1  # the attacks do something here
