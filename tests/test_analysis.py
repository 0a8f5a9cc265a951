"""The analyses of sections 4.3 / 4.4 (Figures 2-4, Table 4) on tiny models and data."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA

from robustfeat.analysis import (
    AnalysisError,
    RankAccumulator,
    analysis_attack,
    attention_maps,
    attention_vs_robustness,
    classify_maps,
    clip_std,
    feature_robustness,
    gradient_map_accuracy,
    gradient_maps,
    pick_examples,
    prepare_maps,
    rankdata,
    rescale_unit,
    robustness_order,
    spearman,
    subset,
    upsample_map,
    weights_by_rank,
)
from robustfeat.attacks import attack_from_config
from robustfeat.cli import main
from robustfeat.config import AttackConfig, load_config
from robustfeat.data import to_float_images
from robustfeat.models import create_model
from robustfeat.train import train

CIFAR = SHARED_DATA / "cifar10" / "cifar10_lossless.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ATTACK = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=2, bn_mode="eval")


def _tiny(name="resnet_att", seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=3, widths=[4, 4, 8, 8], num_units=1).eval()


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _is_png(path):
    path = Path(path)
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------
# Figure 2: rank averaging


def test_rank_averaging_by_hand():
    # image 1: distances rank positions as 1, 3, 0, 2 (most -> least robust)
    # image 2: distances already in order
    dist = torch.tensor([[0.3, 0.1, 0.4, 0.2], [1.0, 2.0, 3.0, 4.0]])
    w = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    assert robustness_order(dist).tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    by_rank = weights_by_rank(w, dist)
    assert torch.allclose(by_rank, torch.tensor([[0.4, 0.3, 0.1, 0.2], [0.7, 0.1, 0.1, 0.1]]))
    acc = RankAccumulator()
    acc.add(by_rank[:1])
    acc.add(by_rank[1:])  # accumulating in two batches = one batch
    r = acc.result((2, 2))
    np.testing.assert_allclose(r.mean, [0.55, 0.2, 0.1, 0.15])
    np.testing.assert_allclose(r.std, [0.15, 0.1, 0.0, 0.05], atol=1e-12)
    assert r.n == 2 and r.mean.sum() == pytest.approx(1.0)
    # ranks of the mean curve are 3, 2, 0, 1: rho = 1 - 6 * (9 + 1 + 4 + 4) / (4 * 15) = -0.8
    assert r.spearman == pytest.approx(-0.8)


def test_weights_by_rank_accepts_a_spatial_map_and_ties_keep_position_order():
    dist = torch.zeros(1, 4)  # all tied: stable order = position order
    w = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])  # (B, H', W')
    assert robustness_order(dist).tolist() == [[0, 1, 2, 3]]
    assert torch.allclose(weights_by_rank(w, dist), w.flatten(1))


def test_feature_robustness_is_the_l2_distance_per_position():
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0, :, 0, 1] = torch.tensor([3.0, 4.0, 0.0])  # position 1 of image 0 moves by 5
    d = feature_robustness(a, b)
    assert d.shape == (2, 4)
    assert d.tolist() == [[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_spearman_matches_hand_values():
    assert spearman(np.arange(5), np.arange(5) ** 2) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5.0)) == pytest.approx(-1.0)
    assert rankdata([10, 20, 20, 5]).tolist() == [1.0, 2.5, 2.5, 0.0]
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(1.5 / np.sqrt(3))
    assert np.isnan(spearman([1, 2, 3], [7, 7, 7]))


def test_attention_vs_robustness_on_a_tiny_model():
    model = _tiny()
    x, y = _images(5)
    gen = torch.Generator().manual_seed(0)
    r = attention_vs_robustness(model, x, y, ATTACK, batch_size=2, generator=gen)
    assert r.grid == (8, 8) and r.mean.shape == (64,) and r.std.shape == (64,) and r.n == 5
    assert (r.mean >= 0).all() and r.mean.sum() == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= r.spearman <= 1.0
    assert not model.training
    # the per-image pieces: ranks are a permutation, weights sum to 1
    xf = to_float_images(x, torch.device("cpu"))
    with torch.no_grad():
        out = model.attention(xf)
    assert out.weights.shape == (5, 8, 8) and out.local.shape == (5, 8, 8, 8)
    assert torch.allclose(out.weights.flatten(1).sum(1), torch.ones(5), atol=1e-5)
    order = robustness_order(feature_robustness(out.local, out.local + torch.rand_like(out.local)))
    assert torch.equal(order.sort(1).values, torch.arange(64).expand(5, 64))


def test_analysis_attack_drops_the_training_only_start_and_projection_options():
    # an N-FGSM training attack with an unclipped start: its adversaries may leave the eps-ball
    train_attack = load_config("cifar10-at-att", overrides=[
        "attack.steps=1", "attack.step_size=0.031", "attack.start_scale=2", "attack.project=false",
        "attack.clip_start=false"]).attack
    a = analysis_attack(train_attack)
    assert type(a) is AttackConfig and a.bn_mode == "eval" and train_attack.bn_mode == "train"
    assert (a.eps, a.step_size, a.steps, a.restarts, a.loss) == (
        train_attack.eps, train_attack.step_size, 1, train_attack.restarts, train_attack.loss)
    model = _tiny()
    x, y = _images(4)
    xf = to_float_images(x, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    xa = attack_from_config(model, xf, y, a, generator=gen, keep_best=False)
    assert (xa - xf).abs().max() <= a.eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    gen = torch.Generator().manual_seed(0)
    wide = attack_from_config(model, xf, y, train_attack, generator=gen, keep_best=False)
    assert (wide - xf).abs().max() > a.eps + 1e-3  # the training attack itself does leave the ball


def test_attention_analyses_refuse_a_model_without_attention():
    model = _tiny("resnet")
    x, y = _images(2)
    with pytest.raises(AnalysisError, match="needs a model with attention"):
        attention_vs_robustness(model, x, y, ATTACK)
    with pytest.raises(AnalysisError, match="needs a model with attention"):
        attention_maps(model, x)


# ---------------------------------------------------------------------------------------------------
# Figure 3


def test_attention_maps_shapes_and_upsampling():
    model = _tiny()
    x, _ = _images(3)
    w, up, pred = attention_maps(model, x, batch_size=2)
    assert w.shape == (3, 8, 8) and up.shape == (3, 32, 32) and pred.shape == (3,)
    assert (up >= 0).all()
    assert torch.allclose(up.flatten(1).sum(1), torch.ones(3), atol=0.05)  # bilinear keeps the mass roughly
    const = upsample_map(torch.full((1, 8, 8), 1 / 64), (32, 32))
    assert torch.allclose(const, torch.full((1, 32, 32), 1 / 1024))


# ---------------------------------------------------------------------------------------------------
# Figure 4 and Table 4


def test_gradient_maps_are_per_example_input_gradients():
    model = _tiny("resnet")
    x, y = _images(4)
    xf = to_float_images(x, torch.device("cpu"))
    g = gradient_maps(model, xf, y)
    assert g.shape == xf.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    g0 = gradient_maps(model, xf[:1], y[:1])  # eval mode: a map does not depend on its batch
    assert torch.allclose(g[:1], g0, atol=1e-6)


def test_clipping_and_rescaling_ranges():
    g = torch.randn(3, 3, 8, 8)
    g[0, 0, 0, 0] = 100.0  # an outlier the clip must cut back
    clipped = clip_std(g)
    flat = g.flatten(1)
    hi = flat.mean(1) + 3 * flat.std(1, unbiased=False)
    assert clipped.flatten(1).amax(1).le(hi + 1e-6).all()
    for clip in (True, False):
        m = prepare_maps(g, clip=clip)
        assert m.shape == g.shape and m.dtype == torch.float32
        assert m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m.flatten(1).amin(1), torch.zeros(3)) and torch.allclose(m.flatten(1).amax(1), torch.ones(3))
    # by hand for one image: clip to mean +- 3 std (population std over all C*H*W values), min/max rescale
    one = torch.cat([torch.arange(15.0) % 4, torch.tensor([50.0])]).view(1, 1, 4, 4)  # 50 is > 3 std out
    mean, std = one.mean(), one.std(unbiased=False)
    hi, lo = mean + 3 * std, torch.maximum(one.min(), mean - 3 * std)
    assert hi < 50
    expected = (one.clamp(max=hi) - lo) / (hi - lo)
    assert torch.allclose(prepare_maps(one, clip=True), expected)
    assert torch.allclose(prepare_maps(one, clip=False), one / 50)
    assert torch.equal(rescale_unit(torch.zeros(2, 1, 4, 4)), torch.full((2, 1, 4, 4), 0.5))


class _Recorder(torch.nn.Module):
    """Wraps a classifier and keeps every input it is shown."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_classifier_sees_maps_prepared_like_its_training_images():
    x, y = _images(5)
    model, clf = _tiny("resnet", seed=1), _Recorder(_tiny("resnet", seed=2))
    images = to_float_images(x, torch.device("cpu"))  # exactly what training feeds the classifier
    acc = gradient_map_accuracy(model, clf, x, y, batch_size=3)
    assert set(acc) == {"clipped", "raw"} and all(0 <= a <= 1 for a in acc.values())
    assert len(clf.seen) == 4  # two batches x (clipped, raw)
    g = gradient_maps(model, images, y)  # the accuracies are the classifier's on the split's maps
    clf.eval()  # (the call put the recorder back in its training mode, and the network with it)
    with torch.no_grad():
        for v in ("clipped", "raw"):
            want = (clf.inner(prepare_maps(g, clip=v == "clipped")).argmax(1) == y).float().mean().item()
            assert acc[v] == pytest.approx(want), v
    for m in clf.seen:
        assert m.dtype == images.dtype and m.dim() == 4 and m.shape[1:] == images.shape[1:]
        assert m.min() >= 0 and m.max() <= 1
    # a "map" that is the image itself is classified exactly as the image
    clf.seen.clear()
    with torch.no_grad():
        direct = clf.inner(images).argmax(1)
    assert torch.equal(classify_maps(clf, images), direct)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classify_maps(clf, images * 255)
    with pytest.raises(ValueError, match="float"):
        classify_maps(clf, x)


