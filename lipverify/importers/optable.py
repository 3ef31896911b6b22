"""The op tables of the importers: which torch modules, functions and methods are activations,
coordinate selections, softmax or binary arithmetic, and how an fx node is classified.

Both importers use them: :mod:`lipverify.importers.fx` directly, and torch.export programs after
:func:`lipverify.importers.aten.normalise_aten` has rewritten their aten calls to torch functions.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod).__name__ == "OnnxFunction":
            return getattr(mod.function, "__name__", "OnnxFunction")
        if type(mod).__name__ == "OnnxBinaryMathOperation":
            fn = getattr(mod.math_op_function, "__name__", "")
            return {"add": "Add", "sub": "Sub", "mul": "Mul", "_onnx_div": "Div", "div": "Div"}.get(fn, "BinaryMath")
        return type(mod).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


ACT_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.Hardtanh: lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
    nn.Softplus: lambda m: ("softplus", {"beta": m.beta}) if m.threshold >= 20 else ("softplus", {"beta": m.beta}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.SELU: lambda m: ("selu", {}),
    nn.CELU: lambda m: ("celu", {"alpha": m.alpha}),
    nn.Mish: lambda m: ("mish", {}),
    nn.PReLU: lambda m: ("prelu", {"weight": m.weight}),
    nn.Softsign: lambda m: ("softsign", {}),
}

#: onnx2torch modules that are activations: name -> (activation, keyword arguments read from the module)
ONNX_ACT_MODULES: dict[str, Callable[[nn.Module], tuple[str, dict]]] = {
    "OnnxHardSigmoid": lambda m: ("hardsigmoid", {"alpha": float(m.alpha), "beta": float(m.beta)}),
    "OnnxHardSwish": lambda m: ("hardswish", {}),
}


ACT_FUNCS = {
    F.relu: "relu", torch.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu", F.elu: "elu",
    F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh", F.relu6: "relu6", F.softplus: "softplus",
    torch.clamp: "clip", torch.clip: "clip", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    F.selu: "selu", torch.selu: "selu", F.softsign: "softsign", F.celu: "celu", F.mish: "mish", F.relu_: "relu", torch.relu_: "relu",
    F.hardtanh_: "hardtanh", F.leaky_relu_: "leaky_relu", torch.clamp_: "clip", F.elu_: "elu",
}


ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "clamp": "clip", "clip": "clip",
               "relu_": "relu", "tanh_": "tanh", "sigmoid_": "sigmoid", "clamp_": "clip", "clip_": "clip"}

#: torch functions / methods that reduce over axes linearly
MEAN_FUNCS = {torch.mean}
SUM_FUNCS = {torch.sum}


SELECT_MODULES = {
    "Flatten", "Unflatten", "Identity", "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout",
    "ZeroPad1d", "ZeroPad2d", "ConstantPad1d", "ConstantPad2d", "ReflectionPad1d", "ReflectionPad2d",
    "ReplicationPad1d", "ReplicationPad2d", "OnnxReshape", "OnnxTranspose", "OnnxSlice", "OnnxSliceV9",
    "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
    "OnnxUnsqueezeDynamicAxes", "OnnxPadStatic", "OnnxPadDynamic", "OnnxGather", "OnnxCast",
    "OnnxCopyIdentity", "OnnxDropoutDynamic", "OnnxFlatten", "OnnxDepthToSpace", "OnnxExpand",
    "OnnxTile", "OnnxResize", "Upsample", "UpsamplingNearest2d",
}


SELECT_FUNCS = {
    torch.flatten, torch.reshape, operator.getitem, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.t, F.pad, F.dropout, torch.narrow, torch.movedim, torch.swapaxes,
    F.dropout2d, torch.clone,
}


#: functions known by name (they live in other packages): the identity in eval mode, checked by probing
SELECT_FUNC_NAMES = {"stochastic_depth", "drop_path", "interpolate", "upsample_nearest2d", "upsample_nearest1d",
                     "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "_upsample_nearest_exact2d"}

SELECT_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "narrow", "__getitem__", "float", "to", "type_as", "movedim", "swapaxes", "expand", "repeat",
    "clone", "detach",
}


SOFTMAX_OPS = {"Softmax", "LogSoftmax", "OnnxSoftmaxV1V11", "softmax", "log_softmax"}


ADD_OPS = {operator.add, torch.add, operator.iadd, torch.Tensor.add_}


SUB_OPS = {operator.sub, torch.sub, torch.subtract, operator.isub}


MUL_OPS = {operator.mul, torch.mul, torch.multiply, operator.imul}


DIV_OPS = {operator.truediv, torch.div, torch.true_divide, torch.divide, operator.itruediv}


def binary_kind(gm, node) -> str | None:
    """'add', 'sub', 'mul', 'div' or None for a binary arithmetic node."""
    if node.op == "call_function":
        t = node.target
        return ("add" if t in ADD_OPS else "sub" if t in SUB_OPS else "mul" if t in MUL_OPS
                else "div" if t in DIV_OPS else None)
    if node.op == "call_method" and node.target in ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"):
        return node.target.rstrip("_")
    if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == "OnnxBinaryMathOperation":
        return {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}.get(op_name(gm, node))
    return None


def is_neg(gm, node) -> bool:
    if node.op == "call_function" and node.target in (operator.neg, torch.neg):
        return True
    if node.op == "call_method" and node.target == "neg":
        return True
    return node.op == "call_module" and op_name(gm, node) == "OnnxNeg"
