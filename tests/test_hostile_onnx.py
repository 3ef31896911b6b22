"""Hostile ONNX files: every probe is refused with exit 2, one line naming the file and the reason,
within seconds and under a capped address space; nothing outside the model's folder is read.

All CLI probes run in one capped subprocess (:func:`hostile.run_probes`, a module fixture).  Models
are built here with ``onnx.helper`` and are small on disk (the 100,000-node chain is 2.2 MB, the
100,000-class layer 800 kB; the 5 GiB "model" is a sparse file).  The sentinel ``secret.bin`` files
outside the model folders hold valid weights, so a model that read them would load; their access
time is set in the past and must not move (checked where the file system records access times).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import GiB, run_probes  # noqa: E402

FAST = 15.0  # seconds any refusal may take (they take well under 2 s; the machine is shared)
ENV = {"LIPVERIFY_MAX_MEMORY": "2G"}
W34 = np.random.RandomState(0).randn(3, 4).astype(np.float32)  # the weights every small model uses


# -- building models ------------------------------------------------------------------------------
def model(nodes, inits=(), inp=("x", T.FLOAT, ["N", 4]), outs=(("y", T.FLOAT, ["N", 3]),), functions=(),
          opset=17):
    g = h.make_graph(list(nodes), "g", [h.make_tensor_value_info(*inp)],
                     [h.make_tensor_value_info(*o) for o in outs], list(inits))
    imports = [h.make_opsetid("", opset)] + ([h.make_opsetid("local", 1)] if functions else [])
    return h.make_model(g, opset_imports=imports, functions=list(functions))


def gemm(w: np.ndarray | T = W34, x="x", y="y"):
    w = w if isinstance(w, T) else nh.from_array(w, "W")
    return model([h.make_node("Gemm", [x, "W"], [y], transB=1)], [w])


def ext_tensor(location: str, offset: int | None = None, length: int | None = None, name="W", dims=(3, 4)):
    t = T()
    t.name, t.data_type = name, T.FLOAT
    t.dims.extend(dims)
    t.data_location = T.EXTERNAL
    entries = [("location", location)] + ([("offset", str(offset))] if offset is not None else []) \
        + ([("length", str(length))] if length is not None else [])
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def save(m, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


def relu_chain(n: int):
    nodes = [h.make_node("Relu", ["x" if i == 0 else f"r{i}"], [f"r{i + 1}"]) for i in range(n)]
    nodes.append(h.make_node("Gemm", [f"r{n}", "W"], ["y"], transB=1))
    return model(nodes, [nh.from_array(W34, "W")])


def mul_chain(n: int):
    """``n`` multiplications by one constant, then a dense layer: 10,000 initializer uses and one
    affine run of 10,000 nodes (both were quadratic)."""
    nodes = [h.make_node("Mul", ["x" if i == 0 else f"m{i}", "c"], [f"m{i + 1}"]) for i in range(n)]
    nodes.append(h.make_node("Gemm", [f"m{n}", "W"], ["y"], transB=1))
    return model(nodes, [nh.from_array(np.array(1.0, np.float32), "c"), nh.from_array(W34, "W")])


def function_bomb(body: int = 200, calls: int = 200):
    f = h.make_function("local", "F", ["a"], ["b"],
                        [h.make_node("Relu", ["a" if i == 0 else f"t{i}"], ["b" if i == body - 1 else f"t{i + 1}"])
                         for i in range(body)], [h.make_opsetid("", 17)])
    nodes = [h.make_node("F", ["x" if i == 0 else f"f{i}"], [f"f{i + 1}"], domain="local") for i in range(calls)]
    nodes.append(h.make_node("Gemm", [f"f{calls}", "W"], ["y"], transB=1))
    return model(nodes, [nh.from_array(W34, "W")], functions=[f])


def nested_if():
    def branch(inner):
        out = h.make_tensor_value_info("o", T.FLOAT, ["N", 4])
        node = inner if inner is not None else h.make_node("Relu", ["x"], ["o"])
        return h.make_graph([node], "b", [], [out])

    inner = h.make_node("If", ["cond"], ["o"], then_branch=branch(None), else_branch=branch(None))
    outer = h.make_node("If", ["cond"], ["z"], then_branch=branch(inner), else_branch=branch(None))
    cond = nh.from_array(np.array(True), "cond")
    return model([outer, h.make_node("Gemm", ["z", "W"], ["y"], transB=1)], [cond, nh.from_array(W34, "W")])


def value_sized_expand():
    """``Expand`` to a length computed from the input's values: no static size."""
    nodes = [h.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             h.make_node("Mul", ["mx", "big"], ["s"]),
             h.make_node("Cast", ["s"], ["si"], to=T.INT64),
             h.make_node("Reshape", ["si", "one"], ["shape"]),
             h.make_node("Expand", ["c1", "shape"], ["e"]),
             h.make_node("ReduceSum", ["e"], ["tot"], keepdims=0),
             h.make_node("Gemm", ["x", "W"], ["g"], transB=1),
             h.make_node("Add", ["g", "tot"], ["y"])]
    inits = [nh.from_array(np.array(1e9, np.float32), "big"), nh.from_array(np.array([1], np.int64), "one"),
             nh.from_array(np.array([1.0], np.float32), "c1"), nh.from_array(W34, "W")]
    return model(nodes, inits)


