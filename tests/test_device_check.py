"""The device check script (benchmarks/device_check.py) in its reduced form on the CPU, so that it
cannot rot before the next time a GPU is available: every step runs, every check passes, and the
checks themselves fail when they should (flags left changed, a wrong radius, a different report)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.realdata
def test_reduced_device_check_passes_on_cpu(realdata, tmp_path):
    out = tmp_path / "dc.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--reduced", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "LIPVERIFY_REALDATA": str(realdata)})
    summary = json.loads(out.read_text())
    assert r.returncode == 0, summary["failed"] or r.stderr[-2000:]
    assert summary["ok"] and not summary["failed"]
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == {"bounds", "certify", "attack", "finetune", "train", "torchrun"}
    for s in steps.values():
        assert s["checks"] and s["seconds"] > 0 and s["peak_memory_mib"] > 0
    names = [c["check"] for s in steps.values() for c in s["checks"]]
    assert sum("flags restored" in n for n in names) >= 10
    assert any("float32 path decisions identical" in n for n in names)
    assert any("misclassified by the float64 model" in n for n in names)
    assert any("torchrun --nproc_per_node 1" in n for n in names)


def test_no_cuda_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no CUDA device" in r.stderr


def test_flag_check_catches_a_call_that_leaves_tf32_on():
    dc = _module()
    st = dc.Step("x", torch.device("cpu"))

    def leaky():
        torch.backends.cudnn.benchmark = False  # changed and not restored

    old = torch.backends.cudnn.benchmark
    try:
        st.call("leaky", leaky)
    finally:
        torch.backends.cudnn.benchmark = old
    assert st.checks[-1]["ok"] is False
    st.call("clean", lambda: None)
    assert st.checks[-1]["ok"] is True
    assert torch.backends.cudnn.benchmark == old  # the check's own flags are put back


def test_json_diff_ignores_times_and_finds_a_changed_radius():
    dc = _module()
    a = {"vra": {"0.3": 0.5}, "time_s": 1.0, "inputs": [{"radius": 0.25, "certified": True}]}
    b = {"vra": {"0.3": 0.5}, "time_s": 9.0, "inputs": [{"radius": 0.25 * (1 + 1e-12), "certified": True}]}
    assert dc.json_diff(dc.strip_times(a), dc.strip_times(b)) == []
    c = {"vra": {"0.3": 0.5}, "time_s": 1.0, "inputs": [{"radius": 0.2500001, "certified": True}]}
    assert dc.json_diff(dc.strip_times(a), dc.strip_times(c)) == ["/inputs[0]/radius: 0.25 vs 0.2500001"]
    d = {"vra": {"0.3": 0.5}, "inputs": [{"radius": 0.25, "certified": False}]}
    assert dc.json_diff(dc.strip_times(a), dc.strip_times(d)) == ["/inputs[0]/certified: True vs False"]


def test_converted_shape_node_exports_after_torchvision_import(tmp_path):
    """Found by the device check: once torchvision was imported, exporting an onnx2torch module with a
    Shape node failed (onnx2torch asks torch.onnx.symbolic_helper for the export opset)."""
    pytest.importorskip("torchvision")
    code = f"""
import torch, torchvision, warnings
import torch.nn as nn
import lipverify
from lipverify.importers.onnx import export_to_onnx

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        h = torch.relu(self.c(x)).mean(dim=(2, 3), keepdim=True)
        return self.fc(h.reshape(h.shape[0], -1))  # a Shape node with a dynamic batch

p = {str(tmp_path / 'net.onnx')!r}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(Net().eval(), (torch.zeros(1, 1, 6, 6),), p, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={{"x": {{0: "b"}}}})
lm = lipverify.load(p)
data = export_to_onnx(lm.module.model, (1, 6, 6), None)
again = lipverify.load({str(tmp_path / 'again.onnx')!r} if open({str(tmp_path / 'again.onnx')!r}, 'wb').write(data) else None)
x = torch.rand(3, 1, 6, 6)
print("DIFF", float((again(x) - lm(x)).abs().max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "DIFF" in r.stdout, r.stderr[-2000:]
    assert float(r.stdout.split("DIFF")[1]) < 1e-5
