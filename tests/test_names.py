"""Messages name modules by their path in the user's model, say what they are, and fit on a screen.

Oracle: the torchvision network itself (``get_submodule`` of the named path is the module class the
message names), not lipverify's own naming."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.errors import UnsupportedOpError
from lipverify.importers.names import describe_nodes, onnx_scope_path


@pytest.mark.parametrize("scope,path", [
    ("/features/features.1/features.1.0/block/block.1/Mul", "features.1.0.block.1"),
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/fc/Gemm", "fc"),
    ("/encoder/layers/encoder_layer_0/self_attention/MatMul", "encoder.layers.encoder_layer_0.self_attention"),
    ("Mul_12", None),
    ("/Relu", None),
])
def test_onnx_scope_path(scope, path):
    assert onnx_scope_path(scope) == path


@pytest.fixture(scope="module")
def se_net():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()


def _paths(text):
    return [p.split(" ")[0].rstrip(",") for p in text.split(" at ")[1:]]


def test_gates_named_by_module_path_eager_and_onnx(se_net, tmp_path):
    lm = lipverify.load(se_net, input_shape=(3, 32, 32))
    special = [lm.graph.nodes[i] for i in lm.graph.domain_nodes()]
    text = describe_nodes(lm.module.model, special, shown=len(special))
    assert "squeeze-excitation gate" in text
    for p in _paths(text):
        # every named path is a squeeze-excitation module of the user's network
        assert type(se_net.get_submodule(p)).__name__ == "SqueezeExcitation", p
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(se_net, torch.zeros(1, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    lm2 = lipverify.load(path)
    special2 = [lm2.graph.nodes[i] for i in lm2.graph.domain_nodes()]
    text2 = describe_nodes(lm2.module.model, special2, shown=len(special2))
    assert len(_paths(text2)) == len(special2) > 0
    for p in _paths(text2):
        assert type(se_net.get_submodule(p)).__name__ == "SqueezeExcitation", p


def test_finetune_refusal_fits_on_a_screen(se_net, tmp_path):
    sd = tmp_path / "m.pt"
    torch.save(se_net.state_dict(), sd)
    arch = tmp_path / "arch.py"
    arch.write_text("import torchvision\n\n\ndef build():\n"
                    "    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)\n")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.rand(10, 3, 32, 32).astype(np.float32), y=np.arange(10))
    r = CliRunner().invoke(main, ["finetune", str(sd), "--arch", f"{arch}:build", "--input-shape", "3,32,32",
                                  "--data", str(data), "--eps", "0.1", "--out", str(tmp_path / "o"), "--epochs", "1"])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert "\n" not in line and len(line) < 600, line
    assert "squeeze-excitation gate at features." in line and "more" in line
    assert "mul_1" not in line


def test_unsupported_op_listing_is_summarised():
    nodes = [("Reshape", f"/blocks.{i}/Reshape") for i in range(40)] + \
            [("Transpose", f"/blocks.{i}/Transpose") for i in range(48)]
    e = UnsupportedOpError(nodes, "vit.onnx")
    msg = str(e)
    assert len(msg) < 300 and "88 operator(s)" in msg and "and 84 more" in msg
    assert "Transpose x48" in msg and "Reshape x40" in msg
    assert e.nodes == nodes  # every node is still there for the API
