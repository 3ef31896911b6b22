"""Local margin constants from interval bounds on the Clarke Jacobian (backward bound propagation).

For a ball ``B = B_p(x, eps)`` (intersected with the input domain) and a direction ``c`` in logit space
(``c = e_i - e_j`` for the margin ``f_i - f_j``), every element of Clarke's generalised gradient of
``c^T f`` at any point of ``B`` is a product

.. math::
    g = A_1^T S_1 A_2^T S_2 \\cdots A_k^T c

of the linear operators' adjoints with, at each activation, a diagonal ``S`` of slopes taken from the
activation's Clarke derivative at a point of the unit's pre-activation interval (Clarke's chain rule,
"Optimization and nonsmooth analysis" Thm 2.6.6, applied node by node; sums and concatenations add
and split the gradients; max pooling and MinMax route each output's gradient to an input that can be
the maximum).  Propagating *intervals* of ``g`` backwards from the exact ``c`` therefore gives
element-wise bounds ``lo <= g <= hi`` that hold for every generalised gradient on the ball, and by
Lebourg's mean value theorem on the convex set ``B``

.. math::
    |c^T f(a) - c^T f(b)| \\le \\sup_{z \\in B} \\|\\partial (c^T f)(z)\\|_q \\, \\|a - b\\|_p
        \\le \\big\\| \\max(|lo|, |hi|) \\big\\|_q \\, \\|a - b\\|_p ,

``q`` the dual norm of ``p`` (``q = 2`` for ``l_2`` balls, ``q = 1`` for ``l_inf`` balls).  This is the
bound-propagation view of local Lipschitz constants of Shi, Wang, Zhang, Yi and Hsieh ("Efficiently
computing local Lipschitz constants of neural networks via bound propagation", NeurIPS 2022) with
interval (not linear) relaxations.  It is sound on every architecture made of the node kinds below,
and, unlike a product of masked operator norms, needs no operator norm at all: only ``A^T`` and
``|A|^T`` (``LinearOp.adjoint`` / ``abs_adjoint``) per linear node, batched over examples and
directions.

Rules (``[lo, hi]`` the gradient interval of a node's output; ``[l, u]`` the node's *input* interval on
the ball, from :mod:`lipverify.bounds.local`):

* linear ``y = A h + b``: ``A^T`` of the centre, ``|A|^T`` of the radius;
* activation: slopes ``S`` in ``[s_lo, s_hi]`` per unit (ReLU: ``0`` when ``u <= 0``, ``1`` when
  ``l >= 0 < u``, else ``[0, 1]``; clipped units likewise; tanh / sigmoid from their derivative's
  extremes on ``[l, u]``; others the activation's global slope range, ``0`` on constant regions) and the
  interval product ``S * [lo, hi]``.  A unit constant (or affine) on the whole ball is replaced by that
  constant (affine) function, which leaves the network unchanged on the ball;
* max pooling: a window's gradient goes to one of its *candidates* (inputs with ``u >= max l`` over the
  window): ``[lo, hi]`` when there is a single candidate, ``[min(lo, 0), max(hi, 0)]`` to each candidate
  otherwise, summed over the windows containing the input;
* MinMax pairs ``(a, b) -> (max, min)``: the routing is fixed when the intervals of ``a`` and ``b`` do not
  overlap, else each input gets the hull of both outputs' gradient intervals;
* ``add``: each input receives its coefficient times the interval; ``concat``: split.

Everything runs in float64 with outward rounding: every linear step widens the radius by
``REL_SLACK (|A|^T |centre| + |A|^T radius)`` (the float64 error of the dot products is below
``n 2^-53`` of those sums), products and sums by ``REL_SLACK`` of their magnitudes, and the final norm
by a relative ``1e-10``.

Warnings
--------
* Valid only on the ball the intervals were computed for; it is a bound of the margin's Lipschitz
  constant on that ball (what local certification needs), not of the whole logit map.
* Products of input-dependent tensors, normalisations, attention and l-inf distance layers have no rule
  here: :func:`margin_jacobian_bounds` raises ``NotImplementedError`` naming the node kind, and the caller
  keeps the masked-norm bound.  So does a linear operator without an ``|A|^T`` bound.
* The intervals widen with depth and with the number of units whose slope is not fixed on the ball;
  on large balls the bound can be far above the product of masked norms (callers take the minimum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipverify.graph import LipschitzGraph
from lipverify.graph.domain import REL_SLACK, mul_interval

__all__ = ["margin_jacobian_bounds", "slope_interval", "pair_directions"]

#: rows (examples x directions) pushed backwards at once
MAX_ROWS = 1024


def pair_directions(m: int, rows: torch.Tensor | None, B: int, dtype=torch.float64, device=None):
    """Directions ``c`` and their class pairs.

    ``rows`` (``(B,)`` class indices): the ``m`` directions ``e_{r_b} - e_j`` per example (``j = r_b``
    gives zero).  ``None``: the ``m (m - 1) / 2`` directions ``e_i - e_j``, ``i < j``, for every example.
    Returns ``(C (B, P, m), I (B, P), J (B, P))``.
    """
    if rows is not None:
        rows = torch.as_tensor(rows, device=device).long().reshape(-1)
        eye = torch.eye(m, dtype=dtype, device=device)
        C = eye[rows][:, None, :] - eye[None, :, :]
        I = rows[:, None].expand(B, m)
        J = torch.arange(m, device=device)[None, :].expand(B, m)
        return C, I, J
    iu = torch.triu_indices(m, m, 1, device=device)
    eye = torch.eye(m, dtype=dtype, device=device)
    C = (eye[iu[0]] - eye[iu[1]])[None].expand(B, -1, -1)
    return C, iu[0][None].expand(B, -1), iu[1][None].expand(B, -1)


def slope_interval(act, l: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit bounds ``[s_lo, s_hi]`` of the activation's Clarke derivative on ``[l, u]`` (a unit that
    is constant on the interval gets ``0``; one that is the identity there gets ``1``)."""
    name = act.name
    one = torch.ones_like(l)
    zero = torch.zeros_like(l)
    const = torch.zeros_like(l, dtype=torch.bool)
    if act.const_below is not None:
        const |= u <= act.const_below
    if act.const_above is not None:
        const |= l >= act.const_above
    if name == "relu" or name.startswith("clip["):
        lo_c = -math.inf if act.const_below is None else act.const_below
        hi_c = math.inf if act.const_above is None else act.const_above
        ident = (l >= lo_c) & (u <= hi_c)
        s_lo = torch.where(ident, one, zero)
        s_hi = one.clone()
    elif name.startswith("leaky_relu("):
        a = act.lo if act.hi == 1.0 else act.hi  # the slope below 0
        s_lo = torch.where(l >= 0, one, torch.where(u <= 0, a * one, act.lo * one))
        s_hi = torch.where(l >= 0, one, torch.where(u <= 0, a * one, act.hi * one))
    elif name in ("tanh", "sigmoid"):
        near = torch.where(l > 0, l, torch.where(u < 0, u, zero))  # the point of [l, u] nearest 0
        far = torch.where(l.abs() > u.abs(), l, u)

        def d(z):
            if name == "tanh":
                t = torch.tanh(z)
                return 1 - t * t
            s = torch.sigmoid(z)
            return s * (1 - s)
        s_hi = d(near) * (1 + 1e-12) + 1e-300
        s_lo = (d(far) * (1 - 1e-12)).clamp_min(0.0)
    else:
        s_lo = act.lo * one
        s_hi = act.hi * one
    s_lo = torch.where(const, zero, s_lo)
    s_hi = torch.where(const, zero, s_hi)
    return s_lo, s_hi


