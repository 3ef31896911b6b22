"""Merge affine chains of a Lipschitz graph before any norm is taken (SPEC section 2).

* consecutive linear nodes with no nonlinearity between them become one :class:`Chain`;
* an ``add`` whose inputs both reach the same node through linear nodes only becomes one
  :class:`Residual` operator (``I + W``, or ``W_1 + W_2``), bounded as a single operator;
* nodes that no longer feed the output are dropped.

The norm of a merged operator is at most the product of its parts and is often far smaller.

Each pass is linear in the number of nodes: a whole run of linear nodes becomes one :class:`Chain`
at once (its offset is computed once), and the residual sums are merged in one walk in graph order
(an inner sum merged first is a linear node for the sums around it).  The passes repeat only while a
residual merge happened, which the graph's nesting depth bounds.
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
    while True:
        nodes, out = _merge_chains(nodes, out)
        nodes, out, merged = _merge_residuals(nodes, out)
        if not merged:
            break
    nodes, out = _prune(nodes, out)
    return LipschitzGraph(nodes, out, graph.notes)


def _merge_chains(nodes, out):
    """Every maximal run of linear nodes, each the single consumer of the one before (none of them
    the output but the last), as one node."""
    cons = _consumers(nodes)

    def feeds_linear(j):  # j's value goes into one linear node only, and is not the output
        n = nodes[j]
        return (n is not None and n.kind == "linear" and j != out and len(cons[j]) == 1
                and nodes[cons[j][0]].kind == "linear")

    changed = False
    for i, n in enumerate(nodes):
        if n is None or n.kind != "linear" or feeds_linear(i):
            continue
        run = [i]
        j = n.inputs[0]
        while feeds_linear(j):
            run.append(j)
            j = nodes[j].inputs[0]
        if len(run) == 1:
            continue
        run.reverse()
        first, last = nodes[run[0]], nodes[run[-1]]
        nodes[i] = Node(_merged_name(first.name, last.name), "linear", list(first.inputs), last.out_shape,
                        Chain([nodes[k].op for k in run]), [s for k in run for s in nodes[k].sources])
        for k in run[:-1]:
            nodes[k] = None
        changed = True
    return _compact(nodes, out) if changed else (nodes, out)


def _merge_residuals(nodes, out):
    """Every ``add`` whose inputs reach one node through single-consumer linear nodes, as one
    :class:`Residual` node (in graph order; the branch nodes are dropped at once)."""
    cons = _consumers(nodes)
    changed = False
    for i, n in enumerate(nodes):
        if n is None or n.kind != "add":
            continue
        walks = [_walk_linear(nodes, cons, j, out) for j in n.inputs]
        srcs = {w[0] for w in walks}
        if len(srcs) != 1:
            continue
        src = walks[0][0]
        branches = []
        for _, ops, _names, _seen in walks:
            if not ops:
                branches.append(identity_select(nodes[src].out_shape))
            else:
                branches.append(ops[0] if len(ops) == 1 else Chain(ops))
        sources = [s for w in walks for s in w[2]] + n.sources
        nodes[i] = Node(n.name, "linear", [src], n.out_shape, Residual(branches, list(n.op)), sources)
        dead = {k for w in walks for k in w[3]}
        for k in dead:  # they fed this sum only
            nodes[k] = None
        cons[src] = [c for c in cons[src] if c not in dead and c != i] + [i]
        changed = True
    if changed:
        nodes, out = _prune(nodes, out)
    return nodes, out, changed


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

    Returns (source index, list of ops from source to j, merged source names, indices walked)."""
    ops, names, seen = [], [], []
    while nodes[j].kind == "linear" and len(cons[j]) == 1 and j != out:
        ops.append(nodes[j].op)
        names.append(nodes[j].sources)
        seen.append(j)
        j = nodes[j].inputs[0]
    ops.reverse()
    return j, ops, [s for part in reversed(names) for s in part], seen


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
