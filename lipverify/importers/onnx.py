"""ONNX files: reading and checking them, normalising what exporters write, converting with
onnx2torch (put in eval mode; every node onnx2torch cannot convert is listed at once), and exporting
torch modules to ONNX (opset 17, dynamic batch) for the programs that are analysed through ONNX.

Every file may be hostile: :func:`read_onnx` runs the checks of
:mod:`lipverify.importers.onnx_safety` (regular file, size and node limits, no control flow,
external data read only from the model's own folder and attached, finite weights, one float32 input
and one output) before the ONNX checker, and :func:`convert_onnx` converts with
:func:`lipverify.importers.onnx_convert.convert` (onnx2torch's converter in linear time).

:func:`normalise_onnx` runs before conversion, with the onnx library's own tools only:

* ``Identity`` nodes go: one whose input is an initializer becomes a copy of that initializer under
  its output's name (the exporter stores identical tensors once and aliases them, which onnx2torch
  cannot follow); any other is bypassed;
* ``Constant`` nodes become initializers; initializers no node uses are dropped; initializers listed
  as graph inputs (old IR versions) are no longer inputs;
* every node whose inputs are all constant is evaluated once and becomes initializers
  (:mod:`lipverify.importers.onnx_fold`: weight standardisation, weight normalisation, reshaped or
  transposed weights), with its output sizes checked before anything is allocated;
* opsets older than 11 are converted to 13 with ``onnx.version_converter``;
* a ``Reshape`` of an input-dependent tensor whose constant shape fixes the batch dimension at 1 gets
  ``0`` there ("copy the input's batch size"), so that the model runs on batches;
* shape inference annotates the result.

The fidelity check still compares the converted module against onnxruntime on the **original** model
(with its external data attached), not the normalised one.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lipverify.errors import UnsupportedOpError, UserInputError
from lipverify.importers.names import record_onnx_names
from lipverify.importers.onnx_fold import fold_constants
from lipverify.importers.onnx_safety import check_io, check_structure, read_model
from lipverify.limits import check_regular


def check_file(path: Path) -> None:
    """A model path must name a non-empty regular file (:func:`lipverify.limits.check_regular`:
    devices such as ``/dev/zero``, FIFOs, ``/dev/stdin`` and directories are refused by what they are,
    exit 2)."""
    check_regular(path, "model file")


def read_onnx(path: Path):
    """The checked model of ``path``, its self-contained serialised bytes (external data attached, for
    onnxruntime) and the largest weight ``(magnitude, label)``: the checks of
    :mod:`lipverify.importers.onnx_safety`, then the ONNX checker and :func:`check_io`.

    Warnings
    --------
    Refuses (exit 2) everything :func:`lipverify.importers.onnx_safety.read_model` refuses, models
    the ONNX checker rejects, and models without exactly one float32 input and one output.
    """
    import onnx

    model, data, largest = read_model(path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserInputError(f"invalid ONNX model: {_name_checker_node(model, str(exc))}", str(path)) from None
    check_io(model, path)
    return model, data, largest


def _name_checker_node(model, msg: str) -> str:
    """The checker's first line, with the node it is about named by index and op type when it quotes
    one of the node's inputs."""
    import re

    first = msg.strip().splitlines()[0] if msg.strip() else "checker failed"
    m = re.search(r"input '([^']*)'", msg)
    if m:
        for i, n in enumerate(model.graph.node):
            if m.group(1) in n.input:
                why = "it is produced by no earlier node, initializer or graph input"
                return f"node {n.name or '#' + str(i)} ({n.op_type}): input {m.group(1)!r}: {why} ({first.rstrip(': ')})"
    return first


def onnx_input_shape(model, path) -> tuple[Any, ...]:
    """The declared input shape, batch dimension first; None for symbolic or unset dimensions."""
    inp, _ = check_io(model, path)
    dims = []
    for d in inp.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    return tuple(dims)


def onnx_unconvertible(model) -> list[tuple[str, str]]:
    from onnx2torch.node_converters.registry import get_converter

    opset = {o.domain or "": o.version for o in model.opset_import}
    bad = []
    for i, n in enumerate(model.graph.node):
        try:
            get_converter(n.op_type, opset.get(n.domain or "", max(opset.values())), n.domain or "")
        except NotImplementedError:
            bad.append((n.op_type, n.name or f"#{i}"))
    return bad


