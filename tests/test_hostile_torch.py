"""Hostile PyTorch files: ``.pt2`` archives and fine-tuning checkpoints that run code when loaded,
truncated archives, devices and FIFOs, non-finite weights.

Each code-running payload ``touch``es a sentinel file: the test asserts the sentinel never appears and
the command ends in exit 2 with one line naming the file.  (On lipverify before these checks every
payload probe below creates its sentinel.)  Every CLI probe runs in one capped subprocess
(tests/hostile.py); the legitimate ``.pt2`` (a small conv net exported with a dynamic batch dimension)
and a legitimate checkpoint resume must still work.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from hostile import run_probes
from lipverify.errors import UserInputError
from lipverify.models.zoo import default_samples


class Payload:
    """Unpickling it calls ``os.system(cmd)``."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.f = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.f(torch.flatten(torch.relu(self.bn(self.c(x))), 1))


def _touch(p) -> str:
    return "touch " + shlex.quote(str(p))


def _tsave(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _rewrite(src: Path, dst: Path, edits: dict) -> Path:
    """Copy the archive ``src`` to ``dst`` with entries (relative to its root folder) replaced by bytes,
    edited by a function of their bytes, or added."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = names[0].split("/")[0]
        rels = [n[len(root) + 1:] for n in names]
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for n, rel in zip(names, rels):
                data = zin.read(n)
                if rel in edits:
                    e = edits[rel]
                    data = e(data) if callable(e) else e
                zout.writestr(n, data)
            for rel, e in edits.items():
                if rel not in rels:
                    zout.writestr(root + "/" + rel, e)
    return dst


def _json(fn):
    def edit(data):
        d = json.loads(data)
        fn(d)
        return json.dumps(d).encode()
    return edit


W = "data/weights/model_weights_config.json"
C = "data/constants/model_constants_config.json"
M = "models/model.json"


def _first_expr(d):
    for v in d["graph_module"]["graph"]["tensor_values"].values():
        for s in v["sizes"]:
            if "as_expr" in s:
                return s["as_expr"]
    raise AssertionError("no symbolic size in the program")


def _payloads(good: Path, d: Path, sentinel) -> dict:
    """Archives that ran code (or wrote a file) on ``lipverify bounds`` before the checks; each creates
    ``sentinel(name)`` when it runs."""

    def weight(c):
        c["config"]["c.weight"]["use_pickle"] = True

    def const(c):
        c["config"]["evil"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    def opaque(c):
        c["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    def sym(p):
        _first_expr(p)["expr_str"] = f"__import__('os').system({_touch(sentinel('sympy'))!r})"

    def guard(p):
        p["guards_code"] = [f"__import__('os').system({_touch(sentinel('guard'))!r}) == 0"]

    def from_file(p):
        g = p["graph_module"]["graph"]
        g["nodes"].insert(0, {"target": "torch.ops.aten.from_file.default", "inputs": [
            {"name": "filename", "arg": {"as_string": str(sentinel("from_file"))}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
            {"name": "size", "arg": {"as_int": 4}, "kind": 1}],
            "outputs": [{"as_tensor": {"name": "pwn"}}], "metadata": {}, "is_hop_single_tensor_return": None,
            "name": "pwn"})
        g["tensor_values"]["pwn"] = dict(copy.deepcopy(g["tensor_values"]["p_c_bias"]), requires_grad=False)

    # a parameter name is spliced into the generated forward() as getattr(self.f, "<name>")
    fqn = 'w", 0) or getattr(__import__("os"), "system")("touch pwned_fqn") or getattr(self, "'

    def rename(data):
        return data.replace(b'"f.bias"', json.dumps("f." + fqn).encode())

    cases = {
        "weight_pickle": {W: _json(weight),
                          "data/weights/weight_0": _tsave(Payload(_touch(sentinel("weight_pickle"))))},
        "constant_pickle": {C: _json(const),
                            "data/constants/tensor_0": _tsave(Payload(_touch(sentinel("constant_pickle"))))},
        "opaque_object": {C: _json(opaque),
                          "data/constants/opaque_obj_0": pickle.dumps(Payload(_touch(sentinel("opaque_object"))))},
        "sample_inputs": {"data/sample_inputs/model.pt": _tsave(Payload(_touch(sentinel("sample_inputs"))))},
        "legacy_weights": {"data/weights/model.pt": _tsave(Payload(_touch(sentinel("legacy_weights"))))},
        "sympy": {M: _json(sym)},
        "guard": {M: _json(guard)},
        "from_file": {M: _json(from_file)},
        "fqn": {M: rename, W: rename},
    }
    return {name: _rewrite(good, d / f"{name}.pt2", edits) for name, edits in cases.items()}


#: the words each payload's one-line refusal must hold
WHY = {"weight_pickle": ("c.weight", "pickle"), "constant_pickle": ("evil", "pickle"),
       "opaque_object": ("opaque_obj_0",), "sample_inputs": ("sample_inputs", "pickled"),
       "legacy_weights": ("data/weights/model.pt",), "sympy": ("symbolic-size expression",),
       "guard": ("guard",), "from_file": ("from_file", "filename"), "fqn": ("weight name", "dotted")}


def _ft(d, out, *extra):
    return ["finetune", "--data", d / "d.npz", "--eps", "1.0", "--out", out, "--quiet", "--batch-size", "8",
            "--limit", "16", "--eval-limit", "4", "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_torch")
    (d / "s").mkdir()

    def sentinel(name):
        return d / "s" / f"pwned_{name}"

    torch.manual_seed(0)
    net = Conv().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    good = d / "good.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(good))
    data = good.read_bytes()
    (d / "trunc.pt2").write_bytes(data[: len(data) // 2])
    nan = torch.full((36,), float("nan")).numpy().tobytes()
    _rewrite(good, d / "nan.pt2", {"data/weights/weight_0": nan})
    payloads = _payloads(good, d, sentinel)
    sd = net.state_dict()
    sd["f.weight"] = sd["f.weight"].clone()
    sd["f.weight"][0, 0] = float("inf")
    torch.save(sd, d / "inf.pt")
    (d / "arch_def.py").write_text(
        "import torch\nimport torch.nn as nn\n\n\n"
        "class Conv(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = nn.Conv2d(1, 4, 3)\n"
        "        self.bn = nn.BatchNorm2d(4)\n"
        "        self.f = nn.Linear(144, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.f(torch.flatten(torch.relu(self.bn(self.c(x))), 1))\n\n\n"
        "def build():\n"
        "    return Conv()\n")
    (d / "pickled.pt").write_bytes(_tsave(Payload(_touch(sentinel("pickled_pt")))))
    # S2: a checkpoint in --out whose unpickling runs a command
    (d / "evil_ft").mkdir()
    evil_ckpt = {"version": 2, "rng": Payload(_touch(sentinel("checkpoint")))}
    (d / "evil_ft" / "checkpoint.pt").write_bytes(_tsave(evil_ckpt))
    x, y = default_samples()
    np.savez(d / "d.npz", x=x[:16].numpy(), y=y[:16].numpy())

    probes = {name: {"args": ["bounds", p, "--json"], "cwd": d / "s"} for name, p in payloads.items()}
    probes.update({
        "good": {"args": ["bounds", good, "--json"]},
        "good_trusted": {"args": ["bounds", good, "--json", "--trust-pickle"]},
        "trunc": {"args": ["bounds", d / "trunc.pt2"]},
        "nan_pt2": {"args": ["bounds", d / "nan.pt2"]},
        "inf_state_dict": {"args": ["bounds", d / "inf.pt", "--arch", f"{d / 'arch_def.py'}:build",
                                    "--input-shape", "1,8,8"]},
        "pickled_pt": {"args": ["bounds", d / "pickled.pt", "--input-shape", "1,8,8"]},
        "checkpoint": {"args": _ft(d, d / "evil_ft", "--epochs", "2", "--resume")},
        # a legitimate run stopped after one epoch, then resumed
        "ft_first": {"args": _ft(d, d / "ft", "--epochs", "2", "--stop-after-epochs", "1")},
        "ft_resume": {"args": _ft(d, d / "ft", "--epochs", "2", "--resume")},
    })
    names = list(probes)
    outcomes = dict(zip(names, run_probes([probes[n] for n in names])))
    return d, sentinel, outcomes


@pytest.mark.parametrize("name", sorted(WHY))
def test_pt2_payload_does_not_run(world, name):
    d, sentinel, out = world
    out[name].refused(f"{name}.pt2", *WHY[name])
    assert not sentinel(name).exists(), f"{name}: the payload ran"


def test_checkpoint_payload_does_not_run(world):
    d, sentinel, out = world
    out["checkpoint"].refused("checkpoint.pt", "pickled")
    assert not sentinel("checkpoint").exists(), "the checkpoint's payload ran"


def test_pickled_module_is_refused(world):
    d, sentinel, out = world
    out["pickled_pt"].refused("pickled.pt", "pickle")
    assert not sentinel("pickled_pt").exists()


def test_legitimate_pt2_still_loads(world):
    d, _, out = world
    for key in ("good", "good_trusted"):
        o = out[key]
        assert o.rc == 0, o.stderr[-2000:]
        rep = json.loads(o.stdout)
        assert rep["global"]["sound"] and rep["global"]["value"] > 0 and rep["input_shape"] == [1, 8, 8]


def test_truncated_pt2_is_one_line(world):
    world[2]["trunc"].refused("trunc.pt2", "truncated")


def test_non_finite_weights_are_refused(world):
    out = world[2]
    out["nan_pt2"].refused("nan.pt2", "c.weight", "NaN")
    out["inf_state_dict"].refused("inf.pt", "f.weight", "infinite")


def test_legitimate_checkpoint_resumes(world):
    d, _, out = world
    assert out["ft_first"].rc == 0, out["ft_first"].stderr[-2000:]
    assert out["ft_resume"].rc == 0, out["ft_resume"].stderr[-2000:]
    assert (d / "ft" / "model.onnx").is_file()
    st = torch.load(d / "ft" / "checkpoint.pt", weights_only=True)
    assert st["epoch"] == 2 and isinstance(st["rng"]["numpy"]["key"], torch.Tensor)


# -- in-process checks of the helpers -------------------------------------------------------------------

def test_fifo_device_and_size_are_refused(tmp_path, monkeypatch):
    from lipverify.importers import torchfile
    from lipverify.train import checkpoint

    for p in (tmp_path / "m.pt2", tmp_path / "m.pt"):
        os.mkfifo(p)  # no writer: opening it for reading the usual way would hang
        with pytest.raises(UserInputError, match="FIFO"):
            torchfile.load_torch_file(p, None, False, None)
    link = tmp_path / "zero.pt2"
    link.symlink_to("/dev/zero")
    with pytest.raises(UserInputError, match="character device"):
        torchfile.load_torch_file(link, None, False, None)
    ck = tmp_path / "out" / "checkpoint.pt"
    ck.parent.mkdir()
    os.mkfifo(ck)
    with pytest.raises(UserInputError, match="FIFO"):
        checkpoint.load(ck)
    big = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1000)}, big)
    monkeypatch.setattr(torchfile, "MAX_MODEL_BYTES", 1000)
    with pytest.raises(UserInputError, match="over the limit"):
        torchfile.load_torch_file(big, None, False, None)


def test_check_finite_params_names_the_tensor():
    from lipverify.importers.torchfile import check_finite_params

    net = Conv()
    check_finite_params(net, "m.pt")
    with torch.no_grad():
        net.bn.running_var[1] = float("nan")
    with pytest.raises(UserInputError, match=r"m\.pt: weight 'bn\.running_var' .*1 NaN"):
        check_finite_params(net, "m.pt")
    check_finite_params({"n": torch.tensor([1, 2]), "x": torch.ones(2)}, "m.pt")  # integers are skipped
    with pytest.raises(UserInputError, match="'x'.*infinite"):
        check_finite_params({"x": torch.tensor([1.0, -float("inf")])}, "m.pt")


def _good_pt2(tmp_path) -> Path:
    torch.manual_seed(0)
    p = tmp_path / "g.pt2"
    ep = torch.export.export(Conv().eval(), (torch.zeros(2, 1, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    torch.export.save(ep, str(p))
    return p


def test_inspect_refuses_what_torch_would_import_or_link(tmp_path):
    """Parts of an archive that do not create a file by themselves but reach code: AOTInductor libraries,
    tree specs that import modules, custom objects, higher-order operators, duplicate entries."""
    from lipverify.importers.pt2_check import inspect_pt2

    good = _good_pt2(tmp_path)
    inspect_pt2(good.read_bytes(), good)

    def refused(edits, *words):
        p = _rewrite(good, tmp_path / "x.pt2", edits)
        with pytest.raises(UserInputError) as e:
            inspect_pt2(p.read_bytes(), p)
        for w in words:
            assert w in str(e.value), str(e.value)

    refused({"data/aotinductor/model/model.so": b"\x7fELF"}, "AOTInductor")

    def defaultdict_spec(p):
        sig = p["graph_module"]["module_call_graph"][0]["signature"]
        ctx = json.dumps({"default_factory_module": "antigravity", "default_factory_name": "x", "dict_context": []})
        sig["in_spec"] = json.dumps([1, {"type": "collections.defaultdict", "context": ctx, "children_spec": []}])
    refused({M: _json(defaultdict_spec)}, "import")

    def custom_obj(p):
        p["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"class_fqn": "__torch__.torch.classes.x.Y"}}
    refused({M: _json(custom_obj)}, "custom")

    def hop(p):
        p["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.higher_order.cond"
    refused({M: _json(hop)}, "not an ATen operator")

    def print_op(p):
        p["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten._print.default"
    refused({M: _json(print_op)}, "_print", "string argument")

    # the same entry twice: two zip readers could pick different copies
    dup = tmp_path / "dup.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(dup, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, zin.read(n))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zout.writestr(zin.namelist()[0], b"")
    with pytest.raises(UserInputError, match="twice"):
        inspect_pt2(dup.read_bytes(), dup)


def test_rng_state_round_trips_weights_only(tmp_path):
    from lipverify.train import checkpoint

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian in numpy's state
    p = tmp_path / "checkpoint.pt"
    checkpoint.save(p, {"history": [{"loss": np.float64(0.5)}], "w": torch.ones(2)})
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    st = checkpoint.load(p)  # weights_only=True
    assert type(st["history"][0]["loss"]) is float
    checkpoint.set_rng_state(st["rng"], p)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    with pytest.raises(TypeError, match="ndarray"):
        checkpoint.save(p, {"x": np.zeros(3)})
    # a format-1 checkpoint (numpy arrays pickled) is refused, not unpickled
    torch.save({"version": 1, "rng": {"numpy": np.random.get_state()}}, p)
    with pytest.raises(UserInputError, match="pickled Python objects"):
        checkpoint.load(p)
    torch.save({"version": 2, "rng": {"torch": torch.zeros(3)}}, p)
    with pytest.raises(UserInputError, match="random-number state"):
        checkpoint.set_rng_state(checkpoint.load(p)["rng"], p)


# -- TorchScript graphs ---------------------------------------------------------------------------------
#
# A TorchScript file runs TorchScript: its ``__setstate__`` while ``torch.jit.load`` reads it, and every
# method when lipverify traces, exports or runs the module.  Each payload below creates its sentinel
# through ``aten::from_file(path, shared=True)`` (or prints) when it runs; on lipverify before the
# TorchScript checks every one of them ran (the sentinel appeared, the print reached stdout).

def _ts_inner(path: str) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=4)


def _ts_outer(x: torch.Tensor, path: str) -> torch.Tensor:
    return x + _ts_inner(path).sum() * 0


class TSFromFile(nn.Module):
    """``forward`` maps, and with ``shared=True`` creates, the file ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.f = nn.Linear(784, 3)

    def forward(self, x):
        t = torch.from_file(self.path, shared=True, size=4)
        return self.f(torch.flatten(x, 1)) + t.sum() * 0


class TSNested(TSFromFile):
    """The same through two script functions (``prim::CallFunction`` within ``prim::CallFunction``)."""

    def forward(self, x):
        return self.f(torch.flatten(_ts_outer(x, self.path), 1))


class TSPrint(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(784, 3)

    def forward(self, x):
        print("lipverify-ts-print-payload")
        return self.f(torch.flatten(x, 1))


class TSSetState(TSFromFile):
    """``__setstate__`` runs inside ``torch.jit.load``, before any graph can be checked."""

    def forward(self, x):
        return self.f(torch.flatten(x, 1))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
        return (self.f.weight, self.f.bias, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, str, bool]) -> None:
        t = torch.from_file(state[2], shared=True, size=4)
        self.path = state[2]
        self.training = state[3] or bool(t.sum() > 1.0)  # uses t: not dead code


TS_PAYLOADS = {"ts_from_file": (TSFromFile, ("aten::from_file", "reads or writes files", "TSFromFile.forward")),
               "ts_nested": (TSNested, ("aten::from_file", "reads or writes files", "TSNested.forward")),
               "ts_print": (TSPrint, ("prim::Print", "prints")),
               "ts_setstate": (TSSetState, ("__setstate__", "torch.jit.load"))}


@pytest.fixture(scope="module")
def ts_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_ts")
    (d / "s").mkdir()

    def sentinel(name):
        return d / "s" / f"pwned_{name}"

    torch.manual_seed(0)
    for name, (cls, _) in TS_PAYLOADS.items():
        m = cls() if cls is TSPrint else cls(str(sentinel(name)))
        torch.jit.save(torch.jit.script(m.eval()), str(d / f"{name}.pt"))
        assert not sentinel(name).exists()
    probes = [{"args": ["bounds", d / f"{name}.pt", "--input-shape", "1,28,28"], "cwd": d / "s"}
              for name in TS_PAYLOADS]
    return d, sentinel, dict(zip(TS_PAYLOADS, run_probes(probes)))


@pytest.mark.parametrize("name", sorted(TS_PAYLOADS))
def test_torchscript_payload_does_not_run(ts_world, name):
    d, sentinel, out = ts_world
    o = out[name]
    o.refused(f"{name}.pt", "TorchScript", "--trust-pickle", *TS_PAYLOADS[name][1])
    assert not sentinel(name).exists(), f"{name}: the payload ran"
    assert "lipverify-ts-print-payload" not in o.stdout


def test_torchscript_checks_are_skipped_with_trust_pickle(tmp_path):
    from lipverify.importers.torchfile import load_torch_file

    p = tmp_path / "print.pt"
    torch.jit.save(torch.jit.script(TSPrint()), str(p))
    with pytest.raises(UserInputError, match="prim::Print"):
        load_torch_file(p, None, False, None)
    module, notes, _ = load_torch_file(p, None, True, None)  # loaded, not run
    assert notes == ["TorchScript module"] and isinstance(module, torch.jit.ScriptModule)


def _bound(source, shape) -> float:
    import lipverify

    return lipverify.load(source, input_shape=shape).bounds("2").global_bound.value


def test_legitimate_torchscript_gives_the_eager_bound(tmp_path):
    """Scripted and traced conv nets load through the whitelist and give the bound of the eager module."""
    torch.manual_seed(0)
    net = Conv().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    want = _bound(net, (1, 8, 8))
    torch.jit.save(torch.jit.script(net), str(tmp_path / "s.pt"))
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 8, 8)), str(tmp_path / "t.pt"))
    for f in ("s.pt", "t.pt"):
        assert _bound(tmp_path / f, (1, 8, 8)) == pytest.approx(want, rel=1e-6), f


def test_scripted_resnet18_gives_the_eager_bound(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(weights=None, num_classes=10).eval()
    p = tmp_path / "resnet18.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    assert _bound(p, (3, 32, 32)) == pytest.approx(_bound(net, (3, 32, 32)), rel=1e-6)
