"""Function-preserving conversions of the fx ``GraphModule`` that certified fine-tuning trains.

:func:`fold_batchnorm` folds eval-mode BatchNorm layers into the convolution or dense layer that
feeds them.  A normally trained network computes ``BN(conv(x))``; the sound bound multiplies the
spectral norm of ``W`` by the largest BatchNorm scale ``max_c |gamma_c / sqrt(var_c + eps)|`` (two
layers), while after folding it bounds ``diag(s) W`` as one operator, often orders of magnitude less
over a deep network.

The fold keeps every module and every state-dict key (the written ``model.pt`` still loads into the
``--arch`` network): with ``s = gamma / sqrt(var + eps)`` per output channel,

* the layer's weight becomes ``W * s`` (per output channel: row of a dense layer, output filter of a
  convolution, grouped and depthwise included) and its bias, if any, ``b * s``;
* the BatchNorm becomes a per-channel shift with unit scale: ``running_mean = 0``, ``running_var = 1``,
  ``weight = sqrt(1 + eps)``, ``bias = beta - s * mean``; this carries the offset
  ``(b - mean) * s + beta`` also for a layer without a bias.

A BatchNorm is folded only when its input is the output of one ``Conv1d``/``Conv2d``/``Conv3d`` or
``Linear`` (a module, or ``F.conv*`` / ``F.linear`` with constant weights as in ``.pt2`` programs) with no
other user, its statistics are the eval running statistics, and no tensor involved is shared with another
layer.  Every other BatchNorm (after a residual add, a pooling, a concatenation...) is left as it is (the
bound already treats it as a per-channel scale) and listed with the reason.

The function is checked on a batch (the largest logit change relative to the largest logit must be
below ``1e-4``); a fold that fails the check is undone.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

RTOL = 1e-4
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)


def _aten_bn_no_training():
    try:
        from lipverify.importers.aten import batch_norm_no_training
        return batch_norm_no_training
    except ImportError:  # pragma: no cover
        return None


def _attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        t = obj
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _bn_parts(gm: fx.GraphModule, node: fx.Node):
    """``(input node, weight, bias, mean, var, eps, owner)`` of a BatchNorm node in eval mode, a string
    (the reason it is not foldable) for a BatchNorm that is not, None for any other node.  ``owner`` is
    the module (call_module) or the get_attr nodes (call_function) that hold the tensors."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return None
        if mod.training:
            return "in training mode"
        if mod.running_mean is None or mod.running_var is None:
            return "no running statistics (track_running_stats=False)"
        if not mod.affine or mod.weight is None or mod.bias is None:
            return "no affine parameters"
        return node.args[0], mod.weight, mod.bias, mod.running_mean, mod.running_var, float(mod.eps), mod
    if node.op != "call_function":
        return None
    legit = _aten_bn_no_training()
    if node.target is torch.batch_norm:  # (x, weight, bias, mean, var, training, momentum, eps, cudnn)
        names = (1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")
        training, eps = _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5)
    elif node.target is F.batch_norm:  # (x, mean, var, weight, bias, training, momentum, eps)
        names = (3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var")
        training, eps = _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5)
    elif legit is not None and node.target is legit:  # (x, weight, bias, mean, var, momentum, eps) -> tuple
        names = (1, "weight"), (2, "bias"), (3, "mean"), (4, "var")
        training, eps = False, _arg(node, 6, "eps", 1e-5)
        if not all(u.op == "call_function" and u.args[1:] == (0,) for u in node.users):
            return "its batch statistics outputs are used"
    else:
        return None
    if training:
        return "in training mode"
    attrs = [_arg(node, i, n) for i, n in names]
    tensors = [_attr_tensor(gm, a) for a in attrs]
    if any(t is None for t in tensors) or not isinstance(eps, (int, float)):
        return "weight, bias or statistics are not constant tensors of the module"
    return (node.args[0], *tensors, float(eps), attrs)


