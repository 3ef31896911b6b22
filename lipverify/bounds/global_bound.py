"""Global Lipschitz bounds over a Lipschitz graph, and GloRo margin constants ``K_ij``.

Global bound (SPEC section 2).  With ``L(v)`` a bound on the Lipschitz constant of the map from the
model input to the output of node ``v``::

    L(input)           = 1
    L(linear A)        = ||A|| * L(u)          (A a merged affine chain / residual operator)
    L(activation phi)  = Lip(phi) * L(u)
    L(maxpool)         = Lip(pool) * L(u)
    L(add sum c_k u_k) = sum |c_k| L(u_k)
    L(concat)          = sqrt(sum L(u_k)^2)    (l2)  or  max L(u_k)  (l-inf)
    L(a * b)           = F_b L(b) + F_a L(a)   (on an input domain: F from interval bounds of the factors)
    L(normalisation)   = max|gamma| / sqrt(var_min + eps) * L(u)   (var_min = 0, or its minimum on the domain)

Margin constants (SPEC section 3, Leino et al. 2021 "Globally-Robust Neural Networks").  When the
logits are an affine map ``f = T h + b`` of the last nonlinear node ``h``::

    K_ij = ||T_j - T_i||_2 * L_2(h)       (l2 perturbations)
    K_ij = ||T_j - T_i||_1 * L_inf(h)     (l-inf perturbations: dual norm)

where ``T`` is the materialised matrix of the whole linear tail.  Without an affine tail only
``K_ij <= sqrt(2) L_2(f)`` (l2) or ``2 L_inf(f)`` (l-inf) hold.

The last two rules are in :mod:`lipverify.graph.domain`; a bound that used the domain says so.
Every number carries its method and whether it is sound.  ``method="sound"`` uses proven upper
bounds computed in float64; ``method="power"`` replaces linear-operator norms by power-iteration
estimates (approach the norm from below: not sound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipverify.errors import UserInputError
from lipverify.graph import LipschitzGraph, Node
from lipverify.graph.domain import attention_constant, interval_bounds, normalization_constants, product_factors
from lipverify.graph.linear_ops import Bound
from lipverify.graph.operator_norms import SOUND_FACTOR
from lipverify.limits import check_alloc


@dataclass
class NodeConstant:
    """Lipschitz constant of one graph node (``None`` for combining nodes such as ``add``)."""

    index: int
    name: str
    op: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    constant: Bound | None
    cumulative: Bound  # bound of the map input -> this node's output


def node_constant(node: Node, p: str, method: str = "sound", power_tol: float = 1e-5) -> Bound | None:
    """Lipschitz constant of a single node's op, for ``p`` in {"2", "inf"}."""
    k = node.kind
    if k == "linear":
        if method == "power" and p == "2":
            return node.op.power_norm("2", tol=power_tol)
        return node.op.norm(p)
    if k == "activation":
        a = node.op
        return Bound(a.lipschitz, f"slope range [{a.lo:g}, {a.hi:g}]", True)
    if k == "minmax":
        return Bound(1.0, "GroupSort is a permutation at every point", True)
    if k == "linf_dist":
        lay = node.op
        c = lay.lipschitz_inf()
        how = "l-inf distance neurons: 1-Lipschitz in l-inf" if c == 1.0 else f"l-{lay.p:g} distance neurons: d^(1/p)"
        if p == "2":  # |du_j| <= ||dx||_inf * c <= ||dx||_2 * c for each of the out neurons
            return Bound(math.sqrt(lay.out_features) * c, how + " x sqrt(outputs) (l2)", True)
        return Bound(c, how, True)
    if k == "maxpool":
        if p == "2":
            n = node.op.windows_per_input()
            return Bound(node.op.lip2, f"sqrt(windows per input = {n})", True)
        return Bound(1.0, "max over a window", True)
    return None


