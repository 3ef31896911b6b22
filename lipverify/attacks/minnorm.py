"""Minimum-norm adversarial examples: an empirical *upper* bound on each input's robust radius.

For input ``x`` with label ``y`` the true robust radius is

    r_true(x) = inf { ||x' - x||_p : x' in clip box, max_{i != y} f_i(x') >= f_y(x') }.

Any checked adversarial point ``x'`` gives ``r_adv(x) = ||x' - x||_p >= r_true(x)``, so this module
returns upper bounds only, to be compared with certified radii (``r_cert <= r_true <= r_adv``).

Two searches, both using only the forward pass (and autograd through it):

* ``"bisection"``: bisection over ``eps`` with PGD (:func:`lipverify.attacks.pgd.pgd_attack`).  An upper
  bracket is found by doubling a first-order guess ``(f_y - f_k) / ||grad (f_y - f_k)||_q`` (the
  distance to the linearised boundary, q the dual norm); then each bisection step runs PGD at the
  midpoint.  A success moves the upper end down to the *measured* norm of the adversarial point found
  (it can be smaller than the midpoint); a failure moves the lower end up (heuristically: a failed attack
  is not a proof).
* ``"fmn"``: a fast-minimum-norm style attack (Pintor et al., 2021).  One trajectory ``delta_k`` with an
  adaptive radius ``eps_k``: gradient steps that decrease the margin ``f_y - max_{i != y} f_i`` followed by
  projection onto ``{||delta||_p <= eps_k}`` and the box, where

      adversarial now:           eps_k = min(eps_{k-1} (1 - gamma_k), best adversarial norm so far)
      not adversarial, none yet: eps_k = ||delta_k|| + margin / ||grad margin||_q   (linearised boundary)
      not adversarial, found:    eps_k = eps_{k-1} (1 + gamma_k)

  ``gamma_k`` and the step length (relative to ``eps_k``; l2: normalised gradient, l-inf: sign of the
  gradient) decay with a cosine schedule.  The linearised estimate overshoots by ``(1 + gamma_k)`` so
  that a flat boundary is crossed rather than approached forever from the robust side.  Besides the
  untargeted trajectory, by default two targeted ones run in the same batch (margin ``f_y - f_t`` for
  the two classes with the nearest linearised boundary at ``x``), because descent on ``f_y - max f_i``
  can lock onto the runner-up class while another class is closer.  This is our own rendering of the
  published algorithm, not the authors' code.
* ``"auto"``: FMN first, then a short PGD bisection *below* the FMN radius; the per-example minimum.

Every method finishes with a line search along the segment from ``x`` to the best point (the smallest
checked adversarial ``x + t (x_adv - x)``, t in (0, 1]), and a final verification: ``forward(x_adv)`` is
re-run and ``radius = ||x_adv - x||_p`` is recomputed in float64 from the returned tensor.  Points that
fail verification are dropped (radius ``inf``).

References
----------
M. Pintor, F. Roli, W. Brendel, B. Biggio. "Fast Minimum-norm Adversarial Attacks through Adaptive
Norm Constraints." NeurIPS 2021.
A. Madry et al. "Towards Deep Learning Models Resistant to Adversarial Attacks." ICLR 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipverify.attacks.pgd import (
    Forward,
    _apply_clip,
    _bcast,
    _check_clip,
    _prepare,
    _check_norm,
    _flat_dual_norm,
    _flat_norm,
    _logits,
    _margin,
    _project_ball,
    _ranked_targets,
    margin_loss,
    pgd_attack,
)

__all__ = ["MinNormResult", "min_norm_radius", "fmn_attack", "bisection_attack"]


@dataclass
class MinNormResult:
    """Outcome of :func:`min_norm_radius`.

    Attributes
    ----------
    radius:
        ``(B,)`` float64: ``||x_adv - x||_p`` of a checked adversarial point, 0 for inputs misclassified
        at ``x``, ``inf`` where no adversarial point was found (within ``max_eps``).
    x_adv:
        ``(B, *input_shape)``: the adversarial points (``x`` where none was found).
    method:
        ``"fmn"``, ``"bisection"`` or ``"auto"``.
    found_by:
        Per-example list naming the search that produced the reported point (``"clean"``, ``"fmn"``,
        ``"bisection"``, or ``"none"``).
    """

    radius: torch.Tensor
    x_adv: torch.Tensor
    method: str
    found_by: list


def _cosine(start: float, end: float, k: int, total: int) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * k / max(total, 1)))


def _delta_norm64(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    return _flat_norm(x_adv.to(torch.float64) - x.to(torch.float64), norm)


def _first_order_radius(forward: Forward, x, y, norm: str) -> torch.Tensor:
    """Distance to the linearised decision boundary, ``min_k (f_y - f_k) / ||grad(f_y - f_k)||_q``.

    Only the runner-up class is used (cheap); the value seeds the eps search and is not a bound.
    """
    xt = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        marg = -margin_loss(_logits(forward, xt), y)
    (g,) = torch.autograd.grad(marg.sum(), xt)
    gq = _flat_dual_norm(g, norm).to(torch.float64)
    r = marg.detach().to(torch.float64).clamp_min(0) / gq.clamp_min(1e-12)
    return r


def fmn_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "2",
    steps: int = 200,
    clip=None,
    max_eps=None,
    targets: int | None = 2,
    alpha0: float = 1.0,
    alpha_final: float | None = None,
    gamma0: float = 0.05,
    gamma_final: float = 0.001,
    init_scale: float = 1.0,
):
    """Fast-minimum-norm style search (see the module docstring).  Returns ``(radius, x_adv)``.

    ``radius`` is float64 (``inf`` where no adversarial point was seen); ``x_adv`` equals ``x`` there.
    Points are checked adversarial (untargeted: label no longer the unique argmax) by the forward pass
    that produced them; :func:`min_norm_radius` re-verifies.

    Parameters beyond :func:`min_norm_radius`'s:

    targets:
        Besides one trajectory on the untargeted margin ``f_y - max_{i != y} f_i``, run ``targets``
        trajectories on ``f_y - f_t`` for the classes ``t`` nearest by linearised boundary distance at
        ``x`` (all batched together; the per-example minimum is kept).  ``0`` gives the plain untargeted
        attack; ``None`` all ``m - 1`` classes.  Descent on the untargeted margin can lock onto the
        runner-up class when another class's boundary is nearer, even for an affine model.
    alpha0, alpha_final:
        Step length relative to the current radius ``eps_k`` (l2: ``alpha * eps_k * g / ||g||_2``;
        l-inf: ``alpha * eps_k * sign(g)``), cosine-decayed from ``alpha0`` to ``alpha_final``
        (default ``alpha0 / 100``).
    gamma0, gamma_final:
        Radius growth/shrink factor, cosine-decayed.
    init_scale:
        Step length used while ``eps_k`` is undefined (only when the gradient vanishes).
    """
    norm = _check_norm(norm)
    x = x.detach()
    B = x.shape[0]
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    clip = _check_clip(clip, x)
    if alpha_final is None:
        alpha_final = alpha0 / 100
    cap = math.inf if max_eps is None else float(max_eps)

    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_x = x.clone()
    m0 = _margin(forward, x, y)
    clean_bad = m0 <= 0
    best_r[clean_bad] = 0.0
    todo = (~clean_bad).nonzero().reshape(-1)
    if todo.numel() == 0 or steps <= 0:
        return best_r, best_x

    # rows: (example, target) with target -1 meaning untargeted
    with torch.no_grad():
        m_cls = _logits(forward, x[:1]).shape[1]
    k = (m_cls - 1) if targets is None else max(0, min(int(targets), m_cls - 1))
    tgt_cols = [torch.full((todo.numel(),), -1, dtype=torch.long, device=x.device)]
    if k > 0:
        ranked = _ranked_targets(forward, x[todo], y[todo], norm, max_candidates=max(k, 10))[:, :k]
        tgt_cols += [ranked[:, j] for j in range(k)]
    R = len(tgt_cols)
    idx = todo.repeat_interleave(R)                       # example index of each row
    tgt = torch.stack(tgt_cols, dim=1).reshape(-1)        # target of each row (-1: untargeted)
    xa, ya = x[idx], y[idx]
    delta = torch.zeros_like(xa)
    eps = torch.full((idx.numel(),), math.inf, dtype=torch.float64, device=x.device)
    row_best = torch.full((idx.numel(),), math.inf, dtype=torch.float64, device=x.device)
    row_x = xa.clone()
    targeted = tgt >= 0
    tsafe = tgt.clamp_min(0).reshape(-1, 1)

    for it in range(steps + 1):
        xt = (xa + delta).detach().requires_grad_(True)
        with torch.enable_grad():
            lg = _logits(forward, xt)
            unt = -margin_loss(lg, ya)                      # f_y - max_other
            fy = lg.gather(1, ya.reshape(-1, 1)).squeeze(1)
            tmarg = fy - lg.gather(1, tsafe).squeeze(1)     # f_y - f_t
            obj = torch.where(targeted, tmarg, unt)
        m_unt = unt.detach().to(torch.float64)
        dn = _delta_norm64(xt.detach(), xa, norm)
        is_adv = m_unt <= 0
        better = is_adv & (dn < row_best) & (dn <= cap)
        if better.any():
            row_best[better] = dn[better]
            row_x[better] = xt.detach()[better]
        if it == steps:
            break
        (g,) = torch.autograd.grad(obj.sum(), xt)
        with torch.no_grad():
            m_obj = obj.detach().to(torch.float64)
            gamma = _cosine(gamma0, gamma_final, it, steps)
            alpha = _cosine(alpha0, alpha_final, it, steps)
            gq = _flat_dual_norm(g, norm).to(torch.float64)
            found = torch.isfinite(row_best)
            # linearised distance to the boundary, with a small overshoot so that an exactly linear
            # boundary is crossed instead of approached from the robust side forever
            lin = (dn + m_obj.clamp_min(0) / gq.clamp_min(1e-30)) * (1 + gamma)
            lin = torch.where(gq > 0, lin, torch.full_like(lin, math.inf))
            eps = torch.where(
                is_adv,
                torch.minimum(eps * (1 - gamma), row_best),
                torch.where(found, eps * (1 + gamma), lin),
            )
            eps = eps.clamp_max(cap)
            base = torch.where(torch.isfinite(eps), eps, torch.full_like(eps, init_scale))
            a = _bcast((alpha * base).to(x.dtype), delta)
            if norm == "2":
                gn = _flat_norm(g, "2").clamp_min(torch.finfo(g.dtype).tiny)
                delta = delta - a * g / _bcast(gn, g)
            else:
                delta = delta - a * g.sign()
            finite = torch.isfinite(eps)
            if finite.any():
                e = torch.where(finite, eps, torch.zeros_like(eps))
                proj = _project_ball(delta, e, norm)
                delta = torch.where(_bcast(finite, delta), proj, delta)
            delta = _apply_clip(xa + delta, clip) - xa

    rb = row_best.reshape(-1, R)
    j = rb.argmin(dim=1)
    rows = torch.arange(todo.numel(), device=x.device) * R + j
    ok = torch.isfinite(row_best[rows])
    best_r[todo[ok]] = row_best[rows[ok]]
    best_x[todo[ok]] = row_x[rows[ok]]
    return best_r, best_x


def bisection_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "2",
    steps: int = 100,
    restarts: int = 1,
    iters: int = 12,
    clip=None,
    max_eps=None,
    hi=None,
    x_hi=None,
    generator=None,
    rtol: float = 1e-3,
):
    """Bisection over eps with PGD (see the module docstring).  Returns ``(radius, x_adv)``.

    ``hi``/``x_hi`` optionally give a known verified adversarial radius and point per example (e.g. from
    FMN); the search then only looks below it.  ``iters`` bisection steps follow the bracket search;
    an example stops when its bracket is within ``rtol`` relative width.
    """
    norm = _check_norm(norm)
    x = x.detach()
    B = x.shape[0]
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    clip = _check_clip(clip, x)
    cap = math.inf if max_eps is None else float(max_eps)
    if clip is not None:
        span = clip[1] - clip[0]
        diam = span * math.sqrt(x[0].numel()) if norm == "2" else span
        cap = min(cap, diam)

    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_x = x.clone()
    if hi is not None:
        best_r = torch.as_tensor(hi, dtype=torch.float64, device=x.device).clone().reshape(-1)
        best_x = x_hi.detach().clone()
    m0 = _margin(forward, x, y)
    clean_bad = m0 <= 0
    best_r[clean_bad] = 0.0
    best_x[clean_bad] = x[clean_bad]
    lo = torch.zeros(B, dtype=torch.float64, device=x.device)

    def run(sel: torch.Tensor, e: torch.Tensor):
        res = pgd_attack(forward, x[sel], y[sel], e, norm=norm, steps=steps, restarts=restarts,
                         clip=clip, generator=generator)
        r = _delta_norm64(res.x_adv, x[sel], norm)
        ok = res.success & (r < best_r[sel]) & (r <= cap)
        best_r[sel[ok]] = r[ok]
        best_x[sel[ok]] = res.x_adv[ok]
        return res.success

    # bracket: double a first-order guess until PGD succeeds (or the cap is reached)
    need = ~torch.isfinite(best_r)
    if need.any():
        sel = need.nonzero().reshape(-1)
        cur = _first_order_radius(forward, x[sel], y[sel], norm)
        cur = torch.where(cur > 0, cur, torch.full_like(cur, 1e-3))
        cur = cur.clamp_max(cap)
        for _ in range(40):
            if sel.numel() == 0:
                break
            succ = run(sel, cur)
            fail = ~succ
            lo[sel[fail]] = cur[fail]
            at_cap = cur >= cap
            nxt = fail & ~at_cap
            sel, cur = sel[nxt], (cur[nxt] * 2).clamp_max(cap)

    for _ in range(iters):
        active = torch.isfinite(best_r) & (best_r > 0) & (best_r - lo > rtol * best_r)
        if not active.any():
            break
        sel = active.nonzero().reshape(-1)
        mid = (lo[sel] + best_r[sel]) / 2
        succ = run(sel, mid)
        lo[sel[~succ]] = torch.maximum(lo[sel[~succ]], mid[~succ])
    return best_r, best_x


def _line_search(forward: Forward, x, y, x_adv, radius, norm: str, iters: int = 20):
    """Shrink each adversarial point towards x along the segment; keep only checked points."""
    sel = (torch.isfinite(radius) & (radius > 0)).nonzero().reshape(-1)
    if sel.numel() == 0:
        return radius, x_adv
    radius, x_adv = radius.clone(), x_adv.clone()
    xs, ys, d = x[sel], y[sel], x_adv[sel] - x[sel]
    lo = torch.zeros(sel.numel(), dtype=torch.float64, device=x.device)
    hi = torch.ones_like(lo)
    for _ in range(iters):
        t = (lo + hi) / 2
        z = xs + _bcast(t.to(x.dtype), d) * d
        adv = _margin(forward, z, ys) <= 0
        r = _delta_norm64(z, xs, norm)
        ok = adv & (r < radius[sel])
        if ok.any():
            radius[sel[ok]] = r[ok]
            x_adv[sel[ok]] = z[ok]
        hi = torch.where(adv, t, hi)
        lo = torch.where(adv, lo, t)
    return radius, x_adv


def min_norm_radius(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "2",
    clip=None,
    max_eps=None,
    method: str = "auto",
    steps: int | None = None,
    restarts: int = 2,
    bisection_iters: int | None = None,
    generator: torch.Generator | None = None,
) -> MinNormResult:
    """Smallest adversarial perturbation found per example (an upper bound on the robust radius).

    Parameters
    ----------
    forward:
        Callable ``(B, *input_shape) -> (B, m)`` logits; rows processed independently (eval mode).
    x, y:
        Inputs (their device/dtype is used throughout) and integer labels.
    norm:
        ``"2"`` or ``"inf"``.
    clip:
        ``None`` or the input box ``(lo, hi)``; adversarial points stay inside it.
    max_eps:
        Only adversarial points with ``||x_adv - x||_p <= max_eps`` count; others give ``inf``.
    method:
        ``"fmn"``, ``"bisection"`` or ``"auto"`` (FMN, then a short PGD bisection below the FMN radius;
        the per-example minimum).
    steps:
        FMN iterations (``"fmn"``, default 300), or PGD steps per bisection stage (``"bisection"``,
        default 100).  ``"auto"`` uses ``steps`` (default 300) for FMN and ``max(steps // 6, 20)`` PGD steps.
    restarts:
        PGD restarts per bisection stage (default 2: untargeted from x, then targeted at the class with
        the nearest linearised boundary; see :func:`pgd_attack`).
    bisection_iters:
        Bisection steps after the bracket search (default 12 for "bisection", 6 for "auto").
    generator:
        ``torch.Generator`` for PGD's random restarts.

    Returns
    -------
    MinNormResult
        ``radius`` float64 ``(B,)``: the exact norm (recomputed in float64 from the returned tensor) of a
        point whose adversariality was re-checked by a forward pass; 0 for clean misclassified inputs;
        ``inf`` when nothing was found.

    Warnings
    --------
    These radii are *upper* bounds on the true robust radius: a smaller adversarial example may exist.
    They never prove robustness.  A certified radius larger than the radius returned here is a bug in
    the certifier (or a forward pass that differs from the one certified).  With a float32 forward, the
    adversarial check is a float32 computation (a point at a numerical tie counts as adversarial).
    """
    norm = _check_norm(norm)
    if method not in ("auto", "fmn", "bisection"):
        raise ValueError(f"method must be 'auto', 'fmn' or 'bisection', got {method!r}")
    x, y, B, clip = _prepare(x, y, clip)

    if method == "fmn":
        r, xa = fmn_attack(forward, x, y, norm=norm, steps=300 if steps is None else steps, clip=clip,
                           max_eps=max_eps)
        src = ["fmn"] * B
    elif method == "bisection":
        r, xa = bisection_attack(forward, x, y, norm=norm, steps=100 if steps is None else steps,
                                 restarts=restarts, iters=12 if bisection_iters is None else bisection_iters,
                                 clip=clip, max_eps=max_eps, generator=generator)
        src = ["bisection"] * B
    else:
        fsteps = 300 if steps is None else steps
        r_f, x_f = fmn_attack(forward, x, y, norm=norm, steps=fsteps, clip=clip, max_eps=max_eps)
        r_f, x_f = _line_search(forward, x, y, x_f, r_f, norm)
        r, xa = bisection_attack(forward, x, y, norm=norm, steps=max(fsteps // 6, 20), restarts=restarts,
                                 iters=6 if bisection_iters is None else bisection_iters, clip=clip,
                                 max_eps=max_eps, hi=r_f, x_hi=x_f, generator=generator)
        src = ["bisection" if float(a) < float(b) else "fmn" for a, b in zip(r.tolist(), r_f.tolist())]

    r, xa = _line_search(forward, x, y, xa, r, norm)

    # final verification: re-run forward, recompute the norm in float64 from the returned tensor
    m = _margin(forward, x, y)
    clean_bad = m <= 0
    adv = _margin(forward, xa, y) <= 0
    radius = _delta_norm64(xa, x, norm)
    ok = adv & torch.isfinite(r)
    if max_eps is not None:
        ok &= radius <= float(max_eps)
    radius = torch.where(ok, radius, torch.full_like(radius, math.inf))
    xa = torch.where(_bcast(ok, xa), xa, x)
    radius[clean_bad] = 0.0
    xa[clean_bad] = x[clean_bad]
    found_by = ["clean" if bool(c) else (s if bool(o) else "none")
                for c, s, o in zip(clean_bad.tolist(), src, ok.tolist())]
    return MinNormResult(radius=radius, x_adv=xa, method=method, found_by=found_by)