def _linear_back(op, lo, hi):
    c = (lo + hi) / 2
    r = (hi - lo) / 2 + 1e-15 * (lo.abs() + hi.abs())
    gc = op.adjoint(c)
    both = op.abs_adjoint(torch.cat([r, c.abs()]))
    gr, gabs = both[:r.shape[0]], both[r.shape[0]:]
    gr = gr + REL_SLACK * (gabs + gr)
    return gc - gr, gc + gr


class PoolWindows:
    """The windows of a max-pooling node over its input, and which inputs can be each window's maximum.

    ``cand``: ``(B, C, k, L)`` an input can be the maximum of the window (``u >= max l`` over the window;
    padding never is); ``sole``: ``(B, C, 1, L)`` the window has a single candidate.  :meth:`view` lays a
    ``(R, C, H, W)`` tensor out as ``(R, C, k, L)`` windows, :meth:`fold` sums ``(R, C, k, L)`` back
    onto the input (``R`` a multiple of ``B``).
    """

    def __init__(self, pool, l_in: torch.Tensor, u_in: torch.Tensor):
        self.one_d = pool.one_d
        if self.one_d:
            l_in, u_in = l_in.unsqueeze(2), u_in.unsqueeze(2)
        self.C, self.H, self.W = l_in.shape[1:]
        self.kernel = pool.kernel
        self.stride = pool.stride
        self.padding = pool.padding
        self.dilation = pool.dilation
        self.windows_per_input = pool.windows_per_input()
        self.l_in, self.u_in = l_in, u_in

    def setup(self, out_hw):
        """Geometry for an output of spatial size ``out_hw`` (taken from the gradient tensors)."""
        Ho, Wo = out_hw
        kh, kw = self.kernel
        sh, sw = self.stride
        dh, dw = self.dilation
        ph, pw = self.padding
        self.Ho, self.Wo = Ho, Wo
        # the padded input exactly as far as the windows reach (ceil_mode windows may pass the edge;
        # floor mode may leave the last rows and columns outside every window)
        self.need_h = (Ho - 1) * sh + dh * (kh - 1) + 1
        self.need_w = (Wo - 1) * sw + dw * (kw - 1) + 1
        self.pad = (pw, max(0, self.need_w - self.W - pw), ph, max(0, self.need_h - self.H - ph))
        U, L = self.view(self.u_in, -math.inf), self.view(self.l_in, -math.inf)
        self.cand = U >= L.amax(2, keepdim=True)  # padding (-inf) is never a candidate
        self.sole = self.cand.sum(2, keepdim=True) == 1
        return self

    def view(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        kh, kw = self.kernel
        if self.one_d and t.dim() == 3:
            t = t.unsqueeze(2)
        tp = F.pad(t, self.pad, value=fill)[..., :self.need_h, :self.need_w]
        return F.unfold(tp, kernel_size=(kh, kw), dilation=self.dilation, stride=self.stride).reshape(
            t.shape[0], self.C, kh * kw, self.Ho * self.Wo)

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel
        ph, pw = self.padding
        R = t.shape[0]
        out = F.fold(t.reshape(R, self.C * kh * kw, self.Ho * self.Wo), (self.need_h, self.need_w),
                     kernel_size=(kh, kw), dilation=self.dilation, stride=self.stride)
        short_h, short_w = max(0, ph + self.H - self.need_h), max(0, pw + self.W - self.need_w)
        if short_h or short_w:  # rows / columns no window reads: zero gradient
            out = F.pad(out, (0, short_w, 0, short_h))
        out = out[:, :, ph:ph + self.H, pw:pw + self.W]
        return out.squeeze(2) if self.one_d else out


def _maxpool_back(pool, l_in, u_in, lo, hi, P):
    """Gradient interval of a max-pooling input from its output's (see the module docstring)."""
    win = PoolWindows(pool, l_in, u_in).setup((lo.shape[-2], lo.shape[-1]) if not pool.one_d
                                              else (1, lo.shape[-1]))
    B = l_in.shape[0]
    cand = win.cand.repeat_interleave(P, dim=0)
    sole = win.sole.repeat_interleave(P, dim=0)
    glo = lo.reshape(B * P, win.C, 1, win.Ho * win.Wo)
    ghi = hi.reshape(B * P, win.C, 1, win.Ho * win.Wo)
    z = torch.zeros((), dtype=lo.dtype, device=lo.device)
    c_lo = torch.where(cand, torch.where(sole, glo, torch.minimum(glo, z)), z)
    c_hi = torch.where(cand, torch.where(sole, ghi, torch.maximum(ghi, z)), z)
    r_lo, r_hi = win.fold(c_lo), win.fold(c_hi)
    w = REL_SLACK * (r_lo.abs() + r_hi.abs()) * win.windows_per_input
    return r_lo - w, r_hi + w


def _minmax_back(l_in, u_in, lo, hi, P):
    B, C = l_in.shape[0], l_in.shape[1]
    rest = l_in.shape[2:]
    lp = l_in.reshape(B, C // 2, 2, *rest).repeat_interleave(P, dim=0)
    up = u_in.reshape(B, C // 2, 2, *rest).repeat_interleave(P, dim=0)
    glo = lo.reshape(B * P, C // 2, 2, *rest)
    ghi = hi.reshape(B * P, C // 2, 2, *rest)
    a_max = lp[:, :, 0] >= up[:, :, 1]  # a is always the max
    b_max = lp[:, :, 1] >= up[:, :, 0]  # b is always the max
    hull_lo = torch.minimum(glo[:, :, 0], glo[:, :, 1])
    hull_hi = torch.maximum(ghi[:, :, 0], ghi[:, :, 1])
    a_lo = torch.where(a_max, glo[:, :, 0], torch.where(b_max, glo[:, :, 1], hull_lo))
    a_hi = torch.where(a_max, ghi[:, :, 0], torch.where(b_max, ghi[:, :, 1], hull_hi))
    b_lo = torch.where(a_max, glo[:, :, 1], torch.where(b_max, glo[:, :, 0], hull_lo))
    b_hi = torch.where(a_max, ghi[:, :, 1], torch.where(b_max, ghi[:, :, 0], hull_hi))
    r_lo = torch.stack([a_lo, b_lo], dim=2).reshape(lo.shape)
    r_hi = torch.stack([a_hi, b_hi], dim=2).reshape(hi.shape)
    return r_lo, r_hi


_SUPPORTED = ("input", "linear", "activation", "maxpool", "minmax", "add", "concat")


def supports(graph: LipschitzGraph) -> str | None:
    """``None`` when :func:`margin_jacobian_bounds` applies to ``graph``, else the reason."""
    for i, n in enumerate(graph.nodes):
        if i > graph.output:
            break
        if n.kind not in _SUPPORTED:
            return f"no Jacobian interval rule for {n.kind} nodes"
    return None


def margin_jacobian_bounds(graph: LipschitzGraph, ops: dict, lbs: list, ubs: list, C: torch.Tensor,
                           p: str, node_lipschitz: list | None = None,
                           node_lipschitz_sets: list | None = None) -> torch.Tensor:
    """Upper bounds ``(B, P)`` of ``sup_{z in ball} ||C_bp^T J_f(z)||_q`` (see the module docstring).

    ``ops``: float64 linear operators by node index; ``lbs`` / ``ubs``: float64 intervals of every node
    over each example's ball (:func:`lipverify.bounds.local.preactivation_bounds`); ``C``: ``(B, P, m)``
    float64 directions in logit space; ``p``: ``"2"`` or ``"inf"`` (the ball's norm).

    ``node_lipschitz``: optional ``(B,)`` sound local ``l_p`` bounds ``L(h)`` of the map input -> node ``h``
    on each ball (the masked-norm product).  Then the result is the minimum, over the nodes ``h`` that
    every path from the input to the logits passes through, of ``||max |g_h| ||_q * L(h)`` with ``g_h``
    the gradient interval at ``h``: by Clarke's chain rule every generalised gradient on the ball is
    ``g^T J`` with ``g`` in the interval at ``h`` and ``||J||_{p -> p} <= L(h)`` (the network is first
    replaced by the one whose units constant or affine on the ball are constant or affine, equal to it
    on the ball).  ``h`` = the input gives the pure interval bound, ``h`` next to the logits essentially
    the masked-norm bound.  ``node_lipschitz_sets``: several such lists at once (one backward pass);
    the result is then ``(S, B, P)``, one bound per list.

    Raises ``NotImplementedError`` for graphs with node kinds or operators it has no rule for.
    """
    reason = supports(graph)
    if reason is not None:
        raise NotImplementedError(reason)
    B, P, m = C.shape
    sets = node_lipschitz_sets if node_lipschitz_sets is not None else [node_lipschitz]
    per = max(1, MAX_ROWS // max(P, 1))
    out = torch.empty(len(sets), B, P, dtype=torch.float64, device=C.device)
    for s in range(0, B, per):
        sl = slice(s, min(B, s + per))
        nls = [None if nl is None else [None if t is None else t[sl] for t in nl] for nl in sets]
        out[:, sl] = interval_chunk(graph, ops, [None if t is None else t[sl] for t in lbs],
                                   [None if t is None else t[sl] for t in ubs], C[sl], p, nls)
    return out if node_lipschitz_sets is not None else out[0]


def _dual_norm(lo, hi, B, P, p):
    g = torch.maximum(lo.abs(), hi.abs()).reshape(B, P, -1)
    return (g.norm(dim=2) if p == "2" else g.sum(dim=2)) * (1 + 1e-10)


def interval_chunk(graph, ops, lbs, ubs, C, p, node_lipschitz_sets, keep: dict | None = None):
    """``keep``: a dict that receives every node's complete gradient interval ``(lo, hi)`` (``(B P, *shape)``)
    by node index (for :mod:`lipverify.bounds.jacobian_linear`)."""
    nodes = graph.nodes
    B, P, m = C.shape
    o = graph.output
    glo: list = [None] * len(nodes)
    ghi: list = [None] * len(nodes)
    start = C.reshape((B * P,) + tuple(nodes[o].out_shape))
    glo[o], ghi[o] = start.clone(), start.clone()

    def add_to(j, lo, hi):
        if glo[j] is None:
            glo[j], ghi[j] = lo, hi
        else:
            a, b = glo[j] + lo, ghi[j] + hi
            w = REL_SLACK * (a.abs() + b.abs())
            glo[j], ghi[j] = a - w, b + w

    def rep(t):
        return t.repeat_interleave(P, dim=0)

    S = len(node_lipschitz_sets)
    best = torch.full((S, B, P), math.inf, dtype=torch.float64, device=C.device)
    inp = None
    for i in range(o, -1, -1):
        if glo[i] is None:
            continue
        n = nodes[i]
        lo, hi = glo[i], ghi[i]
        k = n.kind
        if k == "input":
            inp = i
            if keep is not None:
                keep[i] = (lo, hi)
            continue
        if sum(1 for t in glo if t is not None) == 1:
            # every path to the logits passes through node i (no other gradient is pending)
            here = None
            for s_, nl in enumerate(node_lipschitz_sets):
                if nl is not None and nl[i] is not None:
                    here = _dual_norm(lo, hi, B, P, p) if here is None else here
                    Li = nl[i].to(torch.float64).reshape(B, 1)
                    best[s_] = torch.minimum(best[s_], here * Li * (1 + 1e-12))
        if keep is not None:
            keep[i] = (lo, hi)
        glo[i] = ghi[i] = None
        ins = n.inputs
        if k == "linear":
            add_to(ins[0], *_linear_back(ops[i], lo, hi))
        elif k == "activation":
            s_lo, s_hi = slope_interval(n.op, lbs[ins[0]], ubs[ins[0]])
            add_to(ins[0], *mul_interval(lo, hi, rep(s_lo), rep(s_hi)))
        elif k == "maxpool":
            add_to(ins[0], *_maxpool_back(n.op, lbs[ins[0]], ubs[ins[0]], lo, hi, P))
        elif k == "minmax":
            add_to(ins[0], *_minmax_back(lbs[ins[0]], ubs[ins[0]], lo, hi, P))
        elif k == "add":
            for co, j in zip(n.op, ins):
                if co == 0:
                    continue
                a, b = (co * lo, co * hi) if co > 0 else (co * hi, co * lo)
                add_to(j, a, b)
        elif k == "concat":
            ax = n.op + 1
            sizes = [nodes[j].out_shape[n.op] for j in ins]
            for j, a, b in zip(ins, lo.split(sizes, dim=ax), hi.split(sizes, dim=ax)):
                add_to(j, a, b)
        else:  # pragma: no cover - excluded by supports()
            raise NotImplementedError(f"no Jacobian interval rule for {k} nodes")
    if inp is None or glo[inp] is None:  # the logits do not depend on the input
        return torch.zeros(S, B, P, dtype=torch.float64, device=C.device)
    return torch.minimum(best, _dual_norm(glo[inp], ghi[inp], B, P, p)[None])