def _input_dependent(graph) -> set[str]:
    """Names of the values that depend on a (non-initializer) graph input."""
    inits = {i.name for i in graph.initializer}
    dep = {i.name for i in graph.input if i.name not in inits}
    for n in graph.node:
        if any(i in dep for i in n.input if i):
            dep.update(o for o in n.output if o)
    return dep


def normalise_onnx(model, path=None):
    """A normalised copy of ``model`` and notes on what changed (see the module docstring); ``path``
    names the file in refusals."""
    import onnx
    from onnx import numpy_helper

    notes: list[str] = []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = {o.domain or "": o.version for o in m.opset_import}
    if opset.get("", 13) < 11:
        try:
            m = onnx.version_converter.convert_version(m, 13)
            notes.append(f"ONNX opset {opset['']} converted to 13")
        except Exception as exc:  # keep the original opset; onnx2torch may still read it
            notes.append(f"ONNX opset {opset['']} kept (conversion to 13 failed: {str(exc).splitlines()[0]})")
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    kept = []
    copied = bypassed = consts = 0
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
        if n.op_type == "Constant" and len(n.output) == 1 and n.attribute and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            consts += 1
            continue
        if n.op_type == "Identity" and len(n.input) == 1 and n.output[0] not in outputs:
            src = n.input[0]
            if src in inits:
                t = numpy_helper.from_array(numpy_helper.to_array(inits[src]).copy(), n.output[0])
                g.initializer.append(t)
                inits[t.name] = t
                copied += 1
            else:
                rename[n.output[0]] = src
                bypassed += 1
            continue
        kept.append(n)
    if copied or bypassed or consts:
        del g.node[:]
        g.node.extend(kept)
        parts = [f"{copied} aliased initializer(s) copied" if copied else "",
                 f"{bypassed} Identity node(s) bypassed" if bypassed else "",
                 f"{consts} Constant node(s) made initializers" if consts else ""]
        notes.append("ONNX normalised: " + ", ".join(p for p in parts if p))
    folded, by_op = fold_constants(m, path)
    if folded:
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]))
        notes.append(f"ONNX: {folded} node(s) computing constants from the weights folded into weights ({ops})")
    used = {i for n in g.node for i in n.input} | outputs
    unused = [i for i in g.initializer if i.name not in used]
    if unused:
        keep_inits = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
    init_names = {i.name for i in g.initializer}
    if any(i.name in init_names for i in g.input):
        real = [i for i in g.input if i.name not in init_names]
        del g.input[:]
        g.input.extend(real)
    # batch dimension fixed at 1 in Reshape constants
    dep = _input_dependent(g)
    fixed = 0
    for n in g.node:
        if n.op_type == "Reshape" and len(n.input) >= 2 and n.input[0] in dep and n.input[1] in inits:
            shp = numpy_helper.to_array(inits[n.input[1]])
            allow_zero = any(a.name == "allowzero" and a.i == 1 for a in n.attribute)
            if shp.ndim == 1 and len(shp) >= 2 and int(shp[0]) == 1 and not allow_zero:
                new = shp.copy()
                new[0] = 0
                name = n.input[1] + "__batch"
                if name not in inits:
                    t = numpy_helper.from_array(new, name)
                    g.initializer.append(t)
                    inits[name] = t
                n.input[1] = name
                fixed += 1
    if fixed:
        notes.append(f"{fixed} Reshape(s) fixed the batch size at 1: rewritten to keep the batch dimension")
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # shape inference is an annotation only
        pass
    return m, notes


