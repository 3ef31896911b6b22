"""Targeted fast adaptive boundary attack (FAB-T): minimum-norm adversarial points.

Our own implementation of the algorithm of Croce and Hein (ICML 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), in its targeted form (one run per target class, as
AutoAttack runs it).  At the current point ``x_k`` the boundary between the label ``y`` and the target
``t`` is linearised,

    pi_k = { z : g_k . (z - x_k) + (f_t - f_y)(x_k) = 0 },     g_k = grad (f_t - f_y)(x_k),

and both ``x_k`` and the original input ``x_0`` are projected onto ``pi_k ∩ box`` (the minimum-norm
``d`` with ``g . d = c`` and ``lo - z <= d <= hi - z``, see :func:`project_hyperplane_box`).  The step
is a convex combination biased towards the original point,

    x_{k+1} = clip( (1 - a)(x_k + eta d_k) + a (x_0 + eta d_0) ),   a = min(|d_k| / (|d_k| + |d_0|), a_max),

with the overshoot ``eta = 1.05`` and ``a_max = 0.1``; after a step that is adversarial the iterate moves
back towards ``x_0``: ``x_{k+1} <- (1 - beta) x_0 + beta x_{k+1}``, ``beta = 0.9``, and is linearised
again there.  The closest
adversarial point seen is kept.  On piecewise-linear (ReLU) networks the linearisation is exact inside
each linear region, which is why FAB finds smaller perturbations than gradient-sign methods there.

Projection onto a hyperplane inside a box
-----------------------------------------
``min ||d||_p  s.t.  g . d = c,  l <= d <= u`` with ``l <= 0 <= u``.  With ``s = sign(c)``:

* l2 (KKT): ``d(lam) = clip(lam s g, l, u)``, ``lam >= 0``;
* l-inf: ``d(tau) = clip(tau s sign(g), l, u)``, ``tau >= 0``;

in both ``h(lam) = s g . d(lam)`` is continuous, non-decreasing and piecewise linear, so the ``lam``
with ``h(lam) = |c|`` is found exactly by sorting the kinks.  When ``|c|`` exceeds ``sup h`` (the box does not
reach the hyperplane) the saturated point is returned, the closest the box gets.

Warnings
--------
Points are judged in the forward's precision here; :func:`lipverify.attacks.minnorm.min_norm_radius`
re-checks them in float64.  A targeted run only looks for the boundary with its own target class.
"""

from __future__ import annotations

import math

import torch

from lipverify.attacks.core import (
    Forward,
    flat_norm,
    grad_of,
    logits_of,
    margin_loss,
    random_in_ball,
)

__all__ = ["fab_targeted", "project_hyperplane_box"]


def project_hyperplane_box(g: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, norm: str
                           ) -> torch.Tensor:
    """Minimum-norm ``d`` (rows of ``(R, n)``) with ``g . d = c`` and ``lo <= d <= hi`` (see the module
    docstring).  All tensors float64; ``lo <= 0 <= hi`` may hold infinities.

    Exact, by sorting: with ``s = sign(c)`` and ``b_i`` the room coordinate ``i`` has in the direction
    it moves (``hi_i`` where ``s g_i > 0``, else ``-lo_i``), ``h(lam) = sum_i a_i min(lam, beta_i)`` with
    ``a_i = g_i^2, beta_i = b_i / |g_i|`` (l2) or ``a_i = |g_i|, beta_i = b_i`` (l-inf).  ``h`` is
    piecewise linear with its kinks at the sorted ``beta``; the first kink where ``h >= |c|`` fixes
    ``lam = (|c| - sum_{j<k} a_j beta_j) / sum_{j>=k} a_j``.
    """
    s = torch.sign(c).unsqueeze(1)
    sg = s * g
    room = torch.where(sg > 0, hi, -lo)                       # >= 0, possibly inf
    ag = g.abs()
    nz = ag > 0
    if norm == "2":
        a = g * g
        beta = torch.where(nz, room / ag.clamp_min(1e-300), torch.full_like(room, math.inf))
        dirn = sg
    else:
        a = ag
        beta = torch.where(nz, room, torch.full_like(room, math.inf))
        dirn = s * torch.sign(g)
    target = c.abs().unsqueeze(1)
    beta_s, order = beta.sort(dim=1)
    a_s = a.gather(1, order)
    ab = torch.where(a_s > 0, a_s * beta_s, torch.zeros_like(a_s))
    ab = torch.where(torch.isfinite(ab), ab, torch.zeros_like(ab))
    c_excl = torch.cumsum(ab, dim=1) - ab                     # sum_{j<k} a_j beta_j (finite kinks only)
    a_rest = torch.flip(torch.cumsum(torch.flip(a_s, [1]), dim=1), [1])   # sum_{j>=k} a_j
    h_k = c_excl + beta_s * a_rest
    h_k = torch.where(torch.isinf(beta_s), torch.where(a_rest > 0, torch.full_like(h_k, math.inf), c_excl), h_k)
    reach = h_k >= target
    any_reach = reach.any(dim=1, keepdim=True)
    k = reach.to(torch.int8).argmax(dim=1, keepdim=True)
    lam = (target - c_excl.gather(1, k)) / a_rest.gather(1, k).clamp_min(1e-300)
    lam = torch.where(any_reach, lam, torch.full_like(lam, math.inf))
    step = torch.where(dirn != 0, lam * dirn, torch.zeros_like(dirn))
    d = torch.maximum(torch.minimum(step, hi), lo)
    return torch.where((c == 0).unsqueeze(1), torch.zeros_like(d), d)