def propagate(graph: LipschitzGraph, p: str, method: str = "sound", power_tol: float = 1e-5,
              constants: list[Bound | None] | None = None, domain=None) -> list[NodeConstant]:
    """Per-node constants and cumulative bounds ``L(v)`` in topological order.

    ``domain``: ``(lo, hi)`` input box.  Products of two input-dependent tensors need it (their
    constant exists only on a bounded domain) and normalisations use it to tighten their global
    constant; every bound that used it says "holds on the input domain [lo, hi]".  Without a domain a
    graph with a product raises :class:`~lipverify.errors.UserInputError` naming the nodes.
    """
    if p not in ("2", "inf"):
        raise ValueError("norm must be '2' or 'inf'")
    special = graph.domain_nodes()
    muls = [i for i in special if graph.nodes[i].kind in ("mul", "attention")]
    if muls and domain is None:
        names = ", ".join(graph.nodes[i].name for i in muls[:5]) + (" ..." if len(muls) > 5 else "")
        raise UserInputError(f"products of input-dependent tensors ({names}) have no global Lipschitz constant; "
                             "bound them on an input domain (--clip LO,HI)")
    ibp = interval_bounds(graph, *domain) if special and domain is not None else None
    label = f"holds on the input domain {describe_domain(domain)}" if ibp is not None else None
    on_domain = [False] * len(graph.nodes)
    res: list[NodeConstant] = []
    for i, n in enumerate(graph.nodes):
        in_shape = graph.nodes[n.inputs[0]].out_shape if n.inputs else n.out_shape
        if n.kind == "input":
            c, cum = None, Bound(1.0, "identity", True)
        else:
            on_domain[i] = any(on_domain[j] for j in n.inputs)
            if n.kind == "normalization":
                c = _normalize_constant(n, p, ibp, label)
                on_domain[i] |= ibp is not None
            elif n.kind == "attention":
                if ibp is None:
                    raise UserInputError(f"self-attention ({n.name}) has no global Lipschitz constant; bound it on "
                                         "an input domain (--clip LO,HI)")
                c = Bound(float(attention_constant(n.op, *ibp[n.inputs[0]], p).max()),
                          f"product rule over the attention's products with interval bounds ({label})", True)
                on_domain[i] = True
            else:
                c = constants[i] if constants is not None else node_constant(n, p, method, power_tol)
            ins = [res[j].cumulative for j in n.inputs]
            vals = [b.value for b in ins]
            if n.kind == "concat" and p == "inf":
                val = max(vals)
            elif n.kind == "mul":
                f_a, f_b = product_factors(graph, i, ibp, p)
                val = f_b * vals[1] + f_a * vals[0]
                on_domain[i] = True
            elif c is not None:  # single-input node: L(u) * its own constant (l2 or l-inf)
                val = vals[0] * c.value
            else:
                val = combine_lipschitz(n, vals)
            how = "propagated" + (f" ({label})" if on_domain[i] else "")
            cum = Bound(val, how, all(b.sound for b in ins) and (c is None or c.sound))
        res.append(NodeConstant(i, n.name, n.describe(), n.kind, tuple(in_shape), tuple(n.out_shape), c, cum))
    return res


def describe_domain(domain) -> str:
    lo, hi = domain
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{float(v.min()):g}" if v.numel() and bool((v == v.reshape(-1)[0]).all()) else "per-entry"
        return f"{float(v):g}"
    return f"[{one(lo)}, {one(hi)}]"


def _normalize_constant(n: Node, p: str, ibp, label) -> Bound:
    op = n.op
    if ibp is None:
        return Bound(op.lipschitz(p), f"max|gamma| / sqrt(eps){' x (2 + sqrt n)' if p == 'inf' else ''} "
                                      "(any input)", True)
    lb, ub = ibp[n.inputs[0]]
    value = float(normalization_constants(op, lb, ub, p).max())
    return Bound(value, f"max|gamma| / sqrt(var_min + eps), var_min the minimum on the node's input box ({label})",
                 True)


def combine_lipschitz(node: Node, ins: list, linear_constant=None):
    """``L(v)`` from the inputs' bounds ``ins`` (floats or tensors, l2) by the rules in the module
    docstring; ``linear_constant`` is the operator norm of a linear node."""
    k = node.kind
    if k == "linear":
        return ins[0] * linear_constant
    if k == "activation":
        return ins[0] * node.op.lipschitz
    if k == "minmax":
        return ins[0]
    if k == "maxpool":
        return ins[0] * node.op.lip2
    if k == "add":
        return sum(abs(c) * v for c, v in zip(node.op, ins))
    if k == "concat":
        return sum(v * v for v in ins) ** 0.5
    raise ValueError(f"node kind {k} has no Lipschitz rule")


