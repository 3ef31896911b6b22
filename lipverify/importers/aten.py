"""torch.export (``.pt2``) programs: their aten operators rewritten to the torch functions with the
same signature, so that one op table (:mod:`lipverify.importers.optable`) serves every importer.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from lipverify.importers.optable import SELECT_FUNCS


def batch_norm_no_training(x, weight, bias, mean, var, momentum, eps):
    """aten's eval-mode batch norm returns (out, save_mean, save_var); only ``out`` is used."""
    return (F.batch_norm(x, mean, var, weight, bias, False, momentum, eps), mean, var)


def aten_equivalents() -> dict:
    """aten overloads (from ``torch.export`` programs) -> the torch function with the same signature."""
    a = torch.ops.aten
    pairs = {
        "conv2d.default": F.conv2d, "conv1d.default": F.conv1d, "linear.default": F.linear,
        "relu.default": torch.relu, "relu_.default": torch.relu, "tanh.default": torch.tanh,
        "sigmoid.default": torch.sigmoid, "gelu.default": F.gelu, "silu.default": F.silu,
        "leaky_relu.default": F.leaky_relu, "hardtanh.default": F.hardtanh, "clamp.default": torch.clamp,
        "elu.default": F.elu, "abs.default": torch.abs,
        "max_pool2d.default": F.max_pool2d, "avg_pool2d.default": F.avg_pool2d,
        "adaptive_avg_pool2d.default": F.adaptive_avg_pool2d, "batch_norm.default": torch.batch_norm,
        "add.Tensor": torch.add, "sub.Tensor": torch.sub, "mul.Tensor": torch.mul, "div.Tensor": torch.div,
        "neg.default": torch.neg, "cat.default": torch.cat, "softmax.int": torch.softmax,
        "log_softmax.int": torch.log_softmax, "_softmax.default": torch.softmax, "matmul.default": torch.matmul,
        "flatten.using_ints": torch.flatten, "view.default": torch.reshape, "reshape.default": torch.reshape,
        "permute.default": torch.permute, "transpose.int": torch.transpose, "squeeze.dim": torch.squeeze,
        "unsqueeze.default": torch.unsqueeze, "dropout.default": F.dropout, "clone.default": torch.clone,
        "contiguous.default": torch.clone, "_unsafe_view.default": torch.reshape,
        # in-place and functional variants (BasicBlock's ``out += identity``, ``inplace=True`` activations)
        "add_.Tensor": torch.add, "sub_.Tensor": torch.sub, "mul_.Tensor": torch.mul, "div_.Tensor": torch.div,
        "hardtanh_.default": F.hardtanh, "silu_.default": F.silu,
        "leaky_relu_.default": F.leaky_relu, "elu_.default": F.elu, "clamp_.default": torch.clamp,
        "hardswish.default": F.hardswish, "hardswish_.default": F.hardswish,
        "hardsigmoid.default": F.hardsigmoid, "hardsigmoid_.default": F.hardsigmoid,
        "sigmoid_.default": torch.sigmoid, "tanh_.default": torch.tanh, "mish.default": F.mish,
        "selu.default": F.selu, "celu.default": F.celu, "softplus.default": F.softplus,
        "mean.dim": torch.mean, "sum.dim_IntList": torch.sum,
        "_native_batch_norm_legit_no_training.default": batch_norm_no_training,
        "conv_transpose2d.input": F.conv_transpose2d,
        "relu6.default": F.relu6, "dropout_.default": F.dropout, "prelu.default": F.prelu, "_prelu_kernel.default": F.prelu,
    }
    out = {}
    for name, fn in pairs.items():
        op, _, overload = name.partition(".")
        try:
            out[getattr(getattr(a, op), overload)] = fn
        except AttributeError:
            continue
    for name in ("slice.Tensor", "select.int", "constant_pad_nd.default", "pad.default", "expand.default",
                 "alias.default", "detach.default"):
        op, _, overload = name.partition(".")
        try:
            SELECT_FUNCS.add(getattr(getattr(a, op), overload))
        except AttributeError:
            continue
    return out


def normalise_aten(gm: fx.GraphModule) -> None:
    """Rewrite aten call targets to their torch equivalents so one op table serves every importer."""
    table = aten_equivalents()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    gm.recompile()
