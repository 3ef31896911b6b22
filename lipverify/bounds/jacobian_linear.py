"""Local margin constants by linear relaxation of the backward (Clarke-Jacobian) graph.

Shi, Wang, Zhang, Yi and Hsieh ("Efficiently computing local Lipschitz constants of neural networks via
bound propagation", NeurIPS 2022) bound ``sup_z ||c^T J_f(z)||_q`` over a ball by treating the
backward pass as a computational graph of its own and bounding it with linear relaxations instead of
intervals.  Over the Lipschitz graph the backward pass is (see :mod:`lipverify.bounds.jacobian`)

.. math::
    g_{out} = c, \\qquad g_j = \\sum_{k \\text{ reads } j} T_k(g_k),

with ``T_k`` the adjoint ``A^T`` of a linear node, ``s \\odot g`` for an activation (``s`` in the
slope interval ``[s_lo, s_hi]`` of each unit on the ball), the routing of max pooling (each window's
gradient to one of its candidate maxima, a convex combination of them at ties), the coefficients of a
sum and the split of a concatenation.  The objective is
``||g_in||_q`` at the input node.

The bound is built *forwards* through the network (the backward graph read from its end): a linear
upper bound ``\\Lambda_j^T g_j + \\text{const}`` of the objective in the gradient of node ``j`` is
rewritten in the gradients of the nodes that read ``j``:

* the objective: ``q = 1`` (``l_inf`` balls): ``|g| <= a g + b``, the chord of ``|.|`` over the unit's
  gradient interval (exact when it does not cross 0); ``q = 2`` (``l_2`` balls): ``g^2 <= (l + u) g - l u``
  per unit, so ``||g||_2^2`` is bounded by a linear function and the square root is taken at the end;
* linear ``g_j = A^T g_k``: ``\\Lambda_k = A \\Lambda_j`` (``LinearOp.apply``, no bias);
* max pooling: a window's gradient ``g_w`` goes to one candidate ``u``, so it adds ``t g_w`` with ``t``
  between the smallest and largest ``\\Lambda_j[u]`` over the window's candidates (exact for a sole
  candidate), bounded by the chord below;
* activation ``g_j = s \\odot g_k``: the term ``w s g`` (``w`` the coefficient) with the slope free in
  ``[s_lo, s_hi]`` is at most ``max(a g, b g)``, ``a``/``b`` the smaller/larger of ``w s_lo`` and
  ``w s_hi``: a convex function of ``g`` whose tightest linear upper bound on ``[g_lo, g_hi]`` is its
  chord (:func:`product_chord`; for a ReLU it is the triangle relaxation of ``relu(g)``, as in the
  paper's implementation); it is exact where the slope is decided or the gradient interval is
  one-signed, and below the McCormick planes of ``w s g`` everywhere;
* sums and concatenations: scale and place the coefficients.

At the logits ``g = c`` is known and the bound is ``\\Lambda_{out}^T c + \\text{const}``.  The gradient
intervals ``[g_lo, g_hi]`` of every node are the interval bounds of :mod:`lipverify.bounds.jacobian`;
the slope intervals come from the pre-activation bounds it is given (CROWN's, on the ball intersected
with the input domain, in :func:`lipverify.bounds.local.local_margin_constants`), which decide most
of the gain: with them most ReLUs are stable and ``s`` is exact.

Soundness: every chord is valid on its box, and every float64 step adds its rounding error to the
constant: ``REL_SLACK`` times the magnitudes involved, times the largest ``|g|`` the term can take
(``|fl(A \\Lambda) - A \\Lambda| <= REL_SLACK |A| |\\Lambda|`` element-wise, far above the float64
error of the dot products).  The result is ``min`` with the interval bound by the caller.

Warnings
--------
* The slopes are treated as independent of each other and of the input within their intervals, as in
  the paper's implementation; without the refinement the intermediate gradient intervals are interval
  bounds, and the chords over them are loose (kw_mnist on l2 balls: 1.16x below the interval bound
  unrefined, 2.3x refined).
* The refinement of the gradient intervals (``refine_rows > 0``) costs one pass through the rest of the
  network per refined unit and direction, twice; only units whose chord is inexact (undecided slope,
  gradient interval across 0; at the input: across 0 for ``l_inf``, every unit for ``l2``) are refined,
  at most ``MAX_REFINED`` per node, example and direction (the widest intervals); the others keep their
  interval bounds.  On wide layers followed by max pooling this is slow (Convnet_maxpool: about a
  minute per input).
* The chord of each term is chosen per unit (no optimisation over the convex combinations).
* MinMax and nodes without a Jacobian rule raise ``NotImplementedError``: the caller keeps the
  interval bound.
"""

