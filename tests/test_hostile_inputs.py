"""Hostile and careless command lines: outputs aimed at the wrong places, non-finite arguments,
single-output and constant models, strict JSON, interruption. (Model files: test_hostile_onnx.py and
test_hostile_torch.py; data files: test_hostile_data.py.)

Every CLI probe runs in one capped subprocess (tests/hostile.py): each must end in exit 0 (legitimate
input) or exit 2 with one line naming the problem, within seconds, and never touch what it must not.
"""

from __future__ import annotations

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

from hostile import run_probes
from lipverify.data.atomic import check_output, staged_outputs
from lipverify.errors import UserInputError
from lipverify.models.zoo import default_samples
from lipverify.results import dumps

ROOT = Path(__file__).resolve().parent.parent


def _strict(text: str):
    """json.loads that refuses Infinity, -Infinity and NaN."""
    def bad(tok):
        raise ValueError(f"non-standard JSON constant {tok}")

    return json.loads(text, parse_constant=bad)


def _export(net, path, shape=(1, 1, 28, 28)):
    torch.onnx.export(net.eval(), torch.zeros(shape), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_cli")
    torch.manual_seed(0)
    one = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1))
    _export(one, d / "one.onnx")
    const = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.arange(10.0))
    _export(const, d / "const.onnx")
    x, y = default_samples()
    np.savez(d / "d.npz", x=x[:12].numpy(), y=y[:12].numpy())
    np.savez(d / "zeros.npz", x=x[:12].numpy(), y=np.zeros(12, dtype=np.int64))
    (d / "ro").mkdir()
    (d / "notes.txt").write_text("keep me")
    return d


PROBES = {
    # B4: outputs checked before the work
    "out_proc": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--out", "/proc/lipverify-x.csv"],
    "out_through_file": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--out", d / "const.onnx" / "x.csv"],
    "audit_out_is_model": lambda d: ["audit", d / "const.onnx", "--data", d / "d.npz", "--out", d / "const.onnx"],
    "out_device": lambda d: ["attack", "--data", d / "d.npz", "--out", "/dev/null", "--strength", "fast"],
    "out_too_long": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--out", d / ("x" * 250 + ".csv")],
    "out_is_data": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--out", d / "d.npz"],
    "out_is_folder": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--plot", d / "ro"],
    "two_outputs_one_path": lambda d: ["certify", "--data", d / "d.npz", "--eps", "0.1", "--out", d / "o.x",
                                       "--plot", d / "o.x"],
    "finetune_out_is_file": lambda d: ["finetune", "--data", d / "d.npz", "--eps", "0.3", "--out", d / "notes.txt"],
    "train_out_in_proc": lambda d: ["train", "--arch", "2c2f", "--data", d / "d.npz", "--eps", "0.3",
                                    "--out", "/proc/lipverify-train"],
    # B5: non-finite and malformed arguments
    "eps_overflow": lambda d: ["certify", "--data", d / "d.npz", "--eps", "1e400"],
    "eps_nan": lambda d: ["attack", "--data", d / "d.npz", "--eps", "nan"],
    "std_nan": lambda d: ["bounds", d / "const.onnx", "--std", "nan"],
    "mean_inf": lambda d: ["bounds", d / "const.onnx", "--mean", "inf"],
    "clip_nan": lambda d: ["bounds", "--clip", "nan,1"],
    "lr_nan": lambda d: ["finetune", "--data", d / "d.npz", "--eps", "0.3", "--out", d / "ft", "--lr", "nan"],
    "max_memory_bad": lambda d: ["bounds", "--max-memory", "lots"],
    "unknown_option": lambda d: ["bounds", "--no-such-option"],
    # B6: a model with one output
    "attack_one_class": lambda d: ["attack", d / "one.onnx", "--data", d / "zeros.npz", "--strength", "fast"],
    "certify_one_class": lambda d: ["certify", d / "one.onnx", "--data", d / "zeros.npz"],
    "audit_one_class": lambda d: ["audit", d / "one.onnx", "--data", d / "zeros.npz", "--out", d / "aud1"],
    "finetune_one_class": lambda d: ["finetune", d / "one.onnx", "--data", d / "zeros.npz", "--eps", "0.3",
                                     "--out", d / "ft1"],
    # B11: strict JSON
    "json_bounds_one_class": lambda d: ["bounds", d / "one.onnx", "--json"],
    "json_certify_constant": lambda d: ["certify", d / "const.onnx", "--data", d / "zeros.npz", "--eps", "0.1", "--json",
                                         "--allow-low-accuracy"],
    "json_attack_constant": lambda d: ["attack", d / "const.onnx", "--data", d / "d.npz", "--strength", "fast",
                                       "--json", "--eps", "0.1", "--allow-low-accuracy"],
}


@pytest.fixture(scope="module")
def outcomes(world):
    names = list(PROBES)
    res = run_probes([{"args": PROBES[n](world), "cwd": world} for n in names])
    return dict(zip(names, res))


