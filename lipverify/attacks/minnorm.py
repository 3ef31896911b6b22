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
* ``"fab"``: targeted fast adaptive boundary (:mod:`lipverify.attacks.fab`) on the nearest classes.
* ``"auto"`` (default): the escalation of :func:`min_norm_radius` — FMN, FAB-T, PGD bisection below the
  best radius (and a bracket search where nothing was found yet), then a search of the box itself; the
  per-example minimum.

Every candidate is refined along the segment from ``x`` (the smallest genuine ``x + t (x_adv - x)``,
``t in (0, 1]``) and judged in float64 by :class:`lipverify.attacks.verify.Judge`: the returned point is
inside the box and strictly misclassified by the float64 model, and the radius is its float64 norm.
Float32 ties are pushed outward along the segment until they are genuine; what cannot be made genuine
is dropped (radius ``inf``).

References
----------
M. Pintor, F. Roli, W. Brendel, B. Biggio. "Fast Minimum-norm Adversarial Attacks through Adaptive
Norm Constraints." NeurIPS 2021.
A. Madry et al. "Towards Deep Learning Models Resistant to Adversarial Attacks." ICLR 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipverify.attacks.core import (
    Forward,
    clip_rows,
    apply_clip,
    bcast,
    check_clip,
    check_norm,
    flat_dual_norm,
    flat_norm,
    grad_of,
    logits_of,
    margin_loss,
    margin_of,
    prepare,
    project_ball,
    rand_like_gen,
    randn_like_gen,
    ranked_targets,
)
from lipverify.attacks.ddn import ddn_attack
from lipverify.attacks.fab import fab_targeted
from lipverify.attacks.pgd import pgd_attack
from lipverify.attacks.strength import STRENGTHS, Strength, get_strength
from lipverify.attacks.verify import Judge