def _producer(gm: fx.GraphModule, node, shapes: dict):
    """``(weight, bias, owner, kind)`` of the layer that produces ``node`` when it can absorb a per-channel
    scale on its output, else the reason it cannot."""
    if not isinstance(node, fx.Node):
        return "its input is not a layer output"
    if len(node.users) != 1:
        return f"the output of {node.name} has other users"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _CONV_MODULES):
            kind = "convolution"
        elif isinstance(mod, nn.Linear):
            kind = "dense"
        else:
            return f"its input comes from {type(mod).__name__} {node.target}, not a convolution or dense layer"
        if parametrize.is_parametrized(mod):
            return f"{node.target} is parametrised"
        return mod.weight, mod.bias, mod, kind
    if node.op == "call_function" and (node.target in _CONV_FUNCS or node.target is F.linear):
        w = _attr_tensor(gm, _arg(node, 1, "weight"))
        b_node = _arg(node, 2, "bias")
        b = None if b_node is None else _attr_tensor(gm, b_node)
        if w is None or (b_node is not None and b is None):
            return f"{node.name} has input-dependent weights"
        return w, b, [n for n in (_arg(node, 1, "weight"), b_node) if n is not None], (
            "dense" if node.target is F.linear else "convolution")
    return f"its input comes from {node.name} ({node.op} {getattr(node.target, '__name__', node.target)}), " \
           "not a convolution or dense layer"


def _shared(gm: fx.GraphModule, owners: list) -> bool:
    """Whether a module or tensor taking part is used by more than this one node."""
    mods = [o for o in owners if isinstance(o, nn.Module)]
    attrs = [a for o in owners if isinstance(o, list) for a in o]
    for m in mods:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is m]
        if len(calls) != 1:
            return True
    for a in attrs:
        if len(a.users) != 1 or sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == a.target) != 1:
            return True
    return False