@pytest.mark.parametrize("name,words", [
    ("out_proc", ["/proc/lipverify-x.csv", "cannot write"]),
    ("out_through_file", ["const.onnx", "not a folder"]),
    ("audit_out_is_model", ["--out must be a folder", "a file"]),
    ("out_device", ["/dev/null", "character device"]),
    ("out_too_long", ["longer than the file system allows"]),
    ("out_is_data", ["one of the inputs"]),
    ("out_is_folder", ["--plot", "a directory"]),
    ("two_outputs_one_path", ["--plot and --out", "same path"]),
    ("finetune_out_is_file", ["notes.txt", "must be a folder"]),
    ("train_out_in_proc", ["/proc/lipverify-train", "cannot write"]),
])
def test_output_locations_refused_before_the_work(outcomes, world, name, words):
    # well before any model load or attack: the probe ends in a fraction of the time the work takes
    outcomes[name].refused(*words, within=5.0)
    assert (world / "const.onnx").stat().st_size > 0 and (world / "notes.txt").read_text() == "keep me"
    assert not (world / "aud1").exists()


@pytest.mark.parametrize("name,words", [
    ("eps_overflow", ["--eps", "1e400"]),
    ("eps_nan", ["--eps", "nan"]),
    ("std_nan", ["--std", "finite"]),
    ("mean_inf", ["--mean", "finite"]),
    ("clip_nan", ["--clip", "finite"]),
    ("lr_nan", ["--lr", "finite"]),
    ("max_memory_bad", ["--max-memory", "lots"]),
    ("unknown_option", ["--no-such-option", "--help"]),
])
def test_bad_arguments_one_line(outcomes, name, words):
    outcomes[name].refused(*words, within=10.0)


@pytest.mark.parametrize("name", ["attack_one_class", "certify_one_class", "audit_one_class", "finetune_one_class"])
def test_single_output_model_refused(outcomes, world, name):
    outcomes[name].refused("one.onnx", "1 output", "at least two")
    assert not (world / "aud1").exists() and not (world / "ft1" / "report.json").exists()


def test_json_is_strict(outcomes):
    b = outcomes["json_bounds_one_class"]
    assert b.rc == 0, b.stderr
    assert "Infinity" not in b.stdout and "NaN" not in b.stdout
    _strict(b.stdout)
    c = outcomes["json_certify_constant"]
    assert c.rc == 0, c.stderr
    d = _strict(c.stdout)
    # the constant model's decision never changes: its radii are infinite, written as null
    assert all(i["radius"] is None for i in d["inputs"])
    assert d["clean_accuracy"] == 0.0  # it always answers 9; every label is 0
    assert "at or below chance" in c.stderr  # said out loud, not only in the JSON
    a = outcomes["json_attack_constant"]
    assert a.rc == 0, a.stderr
    _strict(a.stdout)


def test_dumps_never_writes_non_standard_constants():
    obj = {"a": float("inf"), "b": [float("-inf"), float("nan"), 1.5], "c": np.float32(np.inf), "d": np.arange(3),
           "e": torch.tensor([1.0, float("inf")]), (1, 2): (3,)}
    d = _strict(dumps(obj))
    assert d == {"a": None, "b": [None, None, 1.5], "c": None, "d": [0, 1, 2], "e": [1.0, None], "(1, 2)": [3]}


def test_check_output_accepts_new_nested_folder_and_refuses_devices(tmp_path):
    p = check_output(tmp_path / "new" / "deeper", folder=True)
    assert p == tmp_path / "new" / "deeper" and not p.exists()  # nothing created by the check
    assert not list(tmp_path.iterdir())  # the write probe leaves nothing behind
    with pytest.raises(UserInputError, match="character device"):
        check_output("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserInputError, match="FIFO"):
        check_output(fifo)


def test_staged_outputs_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_outputs(out, last="report.json") as stage:
            (stage / "model.onnx").write_bytes(b"m")
            raise KeyboardInterrupt
    assert out.is_dir() and not list(out.iterdir())  # nothing published, staging folder gone

    # a signal arriving during the moves is held until every file is in place, report.json last
    order = []
    real = os.replace

    def replace(a, b):
        if not order:
            os.kill(os.getpid(), signal.SIGINT)
        order.append(Path(b).name)
        real(a, b)

    import lipverify.data.atomic as atomic

    atomic.os.replace = replace
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_outputs(out, last="report.json") as stage:
                for name in ("report.json", "model.onnx", "model.pt"):
                    (stage / name).write_bytes(name.encode())
    finally:
        atomic.os.replace = real
    assert order == ["model.onnx", "model.pt", "report.json"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "report.json"]


def _wait_for(pred, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_reverification_leaves_no_partial_outputs(world, tmp_path, sig, code):
    """SIGINT / SIGTERM while the fine-tuned model is re-verified: no staging folder, no verification
    model, no model without its report; the checkpoint stays for --resume."""
    out = tmp_path / "ft"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lipverify", "finetune", "--data", str(world / "d.npz"), "--eps", "0.3",
           "--epochs", "1", "--batch-size", "12", "--out", str(out), "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        staged = _wait_for(lambda: out.is_dir() and any(q.name.startswith(".lipverify-staging") for q in out.iterdir()),
                           120)
        assert staged, "the run never reached the export stage"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    if p.returncode == 0:  # finished before the signal landed: then every output is there
        assert (out / "report.json").is_file() and (out / "model.onnx").is_file()
    else:
        assert p.returncode == code, err
        assert "Traceback" not in err
        left = sorted(q.name for q in out.iterdir())
        assert left == ["checkpoint.pt"], left