def _box_bounds(clip, z: torch.Tensor):
    """``(lo - z, hi - z)`` flattened, float64 (infinite without a box)."""
    z64 = z.flatten(1).to(torch.float64)
    if clip is None:
        inf = torch.full_like(z64, float("inf"))
        return -inf, inf
    lo, hi = clip
    if isinstance(lo, torch.Tensor):
        lo = lo.to(torch.float64).expand_as(z).flatten(1)
        hi = hi.to(torch.float64).expand_as(z).flatten(1)
    return lo - z64, hi - z64


def _to_box(z: torch.Tensor, clip) -> torch.Tensor:
    if clip is None:
        return z
    lo, hi = clip
    if isinstance(lo, torch.Tensor):
        return torch.maximum(torch.minimum(z, hi.to(z.dtype)), lo.to(z.dtype))
    return z.clamp(lo, hi)


def fab_targeted(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    *,
    norm: str,
    clip=None,
    steps: int = 100,
    restarts: int = 1,
    eta: float = 1.05,
    beta: float = 0.9,
    alpha_max: float = 0.1,
    start_radius=None,
    generator: torch.Generator | None = None,
):
    """FAB-T for one target per row.  Returns ``(radius, x_adv)``, ``radius`` float64 (``inf`` where
    nothing adversarial was seen; ``x_adv = x`` there).

    ``restarts > 1`` starts later runs at random points of the ball of radius ``start_radius`` (per row;
    default half the best radius found so far, or skipped where nothing was found).
    """
    R = x.shape[0]
    shape = x.shape
    x0 = x.detach()
    x0f = x0.flatten(1).to(torch.float64)
    best_r = torch.full((R,), float("inf"), dtype=torch.float64, device=x.device)
    best_x = x0.clone()
    lo0, hi0 = _box_bounds(clip, x0)
    for rs in range(max(restarts, 1)):
        if rs == 0:
            xk = x0.clone()
        else:
            rad = best_r / 2 if start_radius is None else torch.as_tensor(start_radius, dtype=torch.float64,
                                                                          device=x.device).expand(R)
            rad = torch.where(torch.isfinite(rad), rad, torch.zeros_like(rad))
            if not bool((rad > 0).any()):
                break
            xk = _to_box(x0 + random_in_ball(x0, rad, norm, generator), clip)
        def lin(z_in, tt, yy):
            """Forward at z: (margin, f_t - f_y, its gradient)."""
            z_in = z_in.detach().requires_grad_(True)
            with torch.enable_grad():
                lg = logits_of(forward, z_in)
                diff = lg.gather(1, tt.reshape(-1, 1)).squeeze(1) - lg.gather(1, yy.reshape(-1, 1)).squeeze(1)
                gr = grad_of(diff, z_in)
            return (-margin_loss(lg.detach(), yy)).to(torch.float64), diff.detach().to(torch.float64), gr

        marg, fd, g = lin(xk, t, y)
        for _ in range(steps):
            with torch.no_grad():
                r = flat_norm(xk.to(torch.float64) - x0.to(torch.float64), norm)
                adv_now = marg <= 0
                better = adv_now & (r < best_r)
                best_r = torch.where(better, r, best_r)
                best_x[better] = xk[better]
            if adv_now.any():
                # backward step towards x_0 from an adversarial point, linearised afresh there
                ai = adv_now.nonzero().reshape(-1)
                xk = xk.clone()
                xk[ai] = ((1 - beta) * x0[ai].to(torch.float64) + beta * xk[ai].to(torch.float64)).to(x.dtype)
                m_a, fd_a, g_a = lin(xk[ai], t[ai], y[ai])
                marg, fd, g = marg.clone(), fd.clone(), g.clone()
                marg[ai], fd[ai], g[ai] = m_a, fd_a, g_a
            with torch.no_grad():
                g64 = g.flatten(1).to(torch.float64)
                xkf = xk.flatten(1).to(torch.float64)
                lo_k, hi_k = _box_bounds(clip, xk)
                d_k = project_hyperplane_box(g64, -fd, lo_k, hi_k, norm)
                c0 = -(fd + (g64 * (x0f - xkf)).sum(1))
                d_0 = project_hyperplane_box(g64, c0, lo0, hi0, norm)
                nk = flat_norm(d_k, norm)
                n0 = flat_norm(d_0, norm)
                a = (nk / (nk + n0).clamp_min(1e-300)).clamp(0, alpha_max).unsqueeze(1)
                nxt = (1 - a) * (xkf + eta * d_k) + a * (x0f + eta * d_0)
                xk = _to_box(nxt.to(x.dtype).reshape(shape), clip)
            marg, fd, g = lin(xk, t, y)
        with torch.no_grad():
            r = flat_norm(xk.to(torch.float64) - x0.to(torch.float64), norm)
            better = (marg <= 0) & (r < best_r)
            best_r = torch.where(better, r, best_r)
            best_x[better] = xk[better]
    return best_r, best_x
