"""Tests for robustfeat.models: shapes, the G(x)/head split, attention, Madry's architectures."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from robustfeat.models import (
    AttentionOutput,
    RobustModel,
    create_model,
    list_models,
    per_image_standardization,
)

ALL_NAMES = [
    "mnist_cnn",
    "resnet",
    "resnet_att",
    "resnet_madry_wide",
    "resnet_madry_wide_att",
    "resnet_wide3",
    "resnet_wide3_att",
]
ATT_NAMES = [n for n in ALL_NAMES if n.endswith("_att")]
PLAIN_NAMES = [n for n in ALL_NAMES if not n.endswith("_att")]
WIDTHS = {
    "resnet": [16, 16, 32, 64],
    "resnet_wide3": [16, 48, 96, 192],
    "resnet_madry_wide": [16, 160, 320, 640],
}


def _spec(name: str) -> tuple[int, int]:
    """(in_channels, input size) of the data a model is meant for."""
    return (1, 28) if name == "mnist_cnn" else (3, 32)


def _batch(name: str) -> int:
    return 2 if "madry_wide" in name else 4  # the 46M-parameter models: one small batch


@functools.cache
def _model(name: str) -> RobustModel:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=_spec(name)[0])


def _input(name: str, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    c, s = _spec(name)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch or _batch(name), c, s, s, generator=g)


def test_registered_names():
    assert list_models() == sorted(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shapes_and_head_split(name):
    model = _model(name).eval()
    x = _input(name)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        head = model.forward_head(model.forward_features(x))
    b = x.shape[0]
    assert logits.shape == (b, 10)
    assert feats.shape == (b, model.feature_dim)
    assert torch.allclose(logits, model.forward_head(feats), atol=1e-5)
    assert torch.allclose(logits, head, atol=1e-5)
    assert model.num_classes == 10
    assert model.model_name == name
    assert model.has_attention == name.endswith("_att")
    if name != "mnist_cnn":
        assert model.feature_dim == WIDTHS[name.removesuffix("_att")][3]
    else:
        assert model.feature_dim == 1024


@pytest.mark.parametrize("name", ALL_NAMES)
def test_backward_gives_finite_grads(name):
    model = _model(name).train()
    model.zero_grad(set_to_none=True)
    x = _input(name, batch=2).requires_grad_(True)
    y = torch.tensor([1, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("name", ATT_NAMES)
def test_attention_output(name):
    model = _model(name).eval()
    x = _input(name)
    b = x.shape[0]
    c = WIDTHS[name.removesuffix("_att")][3]
    with torch.no_grad():
        out = model.attention(x)
        logits = model(x)
        feats = model.features(x)
    assert isinstance(out, AttentionOutput)
    assert out.weights.shape == (b, 8, 8)
    assert out.local.shape == (b, c, 8, 8)
    assert out.features.shape == (b, c)
    assert (out.weights >= 0).all()
    assert torch.allclose(out.weights.sum(dim=(1, 2)), torch.ones(b), atol=1e-5)
    weighted = (out.weights[:, None] * out.local).sum(dim=(2, 3))
    assert torch.allclose(out.features, weighted, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out.features, feats, atol=1e-6)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    # the local features are the map after the final BN + leaky ReLU
    assert torch.allclose(out.local, model.local_features(x), atol=1e-6)


def test_attention_weights_depend_on_input():
    model = _model("resnet_att").eval()
    with torch.no_grad():
        w = model.attention(_input("resnet_att", batch=2)).weights
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("size,expected", [(32, 8), (28, 7), (48, 12), (20, 5)])
def test_attention_other_input_sizes(size, expected):
    model = _model("resnet_att").eval()
    with torch.no_grad():
        out = model.attention(torch.rand(2, 3, size, size))
    assert out.weights.shape == (2, expected, expected)
    assert out.local.shape == (2, 64, expected, expected)
    assert out.logits.shape == (2, 10)
    assert torch.allclose(out.weights.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)


def test_attention_rejects_too_small_input():
    model = _model("resnet_att").eval()
    with pytest.raises(ValueError, match="at least"):
        model(torch.rand(2, 3, 16, 16))


def test_attention_global_feature_shape_for_cifar():
    """The sandwich max-pool -> conv3x3 (no padding) -> max-pool maps 8x8 to 1x1."""
    head = _model("resnet_att").att
    assert head.global_conv.kernel_size == (3, 3)
    assert head.global_conv.padding == (0, 0)
    assert head.global_conv.bias is not None
    assert head.hidden == 64
    g = head.global_feature(torch.rand(3, 64, 8, 8))
    assert g.shape == (3, 64)


def test_att_hidden_override():
    model = create_model("resnet_att", 10, 3, widths=[8, 8, 8, 16], num_units=1, att_hidden=7)
    assert model.att.local_proj.out_channels == 7
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_plain_models_have_no_attention(name):
    model = _model(name)
    with pytest.raises(TypeError, match="no attention module"):
        model.attention(_input(name, batch=1))


def test_mnist_cnn_parameter_count():
    model = create_model("mnist_cnn", num_classes=10, in_channels=1)
    expected = (
        (32 * 25 + 32)  # conv1
        + (64 * 32 * 25 + 64)  # conv2
        + (3136 * 1024 + 1024)  # fc1
        + (1024 * 10 + 10)  # fc2
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 3274634
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_mnist_cnn_input_size():
    model = create_model("mnist_cnn", num_classes=10, in_channels=1, input_size=32)
    assert model.fc1.in_features == 64 * 8 * 8
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.rand(2, 1, 28, 28))


def _resnet_param_count(widths, num_units=5, in_channels=3, num_classes=10):
    def unit(cin, cout):
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout  # bn1, conv1, bn2, conv2

    total = 9 * in_channels * widths[0]  # init conv, no bias
    cin = widths[0]
    for cout in widths[1:]:
        total += unit(cin, cout) + (num_units - 1) * unit(cout, cout)
        cin = cout
    total += 2 * widths[3]  # final BN
    total += widths[3] * num_classes + num_classes  # linear
    return total


@pytest.mark.parametrize("name", ["resnet", "resnet_wide3", "resnet_madry_wide"])
def test_resnet_parameter_count(name):
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == _resnet_param_count(WIDTHS[name])


def test_resnet_small_parameter_count_value():
    assert _resnet_param_count([16, 16, 32, 64]) == 464154
    assert sum(p.numel() for p in _model("resnet").parameters()) == 464154


def test_resnet_att_parameter_count():
    c, hidden = 64, 64
    extra = (
        (9 * c * c + c)  # sandwich conv with bias
        + (c * hidden + hidden)  # W_l (1x1 conv) + b
        + c * hidden  # W_g
        + hidden  # output layer (no bias: softmax is shift invariant)
    )
    model = _model("resnet_att")
    assert sum(p.numel() for p in model.parameters()) == _resnet_param_count(WIDTHS["resnet"]) + extra


def test_resnet_layer_structure():
    model = _model("resnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 + 3 * 5 * 2
    assert len(bns) == 3 * 5 * 2 + 1
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    for bn in bns:
        assert bn.momentum == pytest.approx(0.1)
        assert bn.eps == pytest.approx(1e-3)
    units = [u for stage in (model.stage1, model.stage2, model.stage3) for u in stage]
    assert len(units) == 15
    assert [u.activate_before_residual for u in units] == [True] + [False] * 14
    assert [u.stride for u in units] == [1] * 5 + [2] + [1] * 4 + [2] + [1] * 4
    assert [u.cout for u in units] == [16] * 5 + [32] * 5 + [64] * 5


def test_num_units_override():
    model = create_model("resnet", 10, 3, num_units=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 * 2
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_per_image_standardization_matches_formula():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    x[2] = 0.25  # constant image: std 0 -> divided by 1 / sqrt(N), result all zeros
    y = per_image_standardization(x)
    n = 3 * 8 * 8
    for i in range(3):
        flat = x[i].flatten()
        std = max(flat.std(unbiased=False).item(), 1.0 / n**0.5)
        assert torch.allclose(y[i], (x[i] - flat.mean()) / std)
    assert torch.allclose(y[2], torch.zeros_like(y[2]))
    assert torch.allclose(y[0].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y[0].std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("name", ["resnet", "resnet_att"])
def test_resnet_invariant_to_affine_input_change(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 3).double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a = model(x)
        b = model(0.5 * x + 0.1)
    assert torch.allclose(a, b, atol=1e-9)


def test_unknown_model_name_suggests_nearest():
    with pytest.raises(KeyError, match="did you mean 'resnet_att'"):
        create_model("resnet_at", num_classes=10, in_channels=3)
    with pytest.raises(KeyError, match="unknown model"):
        create_model("vgg16", num_classes=10, in_channels=3)


@pytest.mark.parametrize("name", ["resnet", "resnet_att"])
def test_widths_override(name):
    model = create_model(name, num_classes=7, in_channels=3, widths=[8, 8, 16, 24])
    assert model.feature_dim == 24
    assert model.conv_init.out_channels == 8
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, 24)
    if model.has_attention:
        assert model.attention(x).local.shape == (2, 24, 8, 8)


def test_odd_channel_padding_and_bad_widths():
    model = create_model("resnet", 10, 3, widths=[5, 8, 13, 20], num_units=1)  # odd differences
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="4 entries"):
        create_model("resnet", 10, 3, widths=[16, 32, 64])


def test_in_channels_and_num_classes():
    model = create_model("resnet", num_classes=100, in_channels=1)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 100)
    model = create_model("mnist_cnn", num_classes=3, in_channels=3)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_channels_last_input_matches(name):
    model = _model(name).eval()
    x = _input(name, batch=2)
    xc = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] > 1:  # with one channel both layouts have the same strides
        assert not xc.is_contiguous()
    with torch.no_grad():
        a = model(x)
        b = model(xc)
        if model.has_attention:
            oa, ob = model.attention(x), model.attention(xc)
            assert torch.allclose(oa.weights, ob.weights, atol=1e-5)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mnist_cnn", "resnet", "resnet_att"])
def test_channels_last_model_matches(name):
    torch.manual_seed(0)
    model = create_model(name, 10, _spec(name)[0]).eval()
    x = _input(name, batch=2)
    with torch.no_grad():
        a = model(x)
        model = model.to(memory_format=torch.channels_last)
        b = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_madry_initialization_scales():
    torch.manual_seed(0)
    model = create_model("resnet_wide3", 10, 3)
    conv = model.stage2[1].conv2  # 96 -> 96, 3x3
    assert conv.weight.std().item() == pytest.approx((2.0 / (9 * 96)) ** 0.5, rel=0.05)
    bound = (3.0 / 192) ** 0.5
    # uniform in +-bound: reaches it, with std bound / sqrt(3) (torch's default bound is 0.072)
    assert 0.95 * bound < model.fc.weight.abs().max().item() <= bound
    assert model.fc.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0
    mnist = create_model("mnist_cnn", 10, 1, init="madry")
    # normal with std 0.1 truncated at 2 std: max just under 0.2, std 0.1 * 0.880
    assert 0.19 < mnist.fc1.weight.abs().max().item() <= 0.2 + 1e-6
    assert mnist.fc1.weight.std().item() == pytest.approx(0.088, rel=0.02)
    assert torch.allclose(mnist.fc1.bias, torch.full_like(mnist.fc1.bias, 0.1))


def test_mnist_default_init_is_torchs_and_unknown_init_is_refused():
    torch.manual_seed(0)
    mnist = create_model("mnist_cnn", 10, 1)
    assert mnist.fc1.weight.abs().max().item() <= (1.0 / 3136) ** 0.5 + 1e-6  # kaiming-uniform bound
    with pytest.raises(ValueError, match="init='tf'"):
        create_model("mnist_cnn", 10, 1, init="tf")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_registered_metadata_matches_the_model(name):
    from robustfeat.models import model_info

    info = model_info(name)
    model = _model(name)
    assert info.name == name and info.has_attention == model.has_attention
    c, h, w = info.input_shape
    x = torch.rand(2, c, h, w)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 10)
    assert info.family in ("mnist", "cifar")