from __future__ import annotations

import math

import torch

from lipverify.bounds.jacobian import MAX_ROWS, PoolWindows, interval_chunk, slope_interval, supports
from lipverify.graph import LipschitzGraph
from lipverify.graph.domain import REL_SLACK
from lipverify.limits import check_alloc

__all__ = ["linear_jacobian_bounds"]

#: rows (units x directions x 2) per batch of the intermediate gradient refinement; 0 turns it off
REFINE_ROWS = 4096
#: at most this many units of one node are refined per example and direction (the widest intervals)
MAX_REFINED = 2000
#: float64 entries of one node's tensor in a refinement pass (rows x node size)
ROW_ELEMENTS = 1 << 23

_LINEAR_KINDS = ("input", "linear", "activation", "maxpool", "add", "concat")


def linear_supports(graph: LipschitzGraph) -> str | None:
    """``None`` when :func:`linear_jacobian_bounds` applies to ``graph``, else the reason."""
    reason = supports(graph)
    if reason is not None:
        return reason
    for n in graph.nodes[:graph.output + 1]:
        if n.kind not in _LINEAR_KINDS:
            return f"no linear Jacobian relaxation for {n.kind} nodes"
    return None


def chord_coefficients(s_lo, s_hi, g_lo, g_hi):
    """``(sig_pos, sig_neg, kappa)``: the chord of :func:`product_chord` is
    ``w sig_pos g + |w| kappa`` for ``w >= 0`` and ``w sig_neg g + |w| kappa`` for ``w < 0``, rounding
    included in ``kappa``; they depend on the coefficient ``w`` only through its sign, so they are
    computed once per node and reused for every row of coefficients."""
    cross = (g_lo < 0) & (g_hi > 0)
    width = torch.where(cross, g_hi - g_lo, torch.ones_like(g_lo))
    # w >= 0: a = w s_lo, b = w s_hi; w < 0: a = w s_hi, b = w s_lo (a the slope below 0, b above)
    sig_pos = torch.where(g_lo >= 0, s_hi, torch.where(g_hi <= 0, s_lo, (s_hi * g_hi - s_lo * g_lo) / width))
    sig_neg = torch.where(g_lo >= 0, s_lo, torch.where(g_hi <= 0, s_hi, (s_lo * g_hi - s_hi * g_lo) / width))
    # the intercept w g_lo g_hi (s_lo - s_hi) / width (w >= 0) or w g_lo g_hi (s_hi - s_lo) / width is
    # |w| |g_lo g_hi| (s_hi - s_lo) / width either way
    kappa = torch.where(cross, (g_lo * g_hi).abs() * (s_hi - s_lo) / width, torch.zeros_like(g_lo))
    gmax = torch.maximum(g_lo.abs(), g_hi.abs())
    # every step is a few roundings of terms at most (|s_lo| + |s_hi|) gmax (|g_lo| + |g_hi| = width
    # where the interval crosses 0), and |w sig g| one more: REL_SLACK of them covers it by far
    smax = s_lo.abs() + s_hi.abs()
    err = REL_SLACK * ((smax + torch.maximum(sig_pos.abs(), sig_neg.abs())) * gmax + kappa)
    return sig_pos, sig_neg, kappa + err


