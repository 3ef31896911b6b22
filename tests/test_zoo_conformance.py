"""The ecosystem's own architectures, exported the ways their users export them, at random initialisation.

For every torchvision classification family: ``torch.onnx.export(..., dynamo=False, opset_version=17)``
with a dynamic batch (identical initializers aliased through ``Identity`` nodes, as that exporter
writes them), and for a few also ``torch.export`` (``.pt2``) and a state dict with ``--arch``.  Each must
end in exactly one of two ways:

* a sound bound, with the fidelity and graph checks passed, that is never below the spectral norm of
  the model's Jacobian at sampled points (computed here with autograd and an exact SVD, not by
  lipverify);
* a refusal (:class:`~lipverify.errors.UserInputError`, exit code 2 in the CLI) whose one line names
  the op types it cannot bound.

Never another exception (an internal error, exit 1).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import lipverify
from lipverify.errors import UserInputError
from nets import jacobian_spectral_lower_bound

tv = pytest.importorskip("torchvision")

# family -> (constructor keyword arguments, input size)
FAMILIES = {
    "resnet18": ({}, 32),
    "mobilenet_v2": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "shufflenet_v2_x0_5": ({}, 32),
    "squeezenet1_1": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32),
    "mnasnet0_5": ({}, 32),
    "densenet121": ({}, 32),
    "convnext_tiny": ({}, 32),
    "resnext50_32x4d": ({}, 32),
    "swin_t": ({}, 64),
    "vit_b_16": ({"image_size": 32}, 32),
}
FAST = {"resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1"}


def _build(name):
    kw, size = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(tv.models, name)(num_classes=10, **kw).eval(), size


def _jacobian_lower_bound(module, shape, n=2, seed=0):
    """max over sampled x in [0,1]^d of ||J(x)||_2, exact SVD of the autograd Jacobian (float64)."""
    return jacobian_spectral_lower_bound(copy.deepcopy(module).double(), shape, n, seed)


def _check_outcome(load, what):
    try:
        lm = load()
    except UserInputError as exc:
        msg = str(exc)
        assert "\n" not in msg.strip() or "cannot bound" in msg, msg
        assert "cannot bound" in msg or "not" in msg, msg
        return "refused", msg
    if lm.fidelity is not None:
        assert lm.fidelity.passed
    rep = lm.bounds("2")
    assert rep.global_bound.sound
    lower = _jacobian_lower_bound(lm.module, lm.input_shape)  # inputs in [0, 1]: inside the default domain
    assert rep.global_bound.value >= lower * (1 - 1e-6), (what, rep.global_bound.value, lower)
    if rep.domain is not None:
        assert rep.domain == [0.0, 1.0] and "holds on the input domain [0, 1]" in rep.global_bound.method
        return "bounded on the domain", rep.global_bound.value
    return "bounded", rep.global_bound.value


def _export_onnx(net, size, path):
    x = torch.rand(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in FAMILIES])
def test_onnx_export_of_every_family(name, tmp_path):
    net, size = _build(name)
    path = tmp_path / f"{name}.onnx"
    _export_onnx(net, size, path)
    outcome, detail = _check_outcome(lambda: lipverify.load(path), name)
    if name in ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"):
        # squeeze-excitation gates (products) and LayerNorm: bounded on the input domain [0, 1]
        assert outcome == "bounded on the domain", detail
    elif name in ("swin_t", "vit_b_16"):
        # softmax attention (an input-dependent MatMul) has no bound yet, and onnx2torch's conversion of
        # swin's LayerNorm does not run: refused either way, naming the nodes
        assert outcome == "refused" and ("cannot bound" in detail or "does not run: node" in detail), detail
    else:
        assert outcome == "bounded", detail


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_torch_export_and_state_dict_of_families(name, tmp_path):
    net, size = _build(name)
    x = torch.rand(2, 3, size, size)
    ep = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}})
    pt2 = tmp_path / f"{name}.pt2"
    torch.export.save(ep, str(pt2))
    a = _check_outcome(lambda: lipverify.load(pt2), name + ".pt2")
    sd = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), sd)
    arch = tmp_path / "arch.py"
    kw, _ = FAMILIES[name]
    arch.write_text(f"import torchvision\n\ndef build():\n    return torchvision.models.{name}(num_classes=10, **{kw!r})\n")
    b = _check_outcome(lambda: lipverify.load(sd, arch=f"{arch}:build", input_shape=(3, size, size)), name + ".pth")
    assert a[0] == b[0] == "bounded"
    # the same network gives the same bound whichever way it was saved
    assert a[1] == pytest.approx(b[1], rel=1e-6)


def test_cli_on_an_aliased_export_never_exits_1(tmp_path):
    from click.testing import CliRunner

    from lipverify.cli import main

    net, size = _build("resnet18")
    path = tmp_path / "r.onnx"
    _export_onnx(net, size, path)
    res = CliRunner().invoke(main, ["bounds", str(path), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["global"]["sound"] and d["fidelity"]["passed"]
    assert any("aliased initializer" in n for n in d["notes"])
    net, size = _build("mobilenet_v3_small")
    _export_onnx(net, size, path)
    res = CliRunner().invoke(main, ["bounds", str(path), "--json", "--clip", "0,1"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["domain"] == [0.0, 1.0] and "holds on the input domain [0, 1]" in d["global"]["method"]
    res = CliRunner().invoke(main, ["bounds", str(path), "--clip", "1,0"])
    assert res.exit_code == 2 and "--clip" in res.stderr and "Traceback" not in res.stderr


# timm's families whose convolutions standardise their weights at run time (exported as a training-mode
# BatchNormalization over the weight tensor, folded into plain weights at import)
# family -> outcome: NFNet's squeeze-excitation gates and BiT's GroupNorm are bounded on the input domain
TIMM_WEIGHT_STANDARDISED = {"nf_resnet26": "bounded", "nfnet_l0": "bounded on the domain",
                            "resnetv2_50x1_bit": "bounded on the domain"}


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_WEIGHT_STANDARDISED)
def test_timm_weight_standardised_families(name, tmp_path):
    timm = pytest.importorskip("timm", reason="timm (pip install '.[test]') builds these families")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = timm.create_model(name, pretrained=False, num_classes=10).eval()
    path = tmp_path / f"{name}.onnx"
    _export_onnx(net, 32, path)
    lm = lipverify.load(path)
    outcome, detail = _check_outcome(lambda: lm, name)
    assert outcome == TIMM_WEIGHT_STANDARDISED[name], detail
    assert any("BatchNormalization" in n and "folded" in n for n in lm.notes), lm.notes
