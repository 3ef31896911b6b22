"""Residual branch scales: start certified fine-tuning of a residual network from a bound near 1 per block.

A residual block ``y = S x + F(x)`` (``S`` the identity or a projection shortcut, ``F`` the branch) is
bounded by ``K_S + K_F`` (triangle inequality), and a normally trained ResNet has ``K_F`` of 10-1000
per block: the product over 8-50 blocks is the 1e7-1e26 starting bound that makes any certified loss
swamp the cross-entropy (the run collapses in its first epoch).  LiResNet (Hu et al. 2023, "Unlocking
Deterministic Robustness Certification on ImageNet") scales each branch, ``y = S x + alpha F(x)``, so
that a block's bound starts near ``K_S``.

:func:`scale_residual_branches` does the same to an imported network: for every residual add it finds
the branch (the longer of the two paths from the block's input), estimates ``K_F`` and ``K_S`` as the
products of the sound l2 operator norms of their affine layers (activations taken as 1-Lipschitz, and
parallel paths multiplied: a rough figure that only sets the starting scale, certifying nothing), and
multiplies the weight and bias of the branch's last affine layer by ``alpha = min(1, delta K_S / K_F)``,
so the block's bound starts at about ``(1 + delta) K_S``.  The branch stays a trainable part of the
network (its last layer's weights carry the scale), so training can grow it back where the loss asks
for it.

This is **not** function-preserving: the network computes mostly its shortcut path afterwards.  The
accuracy before and after the conversion is measured on the calibration inputs and reported.

Warnings
--------
* A branch whose last layer is not a convolution, a dense layer or an affine BatchNorm (directly or
  behind an identity / dropout) is left alone and named in the notes.
* Adds of a tensor and a constant, and adds whose two inputs have no common ancestor, are not residual
  blocks and are skipped.
* ``K_F`` multiplies every affine layer of the branch, also across parallel paths inside the branch:
  an over-estimate there, which only makes ``alpha`` smaller.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from lipverify.graph.linear_ops import Conv
from lipverify.importers.optable import binary_kind
from lipverify.train.convert import logits_f64, node_shapes

_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)


def _mod(gm: fx.GraphModule, n: fx.Node):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _is_bn(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None


@torch.no_grad()
def layer_operator_norm(m: nn.Module, in_shape: tuple) -> float | None:
    """Sound upper bound of the l2 operator norm of the linear part of ``m`` at input shape ``in_shape``
    (no batch axis): exact for dense layers and BatchNorm scales, :meth:`Conv.norm` for convolutions
    (exact SVD when small, the FFT bound otherwise); ``None`` when ``m`` is not an affine layer."""
    if _is_bn(m):
        s = m.weight.detach().double() / torch.sqrt(m.running_var.detach().double() + m.eps)
        return float(s.abs().max())
    if isinstance(m, nn.Linear):
        return float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
    if not isinstance(m, (nn.Conv1d, nn.Conv2d)) or m.padding_mode != "zeros":
        return None
    one_d = isinstance(m, nn.Conv1d)
    rp = m._reversed_padding_repeated_twice  # (left, right[, top, bottom]), also for padding="same"
    padding = (rp[0], rp[1]) if one_d else (rp[2], rp[3], rp[0], rp[1])
    op = Conv(m.weight.detach().double(), tuple(in_shape), tuple(m.stride), padding, tuple(m.dilation), m.groups,
              one_d=one_d)
    return float(op.norm("2").value)


def _ancestors(gm: fx.GraphModule) -> dict:
    anc: dict = {}
    for n in gm.graph.nodes:
        s = set()
        for a in n.all_input_nodes:
            s |= anc[a]
            s.add(a)
        anc[n] = frozenset(s)
    return anc


def residual_blocks(gm: fx.GraphModule) -> list[dict]:
    """Every residual add of ``gm``: ``{"add", "branch", "shortcut", "start", "branch_nodes",
    "shortcut_nodes"}`` (fx nodes; ``start`` is the block's input, the latest common ancestor)."""
    anc = _ancestors(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for n in gm.graph.nodes:
        if binary_kind(gm, n) != "add":
            continue
        args = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(args) != 2 or args[0] is args[1]:
            continue
        a, b = args
        ca, cb = anc[a] | {a}, anc[b] | {b}
        common = ca & cb
        if not common:
            continue
        start = max(common, key=order.__getitem__)
        below = anc[start] | {start}
        na, nb = ca - below, cb - below
        branch, short = (a, b) if len(na) >= len(nb) else (b, a)
        out.append({"add": n, "branch": branch, "shortcut": short, "start": start,
                    "branch_nodes": na if branch is a else nb, "shortcut_nodes": nb if branch is a else na})
    return out


def _last_affine(gm: fx.GraphModule, node: fx.Node, inside: frozenset | set):
    """The module producing ``node`` through identities/dropouts, if it is a conv, dense or affine BN."""
    while node in inside:
        m = _mod(gm, node)
        if isinstance(m, _AFFINE) or _is_bn(m):
            return node, m
        if isinstance(m, _PASS) and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
            continue
        return None
    return None


def _path_norm(gm, nodes, shapes, cache) -> float:
    k = 1.0
    for n in nodes:
        m = _mod(gm, n)
        if m is None or not (isinstance(m, _AFFINE) or _is_bn(m)):
            continue
        if n not in cache:
            src = n.all_input_nodes[0] if n.all_input_nodes else None
            shp = shapes.get(src.name) if src is not None else None
            cache[n] = layer_operator_norm(m, shp[1:]) if shp is not None else None
        if cache[n] is not None:
            k *= cache[n]
    return k


@torch.no_grad()
def scale_residual_branches(gm: fx.GraphModule, example: torch.Tensor, delta: float,
                            labels: torch.Tensor | None = None) -> dict:
    """Scale every residual branch of ``gm`` in place so its block starts at about ``(1 + delta) K_S``
    (see the module docstring).  ``example``: calibration inputs (model space); ``labels``: their labels
    (for the accuracy cost).  Returns the report (``"blocks"``, ``"skipped"``, ``"accuracy_before"`` /
    ``"accuracy_after"`` on ``example``, ``"notes"``)."""
    if not delta > 0:
        raise ValueError("delta must be positive")
    blocks = residual_blocks(gm)
    rep = {"delta": float(delta), "blocks": [], "skipped": [], "notes": []}
    if not blocks:
        return rep
    shapes = node_shapes(gm, example[:2])
    before = logits_f64(gm, example)
    cache: dict = {}
    for blk in blocks:
        last = _last_affine(gm, blk["branch"], blk["branch_nodes"])
        if last is None:
            rep["skipped"].append({"add": blk["add"].name, "reason": "the branch does not end in an affine layer"})
            continue
        node, m = last
        k_f = _path_norm(gm, blk["branch_nodes"], shapes, cache)
        k_s = _path_norm(gm, blk["shortcut_nodes"], shapes, cache)
        alpha = min(1.0, float(delta) * k_s / k_f) if k_f > 0 else 1.0
        m.weight.mul_(alpha)
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(alpha)
        rep["blocks"].append({"add": blk["add"].name, "scaled": node.name, "alpha": alpha,
                              "branch_norm": k_f, "shortcut_norm": k_s})
    after = logits_f64(gm, example)
    if labels is not None and len(labels):
        y = labels.detach().cpu()
        rep["accuracy_before"] = float((before.argmax(1) == y).double().mean())
        rep["accuracy_after"] = float((after.argmax(1) == y).double().mean())
    n = len(rep["blocks"])
    if n:
        a = [b["alpha"] for b in rep["blocks"]]
        msg = (f"residual branch scales: {n} branch(es) scaled by {min(a):.3g}..{max(a):.3g} so each block's "
               f"bound starts near (1 + {delta:g}) x its shortcut's (not function-preserving")
        if "accuracy_after" in rep:
            msg += (f": accuracy on {len(y)} training inputs {100 * rep['accuracy_before']:.1f}% -> "
                    f"{100 * rep['accuracy_after']:.1f}%")
        rep["notes"].append(msg + ")")
    if rep["skipped"]:
        rep["notes"].append(f"residual branch scales: {len(rep['skipped'])} add(s) left alone (the branch does not "
                            "end in a convolution, dense or BatchNorm layer): "
                            + ", ".join(s["add"] for s in rep["skipped"][:3])
                            + (f" and {len(rep['skipped']) - 3} more" if len(rep["skipped"]) > 3 else ""))
    return rep