def product_chord(w: torch.Tensor, s_lo, s_hi, g_lo, g_hi):
    """``(cg, const)`` with ``w s g <= cg g + const`` for every ``s`` in ``[s_lo, s_hi]`` and ``g`` in
    ``[g_lo, g_hi]`` (element-wise).

    With the slope free, the product is at most ``h(g) = max(a g, b g)``, ``a = min(w s_lo, w s_hi)``
    and ``b = max(w s_lo, w s_hi)``: ``b g`` for ``g >= 0`` and ``a g`` below.  ``h`` is convex, so its
    smallest concave (here: linear) upper bound on the interval is the chord through
    ``(g_lo, a g_lo)`` and ``(g_hi, b g_hi)``; it is exact where the interval does not cross 0 or the
    slope is fixed, and below both McCormick planes of ``w s g`` (with their ``s`` term maximised)
    everywhere else.  For a ReLU slope in ``[0, 1]`` and ``w = 1`` it is the triangle relaxation of
    ``relu(g)``.  ``const`` includes a bound of the chord's rounding error."""
    return apply_chord(w, chord_coefficients(s_lo, s_hi, g_lo, g_hi))


def apply_chord(w: torch.Tensor, coefficients):
    """:func:`product_chord` from the box's :func:`chord_coefficients`."""
    sig_pos, sig_neg, kappa = coefficients
    return w * torch.where(w >= 0, sig_pos, sig_neg), w.abs() * kappa


