"""Auto-PGD (APGD): PGD with momentum and a step size that adapts itself, on CE or targeted DLR.

Our own implementation of the algorithm of Croce and Hein (ICML 2020, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks"), the first two members of
AutoAttack.  It maximises a loss ``L`` over ``S = B_p(x, eps) ∩ [lo, hi]^n``:

    z^(k+1) = P_S(x^(k) + eta^(k) s(grad L(x^(k))))
    x^(k+1) = P_S(x^(k) + a (z^(k+1) - x^(k)) + (1 - a)(x^(k) - x^(k-1))),   a = 0.75 (1 at k = 0)

with ``s(g) = sign(g)`` (l-inf) or ``g / ||g||_2`` (l2), ``eta^(0) = 2 eps``.  At the checkpoints
``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
the step is halved and the iterate reset to the best point so far when

1. the loss increased in fewer than ``rho (w_j - w_{j-1})`` of the steps since the last checkpoint
   (``rho = 0.75``), or
2. the step was not reduced at the last checkpoint and the best loss has not improved since.

Losses (maximised):

* ``"ce"``: cross-entropy of the label;
* ``"dlr-t"``: targeted difference of logits ratio ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)``
  (``pi`` sorts the logits decreasingly); scale-invariant, so it does not suffer from saturated softmax.
  With fewer than four classes the plain targeted margin ``z_t - z_y`` is used;
* ``"margin"``: ``max_{i != y} z_i - z_y``.

Examples stop as soon as their margin ``f_y - max_{i != y} f_i`` is clearly negative (below
``-1e-5 max(1, max |f|)``, so that float32 rounding cannot turn it into a tie); the lowest-margin point
is returned.  Only the forward pass and autograd through it are used.

Warnings
--------
A success proves non-robustness only after the float64 check (:mod:`lipverify.attacks.verify`), which
the ensemble (:mod:`lipverify.attacks.ensemble`) applies; a failure proves nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipverify.attacks.core import (
    Forward,
    apply_clip,
    bcast,
    flat_norm,
    grad_of,
    logits_of,
    margin_loss,
    project_ball,
    random_in_ball,
)

__all__ = ["apgd_attack", "apgd_checkpoints", "dlr_targeted_loss"]


def apgd_checkpoints(n_iter: int) -> list[int]:
    """The iterations ``w_j`` at which APGD reconsiders its step size.

    The schedule ``p_j`` of the paper in whole iterations: the first interval is ``0.22 N``, each next
    one ``0.03 N`` shorter, never below ``0.06 N`` (each at least one iteration).
    """
    first = max(int(0.22 * n_iter), 1)
    shrink = max(int(0.03 * n_iter), 1)
    least = max(int(0.06 * n_iter), 1)
    out, k, gap = [0], first, first
    while k <= n_iter:
        out.append(k)
        gap = max(gap - shrink, least)
        k += gap
    return out


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (to be maximised); the targeted margin when there are fewer than 4 classes."""
    zy = logits.gather(1, y.reshape(-1, 1)).squeeze(1)
    zt = logits.gather(1, t.reshape(-1, 1)).squeeze(1)
    if logits.shape[1] < 4:
        return zt - zy
    s = logits.sort(dim=1, descending=True).values
    return -(zy - zt) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)


def _loss(kind: str, lg: torch.Tensor, y: torch.Tensor, t) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(lg, y, reduction="none")
    if kind == "dlr-t":
        return dlr_targeted_loss(lg, y, t)
    if kind == "margin":
        return margin_loss(lg, y)
    raise ValueError(f"unknown APGD loss {kind!r}")


def _stop_threshold(lg: torch.Tensor) -> torch.Tensor:
    return -1e-5 * lg.detach().abs().amax(dim=1).to(torch.float64).clamp_min(1.0)


def _step(delta, grad, eta, norm):
    if norm == "2":
        gn = flat_norm(grad, "2").clamp_min(1e-30)
        return delta + bcast(eta, delta) * grad / bcast(gn, grad)
    return delta + bcast(eta, delta) * grad.sign()