def constant_of_shape_bomb():
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["c"]),
             h.make_node("ReduceSum", ["c"], ["tot"], keepdims=0),
             h.make_node("Gemm", ["x", "W"], ["g"], transB=1),
             h.make_node("Add", ["g", "tot"], ["y"])]
    return model(nodes, [nh.from_array(np.array([100000, 100000], np.int64), "shape"), nh.from_array(W34, "W")])


def mlp(w1: np.ndarray, w2: np.ndarray):
    nodes = [h.make_node("Gemm", ["x", "W1"], ["a"], transB=1), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Gemm", ["r", "W2"], ["y"], transB=1)]
    return model(nodes, [nh.from_array(w1, "W1"), nh.from_array(w2, "W2")])


# -- the world and its probes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    files = root / "files"
    secrets = [root / "secret" / "secret.bin", root / "outside" / "secret.bin"]
    for s in secrets:
        s.parent.mkdir(parents=True)
        W34.tofile(s)
    control = root / "control.bin"
    control.write_bytes(b"x")
    for f in secrets + [control]:
        os.utime(f, (1_000_000, f.stat().st_mtime))

    m = {}
    m["good"] = save(gemm(), files / "good" / "model.onnx")
    ext_ok = files / "extok"
    ext_ok.mkdir(parents=True)
    onnx.save_model(mlp(np.abs(W34.T @ W34) / 10, W34), str(ext_ok / "model.onnx"), save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    m["extok"] = ext_ok / "model.onnx"
    m["inline"] = save(mlp(np.abs(W34.T @ W34) / 10, W34), files / "inline" / "model.onnx")
    # S3: a relative location resolved against the working directory
    m["cwdleak"] = save(gemm(ext_tensor("secret/secret.bin")), files / "ext" / "cwdleak" / "model.onnx")
    # S4: a symbolic link (directory or file) inside the model's folder leading out of it
    m["symdir"] = save(gemm(ext_tensor("sub/secret.bin")), files / "symdir" / "model.onnx")
    (files / "symdir" / "sub").symlink_to(root / "outside", target_is_directory=True)
    m["symfile"] = save(gemm(ext_tensor("w.bin")), files / "symfile" / "model.onnx")
    (files / "symfile" / "w.bin").symlink_to(root / "outside" / "secret.bin")
    m["absolute"] = save(gemm(ext_tensor(str(secrets[1]))), files / "absolute" / "model.onnx")
    m["dotdot"] = save(gemm(ext_tensor("../../outside/secret.bin")), files / "dotdot" / "model.onnx")
    m["fifo"] = save(gemm(ext_tensor("pipe")), files / "fifo" / "model.onnx")
    os.mkfifo(files / "fifo" / "pipe")
    m["pastend"] = save(gemm(ext_tensor("w.bin", offset=40, length=48)), files / "pastend" / "model.onnx")
    W34.tofile(files / "pastend" / "w.bin")
    m["badlen"] = save(gemm(ext_tensor("w.bin", length=8)), files / "badlen" / "model.onnx")
    W34.tofile(files / "badlen" / "w.bin")
    # B1: sizes
    m["bigin"] = save(model([h.make_node("GlobalAveragePool", ["x"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
                             h.make_node("Gemm", ["f", "W"], ["y"], transB=1)], [nh.from_array(W34[:2, :3], "W")],
                            inp=("x", T.FLOAT, [1, 3, 100000, 100000]), outs=(("y", T.FLOAT, [1, 2]),)),
                      files / "bigin" / "model.onnx")
    m["classes"] = save(model([h.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
                              [nh.from_array(np.random.RandomState(1).randn(100000, 2).astype(np.float32), "W")],
                              inp=("x", T.FLOAT, ["N", 2]), outs=(("y", T.FLOAT, ["N", 100000]),)),
                        files / "classes" / "model.onnx")
    m["symbolic"] = save(model([h.make_node("ReduceMean", ["x"], ["r"], axes=[1], keepdims=1),
                                h.make_node("Gemm", ["r", "W"], ["y"], transB=1)],
                               [nh.from_array(W34[:, :1], "W")], inp=("x", T.FLOAT, ["N", "D"])),
                         files / "symbolic" / "model.onnx")
    m["cosbomb"] = save(constant_of_shape_bomb(), files / "cosbomb" / "model.onnx")
    m["expand"] = save(value_sized_expand(), files / "expand" / "model.onnx")
    m["nestedif"] = save(nested_if(), files / "nestedif" / "model.onnx")
    # B3: nodes
    m["chain100k"] = save(relu_chain(100_000), files / "chain100k" / "model.onnx")
    m["funcbomb"] = save(function_bomb(), files / "funcbomb" / "model.onnx")
    m["chain10k"] = save(mul_chain(10_000), files / "chain10k" / "model.onnx")
    # B5: non-finite weights
    nan, inf = W34.copy(), W34.copy()
    nan[1, 2], inf[0, 0] = np.nan, -np.inf
    m["nan"] = save(gemm(nan), files / "nan" / "model.onnx")
    m["inf"] = save(gemm(inf), files / "inf" / "model.onnx")
    m["huge"] = save(mlp(np.full((4, 4), 1e30, np.float32), np.full((3, 4), 1e30, np.float32)),
                     files / "huge" / "model.onnx")
    # B8: wrong reasons
    m["int64"] = save(model([h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
                             h.make_node("Gemm", ["xf", "W"], ["y"], transB=1)], [nh.from_array(W34, "W")],
                            inp=("x", T.INT64, ["N", 4])), files / "int64" / "model.onnx")
    m["twoout"] = save(model([h.make_node("Gemm", ["x", "W"], ["y"], transB=1), h.make_node("Relu", ["y"], ["z"])],
                             [nh.from_array(W34, "W")], outs=(("y", T.FLOAT, ["N", 3]), ("z", T.FLOAT, ["N", 3]))),
                       files / "twoout" / "model.onnx")
    (files / "odd").mkdir()
    os.mkfifo(files / "odd" / "pipe.onnx")
    (files / "odd" / "empty.onnx").write_bytes(b"")
    with open(files / "odd" / "huge.onnx", "wb") as fh:  # sparse: no disk used
        fh.truncate(5 * GiB)

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    probes = {
        "cwdleak": {"args": ["bounds", m["cwdleak"]], "cwd": root},
        "cwdleak_nofid": {"args": ["bounds", m["cwdleak"], "--no-fidelity-check"], "cwd": root},
        "symdir": {"args": ["bounds", m["symdir"]], "cwd": root},
        "symdir_nofid": {"args": ["bounds", m["symdir"], "--no-fidelity-check"], "cwd": m["symdir"].parent},
        "symfile": {"args": ["bounds", m["symfile"]]},
        "absolute": {"args": ["bounds", m["absolute"]]},
        "dotdot": {"args": ["bounds", m["dotdot"]]},
        "fifo": {"args": ["bounds", m["fifo"]]},
        "pastend": {"args": ["bounds", m["pastend"]]},
        "badlen": {"args": ["bounds", m["badlen"]]},
        "extok": {"args": ["bounds", "--json", m["extok"]], "cwd": elsewhere},
        "extok_home": {"args": ["bounds", "--json", "model.onnx"], "cwd": ext_ok},
        "inline": {"args": ["bounds", "--json", m["inline"]], "cwd": elsewhere},
        "bigin": {"args": ["bounds", m["bigin"]]},
        "classes": {"args": ["bounds", m["classes"], "--no-fidelity-check"]},
        "symbolic": {"args": ["bounds", m["symbolic"], "--input-shape", "100000,100000"]},
        "cosbomb": {"args": ["bounds", m["cosbomb"]]},
        "expand": {"args": ["bounds", m["expand"]]},
        "nestedif": {"args": ["bounds", m["nestedif"]]},
        "chain100k": {"args": ["bounds", m["chain100k"]]},
        "funcbomb": {"args": ["bounds", m["funcbomb"]]},
        "chain10k": {"args": ["bounds", "--json", m["chain10k"]]},
        "nan": {"args": ["bounds", m["nan"]]},
        "inf": {"args": ["bounds", m["inf"], "--no-fidelity-check"]},
        "huge": {"args": ["bounds", m["huge"]]},
        "huge_nofid": {"args": ["bounds", m["huge"], "--no-fidelity-check"]},
        "int64": {"args": ["bounds", m["int64"]]},
        "twoout": {"args": ["bounds", m["twoout"]]},
        "devzero": {"args": ["bounds", "/dev/zero"]},
        "pipe": {"args": ["bounds", files / "odd" / "pipe.onnx"]},
        "stdin": {"args": ["bounds", "/dev/stdin"]},
        "empty": {"args": ["bounds", files / "odd" / "empty.onnx"]},
        "hugefile": {"args": ["bounds", files / "odd" / "huge.onnx"]},
    }
    for p in probes.values():
        p["env"] = dict(ENV)
    outcomes = dict(zip(probes, run_probes(list(probes.values()), cap=3 * GiB)))
    control.read_bytes()
    atime_works = control.stat().st_atime > 2_000_000
    untouched = {str(s): s.stat().st_atime < 2_000_000 for s in secrets}
    return {"root": root, "models": m, "out": outcomes, "atime_works": atime_works, "untouched": untouched}


def secrets_unread(world):
    if world["atime_works"]:
        assert all(world["untouched"].values()), f"a file outside the model folders was read: {world['untouched']}"


# -- S3, S4: external data stays inside the model's folder ----------------------------------------
def test_external_data_is_resolved_against_the_models_folder_not_the_cwd(world):
    for key in ("cwdleak", "cwdleak_nofid"):
        line = world["out"][key].refused("cwdleak/model.onnx", "'W'", "secret/secret.bin", "does not exist beside",
                                         within=FAST)
        assert "1.76" not in line  # W34[0, 0]: nothing computed from the secret
    secrets_unread(world)


def test_symbolic_links_out_of_the_models_folder_are_refused(world):
    for key in ("symdir", "symdir_nofid", "symfile"):
        world["out"][key].refused("model.onnx", "'W'", "symbolic link", "outside the model's folder", within=FAST)
        assert "batched" not in world["out"][key].stderr
    secrets_unread(world)


@pytest.mark.parametrize("key, words", [
    ("absolute", ("absolute path",)),
    ("dotdot", ("'..'",)),
    ("fifo", ("FIFO", "not a regular file")),
    ("pastend", ("past the end", "w.bin")),
    ("badlen", ("length 8", "48 bytes")),
])
def test_bad_external_locations_are_refused(world, key, words):
    world["out"][key].refused(f"{key}/model.onnx", "'W'", *words, within=FAST)


def test_external_data_model_loads_from_any_working_directory(world):
    res = {k: world["out"][k] for k in ("extok", "extok_home", "inline")}
    for k, r in res.items():
        assert r.rc == 0, (k, r.stderr)
    bounds = {k: json.loads(r.stdout)["global"]["value"] for k, r in res.items()}
    assert bounds["extok"] == bounds["extok_home"] == pytest.approx(bounds["inline"], rel=1e-12)
    assert json.loads(res["extok"].stdout)["fidelity"]["passed"]


# -- B1: sizes before allocation ------------------------------------------------------------------
def test_huge_declared_input_is_refused_before_allocation(world):
    world["out"]["bigin"].refused("bigin/model.onnx", "input batch", "3,100000,100000", "memory limit of 2 GiB",
                                  within=FAST)


def test_huge_input_shape_option_is_refused(world):
    world["out"]["symbolic"].refused("symbolic/model.onnx", "100000,100000", "memory limit", within=FAST)


def test_class_count_whose_margin_matrix_does_not_fit_is_refused(world):
    world["out"]["classes"].refused("classes/model.onnx", "margin constants", "100000 x 100000", "memory limit",
                                    within=30)


def test_allocation_bombs_are_refused(world):
    world["out"]["cosbomb"].refused("cosbomb/model.onnx", "importing the model", "37.3 GiB of activations",
                                    "memory limit", within=FAST)
    world["out"]["expand"].refused("expand/model.onnx", "Expand", "cannot be determined", within=FAST)
    world["out"]["nestedif"].refused("nestedif/model.onnx", "If", "control flow", within=FAST)


# -- B3: node counts and linear-time import -------------------------------------------------------
def test_node_limit(world):
    world["out"]["chain100k"].refused("chain100k/model.onnx", "100,001 nodes", "20,000", within=FAST)
    world["out"]["funcbomb"].refused("funcbomb/model.onnx", "local functions expand", "20,000", within=FAST)


def test_ten_thousand_node_chain_loads_in_seconds(world):
    r = world["out"]["chain10k"]
    assert r.rc == 0, r.stderr
    assert r.seconds < 40, r.seconds  # ~6 s here; the quadratic import took minutes
    d = json.loads(r.stdout)
    assert d["fidelity"]["passed"]


# -- B5: non-finite weights and outputs -----------------------------------------------------------
def test_non_finite_weights_are_refused_naming_the_tensor(world):
    world["out"]["nan"].refused("nan/model.onnx", "tensor 'W'", "NaN", within=FAST)
    world["out"]["inf"].refused("inf/model.onnx", "tensor 'W'", "infinite", within=FAST)


def test_overflowing_outputs_are_refused_with_the_largest_weight(world):
    for key in ("huge", "huge_nofid"):
        world["out"][key].refused("huge/model.onnx", "outputs are not finite", "inputs in [0,1]",
                                  "largest weight 1e+30", within=FAST)


# -- B8: the right reason -------------------------------------------------------------------------
def test_wrong_element_type_and_output_count_are_named(world):
    world["out"]["int64"].refused("int64/model.onnx", "element type int64", "float32", within=FAST)
    world["out"]["twoout"].refused("twoout/model.onnx", "2 outputs", "exactly one", within=FAST)
    for key in ("int64", "twoout"):
        assert "batched" not in world["out"][key].stderr


@pytest.mark.parametrize("key, words", [
    ("devzero", ("/dev/zero", "character device", "regular model file")),
    ("pipe", ("pipe.onnx", "FIFO", "regular model file")),
    ("stdin", ("/dev/stdin", "expected a regular model file")),
    ("empty", ("empty.onnx", "the file is empty")),
    ("hugefile", ("huge.onnx", "5 GiB", "over the limit of 2 GiB")),
])
def test_model_must_be_a_regular_file(world, key, words):
    world["out"][key].refused(*words, within=FAST)


# -- B7: onnxruntime's own lines never reach the terminal -----------------------------------------
def test_onnxruntime_errors_are_one_line_without_its_log(tmp_path, capfd):
    """Runs in this process: onnxruntime writes its log to file descriptor 2, which capfd sees."""
    from click.testing import CliRunner

    from lipverify.cli import main

    nodes = [h.make_node("Gather", ["x", "idx"], ["g"], axis=1), h.make_node("Gemm", ["g", "W"], ["y"], transB=1)]
    path = save(model(nodes, [nh.from_array(np.array([0, 1, 2, 9], np.int64), "idx"), nh.from_array(W34, "W")]),
                tmp_path / "gather.onnx")
    r = CliRunner().invoke(main, ["bounds", str(path)])
    fd = capfd.readouterr()
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "gather.onnx" in lines[0] and "onnxruntime fails to run" in lines[0], lines
    assert "Gather" in lines[0]
    assert "onnxruntime:" not in fd.err + fd.out and "\x1b[" not in fd.err + fd.out, fd.err[-500:]


# -- B1: sizes computed from the input's shape are known before running -----------------------------
def pad_chain(blocks: int = 12, from_values: bool = False, batch_scale: int = 0):
    """``blocks`` Pads in a row, each widening its input by an amount computed from its shape, as
    swin's window padding is (the batch dimension symbolic): width = prod(shape) / batch, pad =
    width % 3 + 1 (+ (batch - 1) * ``batch_scale``); each Pad's amount thus needs the previous Pad's
    size.  ``from_values``: the amount is computed from the input's values (max(x)) instead."""
    nodes, cur = [], "x"
    for k in range(blocks):
        if from_values:
            nodes += [h.make_node("ReduceMax", [cur], [f"mx{k}"], keepdims=0),
                      h.make_node("Cast", [f"mx{k}"], [f"w{k}"], to=T.INT64)]
        else:
            nodes += [h.make_node("Shape", [cur], [f"s{k}"]),
                      h.make_node("ReduceProd", [f"s{k}"], [f"n{k}"], keepdims=0),
                      h.make_node("Gather", [f"s{k}", "zero"], [f"b{k}"], axis=0),
                      h.make_node("Div", [f"n{k}", f"b{k}"], [f"w{k}"])]
        nodes += [h.make_node("Mod", [f"w{k}", "three"], [f"r{k}"]),
                  h.make_node("Add", [f"r{k}", "one"], [f"a{k}"])]
        if batch_scale:
            nodes += [h.make_node("Sub", [f"b{k}", "one"], [f"bm{k}"]),
                      h.make_node("Mul", [f"bm{k}", "scale"], [f"bs{k}"]),
                      h.make_node("Add", [f"a{k}", f"bs{k}"], [f"ab{k}"])]
        nodes += [h.make_node("Unsqueeze", [f"ab{k}" if batch_scale else f"a{k}", "zero1"], [f"u{k}"]),
                  h.make_node("Concat", ["zeros3", f"u{k}"], [f"p{k}"], axis=0),
                  h.make_node("Pad", [cur, f"p{k}"], [f"h{k}"])]
        cur = f"h{k}"
    nodes += [h.make_node("ReduceMean", [cur], ["m"], axes=[1], keepdims=1),
              h.make_node("Gemm", ["m", "W"], ["y"], transB=1)]
    inits = [nh.from_array(np.array(v, np.int64), name) for name, v in
             [("zero", 0), ("one", 1), ("three", 3), ("scale", batch_scale), ("zero1", [0]), ("zeros3", [0, 0, 0])]]
    return model(nodes, inits + [nh.from_array(W34[:, :1], "W")])


def test_pad_sized_from_the_inputs_shape_passes_and_from_its_values_is_refused(tmp_path, monkeypatch):
    """The regression of swin_t's window padding (twelve Pads, each sized from the previous one's
    shape: an estimator that re-inferred the whole graph once per Pad gave up after eight)."""
    import lipverify
    from lipverify.errors import UserInputError
    from lipverify.importers.onnx_memory import estimate_memory

    monkeypatch.setenv("LIPVERIFY_MAX_MEMORY", "2G")
    runs = [(2, "importing the model", True), (8, "the fidelity check", False)]
    shaped = pad_chain()
    width = 4
    for _ in range(12):
        width += width % 3 + 1
    # per example: the input, 12 x (Pad output), ReduceMean and Gemm outputs, float32; the shape arithmetic
    # (int64 scalars and pads) is counted too, so only a lower bound is exact
    assert estimate_memory(shaped, None, (4,), "m.onnx", runs) >= 4 * (4 + width + 1 + 3)
    path = save(shaped, tmp_path / "shape" / "model.onnx")
    lm = lipverify.load(path)  # converted, run and checked against onnxruntime
    assert lm.fidelity is not None and lm.fidelity.passed
    assert lm.bounds("2").global_bound.sound

    valued = pad_chain(from_values=True)
    with pytest.raises(UserInputError, match=r"node h0 \(Pad\) cannot be determined before running it"):
        estimate_memory(valued, None, (4,), "m.onnx", runs)
    path = save(valued, tmp_path / "values" / "model.onnx")
    with pytest.raises(UserInputError, match="Pad.*cannot be determined"):
        lipverify.load(path)


def test_sizes_from_the_batch_are_those_of_each_runs_batch(monkeypatch):
    """A Pad of (batch - 1) x 10^8 columns: nothing at batch 1, 21 GiB at the fidelity check's 8."""
    from lipverify.errors import UserInputError
    from lipverify.importers.onnx_memory import estimate_memory

    monkeypatch.setenv("LIPVERIFY_MAX_MEMORY", "2G")
    m = pad_chain(blocks=1, batch_scale=10**8)
    assert estimate_memory(m, None, (4,), "m.onnx", [(1, "one example", True)]) < 1000
    with pytest.raises(UserInputError, match="the fidelity check: 8 examples, 2 x .* memory limit"):
        estimate_memory(m, None, (4,), "m.onnx", [(2, "importing the model", True), (8, "the fidelity check", False)])
    # a batch fixed in the file: its sizes, scaled to the run's batch
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert estimate_memory(m, 1, (4,), "m.onnx", [(8, "the fidelity check", False)]) < 1000
