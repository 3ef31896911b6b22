"""torch.export (``.pt2``) programs: their aten operators rewritten to the torch functions with the
same signature, so that one op table (:mod:`lipverify.importers.optable`) serves every importer.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from lipverify.importers.optable import SELECT_FUNCS


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