def test_grayscale_maps_keep_one_channel():
    model = create_model("mnist_cnn", num_classes=10, in_channels=1).eval()
    x = torch.rand(2, 1, 28, 28)
    m = prepare_maps(gradient_maps(model, x, torch.tensor([1, 2])))
    assert m.shape == (2, 1, 28, 28)


def test_pick_examples_and_subset():
    y = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    assert pick_examples(y, 3).tolist() == [1, 3, 0]  # first of each class, in class order
    assert pick_examples(y, 5).tolist() == [1, 3, 0, 2, 5]
    assert pick_examples(y, 100).sort().values.tolist() == list(range(7))
    x = torch.arange(7)
    xs, ys = subset(x, y, 4, seed=0)
    assert len(xs) == 4 and torch.equal(y[xs], ys) and torch.equal(xs, xs.sort().values)
    assert subset(x, y, None, 0)[0] is x


# ---------------------------------------------------------------------------------------------------
# figures


def test_figures_write_png_files(tmp_path):
    from robustfeat.analysis import RankAverage
    from robustfeat.analysis.figures import plot_attention_maps, plot_attention_robustness, plot_gradient_maps

    r = RankAverage(np.full(64, 1 / 64), np.full(64, 0.01), 10, (8, 8))
    assert _is_png(plot_attention_robustness({"Training set": r, "Test set": r}, tmp_path / "f2.png"))
    imgs = torch.rand(3, 3, 32, 32)
    assert _is_png(plot_attention_maps(imgs, torch.rand(3, 32, 32), ["a", "b", "c"], tmp_path / "f3.png"))
    gray = torch.rand(12, 1, 28, 28)  # MNIST-like, wraps onto two blocks of columns
    rows = [("model A", torch.rand(12, 1, 28, 28)), ("model B", torch.rand(12, 1, 28, 28))]
    assert _is_png(plot_gradient_maps(gray, rows, [str(i) for i in range(12)], tmp_path / "f4.png", note="n"))


