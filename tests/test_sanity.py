"""Saying it when the numbers are nonsense: 0..255 data, inputs outside the domain, labels outside the
model's classes, and a clean accuracy at or below chance (lipverify.data.sanity and its use by the
commands that judge a model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lipverify.cli import main
from lipverify.data.sanity import (
    LOW_ACCURACY,
    MIN_INPUTS,
    SCALED_NOTE,
    accuracy_verdict,
    byte_pixels,
    byte_scaling,
    check_label_range,
    domain_warning,
    likely_causes,
    predictions,
)
from lipverify.errors import UserInputError
from lipverify.models.zoo import default_samples

CIFAR_MEAN, CIFAR_STD = "0.485,0.456,0.406", "0.225"


# ------------------------------------------------------------------------------------------------
# pure functions


def test_byte_pixels():
    k = torch.randint(0, 256, (5, 1, 4, 4)).float()
    k[0, 0, 0, 0] = 255
    assert byte_pixels(k)
    assert not byte_pixels(k / 255)  # [0, 1] pixels
    assert not byte_pixels(torch.randint(0, 2, (5, 3)).float())  # binary 0/1: nothing to scale
    assert not byte_pixels(k + 0.5)  # not whole numbers
    assert not byte_pixels(torch.cat([k, torch.full((1, 1, 4, 4), 256.0)]))  # above 255
    assert not byte_pixels(torch.cat([k, torch.full((1, 1, 4, 4), -1.0)]))  # negative


def test_byte_scaling_decision():
    k = torch.tensor([[0.0, 17.0, 255.0]])
    assert byte_scaling(k) == (True, SCALED_NOTE)
    assert "divided by 255" in SCALED_NOTE and "--clip 0,255" in SCALED_NOTE
    keep, note = byte_scaling(k, clip=(0.0, 255.0))
    assert not keep and "kept as stored" in note and "--clip 0,255" in note
    keep, note = byte_scaling(k, mean=[123.7, 116.3, 103.5])
    assert not keep and "--mean" in note
    assert byte_scaling(k, clip=(0.0, 1.0)) == (True, SCALED_NOTE)  # a [0, 1] box declares [0, 1] pixels
    assert byte_scaling(k, mean=[0.5]) == (True, SCALED_NOTE)
    assert byte_scaling(k / 255) == (False, None)


def test_domain_warning_names_range_and_cause():
    assert domain_warning(0.0, 1.0, (0.0, 1.0), "d.npz") is None
    assert domain_warning(-3.0, 9.0, None, "d.npz") is None  # --clip none: no domain
    w = domain_warning(-2.1179, 2.64, (0.0, 1.0), "d.npz", normalised_outside=True)
    assert w.startswith("d.npz: inputs range over [-2.118, 2.64], outside [0, 1]") and "drop --mean/--std" in w
    w = domain_warning(-0.4242, 2.8215, (0.0, 1.0), "d.npz")
    assert "look normalised" in w and "--clip -0.4242,2.822 " in w
    w = domain_warning(0.0, 255.0, (0.0, 1.0), "d.npz")
    assert "0..255" in w and "divide them by 255" in w
    w = domain_warning(0.0, 1.0, (0.0, 0.5), "d.npz", clip_given=True)
    assert "outside the --clip box [0, 0.5]" in w and "widen --clip" in w
    assert "\n" not in w


def test_label_range():
    check_label_range(torch.arange(10), 10, "d.npz")
    with pytest.raises(UserInputError) as e:
        check_label_range(torch.arange(10) + 10, 10, "d.npz")
    msg = str(e.value)
    assert msg.startswith("d.npz: labels range over 10..19") and "10 classes" in msg and "10 of 10" in msg
    with pytest.raises(UserInputError, match="1-based"):
        check_label_range(torch.arange(1, 11), 10, "d.npz")
    with pytest.raises(UserInputError, match=r"-1\.\.3"):
        check_label_range(torch.tensor([-1, 3]), 10, "d.npz")


def test_accuracy_thresholds():
    causes = ["cause A", "cause B"]
    assert accuracy_verdict(0, MIN_INPUTS - 1, 10, "d.npz", causes) == (None, None)  # too few to judge
    assert accuracy_verdict(0, 100, 1, "d.npz", causes) == (None, None)
    kind, msg = accuracy_verdict(1, 10, 10, "d.npz", causes)  # exactly chance
    assert kind == "error"
    assert msg.startswith("d.npz: clean accuracy 0.1000 (1 of 10) is at or below chance (0.1000 for 10 classes)")
    assert "(1) cause A; (2) cause B" in msg and "--allow-low-accuracy" in msg and "\n" not in msg
    kind, msg = accuracy_verdict(1, 10, 10, "d.npz", causes, allowed=True)
    assert kind == "warning" and "running anyway" in msg
    assert accuracy_verdict(2, 10, 10, "d.npz", causes)[0] == "warning"  # above chance, under 0.5
    assert accuracy_verdict(50, 100, 10, "d.npz", causes) == (None, None)  # LOW_ACCURACY itself is fine
    assert LOW_ACCURACY == 0.5
    assert accuracy_verdict(49, 100, 10, "d.npz", causes)[0] == "warning"
    assert accuracy_verdict(50, 100, 2, "d.npz", causes)[0] == "error"  # two classes: chance is 0.5
    _, msg = accuracy_verdict(0, 1000, 10, "d.npz", causes, total=5000)
    assert "on the first 1000 of 5000 inputs" in msg


def test_likely_causes_order():
    c = likely_causes(lo=0.0, hi=1.0, normalised_outside=False, channels=3)
    assert c[0].startswith("missing --mean/--std") and c[1].startswith("channel layout") and "--layout nhwc" in c[1]
    assert c[-1].startswith("labels in another class order")
    c = likely_causes(lo=0.0, hi=1.0, normalised_outside=False, channels=3, layout="nhwc", reshaped=True)
    assert c[0].startswith("channel layout") and "--layout nchw" in c[0]
    c = likely_causes(lo=-2.0, hi=2.5, normalised_outside=True, channels=1)
    assert c[0].startswith("data normalised twice") and not any("layout" in s for s in c)  # one channel
    assert not any("missing --mean" in s for s in c)
    c = likely_causes(lo=0.0, hi=255.0, normalised_outside=False)
    assert c[0].startswith("data in 0..255")
    c = likely_causes(lo=0.0, hi=1.0, normalised_outside=False, scaled_bytes=True)
    assert c[0].startswith("the file's 0..255 values were divided by 255")


def test_predictions_batched():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.randn(23, 3, 4)
    want = net(x).argmax(1)
    assert torch.equal(predictions(net, x, batch_size=4), want)
    assert torch.equal(predictions(net, x, batch_size=100), want)


# ------------------------------------------------------------------------------------------------
# the commands, with the built-in model and its samples


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("sanity")
    x, y = default_samples()
    np.savez(d / "ok.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "bytes.npz", x=np.round(x.numpy() * 255).astype(np.uint8), y=y.numpy())
    np.savez(d / "shifted.npz", x=x.numpy(), y=y.numpy() + 10)
    np.savez(d / "wrong.npz", x=x.numpy(), y=(y.numpy() + 1) % 10)
    yl = y.numpy().copy()
    yl[:20] = (yl[:20] + 1) % 10  # 20 of 32 wrong: accuracy about 0.375
    np.savez(d / "low.npz", x=x.numpy(), y=yl)
    np.savez(d / "normalised.npz", x=((x - 0.1307) / 0.3081).numpy(), y=y.numpy())
    return d


def _certify(data, *extra):
    return _run("certify", "--data", data, "--eps", "0.1", "--json", "--quiet", *extra)


def test_builtin_uint8_npz_scaled_like_folders(samples):
    ok, raw = _certify(samples / "ok.npz"), _certify(samples / "bytes.npz")
    assert ok.exit_code == 0 and raw.exit_code == 0, raw.stderr
    a, b = json.loads(ok.stdout), json.loads(raw.stdout)
    assert a["clean_accuracy"] == b["clean_accuracy"] > 0.9
    assert [i["pred"] for i in a["inputs"]] == [i["pred"] for i in b["inputs"]]
    assert SCALED_NOTE in b["notes"] and not any("yourself" in n for n in b["notes"])
    # declared 0..255 inputs (--clip reaching above 1): kept as stored, inside the box, no warning
    kept = _certify(samples / "bytes.npz", "--clip", "0,255")
    assert kept.exit_code == 0 and "lipverify: warning" not in kept.stderr
    assert any(n.startswith("inputs are whole numbers in [0, 255], kept as stored") for n in
               json.loads(kept.stdout)["notes"])


def test_builtin_labels_outside_classes(samples):
    r = _certify(samples / "shifted.npz")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "shifted.npz: labels range over 10..19 but the model has 10 classes" in r.stderr


def test_builtin_at_chance_refused_unless_allowed(samples):
    for cmd in (["certify", "--eps", "0.1"], ["attack", "--strength", "fast"],
                ["audit", "--strength", "fast", "--out", samples / "audit"]):
        r = _run(cmd[0], "--data", samples / "wrong.npz", "--quiet", *cmd[1:])
        assert r.exit_code == 2, (cmd, r.output)
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and "wrong.npz: clean accuracy 0.0" in line and "chance" in line
        assert "labels in another class order" in line and "--allow-low-accuracy" in line
    assert not (samples / "audit").exists()  # refused before any work
    r = _certify(samples / "wrong.npz", "--allow-low-accuracy")
    assert r.exit_code == 0 and "running anyway" in r.stderr


def test_builtin_low_accuracy_warns(samples):
    r = _certify(samples / "low.npz")
    assert r.exit_code == 0
    assert "lipverify: warning: " in r.stderr and "is low" in r.stderr and "0.5" in r.stderr
    assert any("is low" in n for n in json.loads(r.stdout)["notes"])


def test_builtin_normalised_data_outside_domain_warns(samples):
    r = _certify(samples / "normalised.npz", "--mean", "0.1307", "--std", "0.3081", "--allow-low-accuracy")
    assert r.exit_code == 0
    warning = [ln for ln in r.stderr.splitlines() if "inputs range over" in ln]
    assert len(warning) == 1 and "outside [0, 1]" in warning[0] and "drop --mean/--std" in warning[0]
    clean = _certify(samples / "ok.npz")
    assert "lipverify: warning" not in clean.stderr


# ------------------------------------------------------------------------------------------------
# real third-party models and data


def test_realdata_cifar_without_normalisation(realdata):
    model = realdata / "models" / "onnx" / "cifar_base_kw.onnx"
    data = realdata / "data" / "cifar10_test_100.npz"
    r = _run("certify", model, "--data", data, "--eps", "0.01", "--json", "--quiet")
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "cifar10_test_100.npz: clean accuracy" in line
    assert "chance (0.1000 for 10 classes)" in line and "(1) missing --mean/--std" in line
    ok = _run("certify", model, "--data", data, "--eps", "0.01", "--json", "--quiet", "--mean", CIFAR_MEAN,
              "--std", CIFAR_STD)
    assert ok.exit_code == 0 and json.loads(ok.stdout)["clean_accuracy"] == pytest.approx(0.73)
    anyway = _run("certify", model, "--data", data, "--eps", "0.01", "--json", "--quiet", "--allow-low-accuracy")
    assert anyway.exit_code == 0 and json.loads(anyway.stdout)["clean_accuracy"] <= 0.1


def test_realdata_mnist_uint8_and_shifted_labels(realdata, tmp_path):
    with np.load(realdata / "data" / "mnist_test_1000.npz") as f:
        x, y = f["x"][:200], f["y"][:200]
    np.savez(tmp_path / "f.npz", x=x, y=y)
    np.savez(tmp_path / "u8.npz", x=np.round(x * 255).astype(np.uint8), y=y)
    np.savez(tmp_path / "plus10.npz", x=x, y=y + 10)
    a, b = _certify(tmp_path / "f.npz"), _certify(tmp_path / "u8.npz")
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    assert json.loads(a.stdout)["clean_accuracy"] == json.loads(b.stdout)["clean_accuracy"] > 0.9
    r = _certify(tmp_path / "plus10.npz")
    assert r.exit_code == 2 and "plus10.npz: labels range over 10..19 but the model has 10 classes" in r.stderr
