"""ONNX files: reading and checking them, converting with onnx2torch (put in eval mode; every node
onnx2torch cannot convert is listed at once), and exporting torch modules to ONNX (opset 17, dynamic
batch) for the programs that are analysed through ONNX.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lipverify.errors import UnsupportedOpError, UserInputError


def check_file(path: Path) -> None:
    if not path.exists():
        raise UserInputError("no such file", str(path))
    if path.is_dir():
        raise UserInputError("is a directory, expected a model file", str(path))
    if path.stat().st_size == 0:
        raise UserInputError("the file is empty", str(path))


def read_onnx(path: Path):
    import onnx

    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise UserInputError("not a valid ONNX file (could not parse the protobuf; truncated or not ONNX?)",
                             str(path)) from None
    if len(model.graph.node) == 0:
        raise UserInputError("not a valid ONNX file (no graph nodes; truncated or not ONNX?)", str(path))
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserInputError(f"invalid ONNX model: {str(exc).splitlines()[0]}", str(path)) from None
    return model, data


def onnx_input_shape(model, path) -> tuple[Any, ...]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserInputError(f"the model has {len(inputs)} inputs; lipverify needs exactly one", str(path))
    dims = []
    for d in inputs[0].type.tensor_type.shape.dim:
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


def convert_onnx(model, path):
    import onnx2torch

    bad = onnx_unconvertible(model)
    if bad:
        raise UnsupportedOpError(bad, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = onnx2torch.convert(model)
    except Exception as exc:
        raise UserInputError(f"could not convert the ONNX graph: {str(exc).splitlines()[0]}", str(path)) from None
    return gm.eval()


def export_to_onnx(module: nn.Module, input_shape, path) -> bytes:
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