def apgd_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    *,
    norm: str,
    clip=None,
    loss: str = "ce",
    target: torch.Tensor | None = None,
    steps: int = 100,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
    random_start: bool = True,
):
    """One APGD run per example.  Returns ``(x_best, margin)``.

    ``x_best`` is the lowest-margin point visited (inside the ball and the box up to float32 rounding);
    ``margin`` its float32 margin ``f_y - max_{i != y} f_i`` as float64.  ``eps`` is a ``(B,)`` float64
    tensor, ``clip`` a checked box, ``target`` the class per example for ``loss="dlr-t"``.
    """
    B = x.shape[0]
    dt = x.dtype
    eps_d = eps.to(dt)
    ckpts = set(apgd_checkpoints(steps)[1:])
    prev_ckpt = 0

    def proj(d):
        d = project_ball(d, eps, norm)
        return apply_clip(x + d, clip) - x

    if random_start:
        delta = proj(random_in_ball(x, eps, norm, generator))
    else:
        delta = torch.zeros_like(x)

    def evaluate(d, idx):
        z = (x[idx] + d).detach().requires_grad_(True)
        with torch.enable_grad():
            lg = logits_of(forward, z)
            lv = _loss(loss, lg, y[idx], None if target is None else target[idx])
            g = grad_of(lv, z)
        marg = (-margin_loss(lg.detach(), y[idx])).to(torch.float64)
        return lv.detach().to(torch.float64), g.detach(), marg, _stop_threshold(lg)

    idx = torch.arange(B, device=x.device)
    best_x = x.clone()
    with torch.no_grad():
        best_m = (-margin_loss(logits_of(forward, x), y)).to(torch.float64)
    lv, grad, marg, thr = evaluate(delta, idx)
    better = marg < best_m
    best_m = torch.where(better, marg, best_m)
    best_x[better] = (x + delta)[better].detach()
    loss_best = lv.clone()
    delta_best = delta.clone()
    eta = 2 * eps_d.clone()
    delta_prev = delta.clone()
    n_incr = torch.zeros(B, dtype=torch.long, device=x.device)
    loss_best_ckpt = loss_best.clone()
    reduced_last = torch.ones(B, dtype=torch.bool, device=x.device)
    lv_prev = lv.clone()
    active = marg >= thr

    for k in range(steps):
        if not bool(active.any()):
            break
        a = 1.0 if k == 0 else 0.75
        with torch.no_grad():
            z = proj(_step(delta, grad, eta, norm))
            cand = proj(delta + a * (z - delta) + (1 - a) * (delta - delta_prev))
        delta_prev = delta
        delta = torch.where(bcast(active, cand), cand, delta)
        sel = active.nonzero().reshape(-1)
        lv_s, g_s, m_s, thr_s = evaluate(delta[sel], sel)
        lv = lv.clone()
        lv[sel] = lv_s
        grad = grad.clone()
        grad[sel] = g_s
        better = m_s < best_m[sel]
        if better.any():
            bi = sel[better]
            best_m[bi] = m_s[better]
            best_x[bi] = (x[bi] + delta[bi]).detach()
        n_incr[sel] += (lv_s > lv_prev[sel]).long()
        lv_prev = lv.clone()
        improved = lv > loss_best
        loss_best = torch.where(improved, lv, loss_best)
        delta_best = torch.where(bcast(improved, delta), delta, delta_best)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        done[sel] = m_s < thr_s
        active = active & ~done
        it = k + 1
        if it in ckpts:
            span = it - prev_ckpt
            cond1 = n_incr < rho * span
            cond2 = ~reduced_last & (loss_best_ckpt >= loss_best)
            red = cond1 | cond2
            eta = torch.where(red, eta / 2, eta)
            delta = torch.where(bcast(red, delta), delta_best, delta)
            if red.any():
                # re-evaluate the gradient at the reset points
                ri = (red & active).nonzero().reshape(-1)
                if ri.numel():
                    lv_r, g_r, _, _ = evaluate(delta[ri], ri)
                    grad[ri] = g_r
                    lv_prev[ri] = lv_r
                delta_prev = torch.where(bcast(red, delta), delta, delta_prev)
            reduced_last = red
            loss_best_ckpt = loss_best.clone()
            n_incr.zero_()
            prev_ckpt = it
    return best_x, best_m
