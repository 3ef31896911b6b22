"""Certification by linear bound propagation (CROWN, :mod:`lipverify.bounds.crown`).

An input with prediction ``j`` is certified at ``eps`` when the lower bound of every margin
``f_j - f_i`` over the ball ``B_p(x, eps)`` intersected with the input domain is positive.  The
certified radius is found by bisection: ``lo`` starts at the radius already proven (the global
certificate, or 0) and stays certified; ``hi`` is the smallest radius seen to fail (the requested
radii first, then doubling from ``lo``), and ``bisection_steps`` halvings narrow the bracket.

The bound is not monotone in ``eps`` by construction (the adaptive ReLU slopes change with the
intervals), so the radius reported is one that was itself proven; every smaller radius is certified
with it (its ball is a subset), which is how the requested radii below it are decided.

Warnings
--------
Each step is a full CROWN pass (intermediate bounds included) for the batch: on convolutional networks
with many undecided units this costs seconds per input.  The radius is a lower bound of the largest
certifiable one within the bracket's last width.
"""

from __future__ import annotations

import math

import torch

from lipverify.arguments import default_box
from lipverify.bounds.crown import check_supported, margin_lower_bounds
from lipverify.certify.rules import inside_domain


def crown_certify(model, x, pred, radius, targets, norm, cert_at, eps_list, per_example,
                  bisection_steps: int = 8, batch_size: int = 32, max_doublings: int = 12,
                  intermediate: str = "crown", progress=None, all_inputs: bool = False, alpha_steps: int = 0,
                  alpha_deadline: float | None = None, stats: dict | None = None):
    """CROWN certificates for the inputs not yet certified at the largest requested radius (every
    input with ``all_inputs``: the radius of each is then the largest CROWN proves).  ``radius``: the
    radii already proven (sound ones only: the bisection starts there without checking them), 0 where
    none is.  Inputs outside the domain are not examined.  ``alpha_steps``:
    optimised ReLU slopes (alpha-CROWN) in every bound, this many Adam steps each, none after the
    ``time.perf_counter()`` instant ``alpha_deadline`` (``stats["alpha_cut"]`` then says so).

    The input set is the ball intersected with the model's domain (:meth:`LipModel.set_domain`,
    ``--clip``), else with ``[0, 1]`` when every input lies in it (the attacks' default box,
    :func:`lipverify.arguments.default_box`), else the whole ball.

    Returns ``{index: (radius, True, {eps_key: certified})}`` for every input it examined (the
    format of :func:`lipverify.certify.local.local_certify`).  ``progress(k)``: advanced by ``len(x)``
    in all."""
    check_supported(model.graph)
    n = len(x)
    domain = model.domain if model.domain is not None else default_box(x)
    inside = inside_domain(x, domain, x) if domain is not None else torch.ones(n, dtype=torch.bool)
    if all_inputs:
        todo = list(range(n))
    elif per_example:
        todo = [i for i in range(n) if not bool(cert_at[-1.0][i])]
    elif eps_list:
        top = max(eps_list)
        todo = [i for i in range(n) if not bool(radius[i] > top)]
    else:
        todo = list(range(n))
    todo = [i for i in todo if bool(inside[i])]
    if progress:
        progress(n - len(todo))
    cache = model._cache.setdefault("crown", {})
    out = {}

    def ok_at(xs, p, e):
        low = margin_lower_bounds(model.graph, xs, p, e, norm, domain=domain, intermediate=intermediate,
                                  cache=cache, alpha_steps=alpha_steps, alpha_deadline=alpha_deadline, stats=stats)
        return (low > 0).all(1).cpu()

    for s in range(0, len(todo), batch_size):
        idx = torch.tensor(todo[s:s + batch_size])
        xs = x[idx].to(model.device, torch.float64)
        p = pred[idx]
        at: dict = {i: {} for i in idx.tolist()}
        lo = radius[idx].double().clone().cpu()
        hi = torch.full_like(lo, math.inf)
        keys = [(-1.0, targets[idx].double())] if per_example else \
            [(e, torch.full((len(idx),), e, dtype=torch.float64)) for e in eps_list]
        for key, e in keys:
            ok = ok_at(xs, p, e)
            for k, i in enumerate(idx.tolist()):
                at[i][key] = bool(ok[k])
            lo = torch.where(ok, torch.maximum(lo, e), lo)
            hi = torch.where(~ok, torch.minimum(hi, e), hi)
        # an upper end: double from the largest proven radius until a radius fails
        for _ in range(max_doublings):
            open_ = torch.isinf(hi)
            if not bool(open_.any()):
                break
            trial = torch.where(lo > 0, 2 * lo, torch.full_like(lo, 1e-3))
            ok = ok_at(xs, p, trial)
            lo = torch.where(open_ & ok, trial, lo)
            hi = torch.where(open_ & ~ok, trial, hi)
        hi = torch.where(torch.isinf(hi), lo, hi)  # never failed: keep the largest proven radius
        for _ in range(bisection_steps):
            mid = (lo + hi) / 2
            live = hi > lo * (1 + 1e-6)
            if not bool(live.any()):
                break
            ok = ok_at(xs, p, torch.where(live, mid, lo))
            lo = torch.where(live & ok, mid, lo)
            hi = torch.where(live & ~ok, mid, hi)
        for k, i in enumerate(idx.tolist()):
            for key, e in keys:  # a radius below a proven one is certified with it
                at[i][key] = at[i][key] or bool(lo[k] >= e[k])
            out[i] = (float(lo[k]), True, at[i])
        if progress:
            progress(len(idx))
    return out, domain