__all__ = ["MinNormResult", "bisection_attack", "box_search", "fmn_attack", "min_norm_radius",
           "refine_along_segment"]


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
        Per-example list naming the attack that produced the reported point (``"clean"``, ``"fmn"``,
        ``"fab-t"``, ``"ddn"``, ``"pgd-bisection"``, ``"box-search"``, or ``"none"``).
    tried:
        The attacks that ran, with their effort (what "none" means).
    precision:
        The arithmetic the points were judged in (``"float64"`` unless the forward cannot run in it).
    """

    radius: torch.Tensor
    x_adv: torch.Tensor
    method: str
    found_by: list
    tried: list = field(default_factory=list)
    precision: str = "float64"


def _cosine(start: float, end: float, k: int, total: int) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * k / max(total, 1)))


def _delta_norm64(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    return flat_norm(x_adv.to(torch.float64) - x.to(torch.float64), norm)


def _first_order_radius(forward: Forward, x, y, norm: str) -> torch.Tensor:
    """Distance to the linearised decision boundary, ``min_k (f_y - f_k) / ||grad(f_y - f_k)||_q``.

    Only the runner-up class is used (cheap); the value seeds the eps search and is not a bound.
    """
    xt = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        marg = -margin_loss(logits_of(forward, xt), y)
    g = grad_of(marg, xt)
    gq = flat_dual_norm(g, norm).to(torch.float64)
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
    absolute_step: float | None = None,
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
    absolute_step:
        If given, the published algorithm's step instead: ``alpha_k g / ||g||_2`` with ``alpha_k``
        cosine-decayed from ``absolute_step`` to 1/100 of it, for either norm (followed by the same
        projection).  For l-inf this direction explores differently from the sign step, and the
        minimum-norm search runs both.
    """
    norm = check_norm(norm)
    x = x.detach()
    B = x.shape[0]
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    clip = check_clip(clip, x)
    if alpha_final is None:
        alpha_final = alpha0 / 100
    cap = math.inf if max_eps is None else float(max_eps)

    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_x = x.clone()
    m0 = margin_of(forward, x, y)
    clean_bad = m0 <= 0
    best_r[clean_bad] = 0.0
    todo = (~clean_bad).nonzero().reshape(-1)
    if todo.numel() == 0 or steps <= 0:
        return best_r, best_x

    # rows: (example, target) with target -1 meaning untargeted
    with torch.no_grad():
        m_cls = logits_of(forward, x[:1]).shape[1]
    k = (m_cls - 1) if targets is None else max(0, min(int(targets), m_cls - 1))
    tgt_cols = [torch.full((todo.numel(),), -1, dtype=torch.long, device=x.device)]
    if k > 0:
        ranked = ranked_targets(forward, x[todo], y[todo], norm, max_candidates=max(k, 10))[:, :k]
        tgt_cols += [ranked[:, j] for j in range(k)]
    R = len(tgt_cols)
    idx = todo.repeat_interleave(R)                       # example index of each row
    tgt = torch.stack(tgt_cols, dim=1).reshape(-1)        # target of each row (-1: untargeted)
    xa, ya = x[idx], y[idx]
    clip = clip_rows(clip, idx, x.dim())
    delta = torch.zeros_like(xa)
    eps = torch.full((idx.numel(),), math.inf, dtype=torch.float64, device=x.device)
    row_best = torch.full((idx.numel(),), math.inf, dtype=torch.float64, device=x.device)
    row_x = xa.clone()
    targeted = tgt >= 0
    tsafe = tgt.clamp_min(0).reshape(-1, 1)

    for it in range(steps + 1):
        xt = (xa + delta).detach().requires_grad_(True)
        with torch.enable_grad():
            lg = logits_of(forward, xt)
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
        g = grad_of(obj, xt)
        with torch.no_grad():
            m_obj = obj.detach().to(torch.float64)
            gamma = _cosine(gamma0, gamma_final, it, steps)
            alpha = _cosine(alpha0, alpha_final, it, steps)
            gq = flat_dual_norm(g, norm).to(torch.float64)
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
            a = bcast((alpha * base).to(x.dtype), delta)
            if absolute_step is not None:
                a_abs = _cosine(absolute_step, absolute_step / 100, it, steps)
                gn = flat_norm(g, "2").clamp_min(torch.finfo(g.dtype).tiny)
                delta = delta - a_abs * g / bcast(gn, g)
            elif norm == "2":
                gn = flat_norm(g, "2").clamp_min(torch.finfo(g.dtype).tiny)
                delta = delta - a * g / bcast(gn, g)
            else:
                delta = delta - a * g.sign()
            finite = torch.isfinite(eps)
            if finite.any():
                e = torch.where(finite, eps, torch.zeros_like(eps))
                proj = project_ball(delta, e, norm)
                delta = torch.where(bcast(finite, delta), proj, delta)
            delta = apply_clip(xa + delta, clip) - xa

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
    norm = check_norm(norm)
    x = x.detach()
    B = x.shape[0]
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    clip = check_clip(clip, x)
    cap = math.inf if max_eps is None else float(max_eps)
    if clip is not None:
        if isinstance(clip[0], torch.Tensor):
            span = (clip[1] - clip[0]).to(torch.float64).expand_as(x).flatten(1)
            diam = float(flat_norm(span, norm).max()) if span.numel() else 0.0
        else:
            span = clip[1] - clip[0]
            diam = span * math.sqrt(x[0].numel()) if norm == "2" else span
        cap = min(cap, diam)

    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_x = x.clone()
    if hi is not None:
        best_r = torch.as_tensor(hi, dtype=torch.float64, device=x.device).clone().reshape(-1)
        best_x = x_hi.detach().clone()
    m0 = margin_of(forward, x, y)
    clean_bad = m0 <= 0
    best_r[clean_bad] = 0.0
    best_x[clean_bad] = x[clean_bad]
    lo = torch.zeros(B, dtype=torch.float64, device=x.device)

    def run(sel: torch.Tensor, e: torch.Tensor):
        res = pgd_attack(forward, x[sel], y[sel], e, norm=norm, steps=steps, restarts=restarts,
                         clip=clip_rows(clip, sel, x.dim()), generator=generator)
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


