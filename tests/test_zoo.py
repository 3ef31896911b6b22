"""Model zoo, MinMax / LLN layers, ONNX round trips and the embedded default model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.models.layers import LastLayerNormalizedLinear, MinMax
from lipverify.models.zoo import (
    ARCHITECTURES,
    DEFAULT_INPUT_SHAPE,
    ScaledResidualConv,
    build,
    c2f2,
    default_model,
    default_samples,
    liresnet,
    mlp,
    same_padding,
)

# (name, kwargs, input shape (C, H, W), expected number of classes)
SPEC_ARCHS = [
    ("2c2f", {}, (1, 28, 28), 10),
    ("4c3f", {}, (1, 28, 28), 10),
    ("4c3f", {"in_ch": 3, "in_size": 32}, (3, 32, 32), 10),
    ("6c2f", {}, (3, 32, 32), 10),
    ("8c2f", {}, (3, 64, 64), 200),
    ("7c1f", {"activation": "minmax"}, (3, 64, 64), 200),
    ("2c2f", {"activation": "minmax"}, (1, 28, 28), 10),
    ("6c2f", {"activation": "minmax"}, (3, 32, 32), 10),
    ("liresnet", {"depth": 2, "width": 16}, (3, 32, 32), 10),
    ("liresnet-L3W8", {"in_size": 64, "n_classes": 200}, (3, 64, 64), 200),
]


@pytest.mark.parametrize("name,kw,shape,m", SPEC_ARCHS)
def test_architecture_builds_and_traces(name, kw, shape, m):
    model = build(name, **kw).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        out_traced = traced(x)
    assert out.shape == (2, m)
    assert torch.equal(out, out_traced)


def test_registry_and_mlp():
    assert {"mlp", "2c2f", "4c3f", "6c2f", "8c2f", "liresnet"} <= set(ARCHITECTURES)
    for key, fn in ARCHITECTURES.items():
        assert fn.__doc__, key
    model = mlp([784, 256, 256, 10])
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    torch.fx.symbolic_trace(model)
    assert sum(isinstance(mod, nn.ReLU) for mod in model) == 2
    with pytest.raises(ValueError):
        build("resnet9000")
    with pytest.raises(ValueError):
        c2f2(activation="swish")
    with pytest.raises(ValueError):
        same_padding(4, 1)


def test_activation_after_every_layer_but_last():
    model = build("4c3f")
    kinds = [type(mod) for mod in model]
    assert kinds[-1] is nn.Linear
    affine = [i for i, k in enumerate(kinds) if k in (nn.Conv2d, nn.Linear)]
    for i in affine[:-1]:
        nxt = kinds[i + 1]
        assert nxt is nn.ReLU, (i, kinds)
    assert len(affine) == 7


def test_2c2f_parameter_count_and_feature_maps():
    model = c2f2()
    # conv 1->16 k4: 16*1*16 + 16; conv 16->32 k4: 32*16*16 + 32;
    # 32 x 7 x 7 = 1568 features; dense 1568->100 and 100->10 with biases.
    expected = (16 * 1 * 4 * 4 + 16) + (32 * 16 * 4 * 4 + 32) + (1568 * 100 + 100) + (100 * 10 + 10)
    assert expected == 166406
    assert sum(p.numel() for p in model.parameters()) == expected
    x = torch.rand(1, 1, 28, 28)
    assert model[:2](x).shape == (1, 16, 14, 14)  # SAME padding: ceil(28/2)
    assert model[:4](x).shape == (1, 32, 7, 7)


def test_liresnet_structure():
    depth, width = 4, 8
    model = liresnet(depth, width)
    blocks = [mod for mod in model if isinstance(mod, ScaledResidualConv)]
    assert len(blocks) == depth
    assert all(math.isclose(b.scale, 1 / math.sqrt(depth)) for b in blocks)
    assert isinstance(model[-1], LastLayerNormalizedLinear)
    assert model[0](torch.rand(1, 3, 32, 32)).shape == (1, width, 16, 16)
    # The merged kernel reproduces the block exactly (it is one linear conv).
    blk = blocks[0]
    with torch.no_grad():
        blk.beta.uniform_(0.5, 1.5)
        x = torch.randn(2, width, 16, 16)
        merged = torch.nn.functional.conv2d(x, blk.merged_kernel(), padding=1)
        assert torch.allclose(blk(x), merged, atol=1e-5)


# ---------------------------------------------------------------------------------------- MinMax


def _brute_minmax(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for k in range(x.shape[1] // 2):
        a, b = x[:, 2 * k], x[:, 2 * k + 1]
        out[:, 2 * k] = torch.maximum(a, b)
        out[:, 2 * k + 1] = torch.minimum(a, b)
    return out


@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 5, 5), (2, 8, 3), (1, 2, 1, 1)])
def test_minmax_matches_brute_force(shape):
    x = torch.randn(*shape)
    assert torch.equal(MinMax()(x), _brute_minmax(x))


def test_minmax_is_one_lipschitz():
    act = MinMax()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 8, generator=g)
    b = a + 0.5 * torch.randn(2000, 8, generator=g)
    # pairs that straddle the swap boundary too
    b[:1000, 0::2], b[:1000, 1::2] = a[:1000, 1::2], a[:1000, 0::2]
    fa, fb = act(a), act(b)
    for p in (2, float("inf")):
        ratio = (fa - fb).norm(p=p, dim=1) / (a - b).norm(p=p, dim=1)
        assert float(ratio.max()) <= 1 + 1e-6
    # a permutation of its input at every point
    assert torch.equal(act(a).sort(1).values, a.sort(1).values)


def test_minmax_odd_channels_raise():
    with pytest.raises(ValueError, match="even"):
        MinMax()(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="even"):
        mlp([10, 7, 2], activation="minmax")  # caught when building, not at the first forward


def test_lln_rows_unit_norm():
    head = LastLayerNormalizedLinear(6, 4)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[3.0], [0.1], [7.0], [1.0]]))
    w = head.normalized_weight()
    assert torch.allclose(w.norm(dim=1), torch.ones(4), atol=1e-6)
    x = torch.randn(5, 6)
    assert torch.allclose(head(x), x @ w.T + head.bias, atol=1e-6)


# ---------------------------------------------------------------------------------------- ONNX


def _onnx_roundtrip(model: nn.Module, x: torch.Tensor, path) -> None:
    onnx2torch = pytest.importorskip("onnx2torch")
    ort = pytest.importorskip("onnxruntime")
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x[:1],),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        converted = onnx2torch.convert(str(path)).eval()
        with torch.no_grad():
            ref = model(x).numpy()
            back = converted(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(back, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_onnx_roundtrip_minmax_convnet(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(1, 8, 4, stride=2, padding=1),
        MinMax(),
        nn.Conv2d(8, 8, 4, stride=2, padding=1),
        MinMax(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 20),
        MinMax(),
        nn.Linear(20, 10),
    )
    _onnx_roundtrip(model, torch.rand(4, 1, 28, 28), tmp_path / "minmax.onnx")


def test_onnx_roundtrip_lln_head_and_residual(tmp_path):
    model = liresnet(depth=2, width=8, dense=16)
    with torch.no_grad():
        model[-1].weight.mul_(torch.linspace(0.2, 5.0, 10)[:, None])
    _onnx_roundtrip(model, torch.rand(3, 3, 32, 32), tmp_path / "liresnet.onnx")


# ---------------------------------------------------------------------------------------- default


def test_default_model_and_samples():
    model = default_model()
    assert not model.training
    x, y = default_samples()
    assert x.shape == (32, *DEFAULT_INPUT_SHAPE) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float((x * 255 - torch.round(x * 255)).abs().max()) < 1e-4  # k/255 values
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.9