def linear_jacobian_bounds(graph: LipschitzGraph, ops: dict, lbs: list, ubs: list, C: torch.Tensor,
                           p: str, refine_rows: int = REFINE_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds ``(B, P)`` of ``sup_{z in ball} ||C_bp^T J_f(z)||_q`` by linear relaxation of the
    backward graph (see the module docstring), and the interval bounds ``(B, P)`` computed on the way
    (:func:`lipverify.bounds.jacobian.margin_jacobian_bounds` without node constants).

    Arguments as :func:`~lipverify.bounds.jacobian.margin_jacobian_bounds`.  Raises
    ``NotImplementedError`` for graphs it has no rule for (:func:`linear_supports`).
    """
    reason = linear_supports(graph)
    if reason is not None:
        raise NotImplementedError(reason)
    B, P, m = C.shape
    per = max(1, MAX_ROWS // max(P, 1))
    lin = torch.empty(B, P, dtype=torch.float64, device=C.device)
    itv = torch.empty(B, P, dtype=torch.float64, device=C.device)
    for s in range(0, B, per):
        sl = slice(s, min(B, s + per))
        keep: dict = {}
        itv[sl] = interval_chunk(graph, ops, [None if t is None else t[sl] for t in lbs],
                                [None if t is None else t[sl] for t in ubs], C[sl], p, [None], keep=keep)[0]
        lin[sl] = _linear_chunk(graph, ops, [None if t is None else t[sl] for t in lbs],
                                [None if t is None else t[sl] for t in ubs], C[sl], p, keep, refine_rows)
    return lin, itv


def _objective(g_lo, g_hi, p):
    """Coefficients and constants (per row) of a linear upper bound of ``||g||_1`` or ``||g||_2^2``."""
    R = g_lo.shape[0]
    gmax = torch.maximum(g_lo.abs(), g_hi.abs())
    if p == "inf":  # chord of |g|
        cross = (g_lo < 0) & (g_hi > 0)
        width = torch.where(cross, g_hi - g_lo, torch.ones_like(g_lo))
        a = torch.where(g_lo >= 0, torch.ones_like(g_lo),
                        torch.where(g_hi <= 0, -torch.ones_like(g_lo), (g_hi + g_lo) / width))
        b = torch.where(cross, -2 * g_hi * g_lo / width, torch.zeros_like(g_lo))
        err = 1e-12 * gmax
    else:  # chord of g^2
        a = g_lo + g_hi
        b = -g_lo * g_hi
        err = 1e-12 * gmax * gmax
    const = (b + err).reshape(R, -1).sum(1)
    return a, const


def _linear_chunk(graph, ops, lbs, ubs, C, p, grads, refine_rows: int):
    B, P, m = C.shape
    R = B * P
    nodes = graph.nodes
    o = graph.output
    inp = next((i for i, n in enumerate(nodes[:o + 1]) if n.kind == "input"), None)
    if inp is None or inp not in grads:
        return torch.zeros(B, P, dtype=torch.float64, device=C.device)
    ex = torch.arange(B, device=C.device).repeat_interleave(P)
    c = C.reshape((R,) + tuple(nodes[o].out_shape))
    # per-example slope intervals and pooling windows, per-row chord coefficients, shared by every pass
    memo: dict = {"ex": ex}
    if refine_rows:
        _refine_gradients(graph, ops, lbs, ubs, c, grads, ex, refine_rows, memo, p)
    L0, const0 = _objective(*grads[inp], p)
    val = propagate(graph, ops, lbs, ubs, c, grads, inp, L0, const0, ex, None, memo)
    val = val + 1e-10 * val.abs()
    if p == "2":
        val = val.clamp_min(0).sqrt() * (1 + 1e-10)
    else:
        val = val.clamp_min(0) * (1 + 1e-10)
    val = torch.where(torch.isnan(val), torch.full_like(val, math.inf), val)
    if refine_rows:  # the norm of the refined input intervals themselves
        lo, hi = grads[inp]
        gm = torch.maximum(lo.abs(), hi.abs()).reshape(R, -1)
        nrm = (gm.norm(dim=1) if p == "2" else gm.sum(1)) * (1 + 1e-10)
        val = torch.minimum(val, nrm)
    return val.reshape(B, P)


def _slopes(graph, lbs, ubs, k, memo: dict):
    """Slope intervals ``(B, *shape)`` of activation node ``k`` on each example's ball (memoised)."""
    if ("slopes", k) not in memo:
        n = graph.nodes[k]
        memo[("slopes", k)] = slope_interval(n.op, lbs[n.inputs[0]], ubs[n.inputs[0]])
    return memo[("slopes", k)]


def _refine_gradients(graph, ops, lbs, ubs, c, grads, ex, max_rows: int, memo: dict, p: str):
    """Linear bounds of the gradient units whose chords are inexact (activation outputs whose slope is
    undecided and whose interval crosses 0; the input's, see the module docstring), from the logits'
    side first, intersected with the interval bounds in place."""
    nodes = graph.nodes
    o = graph.output
    R = c.shape[0]
    for k in range(o - 1, -1, -1):
        if nodes[k].kind not in ("activation", "input") or k not in grads:
            continue
        cross = ((grads[k][0] < 0) & (grads[k][1] > 0)).reshape(R, -1)
        if nodes[k].kind == "input":
            # l_inf: the chords of |g| are exact off 0; l2: every unit's interval enters the norm
            open_ = cross if p == "inf" else torch.ones_like(cross)
        else:  # the products' chords are exact where the slope is decided or the interval is one-signed
            s_lo, s_hi = _slopes(graph, lbs, ubs, k, memo)
            open_ = (s_lo < s_hi).reshape(s_lo.shape[0], -1)[ex] & cross
        r_idx, u_idx = open_.nonzero(as_tuple=True)
        if not r_idx.numel():
            continue
        lo, hi = grads[k]
        cap = MAX_REFINED * R  # per row (example and direction)
        if r_idx.numel() > cap:  # the widest gradient intervals first
            width = (hi.reshape(R, -1) - lo.reshape(R, -1))[r_idx, u_idx]
            keep = torch.topk(width, cap).indices
            r_idx, u_idx = r_idx[keep], u_idx[keep]
        shape = lo.shape[1:]
        lo_f, hi_f = lo.reshape(R, -1).clone(), hi.reshape(R, -1).clone()
        # rows per pass: at most max_rows, and at most ROW_ELEMENTS float64 entries per tensor
        widest = max(math.prod(nodes[i].out_shape) for i in range(k, o + 1))
        per = max(1, min(max_rows, ROW_ELEMENTS // widest) // 2)
        check_alloc(16.0 * 8 * 2 * per * widest, "the linear Jacobian relaxation's refinement")
        for s in range(0, r_idx.numel(), per):
            rr, uu = r_idx[s:s + per], u_idx[s:s + per]
            q = rr.numel()
            L0 = torch.zeros((2 * q, lo_f.shape[1]), dtype=torch.float64, device=c.device)
            ar = torch.arange(q, device=c.device)
            L0[ar, uu] = 1.0
            L0[q + ar, uu] = -1.0
            src = torch.cat([rr, rr])
            val = propagate(graph, ops, lbs, ubs, c[src], grads, k, L0.reshape((2 * q,) + tuple(shape)),
                            torch.zeros(2 * q, dtype=torch.float64, device=c.device), ex[src], src, memo,
                            units=torch.cat([uu, uu]))
            up, low = val[:q], -val[q:]
            up = up + 1e-10 * up.abs()
            low = low - 1e-10 * low.abs()
            ok = torch.isfinite(up) & torch.isfinite(low)
            hi_f[rr[ok], uu[ok]] = torch.minimum(hi_f[rr[ok], uu[ok]], up[ok])
            lo_f[rr[ok], uu[ok]] = torch.maximum(lo_f[rr[ok], uu[ok]], low[ok])
        grads[k] = (lo_f.reshape(lo.shape), hi_f.reshape(hi.shape))


def _columns(op, k, memo: dict):
    """``op``'s columns ``A e_u`` for every unit ``u`` of its input, ``(n_in, *out)`` (memoised), or None
    when they would take more than ``ROW_ELEMENTS`` float64 entries."""
    if ("cols", k) not in memo:
        n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
        cols = None
        if n_in * n_out <= ROW_ELEMENTS:
            cols = op.matrix(torch.float64).T.reshape((n_in,) + tuple(op.out_shape))
        memo[("cols", k)] = cols
    return memo[("cols", k)]


def propagate(graph, ops, lbs, ubs, c, grads, start: int, L0, const0, ex, src, memo: dict, units=None):
    """Upper bounds ``(R,)`` of ``L0 . g_start + const0`` (the gradient of node ``start``) for rows whose
    example is ``ex`` (``lbs``/``ubs`` rows) and whose gradient intervals are row ``src`` of ``grads``
    (None: the rows of ``grads`` themselves), ``c`` ``(R, *out)`` the directions at the logits (see the
    module docstring); ``memo`` keeps what depends only on the examples between calls.  ``units``
    ``(R,)``: row ``r`` of ``L0`` is ``+-1`` at unit ``units[r]`` and 0 elsewhere (the first linear steps
    then read the operators' columns)."""
    nodes = graph.nodes
    o = graph.output
    R = L0.shape[0]
    consumers = graph.consumers()
    gcache: dict = {}

    def g_of(k):
        if k not in gcache:
            lo, hi = grads[k]
            gcache[k] = (lo, hi) if src is None else (lo[src], hi[src])
        return gcache[k]

    def of_rows(key, make):
        """What ``make()`` gives for every row of ``grads`` (memoised: the gradient intervals of a node
        are final once a pass reads them, see :func:`_refine_gradients`), for this call's rows."""
        if key not in gcache:
            if key not in memo:
                memo[key] = make()
            full = memo[key]
            gcache[key] = full if src is None else tuple(t[src] for t in full)
        return gcache[key]

    def gmax(k):
        return of_rows(("gmax", k), lambda: (torch.maximum(grads[k][0].abs(), grads[k][1].abs()),))[0]

    def chord_of(k):
        def make():
            s_lo, s_hi = _slopes(graph, lbs, ubs, k, memo)
            rows = memo["ex"]
            return chord_coefficients(s_lo[rows], s_hi[rows], *grads[k])
        return of_rows(("chord", k), make)

    def rows_of(t):
        return t[ex]

    lam: dict[int, torch.Tensor] = {start: L0}
    const = const0

    def add(k, t):
        nonlocal const
        if k in lam:
            new = lam[k] + t
            const = const + REL_SLACK * ((lam[k].abs() + t.abs()) * gmax(k)).reshape(R, -1).sum(1)
            lam[k] = new
        else:
            lam[k] = t

    for j in range(start, o + 1):
        if j not in lam:
            continue
        if j == o:
            break
        L = lam.pop(j)
        for k in consumers[j]:
            if k > o or k not in grads:
                continue  # no gradient reaches k: it contributes nothing to g_j
            n = nodes[k]
            kind = n.kind
            if kind == "linear":
                op = ops[k]
                cols = _columns(op, k, memo) if j == start and units is not None else None
                if cols is not None:  # rows of +-1 at one unit: +- a column of the operator
                    sign = L.reshape(R, -1)[torch.arange(R, device=L.device), units]
                    t = cols[units] * sign.reshape((R,) + (1,) * (cols.dim() - 1))
                    const = const + REL_SLACK * (t.abs() * gmax(k)).reshape(R, -1).sum(1)
                else:
                    t = op.apply(L)
                    const = const + REL_SLACK * (op.abs_apply(L.abs()) * gmax(k)).reshape(R, -1).sum(1)
                add(k, t)
            elif kind == "activation":
                cg, c0 = apply_chord(L, chord_of(k))
                const = const + c0.reshape(R, -1).sum(1)
                add(k, cg)
            elif kind == "maxpool":
                g_lo, g_hi = g_of(k)
                out_hw = (1, g_lo.shape[-1]) if n.op.one_d else (g_lo.shape[-2], g_lo.shape[-1])
                if ("pool", k) not in memo:
                    memo[("pool", k)] = PoolWindows(n.op, lbs[j], ubs[j]).setup(out_hw)
                win = memo[("pool", k)]
                # a window's gradient goes to exactly one candidate u (a convex combination at ties):
                # L . g_in gets g_w L[u], i.e. g_w t with t between the smallest and largest L over the
                # window's candidates
                cand = rows_of(win.cand)
                W = win.view(L, 0.0)
                inf = torch.tensor(math.inf, dtype=W.dtype, device=W.device)
                t_hi = torch.where(cand, W, -inf).amax(2)  # every window has a candidate
                t_lo = torch.where(cand, W, inf).amin(2)
                cols = win.Ho * win.Wo
                cg, c0 = product_chord(torch.ones_like(t_hi), t_lo, t_hi, g_lo.reshape(R, win.C, cols),
                                        g_hi.reshape(R, win.C, cols))
                const = const + c0.reshape(R, -1).sum(1)
                add(k, cg.reshape(g_lo.shape))
            elif kind == "add":
                for co, jj in zip(n.op, n.inputs):
                    if jj == j and co != 0:
                        t = co * L
                        const = const + REL_SLACK * (t.abs() * gmax(k)).reshape(R, -1).sum(1)
                        add(k, t)
            elif kind == "concat":
                ax = n.op + 1
                parts = [L if jj == j else torch.zeros((R,) + tuple(nodes[jj].out_shape), dtype=L.dtype,
                                                       device=L.device) for jj in n.inputs]
                add(k, torch.cat(parts, dim=ax))
            else:
                raise NotImplementedError(f"no linear Jacobian relaxation for {kind} nodes")
    if o not in lam:  # the logits do not depend on this node
        return const
    val = (lam[o] * c).reshape(R, -1).sum(1)
    return val + REL_SLACK * (lam[o] * c).abs().reshape(R, -1).sum(1) + const
