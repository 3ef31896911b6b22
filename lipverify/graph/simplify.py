"""Merge affine chains of a Lipschitz graph before any norm is taken (SPEC section 2).

* consecutive linear nodes with no nonlinearity between them become one :class:`Chain`;
* an ``add`` whose inputs both reach the same node through linear nodes only becomes one
  :class:`Residual` operator (``I + W``, or ``W_1 + W_2``), bounded as a single operator;
* nodes that no longer feed the output are dropped.

The norm of a merged operator is at most the product of its parts and is often far smaller.
"""

from __future__ import annotations

from lipverify.graph import LipschitzGraph, Node
from lipverify.graph.linear_ops import Chain, Residual, identity_select


def _merged_name(a: str, b: str) -> str:
    first = a.split("..")[0]
    last = b.split("..")[-1]
    return first if first == last else f"{first}..{last}"


def simplify(graph: LipschitzGraph) -> LipschitzGraph:
    nodes = list(graph.nodes)
    out = graph.output
    changed = True
    while changed:
        changed = False
        cons = _consumers(nodes)
        # 1. chains of linear nodes
        for i, n in enumerate(nodes):
            if n is None or n.kind != "linear":
                continue
            j = n.inputs[0]
            p = nodes[j]
            if p.kind == "linear" and len(cons[j]) == 1 and j != out:
                nodes[i] = Node(_merged_name(p.name, n.name), "linear", list(p.inputs), n.out_shape,
                                Chain([p.op, n.op]), p.sources + n.sources)
                nodes[j] = None
                changed = True
                break
        if changed:
            nodes, out = _compact(nodes, out)
            continue
        # 2. linear residual sums
        for i, n in enumerate(nodes):
            if n is None or n.kind != "add":
                continue
            walks = [_walk_linear(nodes, cons, j, out) for j in n.inputs]
            srcs = {w[0] for w in walks}
            if len(srcs) != 1:
                continue
            src = walks[0][0]
            branches = []
            for _, ops, _names in walks:
                if not ops:
                    branches.append(identity_select(nodes[src].out_shape))
                else:
                    branches.append(ops[0] if len(ops) == 1 else Chain(ops))
            sources = [s for w in walks for s in w[2]] + n.sources
            nodes[i] = Node(n.name, "linear", [src], n.out_shape, Residual(branches, list(n.op)), sources)
            changed = True
            break
        if changed:
            nodes, out = _prune(nodes, out)
    nodes, out = _prune(nodes, out)
    return LipschitzGraph(nodes, out, graph.notes)


def _consumers(nodes):
    cons = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        if n is None:
            continue
        for j in n.inputs:
            cons[j].append(i)
    return cons


def _walk_linear(nodes, cons, j, out):
    """Walk back from node j through linear nodes that have a single consumer.

    Returns (source index, list of ops from source to j, merged source names)."""
    ops, names = [], []
    while nodes[j].kind == "linear" and len(cons[j]) == 1 and j != out:
        ops.insert(0, nodes[j].op)
        names = nodes[j].sources + names
        j = nodes[j].inputs[0]
    return j, ops, names


def _compact(nodes, out):
    keep = [i for i, n in enumerate(nodes) if n is not None]
    remap = {old: new for new, old in enumerate(keep)}
    res = []
    for i in keep:
        n = nodes[i]
        n.inputs = [remap[j] for j in n.inputs]
        res.append(n)
    return res, remap[out]


def _prune(nodes, out):
    """Drop nodes that do not feed the output (and None placeholders)."""
    live = set()
    stack = [out]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(nodes[i].inputs)
    live.add(0)
    return _compact([n if i in live else None for i, n in enumerate(nodes)], out)