def _explain_conversion_error(model, exc: Exception) -> str:
    """Name the node behind an onnx2torch failure (op type and reason), never a bare KeyError."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        missing = str(exc.args[0])
        known = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        known |= {o for n in model.graph.node for o in n.output}
        for i, n in enumerate(model.graph.node):
            if missing in n.input:
                why = ("is produced by no node, initializer or graph input" if missing not in known
                       else "could not be read as a value onnx2torch understands here")
                return f"node {n.name or '#' + str(i)} ({n.op_type}): its input {missing!r} {why}"
        return f"the value {missing!r} is missing"
    for i, n in enumerate(model.graph.node):
        if n.name and n.name in msg:
            return f"node {n.name} ({n.op_type}): {msg}"
    return f"{type(exc).__name__}: {msg}"


def explain_run_failure(gm, x: torch.Tensor) -> str:
    """Run the converted module node by node and name the node that fails (op type and reason)."""
    import torch.fx as fx

    from lipverify.importers.optable import op_name

    class _Failed(Exception):
        pass

    class _Stepper(fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise _Failed(f"node {n.name} ({op_name(gm, n)}): {first}") from None

    try:
        with torch.no_grad():
            _Stepper(gm).run(x)
    except _Failed as exc:
        return str(exc).splitlines()[0]  # fx appends "While executing ..." lines
    except Exception as exc:  # not an fx module
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "it fails on batched inputs"


def convert_onnx(model, path, notes: list | None = None):
    """onnx2torch module (eval mode) of the normalised ``model``; notes on the normalisation go to
    ``notes``."""
    from lipverify.importers.onnx_convert import convert

    check_structure(model, path)  # also for models exported in memory
    model, more = normalise_onnx(model, path)
    if notes is not None:
        notes.extend(more)
    bad = onnx_unconvertible(model)
    if bad:
        raise UnsupportedOpError(bad, str(path))
    for i, n in enumerate(model.graph.node):  # left after folding: it normalises input-dependent values
        training = any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
        if n.op_type == "BatchNormalization" and (training or len([o for o in n.output if o]) > 1):
            raise UserInputError(f"node {n.name or '#' + str(i)} (BatchNormalization) normalises with the "
                                 "statistics of the batch (training mode), so each output depends on the other "
                                 "inputs of the batch: export the model after model.eval()", str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = convert(model)
    except Exception as exc:
        raise UserInputError(f"could not convert the ONNX graph: {_explain_conversion_error(model, exc)}",
                             str(path)) from None
    _repair_layer_norms(gm, notes)
    record_onnx_names(gm, model)  # messages name modules by the exporter's scope (importers.names)
    return gm.eval()


def _repair_layer_norms(gm: nn.Module, notes) -> None:
    """onnx2torch reads a LayerNormalization's normalised shape from the shape inference of its input;
    where that is unknown (after reshapes with computed sizes) it writes 0s, and the module cannot run.
    The scale has exactly the normalised shape (the operator broadcasts it over the trailing axes), so
    it is taken from there."""
    fixed = 0
    for m in gm.modules():
        if isinstance(m, nn.LayerNorm) and any(int(d) == 0 for d in m.normalized_shape) and m.weight is not None:
            m.normalized_shape = tuple(int(d) for d in m.weight.shape)
            fixed += 1
    if fixed and notes is not None:
        notes.append(f"{fixed} LayerNormalization node(s) without an inferred input shape: normalised shape read "
                     "from the scale")


def _expose_export_opset() -> None:
    """onnx2torch's modules ask ``torch.onnx.symbolic_helper`` for the opset being exported, through a
    ``GLOBALS`` object that torch 2.14 keeps only in its TorchScript exporter (without it, exporting a
    converted Shape / Squeeze / Reduce node can fail with an AttributeError; seen once torchvision was
    imported).  Point the old name at that same object (the real, current opset)."""
    from torch.onnx import symbolic_helper

    if hasattr(symbolic_helper, "GLOBALS"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # an older torch, which still has the name onnx2torch reads
        return
    symbolic_helper.GLOBALS = GLOBALS


def export_to_onnx(module: nn.Module, input_shape, path) -> bytes:
    _expose_export_opset()
    buf = io.BytesIO()
    example = torch.zeros((1,) + tuple(input_shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        if "Guard failed" in str(exc) and "size()[0]" in str(exc):
            raise UserInputError("the program was exported with a fixed batch size; export it with a dynamic "
                                 "batch dimension (torch.export Dim) so lipverify can run batches",
                                 str(path) if path else None) from None
        raise UserInputError(f"could not export the model to a graph lipverify can read: "
                             f"{str(exc).splitlines()[0]}", str(path) if path else None) from None
    return buf.getvalue()
