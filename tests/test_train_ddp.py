"""DDP: ``torchrun --nproc_per_node 2 -m lipverify finetune`` on CPU (gloo) gives the same model as one
process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lipverify.cli import main
from lipverify.models.zoo import default_samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["gloro"])
def test_two_gloo_processes_match_one(tmp_path, loss):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    x, y = default_samples()
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    common = ["finetune", "--data", str(data), "--eps", "1.0", "--epochs", "2", "--batch-size", "16",
              "--lr", "3e-3", "--augment", "crop", "--loss", loss, "--eps-schedule", "constant", "--eval-limit", "8", "--quiet"]
    one = tmp_path / "one"
    res = CliRunner().invoke(main, common + ["--out", str(one)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "lipverify", *common, "--out", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(one / "model.pt", weights_only=True)
    b = torch.load(two / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): for a weight whose gradient is ~0 (e.g. the last-layer column of a ReLU
    # unit that is off on every input), summing the batch in another order (two half batches) can flip
    # the sign of that gradient and move the weight by up to one step (lr); one thread vs two threads in
    # a single process shows the same effect.  Such weights do not change the function, so: every weight
    # within the sign-flip bound, the same losses, the same logits.
    for k in a:
        d = (a[k] - b[k]).abs().flatten()
        assert float(d.max()) <= 2 * 3e-3 * 4, k
        assert float(d.median()) <= 1e-5, k
    import lipverify

    la, lb = lipverify.load(str(one / "model.onnx")), lipverify.load(str(two / "model.onnx"))
    with torch.no_grad():
        fa, fb = la(x), lb(x)
    assert torch.allclose(fa, fb, rtol=1e-4, atol=1e-4 * float(fa.abs().max()))
    ra = json.loads((one / "report.json").read_text())
    rb = json.loads((two / "report.json").read_text())
    assert rb["processes"] == 2 and ra["processes"] == 1
    for ha, hb in zip(ra["history"], rb["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-4)
    # power-iteration vectors and weights are bitwise identical across the two ranks (checked each epoch)
    assert all(h["rank_divergence"] == 0.0 for h in rb["history"])
    # ... and point the same way as the single-process ones
    ca = torch.load(one / "checkpoint.pt", weights_only=False)["train_state"]
    cb = torch.load(two / "checkpoint.pt", weights_only=False)["train_state"]
    us = [k for k in ca if k.startswith("bound.u")]
    assert us and all(float((ca[k] * cb[k]).sum()) > 0.99 for k in us)
