"""``lipverify finetune`` end to end: VRA goes up, the report is re-verified by the sound bound on the
exported file, outputs follow the input format, resume is exact, signals checkpoint, errors exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.models.zoo import default_samples

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    x, y = default_samples()
    p = tmp_path_factory.mktemp("data") / "samples.npz"
    np.savez(p, x=x.numpy(), y=y.numpy())
    return p


def run(args, code=0):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def base(samples, out, *extra):
    return ["finetune", "--data", samples, "--eps", "1.0", "--out", out, "--quiet", "--batch-size", "8",
            "--lr", "3e-3", *extra]


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_finetune_raises_vra_and_everything_is_reverified(samples, tmp_path):
    out = tmp_path / "ft"
    run(["finetune", "--data", samples, "--eps", "1.0", "--eval-eps", "0.5,1.0", "--epochs", "10",
         "--batch-size", "32", "--lr", "3e-3", "--out", out, "--quiet"])
    for f in ("model.onnx", "model.pt", "report.json", "curves.png", "certified_accuracy.png", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*tmp")) and not (out / ".model.verify.onnx").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["input_format"] == "builtin" and rep["outputs"]["primary"] == "model.onnx"
    before, after = rep["before"], rep["after"]
    assert after["sound"] and before["sound"]
    assert after["vra"]["1"] >= before["vra"]["1"] + 0.2  # clearly higher
    assert len(rep["history"]) == 10
    h = rep["history"][-1]
    for k in ("loss", "train_accuracy", "train_vra_estimate", "eval_vra_estimate", "global_bound_estimate",
              "time_s", "lr", "eps_train"):
        assert k in h
    assert "estimate" in rep["training_estimates"]["note"]
    # certify the exported ONNX with the CLI: the same numbers as the report
    res = run(["certify", out / "model.onnx", "--data", samples, "--eps", "0.5,1.0", "--json", "--quiet"])
    cert = json.loads(res.output)
    assert cert["vra"] == after["vra"]
    assert cert["clean_accuracy"] == after["clean_accuracy"]
    lm = lipverify.load(str(out / "model.onnx"))
    assert lm.fidelity is not None and lm.fidelity.passed
    assert lm.bounds().global_bound.value == pytest.approx(after["global_bound"], rel=1e-9)
    # the state dict is the 2C2F architecture of the embedded model, same function
    from lipverify.models.zoo import c2f2

    net = c2f2(in_ch=1, in_size=28, n_classes=10, activation="relu")
    net.load_state_dict(_sd(out / "model.pt"))
    x, _ = default_samples()
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), lm(x), atol=1e-5)


def test_python_api_is_the_command(samples, tmp_path):
    """``lipverify.train.finetune.finetune`` is what the command runs: same options, same model."""
    from lipverify.train.finetune import finetune

    rep = finetune(samples, 1.0, tmp_path / "api", epochs=2, batch_size=8, lr=3e-3, quiet=True)
    run(base(samples, tmp_path / "cli", "--epochs", "2"))
    a = _sd(tmp_path / "api" / "model.pt")
    b = _sd(tmp_path / "cli" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rep["after"]["vra"] == json.loads((tmp_path / "cli" / "report.json").read_text())["after"]["vra"]
    with pytest.raises(TypeError):
        finetune(samples, 1.0, tmp_path / "x", epoch=2)  # a misspelt option is an error, not ignored


def test_resume_is_exact(samples, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("--epochs", "3", "--augment", "crop", "--eps-schedule", "linear", "--eval-limit", "8")
    run(base(samples, a, *extra))
    run(base(samples, b, *extra, "--stop-after-epochs", "1"))
    assert (b / "checkpoint.pt").exists() and not (b / "model.onnx").exists()
    assert torch.load(b / "checkpoint.pt", weights_only=False)["epoch"] == 1
    run(base(samples, b, *extra, "--resume"))
    sa, sb = _sd(a / "model.pt"), _sd(b / "model.pt")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    assert ra["after"]["vra"] == rb["after"]["vra"]
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]


def _ckpt_model(path):
    st = torch.load(path, weights_only=False, map_location="cpu")
    return st, {k: v for k, v in st["train_state"].items()}


def test_sigterm_writes_checkpoint_and_resumes_exactly(samples, tmp_path):
    out = tmp_path / "sig"
    args = ["-m", "lipverify", *[str(a) for a in base(samples, out, "--epochs", "400", "--batch-size", "4",
                                                     "--eval-limit", "4")]]
    args.remove("--quiet")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=str(tmp_path))
    deadline = time.time() + 120
    try:
        for line in proc.stderr:
            if line.startswith("epoch 2/"):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline
        rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest
    assert "checkpoint" in rest[1]
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()
    st, _ = _ckpt_model(out / "checkpoint.pt")
    stopped_at = (st["epoch"], st["step"])
    assert stopped_at >= (2, 0)
    # resume up to the end of that epoch, and compare with an uninterrupted run to the same point
    run(base(samples, out, "--epochs", "400", "--batch-size", "4", "--eval-limit", "4", "--resume",
             "--stop-after-epochs", "1"))
    st_r, w_r = _ckpt_model(out / "checkpoint.pt")
    target = st_r["epoch"]
    ref = tmp_path / "ref"
    run(base(samples, ref, "--epochs", "400", "--batch-size", "4", "--eval-limit", "4", "--stop-after-epochs",
             str(target)))
    st_u, w_u = _ckpt_model(ref / "checkpoint.pt")
    assert st_u["epoch"] == target and st_r["step"] == st_u["step"] == 0
    assert all(torch.equal(w_r[k], w_u[k]) for k in w_u)
    assert [h["loss"] for h in st_r["history"]] == [h["loss"] for h in st_u["history"]]


def test_onnx_input_and_outside_normalisation(samples, tmp_path):
    """ONNX in -> model.onnx out; the --mean/--std normalisation stays outside the exported model."""
    from lipverify.importers.onnx import export_to_onnx
    from lipverify.models.zoo import default_model

    src = tmp_path / "in.onnx"
    src.write_bytes(export_to_onnx(default_model(), (1, 28, 28), None))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "ft"
    norm = ["--mean", "0.1", "--std", "0.5"]
    run(["finetune", src, *norm, "--data", samples, "--eps", "0.5", "--epochs", "2", "--batch-size", "16",
         "--out", out, "--quiet"])
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    rep = json.loads((out / "report.json").read_text())
    assert rep["input_format"] == "onnx" and rep["outputs"]["primary"] == "model.onnx"
    assert "normalise outside" in rep["outputs"]["input_convention"]
    res = run(["certify", out / "model.onnx", *norm, "--data", samples, "--eps", "0.5", "--json", "--quiet"])
    assert json.loads(res.output)["vra"] == rep["after"]["vra"]
    # the exported graph itself contains no normalisation: raw ONNX on normalised inputs = report model
    lm_raw = lipverify.load(str(out / "model.onnx"))
    lm_pix = lipverify.load(str(out / "model.onnx"), mean="0.1", std="0.5")
    x, _ = default_samples()
    with torch.no_grad():
        assert torch.allclose(lm_raw((x - 0.1) / 0.5), lm_pix(x), atol=1e-5)


def test_surgery_losses_export_and_reimport(samples, tmp_path):
    out = tmp_path / "mm"
    run(base(samples, out, "--epochs", "2", "--activation", "minmax", "--lln", "--loss", "trades",
             "--trades-lambda", "0.1,2,2", "--eval-limit", "8"))
    rep = json.loads((out / "report.json").read_text())
    assert [p["kind"] for p in rep["plan"]] == ["minmax"] * 3 and rep["lln"]
    lm = lipverify.load(str(out / "model.onnx"))
    assert sum(n.kind == "minmax" for n in lm.graph.nodes) == 3
    W = [n.op for n in lm.graph.nodes if n.kind == "linear"][-1]
    rows = torch.linalg.vector_norm(W.matrix(torch.float64), dim=1) if hasattr(W, "matrix") else None
    assert rows is not None and torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    out2 = tmp_path / "local"
    run(base(samples, out2, "--epochs", "1", "--loss", "local", "--eval-limit", "8"))
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["after_local"] is not None and [p["kind"] for p in rep2["plan"]] == ["clip"] * 3
    loc = rep2["after_local"]
    for k, v in loc["vra"].items():  # the estimate VRA is reported next to the sound one, with the gap
        assert loc["estimate_gap"][k] == pytest.approx(loc["vra_estimate"][k] - v)
        assert 0.0 <= v <= 1.0 and 0.0 <= loc["vra_estimate"][k] <= 1.0
    lm2 = lipverify.load(str(out2 / "model.onnx"))
    assert sum(n.kind == "activation" and n.op.name == "min(x, const)" for n in lm2.graph.nodes) == 3
    out3 = tmp_path / "emma"
    run(base(samples, out3, "--epochs", "1", "--loss", "emma", "--eps-schedule", "log", "--augment", "crop,flip",
             "--amp", "--eval-limit", "8"))
    assert json.loads((out3 / "report.json").read_text())["after"]["sound"]


def test_user_errors_exit_2(samples, tmp_path):
    out = tmp_path / "e"
    assert run(base(samples, out, "--epochs", "1", "--resume"), code=2).exit_code == 2
    run(base(samples, out, "--epochs", "1", "--eval-limit", "4"))
    res = run(base(samples, out, "--epochs", "1"), code=2)
    assert "--resume" in res.output
    res = run(base(samples, out, "--epochs", "2", "--resume", "--lr", "1e-2"), code=2)
    assert "different settings" in res.output
    # refusing to write over the input model
    src = out / "model.onnx"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    res = run(["finetune", src, "--data", samples, "--eps", "1", "--out", out, "--force", "--quiet"], code=2)
    assert "input" in res.output and hashlib.sha256(src.read_bytes()).hexdigest() == digest
    run(base(samples, tmp_path / "x", "--augment", "rotate"), code=2)
    run(base(samples, tmp_path / "y", "--eps", "0"), code=2)


def test_state_dict_input_writes_state_dict(tmp_path, samples):
    """A state dict + --arch in, model.pt out that loads into the same --arch (checked in the report)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from architectures import spectral_nor_mlp_b

    torch.manual_seed(0)
    net = spectral_nor_mlp_b()
    src = tmp_path / "mlp.pth"
    torch.save(net.state_dict(), src)
    out = tmp_path / "ft"
    res = run(["finetune", src, "--arch", f"{ROOT / 'examples' / 'architectures.py'}:spectral_nor_mlp_b",
         "--input-shape", "1,28,28", "--mean", "0.1307", "--std", "0.3081", "--data", samples, "--eps", "0.3",
         "--epochs", "2", "--batch-size", "16", "--out", out, "--quiet", "--json"])
    rep = json.loads((out / "report.json").read_text())
    printed = json.loads(res.stdout)
    assert printed["after"] == rep["after"]
    assert rep["input_format"] == "state_dict" and rep["outputs"]["primary"] == "model.pt"
    chk = rep["outputs"]["state_dict_check"]
    assert chk["checked"] and chk["passed"], chk
    fresh = spectral_nor_mlp_b()
    fresh.load_state_dict(_sd(out / "model.pt"), strict=True)


def test_kw_mnist_realdata(realdata, tmp_path):
    d = np.load(realdata / "data" / "mnist_train_5k.npz")
    idx = np.concatenate([np.arange(c * 500, c * 500 + 40) for c in range(10)])
    train = tmp_path / "train.npz"
    np.savez(train, x=d["x"][idx], y=d["y"][idx])
    out = tmp_path / "kw"
    run(["finetune", realdata / "models" / "pytorch" / "kw_mnist.pth", "--arch",
         f"{ROOT / 'examples' / 'architectures.py'}:kw_mnist", "--input-shape", "1,28,28", "--data", train,
         "--eval-data", realdata / "data" / "mnist_test_1000.npz", "--eval-limit", "100", "--eps", "0.1",
         "--epochs", "6", "--batch-size", "50", "--lr", "3e-3", "--out", out, "--quiet"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["before"]["vra"]["0.1"] == 0.0
    assert rep["after"]["vra"]["0.1"] >= 0.2
    assert rep["outputs"]["state_dict_check"]["passed"]