@dataclass
class MarginConstants:
    """``K[i][j]`` bounds the Lipschitz constant of ``f_i - f_j`` (symmetric, zero diagonal)."""

    K: torch.Tensor  # float64 (m, m)
    method: str
    sound: bool


def tail_matrix(graph: LipschitzGraph) -> tuple[torch.Tensor, int] | None:
    """``(T, h)`` when the logits are an affine map ``T h + b`` of node ``h`` (float64 rows ``T_i``);
    None when the output node is not linear."""
    out = graph.nodes[graph.output]
    if out.kind != "linear":
        return None
    m = int(math.prod(out.out_shape))
    check_alloc(8 * m * (m + out.op.in_dim), f"the affine tail of the {m} logits (an {m} x {m} float64 identity)")
    op = out.op.to_double_copy()
    with torch.no_grad():
        eye = torch.eye(m, dtype=torch.float64, device=op._device())
        T = op.adjoint(eye.reshape((m,) + op.out_shape)).reshape(m, -1)
    return T, out.inputs[0]


#: the affine tail is materialised (``T``: logits x input entries) up to this many entries; larger
#: tails (ImageNet heads after global pooling) are bounded through their last dense layer
TAIL_MAX_ENTRIES = 2 ** 24


def tail_size(graph: LipschitzGraph) -> int:
    """Entries of the affine tail's matrix ``T`` (0 when the output node is not linear)."""
    out = graph.nodes[graph.output]
    if out.kind != "linear":
        return 0
    return int(math.prod(out.out_shape)) * out.op.in_dim


def last_dense_split(graph: LipschitzGraph):
    """``(W, A)`` when the affine tail is ``W A`` with ``W`` a dense layer on flat vectors and ``A`` the
    linear ops before it (None: no such split)."""
    from lipverify.graph.linear_ops import Chain, Dense

    op = graph.nodes[graph.output].op
    if not isinstance(op, Chain) or len(op.ops) < 2 or not isinstance(op.ops[-1], Dense) \
            or len(op.ops[-1].in_shape) != 1:
        return None
    return op.ops[-1].weight.detach().double(), Chain(op.ops[:-1]) if len(op.ops) > 2 else op.ops[0]