def node_shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict:
    vals = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                vals[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Rec(gm).run(example)
    return vals


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def logits_f64(gm, x):
    with torch.no_grad():
        out = gm(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(out.shape[0], -1).detach().cpu().double()  # on CPU: no float64 on some devices


def fold_batchnorm(gm: fx.GraphModule, example: torch.Tensor) -> dict:
    """Fold eval-mode BatchNorm layers of ``gm`` into the layer before them, in place (see the module
    docstring); ``example`` is a batch of network inputs (after any normalisation) on ``gm``'s device,
    used for the shapes and for the function check.  Returns ``{"folded": [{"batchnorm", "into",
    "kind"}], "kept": [{"batchnorm", "reason"}], "max_logit_change", "relative_change", "notes"}``."""
    if not isinstance(gm, fx.GraphModule):
        return {"folded": [], "kept": [], "max_logit_change": 0.0, "relative_change": 0.0, "notes": []}
    example = example[:64]
    shapes = node_shapes(gm, example)
    ref = logits_f64(gm, example)
    folded, kept, undo = [], [], []
    for node in list(gm.graph.nodes):
        parts = _bn_parts(gm, node)
        if parts is None:
            continue
        if isinstance(parts, str):
            kept.append({"batchnorm": node.name, "reason": parts})
            continue
        src, gamma, beta, mean, var, eps, bn_owner = parts
        prod = _producer(gm, src, shapes)
        if isinstance(prod, str):
            kept.append({"batchnorm": node.name, "reason": prod})
            continue
        w, b, owner, kind = prod
        c = gamma.numel()
        in_shape = shapes.get(src.name)
        why = None
        if not (w.shape[0] == c and mean.numel() == c and var.numel() == c and beta.numel() == c):
            why = f"{src.name} has {w.shape[0]} output channels, the BatchNorm {c}"
        elif in_shape is None or len(in_shape) < 2 or in_shape[1] != c:
            why = f"the BatchNorm input has shape {in_shape}"
        elif kind == "dense" and len(in_shape) != 2:
            why = "a BatchNorm over the channels of a dense layer applied to a sequence"
        elif _shared(gm, [bn_owner, owner]):
            why = "a weight or module is shared with another layer"
        elif b is not None and b.numel() != c:
            why = "bias shape"
        if why:
            kept.append({"batchnorm": node.name, "reason": why})
            continue
        tensors = [w, gamma, beta, mean, var] + ([b] if b is not None else [])
        undo.append([(t, t.detach().clone()) for t in tensors])
        with torch.no_grad():
            s = _f64(gamma) / torch.sqrt(_f64(var) + eps)
            shift = _f64(beta) - s * _f64(mean)
            view = (-1,) + (1,) * (w.dim() - 1)
            w.copy_((_f64(w) * s.view(view)).to(w.device, w.dtype))
            if b is not None:
                b.copy_((_f64(b) * s).to(b.device, b.dtype))
            mean.zero_()
            var.fill_(1.0)
            gamma.fill_(math.sqrt(1.0 + eps))
            beta.copy_(shift.to(beta.device, beta.dtype))
        folded.append({"batchnorm": node.name, "into": src.name, "kind": kind})
    got = logits_f64(gm, example) if folded else ref
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    rel = diff / max(1.0, float(ref.abs().max())) if ref.numel() else 0.0
    notes = []
    if folded and not rel < RTOL:
        with torch.no_grad():
            for entry in reversed(undo):
                for t, saved in entry:
                    t.copy_(saved)
        notes.append(f"BatchNorm folding undone: it changed the logits by {diff:.3g} ({rel:.3g} relative)")
        kept = [{"batchnorm": f["batchnorm"], "reason": "folding undone (function check)"} for f in folded] + kept
        folded = []
        diff = rel = 0.0
    if folded:
        convs = sum(f["kind"] == "convolution" for f in folded)
        into = " and ".join(x for x in (f"{convs} convolution(s)" if convs else "",
                                        f"{len(folded) - convs} dense layer(s)" if len(folded) > convs else "") if x)
        notes.append(f"folded {len(folded)} BatchNorm layer(s) into {into} (each BatchNorm kept as a per-channel "
                     f"shift with unit scale); largest logit change {diff:.2g} ({rel:.2g} relative) on "
                     f"{len(example)} training inputs")
    if kept:
        names = ", ".join(k["batchnorm"] for k in kept[:5]) + (" ..." if len(kept) > 5 else "")
        notes.append(f"{len(kept)} BatchNorm layer(s) left as per-channel scales (not foldable: "
                     f"{kept[0]['reason']}{'; see conversion.kept' if len(kept) > 1 else ''}): {names}")
    return {"folded": folded, "kept": kept, "max_logit_change": diff, "relative_change": rel, "notes": notes}


def steep_activations(graph) -> tuple[dict, list[str]]:
    """Activations whose slope exceeds 1 (Hardswish 1.5, GELU 1.13, SiLU 1.10), counted per kind:
    ``({name: {"count": n, "slope": s, "factor": s ** n}}, notes)``.  They are kept: each multiplies
    the global bound by its slope, so a network with many of them starts from a larger bound (the
    factor is the most they can contribute along one path)."""
    found: dict[str, dict] = {}
    for n in graph.nodes:
        if n.kind != "activation" or n.op.lipschitz <= 1.0:
            continue
        rec = found.setdefault(n.op.name, {"count": 0, "slope": float(n.op.lipschitz)})
        rec["count"] += 1
        rec["slope"] = max(rec["slope"], float(n.op.lipschitz))
    for rec in found.values():
        rec["factor"] = rec["slope"] ** rec["count"]
    notes = [f"kept {r['count']} {name} activation(s) of slope {r['slope']:.4g} > 1 (up to x{r['factor']:.3g} in the "
             "global bound)" for name, r in sorted(found.items())]
    return found, notes