def refine_along_segment(judge: Judge, x, y, z, norm: str, max_eps=None, iters: int = 24):
    """Closest genuine point on each segment ``x -> z``, judged in float64.

    Float32 ties are first pushed outward (:meth:`Judge.push_out`); then bisection over ``t in (0, 1]``
    keeps the smallest ``t`` whose point ``x + t (z - x)`` (rounded, in the box) is genuine.  Returns
    ``(radius, z, ok)``: ``radius`` the float64 norm of the returned point where ``ok``, else ``inf``
    (and ``z = x`` there).
    """
    z, ok = judge.push_out(x, y, z, norm, max_eps)
    radius = torch.where(ok, judge.dist(z, x, norm), torch.full((x.shape[0],), math.inf, dtype=torch.float64,
                                                                 device=x.device))
    sel = (ok & (radius > 0)).nonzero().reshape(-1)
    if sel.numel():
        xs, ys, sub = x[sel], y[sel], judge.rows(sel)
        d64 = z[sel].to(torch.float64) - xs.to(torch.float64)
        lo = torch.zeros(sel.numel(), dtype=torch.float64, device=x.device)
        hi = torch.ones_like(lo)
        for _ in range(iters):
            t = (lo + hi) / 2
            cand = sub.along(xs, d64, t)
            good = sub.genuine(xs, ys, cand, norm)
            r = judge.dist(cand, xs, norm)
            take = good & (r < radius[sel])
            if take.any():
                radius[sel[take]] = r[take]
                z[sel[take]] = cand[take]
            hi = torch.where(good, t, hi)
            lo = torch.where(good, lo, t)
    z = torch.where(bcast(ok, z), z, x)
    return radius, z, ok