def pairwise_distances(rows: torch.Tensor, p: str, max_entries: int = 2 ** 24) -> torch.Tensor:
    """Upper bounds of ``||r_i - r_j||`` (l2, or l1 for ``p = "inf"``), float64.

    Up to ``2^27`` differences (or for l1): from the differences themselves, in chunks of at most
    ``max_entries``.  Larger l2 problems: from the Gram matrix ``G = R R^T`` (one GEMM) with its rounding
    accounted for -- ``|fl(G_ij) - G_ij| <= gamma_d |r_i| |r_j|`` for ``d``-term dot products in any
    order, so ``||r_i - r_j||^2 <= fl(G_ii + G_jj - 2 G_ij) + gamma_{d+4} (|r_i| + |r_j|)^2 (1 + gamma_d)``;
    the shortcut without that term could cancel a small distance away.
    """
    m, d = rows.shape
    rows = rows.to(torch.float64)
    with torch.no_grad():
        if p != "2" or m * m * d <= 2 ** 27:
            out = torch.empty((m, m), dtype=rows.dtype, device=rows.device)
            step = max(1, max_entries // max(1, m * d))
            for i in range(0, m, step):
                diff = rows[i:i + step, None, :] - rows[None, :, :]
                out[i:i + step] = torch.linalg.vector_norm(diff, ord=2 if p == "2" else 1, dim=2)
            return out
        u = 2.0 ** -53
        g_d = d * u / (1 - d * u)
        g_d4 = (d + 4) * u / (1 - (d + 4) * u)
        G = rows @ rows.T
        n = G.diagonal().clamp_min(0)
        sq = n[:, None] + n[None, :] - 2 * G
        rn = (n / (1 - g_d)).sqrt()
        err = g_d4 * (rn[:, None] + rn[None, :]) ** 2 * (1 + g_d)
        return (sq.clamp_min(0) + err).sqrt() * (1 + 4 * u)


def check_margin_size(m: int, name: str | None = None) -> None:
    """Refuse (exit 2, naming the model ``name``) ``m`` classes whose ``m x m`` margin constants (and
    the temporaries computing them) exceed the memory limit (:func:`lipverify.limits.check_alloc`)."""
    check_alloc(4 * m * m * 8, f"the margin constants K ({m} x {m} float64, with the temporaries computing them)",
                name)


def margin_constants(graph: LipschitzGraph, consts: list[NodeConstant], p: str,
                     tail: tuple[torch.Tensor, int] | None = None) -> MarginConstants:
    """``K_ij`` from the affine tail ``f = T h + b``: ``||T_i - T_j||_2 L_2(h)`` (``_1`` / ``L_inf`` for
    l-inf).  When ``T`` would exceed :data:`TAIL_MAX_ENTRIES` and the tail is ``W A`` (last dense layer
    ``W``), ``||W_i - W_j|| ||A|| L(h)`` instead (``||A^T v|| <= ||A|| ||v||``; exact when ``A`` is a
    global average pooling, whose rows are orthogonal with equal norms).  Without an affine tail,
    ``sqrt(2)`` (2 for l-inf) times the global bound."""
    out = graph.nodes[graph.output]
    m = int(math.prod(out.out_shape))
    check_margin_size(m)
    split = None
    if tail is None and tail_size(graph) > TAIL_MAX_ENTRIES:
        split = last_dense_split(graph)
    if split is None:
        tail = tail if tail is not None else tail_matrix(graph)
    norm_name = "l2" if p == "2" else "l1"
    if split is not None:
        W, A = split
        h = out.inputs[0]
        lh = consts[h].cumulative
        a = A.norm(p)
        K = pairwise_distances(W, p) * (a.value * lh.value * SOUND_FACTOR)
        method = (f"{norm_name} norms of row differences of the last dense layer x ||rest of the affine tail|| "
                  f"({a.method}) x L(h) ({lh.method})")
        sound = lh.sound and a.sound
    elif tail is not None:
        T, h = tail
        lh = consts[h].cumulative
        K = pairwise_distances(T, p) * lh.value * SOUND_FACTOR
        method = f"{norm_name} norms of row differences of the affine tail x L(h) ({lh.method})"
        sound = lh.sound
    else:
        lf = consts[graph.output].cumulative
        factor = math.sqrt(2.0) if p == "2" else 2.0
        K = torch.full((m, m), factor * lf.value * SOUND_FACTOR, dtype=torch.float64)
        method = f"{'sqrt(2)' if p == '2' else '2'} x global bound (no affine tail)"
        sound = lf.sound
    K.fill_diagonal_(0.0)
    return MarginConstants(K, method, sound)


@dataclass
class PropertyConstants:
    """``K[k]`` bounds the Lipschitz constant of ``x -> C_k . f(x)`` for each row ``C_k``."""

    K: torch.Tensor  # float64 (rows,)
    method: str
    sound: bool


def property_constants(graph: LipschitzGraph, consts: list[NodeConstant], p: str, C: torch.Tensor,
                       tail: tuple[torch.Tensor, int] | None = None) -> PropertyConstants:
    """Lipschitz constants of linear functions ``c . f`` of the logits (VNN-LIB output properties).

    With an affine tail ``f = T h + b``: ``K_c = ||c^T T||_2 L_2(h)`` (l2) or ``||c^T T||_1 L_inf(h)``
    (l-inf, the dual norm), which for ``c = e_i - e_j`` is the GloRo constant ``K_ij``.  Without one:
    ``||c||_2 L_2(f)`` or ``||c||_1 L_inf(f)`` (Hoelder).  Rows are computed in float64 and carry the
    same rounding factor as the margin constants.
    """
    C = C.to(torch.float64)
    tail = tail if tail is not None else tail_matrix(graph)
    q = 2.0 if p == "2" else 1.0
    if tail is not None:
        T, h = tail
        lh = consts[h].cumulative
        with torch.no_grad():
            rows = C.to(T.device) @ T
            K = torch.linalg.vector_norm(rows, ord=q, dim=1).cpu() * lh.value * SOUND_FACTOR
        return PropertyConstants(K, f"{'l2' if q == 2 else 'l1'} norms of c^T T (affine tail) x L(h) ({lh.method})",
                                 lh.sound)
    lf = consts[graph.output].cumulative
    K = torch.linalg.vector_norm(C, ord=q, dim=1) * lf.value * SOUND_FACTOR
    return PropertyConstants(K, f"{'l2' if q == 2 else 'l1'} norm of c x global bound (no affine tail)", lf.sound)
