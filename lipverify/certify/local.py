"""Local certification by bisection over eps (Huang et al. 2021, SPEC section 4).

Local margin constants ``K(x, eps)`` hold only inside ``B(x, eps)`` and are non-decreasing in ``eps``.
For an input with prediction ``j`` and margins ``d_i = f_j - f_i``:

* certified at ``eps`` iff ``d_i > eps * K_ji(x, eps)`` for all ``i != j``;
* the largest certified radius lies in ``[r_global, min_i d_i / K_ji(x, r_global)]``: ``r_global`` is
  certified by the global constants (valid everywhere), and no radius above the upper end can
  satisfy the rule because ``K(x, r) >= K(x, r_global)`` for ``r >= r_global``.  Bisection keeps the
  invariant "``lo`` is certified".

The local constants are sound on every architecture (the minimum of the masked-norm product with
exact or proven factors and the Clarke-Jacobian interval bound for the pairs ``(j, i)``,
:mod:`lipverify.bounds.jacobian`); power-iteration estimates are never used here.
"""

from __future__ import annotations

import math

import torch

from lipverify.bounds.local import local_margin_constants


def _local_ok(model, xs, pred, diffs, mask, eps, norm, warm, opts, decide: bool = True):
    """(certified, sound, K_j.) for each row of ``xs`` at per-example ``eps`` (float64 tensor).

    ``decide``: only the decision matters (expensive refinements only where they can turn it);
    ``False`` when the constants themselves are used (the upper end of the bisection)."""
    need = None
    if decide:
        with torch.no_grad():
            need = torch.where(mask, diffs / eps[:, None].clamp_min(1e-300), torch.full_like(diffs, math.inf))
    res = local_margin_constants(model.graph, xs, eps, norm, warm_start=warm, domain=model.effective_domain(),
                                 rows=pred, need=need, **opts)
    K = res.K.cpu()
    Kj = K[torch.arange(len(pred)), pred]  # K_ji
    ok = ((diffs > eps[:, None] * Kj) | ~mask).all(1)
    return ok, res.sound.cpu().bool(), Kj


def local_certify(model, x, pred, diffs, mask, radius, targets, norm, cert_at, eps_list, per_example,
                  bisection_steps: int = 8, batch_size: int = 64, tol: float = 1e-3, max_iter: int = 2000,
                  exact_max_entries: int = 250_000, progress=None, jacobian: str = "interval", box=None):
    """Local certificates for the inputs the global rule left uncertified.

    Returns ``{index: (radius, sound, {eps_key: certified})}`` for every input it examined.
    ``progress``: optional ``progress(k)`` advanced by ``len(x)`` in all: at once by the inputs not
    examined, then for each batch by its size in equal fractions per bound computation (one per
    requested eps, one for the upper end, one per bisection step), the last when the batch is done.
    ``jacobian``, ``box``: how the Clarke Jacobian is bounded and the input box the linear relaxations
    intersect the balls with (:func:`lipverify.bounds.local.local_margin_constants`).
    """
    n = len(x)
    opts = {"tol": tol, "max_iter": max_iter, "exact_max_entries": exact_max_entries, "jacobian": jacobian,
            "box": box}
    warm: dict = {}
    margin = torch.where(mask, diffs, torch.full_like(diffs, math.inf)).min(1).values
    if per_example:
        todo = [i for i in range(n) if not bool(cert_at[-1.0][i]) and margin[i] > 0]
    elif eps_list:
        top = max(eps_list)
        todo = [i for i in range(n) if not bool(radius[i] > top) and margin[i] > 0]
    else:
        todo = [i for i in range(n) if margin[i] > 0]
    out = {}
    if progress:
        progress(n - len(todo))
    n_calls = (1 if per_example else len(eps_list)) + 1 + bisection_steps

    calls = [0]

    def step(k):
        """One of the batch's ``n_calls`` bound computations done: whole inputs, ``k`` after the last."""
        c = calls[0] = calls[0] % n_calls + 1
        if progress:
            done = k * c // n_calls - k * (c - 1) // n_calls
            if done:
                progress(done)

    for s in range(0, len(todo), batch_size):
        idx = torch.tensor(todo[s:s + batch_size])
        xs = x[idx].to(model.device, torch.float64)
        p, d, mk = pred[idx], diffs[idx], mask[idx]
        at: dict = {i: {} for i in idx.tolist()}
        # decisions at the requested radii
        keys = [(-1.0, targets[idx].double())] if per_example else [(e, torch.full((len(idx),), e, dtype=torch.float64))
                                                                    for e in eps_list]
        for key, e in keys:
            ok, snd, _ = _local_ok(model, xs, p, d, mk, e, norm, warm, opts)
            for k, i in enumerate(idx.tolist()):
                at[i][key] = bool(ok[k] and snd[k])
            step(len(idx))
        # largest certified radius by bisection
        lo = radius[idx].double().clone()
        lo_sound = torch.ones(len(idx), dtype=torch.bool)
        base = torch.where(lo > 0, lo, torch.full_like(lo, 1e-9))
        _, snd0, Kj0 = _local_ok(model, xs, p, d, mk, base, norm, warm, opts, decide=False)
        step(len(idx))
        with torch.no_grad():
            ratio = torch.where(Kj0 > 0, d / Kj0, torch.full_like(d, math.inf))
        hi = torch.where(mk, ratio, torch.full_like(ratio, math.inf)).min(1).values
        hi = torch.minimum(hi, lo * 1e6 + 1e3)
        for _ in range(bisection_steps):
            mid = torch.where(hi > lo, (lo + hi) / 2, lo)
            ok, snd, _ = _local_ok(model, xs, p, d, mk, mid, norm, warm, opts)
            lo = torch.where(ok, mid, lo)
            lo_sound = torch.where(ok, snd, lo_sound)
            hi = torch.where(ok, hi, mid)
            step(len(idx))
        for k, i in enumerate(idx.tolist()):
            out[i] = (float(lo[k]), bool(lo_sound[k]), at[i])
    return out