def box_search(judge: Judge, x, y, norm: str, clip, max_eps=None, samples: int = 128, generator=None):
    """Last resort for inputs every gradient attack missed: look for misclassified points directly.

    Candidates per input: the box corner farthest from ``x`` (each coordinate at the far end of the
    box), and ``samples`` points drawn uniformly from the box (without a box: Gaussian directions at
    radii doubling from 1e-3 up to ``max_eps`` or 1e6).  The closest genuine one is refined along its
    segment.  Returns ``(radius, z)`` with ``inf`` / ``x`` where nothing was found.
    """
    B = x.shape[0]
    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_z = x.clone()
    if B == 0:
        return best_r, best_z
    cands = []
    if clip is not None:
        lo, hi = clip
        lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device).expand_as(x)
        hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device).expand_as(x)
        cands.append(torch.where((x - lo_t) > (hi_t - x), lo_t, hi_t))
        for _ in range(samples):
            u = rand_like_gen(x.shape, x, generator)
            cands.append(lo_t + u * (hi_t - lo_t))
    else:
        top = 1e6 if max_eps is None else float(max_eps)
        r = 1e-3
        while r <= top * 2:
            per = max(1, samples // 16)
            for _ in range(per):
                g = randn_like_gen(x.shape, x, generator)
                dirn = g / bcast(flat_norm(g, norm).clamp_min(1e-30), g)
                cands.append(x + min(r, top) * dirn)
            r *= 2
    for z in cands:
        good = judge.genuine(x, y, z, norm)
        if max_eps is None:
            r = judge.dist(z, x, norm)
        else:
            # a far point may still have a close boundary point on its segment: refine below
            r = judge.dist(z, x, norm)
        take = good & (r < best_r)
        if take.any():
            best_r[take] = r[take]
            best_z[take] = z[take]
    found = torch.isfinite(best_r)
    if found.any():
        idx = found.nonzero().reshape(-1)
        r, z, ok = refine_along_segment(judge.rows(idx), x[idx], y[idx], best_z[idx], norm, max_eps=None)
        if max_eps is not None:
            ok &= r <= float(max_eps)
        best_r[idx] = torch.where(ok, r, torch.full_like(r, math.inf))
        best_z[idx] = torch.where(bcast(ok, z), z, x[idx])
    return best_r, best_z


def _fab_stage(forward, x, y, norm, clip, st: Strength, generator):
    """FAB-T on the ``st.fab_targets`` nearest classes (linearised); per-example minimum."""
    B = x.shape[0]
    with torch.no_grad():
        m_cls = logits_of(forward, x[:1]).shape[1]
    k = min(st.fab_targets, m_cls - 1)
    r_best = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    z_best = x.clone()
    if k <= 0 or st.fab_steps <= 0 or B == 0:
        return r_best, z_best
    ranked = ranked_targets(forward, x, y, norm, max_candidates=max(k, 10))[:, :k]
    idx = torch.arange(B, device=x.device).repeat_interleave(k)
    tgt = ranked.reshape(-1)
    r, z = fab_targeted(forward, x[idx], y[idx], tgt, norm=norm, clip=clip_rows(clip, idx, x.dim()),
                        steps=st.fab_steps,
                        restarts=st.fab_restarts, generator=generator)
    r = r.reshape(B, k)
    j = r.argmin(dim=1)
    rows = torch.arange(B, device=x.device) * k + j
    ok = torch.isfinite(r.min(dim=1).values)
    r_best[ok] = r.min(dim=1).values[ok]
    z_best[ok] = z[rows[ok]]
    return r_best, z_best


def min_norm_radius(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "2",
    clip=None,
    max_eps=None,
    method: str = "auto",
    strength="standard",
    steps: int | None = None,
    restarts: int = 2,
    bisection_iters: int | None = None,
    generator: torch.Generator | None = None,
    forward64: Forward | None = None,
    progress=None,
) -> MinNormResult:
    """Smallest adversarial perturbation found per example (an upper bound on the robust radius).

    ``method="auto"`` escalates until something is found (``strength`` sets the effort, see
    :mod:`lipverify.attacks.strength`):

    1. FMN: one untargeted and ``fmn_targets`` targeted trajectories (:func:`fmn_attack`); for l-inf
       also one with the published algorithm's l2-normalised steps;
    2. FAB-T on the ``fab_targets`` classes with the nearest linearised boundary
       (:func:`lipverify.attacks.fab.fab_targeted`), and for l2 DDN (:mod:`lipverify.attacks.ddn`);
    3. PGD bisection below the best radius so far, and for inputs with none yet a bracket search that
       doubles eps up to ``max_eps`` (or the box's diameter), restarts targeted at the nearest classes
       (:func:`bisection_attack`);
    4. for inputs still without a point: :func:`box_search` (far box corner and uniform box points).

    Every candidate is then refined along its segment and judged in float64
    (:func:`refine_along_segment`, :class:`lipverify.attacks.verify.Judge`).

    Parameters
    ----------
    forward:
        Callable ``(B, *input_shape) -> (B, m)`` logits; rows processed independently (eval mode).
    x, y:
        Inputs (their device/dtype is used for the attacks) and integer labels.
    norm:
        ``"2"`` or ``"inf"``.
    clip:
        ``None`` or the input box ``(lo, hi)``; adversarial points stay inside it.
    max_eps:
        Only adversarial points with ``||x_adv - x||_p <= max_eps`` count; others give ``inf``.
    method:
        ``"auto"`` (the escalation above), or one attack alone: ``"fmn"``, ``"fab"``, ``"ddn"`` (l2),
        ``"bisection"``.
    strength:
        ``"fast"``, ``"standard"`` (default), ``"thorough"`` or a :class:`Strength`.
    steps, restarts, bisection_iters:
        Overrides for the single-attack methods (FMN/FAB steps, PGD steps per bisection stage, PGD
        restarts, bisection steps).
    generator:
        ``torch.Generator`` for the random restarts and box samples.
    forward64:
        The model in float64 (default: a float64 copy of ``forward`` when it is an ``nn.Module``).

    Returns
    -------
    MinNormResult
        ``radius`` float64 ``(B,)``: the float64 norm of the returned point, which lies in the box and is
        strictly misclassified by the float64 model; 0 for clean misclassified inputs (float64 margin
        ``<= 0``); ``inf`` when nothing was found up to ``max_eps``.  ``found_by`` names the attack
        behind each radius, ``tried`` lists what ran.

    ``progress``: optional ``progress(name)`` called after each stage (``"fmn"``, ``"fab-t"``,
    ``"ddn"``, ``"pgd-bisection"``, ``"box-search"``; a stage that does not run is not named).

    Warnings
    --------
    These radii are *upper* bounds on the true robust radius: a smaller adversarial example may exist.
    They never prove robustness.  A certified radius larger than the radius returned here is a bug in
    the certifier (or a forward pass that differs from the one certified).
    """
    norm = check_norm(norm)
    if method not in ("auto", "fmn", "fab", "ddn", "bisection"):
        raise ValueError(f"method must be 'auto', 'fmn', 'fab', 'ddn' or 'bisection', got {method!r}")
    if method == "ddn" and check_norm(norm) != "2":
        raise ValueError("method 'ddn' is an l2 attack")
    st = get_strength(strength)
    x, y, B, clip = prepare(x, y, clip)
    judge = Judge(forward, x, clip, forward64)
    cap = None if max_eps is None else float(max_eps)

    m64 = judge.margin(x, y)
    clean_bad = m64 <= 0
    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_z = x.clone()
    src = ["none"] * B
    tried: list[str] = []
    todo = (~clean_bad).nonzero().reshape(-1)

    def offer(name: str, idx, z):
        """Refine stage candidates for examples ``idx`` and keep per-example improvements."""
        if idx.numel() == 0:
            return
        r, zr, ok = refine_along_segment(judge.rows(idx), x[idx], y[idx], z, norm, max_eps=cap)
        take = ok & (r < best_r[idx])
        if take.any():
            ti = idx[take]
            best_r[ti] = r[take]
            best_z[ti] = zr[take]
            for i in ti.tolist():
                src[i] = name

    xs, ys, cs = x[todo], y[todo], clip_rows(clip, todo, x.dim())
    if todo.numel():
        if method in ("auto", "fmn"):
            fsteps = st.fmn_steps if steps is None or method == "auto" else steps
            r_f, z_f = fmn_attack(forward, xs, ys, norm=norm, steps=fsteps, clip=cs, max_eps=max_eps,
                                  targets=st.fmn_targets)
            tried.append(f"fmn ({fsteps} steps, {st.fmn_targets} targets)")
            offer("fmn", todo, z_f)
            if norm == "inf" and method == "auto":
                r_f, z_f = fmn_attack(forward, xs, ys, norm=norm, steps=fsteps, clip=cs, max_eps=max_eps,
                                      targets=0, absolute_step=1.0)
                tried.append(f"fmn, l2-normalised steps ({fsteps} steps)")
                offer("fmn", todo, z_f)
            if progress:
                progress("fmn")
        if method in ("auto", "fab"):
            sf = st if steps is None or method == "auto" else Strength(**{**st.__dict__, "fab_steps": steps})
            if method == "fab" and sf.fab_steps == 0:
                sf = STRENGTHS["standard"]
            if sf.fab_steps > 0 and sf.fab_targets > 0:
                r_b, z_b = _fab_stage(forward, xs, ys, norm, cs, sf, generator)
                tried.append(f"fab-t ({sf.fab_steps} steps, {sf.fab_targets} targets)")
                offer("fab-t", todo, z_b)
                if progress:
                    progress("fab-t")
        if method in ("auto", "ddn") and norm == "2":
            dsteps = st.ddn_steps if steps is None or method == "auto" else steps
            if method == "ddn" and dsteps == 0:
                dsteps = STRENGTHS["standard"].ddn_steps
            if dsteps > 0:
                r_d, z_d = ddn_attack(forward, xs, ys, clip=cs, steps=dsteps)
                tried.append(f"ddn ({dsteps} steps)")
                offer("ddn", todo, z_d)
                if progress:
                    progress("ddn")
        if method in ("auto", "bisection"):
            if method == "bisection":
                bsteps = 100 if steps is None else steps
                biters = 12 if bisection_iters is None else bisection_iters
                brest = restarts
            else:
                bsteps, biters, brest = st.bisect_steps, st.bisect_iters, st.bisect_restarts
            hi = best_r[todo].clone()
            r_p, z_p = bisection_attack(forward, xs, ys, norm=norm, steps=bsteps, restarts=brest, iters=biters,
                                        clip=cs, max_eps=max_eps, hi=hi, x_hi=best_z[todo].clone(),
                                        generator=generator)
            tried.append(f"pgd bisection ({bsteps} steps x {brest} restarts, {biters} bisection steps)")
            improved = r_p < hi
            offer("pgd-bisection", todo[improved], z_p[improved])
            if progress:
                progress("pgd-bisection")
        if method == "auto":
            miss = todo[~torch.isfinite(best_r[todo])]
            if miss.numel():
                r_s, z_s = box_search(judge.rows(miss), x[miss], y[miss], norm, clip_rows(clip, miss, x.dim()),
                                      max_eps=max_eps,
                                      samples=st.box_samples, generator=generator)
                tried.append(f"box search ({st.box_samples} samples)")
                ok = torch.isfinite(r_s)
                best_r[miss[ok]] = r_s[ok]
                best_z[miss[ok]] = z_s[ok]
                for i in miss[ok].tolist():
                    src[i] = "box-search"
                if progress:
                    progress("box-search")

    best_r[clean_bad] = 0.0
    best_z[clean_bad] = x[clean_bad]
    found_by = ["clean" if bool(c) else s for c, s in zip(clean_bad.tolist(), src)]
    return MinNormResult(radius=best_r, x_adv=best_z, method=method, found_by=found_by, tried=tried,
                         precision=judge.precision)