# ---------------------------------------------------------------------------------------------------
# the commands end to end on tiny runs


@pytest.fixture(scope="module")
def att_run(tmp_path_factory):
    if not CIFAR.exists():
        pytest.skip("CIFAR-10 data not available")
    cfg = load_config("cifar10-at-att", "smoke", overrides=[
        f"data.dir={SHARED_DATA}", "model.widths=[4,4,8,8]", "data.train_size=16", "data.val_size=8",
        "optim.batch_size=8", "optim.steps=1", "attack.steps=1", "eval_attack.steps=1",
        "run.eval_every=1", "run.eval_size=8", "run.log_every=1", "run.device=cpu",
    ])
    out = tmp_path_factory.mktemp("runs") / "att"
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    cfg = load_config("demo", overrides=[
        "data.train_size=40", "data.val_size=20", "optim.batch_size=20", "optim.steps=1", "optim.milestones=[]",
        "attack.steps=1",
        "eval_attack.steps=1", "run.eval_every=1", "run.eval_size=20", "run.log_every=1",
    ])
    out = tmp_path_factory.mktemp("runs") / "mnist"
    train(cfg, out, progress=False)
    return out


def test_cli_attention_analyses(att_run, capsys):
    run = str(att_run)
    assert main(["analyze", "attention-robustness", run, "--n", "6", "--batch-size", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "Training set (6 images)" in printed and "Test set (6 images)" in printed
    a = att_run / "analysis"
    assert _is_png(a / "attention_robustness.png")
    rows = list(csv.DictReader((a / "attention_robustness.csv").open()))
    assert [int(r["rank"]) for r in rows] == list(range(64))
    assert sum(float(r["test_mean_weight"]) for r in rows) == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((a / "attention_robustness.json").read_text())
    assert summary["splits"]["train"]["n"] == 6 and summary["attack"]["bn_mode"] == "eval"
    # the untrained control went through the same measurement: its own curve, a distribution over ranks
    ctrl = summary["splits"]["test"]["control_mean_by_rank"]
    assert len(ctrl) == 64 and sum(ctrl) == pytest.approx(1.0, abs=1e-5) and "untrained model" in printed
    assert -1 <= summary["splits"]["test"]["control_spearman"] <= 1
    assert main(["analyze", "attention-maps", run, "--n", "4", "--quiet"]) == 0
    assert _is_png(a / "attention_maps.png")


def test_cli_gradient_analyses(att_run, mnist_run, tmp_path, capsys):
    run = str(att_run)
    assert main(["analyze", "gradient-maps", run, run, "--n", "3", "--out", str(tmp_path)]) == 0
    assert _is_png(tmp_path / "gradient_maps.png")
    assert main(["analyze", "gradient-classification", "--classifier", run, run, "--n", "5",
                 "--out", str(tmp_path), "--quiet"]) == 0
    res = json.loads((tmp_path / "gradient_classification.json").read_text())
    assert res["n"] == {"train": 5, "test": 5} and res["image_shape"] == [3, 32, 32]
    row = res["rows"][0]
    assert all(0 <= row[f"{v}_{s}"] <= 1 for v in ("clipped", "raw") for s in ("train", "test"))
    md = (tmp_path / "gradient_classification.md").read_text()
    assert "with clipping, train" in md and "cifar10-at-att" in md
    # grayscale: the MNIST run's maps keep one channel and are drawn in gray
    assert main(["analyze", "gradient-maps", str(mnist_run), "--n", "2", "--quiet"]) == 0
    assert _is_png(mnist_run / "analysis" / "gradient_maps.png")
    capsys.readouterr()
    # a clear one-line error (exit 2) for an attention analysis of a model without attention
    assert main(["analyze", "attention-maps", str(mnist_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs a model with attention" in err and err.count("\n") == 1
    # and for runs on different datasets
    assert main(["analyze", "gradient-maps", run, str(mnist_run), "--quiet"]) == 2
    assert "different datasets" in capsys.readouterr().err
