"""Residual branch scales before certified fine-tuning (lipverify.train.residual).

Oracles: the exact operator norms of the convolutions (SVD of their dense matrices built from impulse
responses), the block structure of torchvision's ResNet and MobileNetV2 (module names), and the
network's own forward pass recomputed by hand with the branch multiplied by alpha."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import lipverify
from lipverify.train.residual import layer_operator_norm, residual_blocks, scale_residual_branches


def dense_matrix(conv: nn.Conv2d, in_shape) -> torch.Tensor:
    """The matrix of the convolution's linear part, column by column from impulses."""
    n = int(torch.tensor(in_shape).prod())
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    with torch.no_grad():
        cols = nn.functional.conv2d(eye, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation,
                                    conv.groups)
    return cols.reshape(n, -1).T


class Block(nn.Module):
    def __init__(self, proj: bool):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4 if proj else 3, 3, padding=1)
        self.sc = nn.Conv2d(3, 4, 1) if proj else None
        self.head = nn.Linear((4 if proj else 3) * 5 * 5, 5)

    def branch(self, x):
        return self.c2(torch.relu(self.c1(x)))

    def forward(self, x):
        s = self.sc(x) if self.sc is not None else x
        y = torch.relu(self.branch(x) + s)
        return self.head(y.flatten(1))


@pytest.mark.parametrize("proj", [False, True])
def test_alpha_matches_exact_norms_and_function_is_shortcut_plus_alpha_branch(proj):
    net = Block(proj).eval()
    ref = copy.deepcopy(net)
    gm = fx.symbolic_trace(net)
    x = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    rep = scale_residual_branches(gm, x, 0.25, torch.zeros(6, dtype=torch.long))
    assert len(rep["blocks"]) == 1 and not rep["skipped"]
    blk = rep["blocks"][0]
    assert blk["scaled"] == "c2"
    s1 = torch.linalg.matrix_norm(dense_matrix(ref.c1, (3, 5, 5)), 2).item()
    s2 = torch.linalg.matrix_norm(dense_matrix(ref.c2, (4, 5, 5)), 2).item()
    ks = torch.linalg.matrix_norm(dense_matrix(ref.sc, (3, 5, 5)), 2).item() if proj else 1.0
    assert blk["branch_norm"] == pytest.approx(s1 * s2, rel=1e-3)
    assert blk["shortcut_norm"] == pytest.approx(ks, rel=1e-3)
    alpha = min(1.0, 0.25 * ks / (s1 * s2))
    assert blk["alpha"] == pytest.approx(alpha, rel=1e-3)
    with torch.no_grad():
        s = ref.sc(x) if proj else x
        want = ref.head(torch.relu(blk["alpha"] * ref.branch(x) + s).flatten(1))
        got = gm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_layer_norm_is_an_upper_bound_on_the_exact_norm_with_stride_groups_and_same_padding():
    torch.manual_seed(0)
    for conv, shape in ((nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
                        (nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 6, 6)),
                        (nn.Conv2d(2, 3, 5, padding=0), (2, 9, 8)),
                        (nn.Conv2d(3, 4, 4, padding="same"), (3, 6, 6)),
                        (nn.Conv2d(16, 16, 3, padding=1), (16, 12, 12))):
        exact = torch.linalg.matrix_norm(dense_matrix(conv, shape), 2).item()
        bound = layer_operator_norm(conv, shape)
        assert exact * (1 - 1e-9) <= bound <= exact * 1.1
    lin = nn.Linear(7, 5)
    assert layer_operator_norm(lin, (7,)) == pytest.approx(torch.linalg.svdvals(lin.weight.double())[0].item())
    assert layer_operator_norm(nn.ReLU(), (3,)) is None


def test_torchvision_resnet18_blocks_branches_and_bound():
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18(num_classes=10).eval()
    gm = fx.symbolic_trace(net)
    blocks = residual_blocks(gm)
    assert len(blocks) == 8
    # the branch ends in bn2 of each BasicBlock; the shortcut is the block input or its downsample
    names = sorted(b["branch"].target for b in blocks)
    want = sorted(f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2))
    assert names == want
    downs = [b for b in blocks if any(n.op == "call_module" and "downsample" in n.target for n in b["shortcut_nodes"])]
    assert len(downs) == 3
    assert all(not b["shortcut_nodes"] for b in blocks if b not in downs)  # identity shortcuts
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = lipverify.load(copy.deepcopy(gm), input_shape=(3, 32, 32)).bounds().global_bound.value
    rep = scale_residual_branches(gm, x, 0.1)
    assert len(rep["blocks"]) == 8
    after = lipverify.load(gm, input_shape=(3, 32, 32)).bounds().global_bound.value
    assert after < before / 10  # the sound bound of the scaled network is far smaller


def test_mobilenet_v2_inverted_residuals_found():
    tv = pytest.importorskip("torchvision")
    net = tv.models.mobilenet_v2(num_classes=10).eval()
    gm = fx.symbolic_trace(net)
    blocks = residual_blocks(gm)
    res = [n for n, m in net.named_modules() if type(m).__name__ == "InvertedResidual" and m.use_res_connect]
    assert len(blocks) == len(res) == 10
    for b in blocks:
        assert b["branch"].target.endswith(".2") or b["branch"].target.endswith(".3")  # the projection BN
        assert not b["shortcut_nodes"]


def test_no_residual_adds_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    gm = fx.symbolic_trace(net)
    x = torch.rand(2, 1, 6, 6)
    before = gm(x)
    rep = scale_residual_branches(gm, x, 0.1)
    assert rep["blocks"] == [] and rep["notes"] == []
    torch.testing.assert_close(gm(x), before)


class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 14 * 14, 10)
        with torch.no_grad():  # a branch far above the shortcut, as in a normally trained network
            self.c1.weight.mul_(20)
            self.c2.weight.mul_(20)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.fc(h.flatten(1))


def test_finetune_cli_residual_scale_reports_conversion_and_exports(tmp_path):
    import json

    import numpy as np
    from click.testing import CliRunner

    from lipverify.cli import main
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    data = tmp_path / "samples.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    net = TinyRes().eval()
    src = tmp_path / "res.onnx"
    torch.onnx.export(net, (x[:1],), str(src), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    before = lipverify.load(str(src)).bounds().global_bound.value
    out = tmp_path / "ft"
    res = CliRunner().invoke(main, [str(a) for a in [
        "finetune", src, "--data", data, "--eps", "0.3", "--epochs", "1", "--batch-size", "16",
        "--residual-scale", "0.5", "--lr", "1e-4", "--out", out, "--quiet"]], catch_exceptions=False)
    assert res.exit_code in (0, 4), res.output
    rep = json.loads((out / "report.json").read_text())
    rs = rep["conversion"]["residual_scale"]
    assert len(rs["blocks"]) == 1 and rs["blocks"][0]["alpha"] < 0.01
    assert "accuracy_after" in rs and any("residual branch scales" in n for n in rep["notes"])
    assert rep["config"]["residual_scale"] == 0.5
    # the exported (re-imported, sound) bound is far below the input model's: the branch was scaled
    assert rep["after"]["global_bound"] < before / 10
