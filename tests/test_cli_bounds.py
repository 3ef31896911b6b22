"""`lipverify bounds` end to end, every model format, and the bad-input contract (exit 2, one line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from lipverify.cli import main

ARCH = str(Path(__file__).resolve().parent.parent / "examples" / "architectures.py")


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_user_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in res.output + res.stderr
    for n in needles:
        assert n in err, (n, err)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5)).eval()


def export(net, path, shape=(1, 1, 8, 8)):
    torch.onnx.export(net, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})


def test_default_model_json():
    res = run("bounds", "--json")
    assert res.exit_code == 0, res.output + res.stderr
    d = json.loads(res.stdout)
    for key in ("model", "norm", "input_shape", "layers", "global", "margin", "fidelity"):
        assert key in d
    assert d["global"]["sound"] is True and d["global"]["value"] > 0
    assert len(d["margin"]["K"]) == 10 and len(d["margin"]["K"][0]) == 10
    assert all({"name", "op", "lipschitz", "method", "sound"} <= set(r) for r in d["layers"])


def test_table_output_and_power_method(tmp_path):
    path = tmp_path / "m.onnx"
    export(small_net(), path)
    res = run("bounds", path)
    assert res.exit_code == 0, res.stderr
    assert "global Lipschitz bound" in res.stdout and "fidelity vs onnxruntime" in res.stdout
    res = run("bounds", path, "--method", "power", "--json")
    d = json.loads(res.stdout)
    assert d["global"]["sound"] is False and d["fidelity"]["reference"] == "onnxruntime"
    res = run("bounds", path, "--norm", "inf", "--json")
    assert json.loads(res.stdout)["norm"] == "inf"


def test_all_formats_give_the_same_bound(tmp_path):
    net = small_net()
    ref = json.loads(run("bounds", tmp_path / "m.onnx", "--json").stdout)["global"]["value"] if export(
        net, tmp_path / "m.onnx") is None else None
    # TorchScript
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(tmp_path / "m.ts"))
    # torch.export program
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)),
                      str(tmp_path / "m.pt2"))
    # state dict + arch
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "arch.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),"
        " nn.Linear(64, 5))\n")
    # pickled module
    torch.save(net, tmp_path / "whole.pt")
    for args in ([tmp_path / "m.ts", "--input-shape", "1,8,8"], [tmp_path / "m.pt2", "--input-shape", "1,8,8"],
                 [tmp_path / "sd.pt", "--arch", f"{tmp_path / 'arch.py'}:build", "--input-shape", "1,8,8"],
                 [tmp_path / "whole.pt", "--trust-pickle", "--input-shape", "1,8,8"]):
        res = run("bounds", *args, "--json")
        assert res.exit_code == 0, (args, res.stderr)
        assert json.loads(res.stdout)["global"]["value"] == pytest.approx(ref, rel=1e-6)
    # pickle refused without --trust-pickle
    assert_user_error(run("bounds", tmp_path / "whole.pt", "--input-shape", "1,8,8"), "whole.pt", "--trust-pickle")
    # state dict without --arch
    assert_user_error(run("bounds", tmp_path / "sd.pt", "--input-shape", "1,8,8"), "sd.pt", "--arch")
    # state dict that does not fit the arch
    (tmp_path / "arch2.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(3, 2)\n")
    assert_user_error(run("bounds", tmp_path / "sd.pt", "--arch", f"{tmp_path / 'arch2.py'}:build",
                          "--input-shape", "1,8,8"), "sd.pt", "does not fit")


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_user_error(run("bounds", empty), "empty.onnx", "empty")
    good = tmp_path / "good.onnx"
    export(small_net(), good)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert_user_error(run("bounds", trunc), "trunc.onnx", "ONNX")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    assert_user_error(run("bounds", text), "notes.onnx", "ONNX")
    assert_user_error(run("bounds", tmp_path / "missing.onnx"), "missing.onnx", "no such file")
    assert_user_error(run("bounds", good, "--input-shape", "3,32,32"), "good.onnx", "--input-shape")
    assert_user_error(run("bounds", good, "--input-shape", "a,b"), "--input-shape")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    assert_user_error(run("bounds", junk, "--input-shape", "1,8,8"), "junk.pt")
    assert_user_error(run("bounds", good, "--mean", "0.1,0.2"), "--mean")


class SinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.sin(x) * x + torch.exp(x))


def test_onnx_with_unsupported_ops_lists_them_all(tmp_path):
    path = tmp_path / "sin.onnx"
    export(SinNet(), path, shape=(1, 6))
    res = run("bounds", path)
    assert_user_error(res, "sin.onnx", "sin", "exp")
    # the product sin(x) * x is no longer refused (bounded on the input domain): only what has no bound is named
    assert "Mul" not in res.stderr + res.stdout
    # an op onnx2torch cannot even convert
    m = onnx.load(str(path))
    for n in m.graph.node:
        if n.op_type == "Sin":
            n.op_type = "Sinh"
    bad = tmp_path / "sinh.onnx"
    onnx.save(m, str(bad))
    assert_user_error(run("bounds", bad), "sinh.onnx", "Sinh")


def test_fidelity_failure_exits_2(tmp_path, monkeypatch):
    """A converted module that disagrees with onnxruntime is refused (simulated disagreement)."""
    path = tmp_path / "m.onnx"
    export(small_net(), path)
    import lipverify.importers.loader as ld
    from lipverify.importers.fidelity import Fidelity

    monkeypatch.setattr(ld, "onnx_fidelity", lambda *a, **k: Fidelity("onnxruntime", 0.5, 0.1, 8, 1e-4, False, 3))
    res = run("bounds", path)
    assert_user_error(res, "m.onnx", "onnxruntime", "--no-fidelity-check", "#3")
    res = run("bounds", path, "--no-fidelity-check", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["fidelity"] is None


def test_console_script_subprocess(tmp_path):
    """The installed entry point: exit codes and no traceback, from a real process."""
    empty = tmp_path / "e.onnx"
    empty.write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "lipverify", "bounds", str(empty)], capture_output=True, text=True)
    assert p.returncode == 2 and "e.onnx" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "lipverify", "bounds", str(empty), "--debug"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "Traceback" in p.stderr
