"""Linear relaxations of the graph's element-wise and pooling nodes, for bound propagation.

Each relaxation is ``(aL, bL, aU, bU)`` with ``aL h + bL <= phi(h) <= aU h + bU`` for every ``h`` in the
unit's interval ``[l, u]`` (element-wise tensors):

* ReLU: the triangle (upper secant, lower slope 1 where ``u >= -l``, else 0: CROWN's adaptive slope;
  Zhang et al., NeurIPS 2018); leaky ReLU the same with its two slopes; clip (ReLU6, hardtanh): the
  triangle at the kink inside the interval, two parallel lines through the kinks when both are.
* Smooth and other activations (tanh, sigmoid, GELU, SiLU, ELU, softplus, ...): the best at the
  midpoint of these lines, every one valid on ``[l, u]``:

  - through an end point with an extreme slope of the activation on ``[l, u]`` (mean value theorem);
  - the secant moved by ``(s_hi - sigma)(sigma - s_lo)(u - l) / (s_hi - s_lo)``, with ``sigma`` the
    secant's slope and ``[s_lo, s_hi]`` the slope range on ``[l, u]``: the largest distance between
    the function and its secant that the slope range allows (the two mean value bounds from ``l`` and
    from ``u`` meet there);
  - where the activation is convex on ``[l, u]``: the secant above (a convex function lies below any
    line that is above it at both end points) and the tangent at the midpoint below; concave: the
    mirror images (tangent/secant relaxation, Zhang et al. 2018).

  The slope range on ``[l, u]`` is the one of :func:`lipverify.bounds.jacobian.slope_interval`,
  tightened on convex (concave) intervals to ``[phi'(l), phi'(u)]`` (``[phi'(u), phi'(l)]``) from the
  derivative computed by autograd with a ``1e-9`` relative and ``1e-12`` absolute slack.  The convex
  and concave intervals of each activation are in :data:`CURVATURE` (tests check them against second
  differences on dense grids).
* Max pooling: a selection below (the entry with the largest lower bound) and the window's largest
  upper bound above, exact when one entry dominates its window.

Rounding: activation values get the outward slack ``1e-12 + 1e-9 |phi|`` (torch's softplus jumps by
``1e-10 |phi|`` where it switches to the identity); the secant's slope error is
added to its offset, and every intercept is moved outwards by ``1e-12`` of the magnitudes of its terms.

Warnings
--------
An activation missing from :data:`CURVATURE` gets only the mean-value lines and the moved secant, whose
width grows with ``(s_hi - s_lo)(u - l)``: wide intervals of GELU or SiLU far from the origin are still
loose where the slope range of :func:`~lipverify.bounds.jacobian.slope_interval` is the global one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipverify.bounds.jacobian import slope_interval

__all__ = ["CURVATURE", "pair_difference_bounds", "pool_relaxation", "relaxation", "relaxation_relu"]

_SQRT2 = math.sqrt(2.0)
#: the smallest positive float: a piece that starts here excludes 0 itself
_ABOVE_0 = math.ulp(0.0)
#: where each activation is convex (+1) or concave (-1): lists of ``(lo, hi, sign)``, keyed by the
#: activation's base name (a positive scale ``"2*gelu"`` keeps them).  On a convex piece the derivative
#: autograd gives at each end point must be a subgradient of the piece (it bounds the slopes inside):
#: where the derivative jumps, the piece on the side autograd does not take excludes the jump.
CURVATURE = {
    "tanh": [(-math.inf, 0.0, 1), (0.0, math.inf, -1)],
    "sigmoid": [(-math.inf, 0.0, 1), (0.0, math.inf, -1)],
    "softsign": [(-math.inf, 0.0, 1), (0.0, math.inf, -1)],
    "softplus": [(-math.inf, math.inf, 1)],
    "abs": [(-math.inf, math.inf, 1)],
    # the derivative jumps down at 0 (lambda alpha to lambda) and autograd gives the left one there, so
    # the right piece starts just above 0
    "selu": [(-math.inf, 0.0, 1), (_ABOVE_0, math.inf, 1)],
    # GELU'' = phi(z) (2 - z^2): convex on [-sqrt 2, sqrt 2], concave outside
    "gelu": [(-math.inf, -_SQRT2 * (1 + 1e-9), -1), (-_SQRT2 * (1 - 1e-9), _SQRT2 * (1 - 1e-9), 1),
             (_SQRT2 * (1 + 1e-9), math.inf, -1)],
    # SiLU'' = sigma'(z) (2 + z (1 - 2 sigma(z))) changes sign at z = -+2.39936
    "silu": [(-math.inf, -2.3994, -1), (-2.3993, 2.3993, 1), (2.3994, math.inf, -1)],
}


def _curvature_regions(act) -> list:
    name = act.name
    base = name.split("*", 1)[1] if "*" in name else name
    if base in CURVATURE:
        return CURVATURE[base]
    if base.startswith("elu("):  # alpha (e^z - 1) below 0 (slope alpha e^z, rising), z above
        a = float(base[4:-1])
        return [(-math.inf, math.inf, 1)] if a <= 1.0 else [(-math.inf, 0.0, 1), (_ABOVE_0, math.inf, 1)]
    if base.startswith("celu("):  # slope e^(z / alpha) <= 1 below 0, 1 above
        return [(-math.inf, math.inf, 1)]
    return []


def _derivative(act, z: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        t = z.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(act.fn(t).sum(), t)
    return g.detach()


def _smooth_relaxation(act, l, u):
    """Mean-value lines, the moved secant and, on convex or concave intervals, the secant and the
    tangent at the midpoint: the best valid line of each side at the midpoint (module docstring)."""
    with torch.no_grad():
        fl, fu, fm = act.fn(l), act.fn(u), act.fn((l + u) / 2)
    # torch's softplus turns into the identity above its threshold: a jump of 1e-10 of the value
    tol = 1e-12 + 1e-9 * torch.maximum(fl.abs(), fu.abs())
    tol_m = 1e-12 + 1e-9 * fm.abs()
    s_lo, s_hi = slope_interval(act, l, u)
    convex = torch.zeros_like(l, dtype=torch.bool)
    concave = torch.zeros_like(convex)
    for lo, hi, sign in _curvature_regions(act):
        inside = (l >= lo) & (u <= hi)
        if sign > 0:
            convex |= inside
        else:
            concave |= inside
    curved = convex | concave
    m = (l + u) / 2
    if bool(curved.any()):
        d_l, d_u, d_m = (_derivative(act, t) for t in (l, u, m))
        err = lambda d: 1e-9 * d.abs() + 1e-12  # noqa: E731
        lo_c = torch.where(convex, d_l - err(d_l), d_u - err(d_u))
        hi_c = torch.where(convex, d_u + err(d_u), d_l + err(d_l))
        s_lo = torch.where(curved, torch.maximum(s_lo, lo_c), s_lo)
        s_hi = torch.where(curved, torch.minimum(s_hi, hi_c), s_hi)
        s_hi = torch.maximum(s_hi, s_lo)
    w = (u - l).clamp_min(0.0)
    wpos = w.clamp_min(1e-300)
    sigma = torch.minimum(torch.maximum((fu - fl) / wpos, s_lo), s_hi)
    gap = s_hi - s_lo
    # |sigma - true secant slope| * w is at most the two end values' errors plus the division's rounding
    e_sig = 2 * tol + 1e-12 * (fl.abs() + fu.abs())
    off = torch.where(gap > 0, (s_hi - sigma) * (sigma - s_lo) * w / gap.clamp_min(1e-300), torch.zeros_like(w))
    off = off.clamp_min(0.0) + e_sig
    # candidates (slope, value at l); lower: the largest at m wins, upper: the smallest
    lower = [(s_lo, fl - tol), (s_hi, fu - tol - s_hi * w), (sigma, fl - tol - off)]
    upper = [(s_hi, fl + tol), (s_lo, fu + tol - s_lo * w), (sigma, fl + tol + off)]
    if bool(curved.any()):
        # the secant through both end points: above a convex function, below a concave one
        sec_hi = torch.maximum(fl + tol, fu + tol - sigma * w)
        sec_lo = torch.minimum(fl - tol, fu - tol - sigma * w)
        inf = torch.full_like(l, math.inf)
        upper.append((sigma, torch.where(convex, sec_hi, inf)))
        lower.append((sigma, torch.where(concave, sec_lo, -inf)))
        # the tangent at the midpoint: below a convex function, above a concave one
        slack = err(d_m) * w / 2
        t_l = fm + d_m * (l - m)
        lower.append((d_m, torch.where(convex, t_l - tol_m - slack, -inf)))
        upper.append((d_m, torch.where(concave, t_l + tol_m + slack, inf)))

    def pick(cands, better):
        a, v = cands[0]
        a, v = a.clone(), v.clone()
        for a2, v2 in cands[1:]:
            take = better(v2 + a2 * (m - l), v + a * (m - l))
            a, v = torch.where(take, a2, a), torch.where(take, v2, v)
        return a, v
    aL, vL = pick(lower, lambda new, old: new > old)
    aU, vU = pick(upper, lambda new, old: new < old)
    # intercepts b = v - a l, moved outwards by their rounding
    bL = vL - aL * l
    bU = vU - aU * l
    bL = bL - 1e-12 * ((aL * l).abs() + vL.abs())
    bU = bU + 1e-12 * ((aU * l).abs() + vU.abs())
    point = u <= l  # an interval that is a point: the constant
    zero = torch.zeros_like(l)
    aL, aU = torch.where(point, zero, aL), torch.where(point, zero, aU)
    bL, bU = torch.where(point, fl - tol, bL), torch.where(point, fu + tol, bU)
    return aL, bL, aU, bU


def _clip_relaxation(l, u, lo: float, hi: float):
    """``(aL, bL, aU, bU)`` of ``clip(h, lo, hi)`` on ``[l, u]`` (``lo``/``hi`` may be infinite)."""
    aL, bL, aU, bU = (torch.zeros_like(l) for _ in range(4))
    width = (u - l).clamp_min(1e-300)
    lo_t = torch.full_like(l, lo if math.isfinite(lo) else -math.inf)
    hi_t = torch.full_like(l, hi if math.isfinite(hi) else math.inf)
    below = u <= lo_t                    # constant lo
    above = l >= hi_t                    # constant hi
    inside = (l >= lo_t) & (u <= hi_t)   # identity
    lower_kink = (l < lo_t) & (u > lo_t) & (u <= hi_t)   # convex: like ReLU at lo
    upper_kink = (l >= lo_t) & (l < hi_t) & (u > hi_t)   # concave: like -ReLU at hi
    both = (l < lo_t) & (u > hi_t)
    lo_f = torch.where(torch.isfinite(lo_t), lo_t, torch.zeros_like(l))
    hi_f = torch.where(torch.isfinite(hi_t), hi_t, torch.zeros_like(l))
    # constants
    bL = torch.where(below, lo_f, bL)
    bU = torch.where(below, lo_f, bU)
    bL = torch.where(above, hi_f, bL)
    bU = torch.where(above, hi_f, bU)
    one = torch.ones_like(l)
    aL = torch.where(inside, one, aL)
    aU = torch.where(inside, one, aU)
    # convex kink at lo: upper secant through (l, lo) and (u, u); lower: slope 1 (h) or 0 (lo)
    s = (u - lo_f) / width
    aU = torch.where(lower_kink, s, aU)
    bU = torch.where(lower_kink, lo_f - s * l, bU)
    take_h = (u - lo_f) >= (lo_f - l)
    aL = torch.where(lower_kink & take_h, one, aL)
    bL = torch.where(lower_kink & ~take_h, lo_f, bL)
    # concave kink at hi: lower secant through (l, l) and (u, hi); upper: slope 1 (h) or 0 (hi)
    s = (hi_f - l) / width
    aL = torch.where(upper_kink, s, aL)
    bL = torch.where(upper_kink, l - s * l, bL)
    take_h = (hi_f - l) >= (u - hi_f)
    aU = torch.where(upper_kink & take_h, one, aU)
    bU = torch.where(upper_kink & ~take_h, hi_f, bU)
    # both kinks: parallel lines of slope (hi - lo) / (u - l) through (lo, lo) below and (hi, hi) above
    s = (hi_f - lo_f) / width
    aL = torch.where(both, s, aL)
    bL = torch.where(both, lo_f - s * lo_f, bL)
    aU = torch.where(both, s, aU)
    bU = torch.where(both, hi_f - s * hi_f, bU)
    return aL, bL, aU, bU


def _relu_relaxation(l, u):
    """ReLU on ``[l, u]``: the triangle (upper secant, lower slope 1 where ``u >= -l``, else 0)."""
    cross = (l < 0) & (u > 0)
    s = torch.where(cross, u / (u - l).clamp_min(1e-300), (l >= 0).to(l.dtype))
    aU = s
    bU = torch.where(cross, -s * l, torch.zeros_like(l))
    aL = torch.where(cross, (u >= -l).to(l.dtype), s)
    return aL, torch.zeros_like(l), aU, bU


def _leaky_relaxation(l, u, a: float):
    """``max(h, a h)`` with ``0 <= a < 1`` (convex) on ``[l, u]``."""
    f = lambda t: torch.where(t >= 0, t, a * t)  # noqa: E731
    cross = (l < 0) & (u > 0)
    width = (u - l).clamp_min(1e-300)
    s = (f(u) - f(l)) / width
    aU = torch.where(cross, s, torch.where(u <= 0, torch.full_like(l, a), torch.ones_like(l)))
    bU = torch.where(cross, f(l) - s * l, torch.zeros_like(l))
    slope_low = torch.where(u >= -l, torch.ones_like(l), torch.full_like(l, a))
    aL = torch.where(cross, slope_low, aU)
    bL = torch.zeros_like(l)
    return aL, bL, aU, bU


def relaxation(act, l: torch.Tensor, u: torch.Tensor):
    """``(aL, bL, aU, bU)``: ``aL h + bL <= phi(h) <= aU h + bU`` for every ``h`` in ``[l, u]``."""
    name = act.name
    if name == "relu":
        return _outward(*_relu_relaxation(l, u), l, u, lower=False)
    if name.startswith("clip["):
        lo = act.const_below if act.const_below is not None else -math.inf
        hi = act.const_above if act.const_above is not None else math.inf
        return _outward(*_clip_relaxation(l, u, lo, hi), l, u, lower=True)
    if name.startswith("leaky_relu(") and act.hi == 1.0 and 0.0 <= act.lo < 1.0:
        return _outward(*_leaky_relaxation(l, u, float(act.lo)), l, u, lower=False)
    return _smooth_relaxation(act, l, u)


def _outward(aL, bL, aU, bU, l, u, lower: bool):
    """Secant intercepts of the piecewise-linear relaxations moved outwards by ``1e-12`` of their terms'
    magnitudes where the two lines differ (the lines through the origin with slope 0, 1 or the leaky
    slope are exact: ``lower=False`` leaves the lower ones)."""
    open_ = (aL != aU) | (bL != bU)
    big = torch.maximum(l.abs(), u.abs())
    bU = torch.where(open_, bU + 1e-12 * (aU.abs() * big + bU.abs()), bU)
    if lower:
        bL = torch.where(open_, bL - 1e-12 * (aL.abs() * big + bL.abs()), bL)
    return aL, bL, aU, bU


# -- max pooling -------------------------------------------------------------------------------------


def _pool_geometry(pool, shape):
    """Unfold arguments of a (2-d or stored 1-d) max pooling on per-example ``shape``."""
    if pool.one_d:
        c, w = shape
        return c, 1, w, (1, pool.kernel[-1]), (1, pool.stride[-1]), (0, pool.padding[-1]), (1, pool.dilation[-1])
    c, h, w = shape
    return c, h, w, tuple(pool.kernel), tuple(pool.stride), tuple(pool.padding), tuple(pool.dilation)


def _windows(t: torch.Tensor, pool, shape, out_hw, fill: float):
    """``(B, C, K, L)`` window entries of ``t`` (``(B, *shape)``), padded with ``fill``."""
    c, h, w, k, s, p, d = _pool_geometry(pool, shape)
    B = t.shape[0]
    x = t.reshape(B * c, 1, h, w)
    oh, ow = out_hw
    need_h = (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1
    need_w = (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1
    ph_extra = max(0, need_h - (h + 2 * p[0]))
    pw_extra = max(0, need_w - (w + 2 * p[1]))
    x = F.pad(x, (p[1], p[1] + pw_extra, p[0], p[0] + ph_extra), value=fill)
    cols = F.unfold(x, k, dilation=d, stride=s)  # (B*C, K, L')
    cols = cols[:, :, : oh * ow]
    return cols.reshape(B, c, cols.shape[1], oh * ow)


def pool_relaxation(pool, shape, out_shape, l, u):
    """Per output: the flat index (into one channel) of the selected entry, whether it dominates its
    window, and the window's upper bound."""
    c, h, w, *_ = _pool_geometry(pool, shape)
    oh, ow = (1, out_shape[-1]) if pool.one_d else (out_shape[-2], out_shape[-1])
    B = l.shape[0]
    idx_map = torch.arange(h * w, device=l.device, dtype=torch.float64).reshape(1, h, w).expand(B, c, h, w)
    li = _windows(l, pool, shape, (oh, ow), -math.inf)
    ui = _windows(u, pool, shape, (oh, ow), -math.inf)
    ii = _windows(idx_map.reshape(B, *shape), pool, shape, (oh, ow), -1.0)
    best = li.argmax(2, keepdim=True)  # (B, C, 1, L)
    sel_idx = ii.gather(2, best).squeeze(2).long()
    sel_l = li.gather(2, best).squeeze(2)
    others = ui.scatter(2, best, -math.inf).amax(2)
    dom = sel_l >= others
    U = ui.amax(2)
    return sel_idx, dom, U


# -- the backward walk -------------------------------------------------------------------------------


# -- MinMax (GroupSort over channel pairs) ------------------------------------------------------------


def pair_difference_bounds(l: torch.Tensor, u: torch.Tensor):
    """Bounds ``(B, c/2, *spatial)`` of ``v[2k] - v[2k+1]`` from the unit intervals ``(B, c, *spatial)``."""
    B, c = l.shape[0], l.shape[1]
    lp = l.reshape(B, c // 2, 2, *l.shape[2:])
    up = u.reshape(B, c // 2, 2, *u.shape[2:])
    dl, du = lp[:, :, 0] - up[:, :, 1], up[:, :, 0] - lp[:, :, 1]
    w = 1e-15 * (lp.abs().amax(2) + up.abs().amax(2))  # the subtraction's rounding, outwards
    return dl - w, du + w


def relaxation_relu(l: torch.Tensor, u: torch.Tensor):
    """The ReLU triangle on ``[l, u]`` (MinMax's ``max(a, b) = b + relu(a - b)``)."""
    return _relu_relaxation(l, u)
