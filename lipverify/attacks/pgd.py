"""Projected gradient descent on the margin loss (l2 and l-inf).

The attack answers the empirical question "is there an adversarial example within ``eps`` of ``x``?"
using nothing but the model's forward pass (and autograd through it).  It never calls lipverify's bound
code, so it stays an independent check of the certificates: for every input
``r_cert(x) <= r_true(x) <= r_adv(x)``, and a certified point that this attack breaks is a bug.

Maths
-----
For logits ``f(x) in R^m`` and label ``y`` the *margin loss* is

    L(x) = max_{i != y} f_i(x) - f_y(x),

and ``x'`` is adversarial (the label is no longer the unique argmax) iff ``L(x') >= 0``: ties count as
broken, because a tie is not robust.  PGD (Madry et al., 2018) maximises ``L`` over the threat set
``S = {x' : ||x' - x||_p <= eps} ∩ [lo, hi]^n`` by iterating

    l2:    x' <- Proj_S(x' + a_t * g / ||g||_2)
    l-inf: x' <- Proj_S(x' + a_t * sign(g)),          g = grad L(x'),

where ``Proj_S`` first projects onto the eps-ball (rescaling for l2, clamping for l-inf) and then clamps
to the input box.  (For a box that contains ``x`` the clamp never leaves the ball: it moves every
coordinate towards ``x``.)  Starting points: the clean input for the first restart, then uniform points
in the l-inf box, or for l2 a uniform direction times ``eps * U^(1/n)`` (uniform in the ball).
The step ``a_t`` starts at ``eps / 4`` and decays with a cosine schedule to 1/10 of that, which on small
CNNs finds points closer to the ball's boundary than a constant step.

Restarts alternate between the untargeted margin loss and targeted losses ``f_t - f_y`` (classes ``t``
in order of their linearised boundary distance), in the spirit of multi-targeted PGD (Gowal et al.,
2019): ascent on a maximum of pieces can stall on the runner-up class's piece.

References
----------
A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu. "Towards Deep Learning Models Resistant to
Adversarial Attacks." ICLR 2018.
S. Gowal, J. Uesato, C. Qin, P.-S. Huang, T. Mann, P. Kohli. "An Alternative Surrogate Loss for
PGD-based Adversarial Testing." arXiv:1910.09338, 2019.

Warnings
--------
Attacks give *upper* bounds on the true robust radius (a found adversarial example is a proof of
non-robustness); a failed attack never proves robustness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipverify.attacks.core import (
    Forward,
    apply_clip,
    clip_rows,
    bcast,
    check_norm,
    flat_norm,
    grad_of,
    logits_of,
    margin_loss,
    margin_of,
    per_example,
    prepare,
    project_ball,
    random_in_ball,
    ranked_targets,
)

__all__ = ["AttackResult", "margin_loss", "pgd_attack"]


@dataclass
class AttackResult:
    """Outcome of :func:`pgd_attack`.

    Attributes
    ----------
    x_adv:
        ``(B, *input_shape)``, the lowest-margin point found per example (``x`` itself where nothing better
        was found, and for examples already misclassified at ``x``).
    success:
        ``(B,)`` bool: ``x_adv`` is adversarial, verified by a final forward pass on ``x_adv``.
    margin:
        ``(B,)`` float64: ``f_y(x_adv) - max_{i != y} f_i(x_adv)`` from that final forward pass
        (``<= 0`` exactly when ``success``).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    margin: torch.Tensor


# --------------------------------------------------------------------------------------------------


def pgd_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    *,
    norm: str = "2",
    steps: int = 100,
    restarts: int = 5,
    step_size=None,
    clip=None,
    generator: torch.Generator | None = None,
    schedule: str = "cosine",
    multi_targeted: bool = True,
) -> AttackResult:
    """Search for adversarial examples in ``B_p(x, eps) ∩ clip`` by PGD on the margin loss.

    Parameters
    ----------
    forward:
        Callable mapping a batch ``(B, *input_shape)`` to logits ``(B, m)``, e.g. an ``nn.Module`` in
        eval mode.  Rows must be processed independently (no batch statistics), because the attack
        evaluates sub-batches of still-unbroken examples.
    x, y:
        Inputs and integer labels.  Computation happens on ``x``'s device and dtype.
    eps:
        Radius: a float or a per-example tensor ``(B,)``.  ``eps = 0`` only checks ``x`` itself.
    norm:
        ``"2"`` or ``"inf"``.
    steps, restarts:
        Gradient steps per restart and number of restarts.  Restart 0 starts at ``x``; later restarts at
        uniform random points of the ball.  Examples stop as soon as they are broken.
    step_size:
        Initial step (float or per-example tensor); default ``eps / 4``.
    clip:
        ``None`` or ``(lo, hi)``: the input domain box.  ``x`` must lie inside it.
    generator:
        ``torch.Generator`` for the random starts (reproducibility).
    schedule:
        ``"cosine"`` (default: decay from ``step_size`` to ``step_size / 10``) or ``"constant"``.
    multi_targeted:
        If true (default), odd-numbered restarts maximise ``f_t - f_y`` for one target class ``t`` at a
        time, targets taken in order of their linearised boundary distance at ``x``; restart 0 and the
        even ones use the untargeted margin loss.  The margin loss is a maximum of pieces, and ascent on
        it can stall on the piece of the current runner-up when another class is closer (even for an
        affine model); targeted restarts remove that failure.  Success is always judged untargeted.

    Returns
    -------
    AttackResult
        ``x_adv`` (best = lowest-margin point over all steps and restarts; it lies in the eps-ball and in
        ``clip``), ``success`` and ``margin`` verified by a final forward pass.  Examples misclassified at
        ``x`` count as success with ``x_adv = x``.

    Warnings
    --------
    A successful attack proves non-robustness (the returned point is checked).  A failed attack proves
    nothing: PGD gives an *upper* bound on the true robust radius, never a proof of robustness; only a
    certificate can show that no adversarial example exists.
    """
    norm = check_norm(norm)
    if steps < 0 or restarts < 0:
        raise ValueError("steps and restarts must be non-negative")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    x, y, B, clip = prepare(x, y, clip)
    eps_t = per_example(eps, B, x, "eps")
    if step_size is None:
        step_t = eps_t / 4
    else:
        step_t = per_example(step_size, B, x, "step_size")

    best_x = x.clone()
    best_margin = margin_of(forward, x, y)

    ranked = None
    for r in range(restarts if steps > 0 else 0):
        idx = ((best_margin > 0) & (eps_t > 0)).nonzero().reshape(-1)
        if idx.numel() == 0:
            break
        xa, ya, ea, sa = x[idx], y[idx], eps_t[idx], step_t[idx].to(x.dtype)
        ca = clip_rows(clip, idx, x.dim())
        ta = None
        if multi_targeted and r % 2 == 1:
            if ranked is None:
                ranked = ranked_targets(forward, x, y, norm)
            ta = ranked[idx, ((r - 1) // 2) % ranked.shape[1]]
        if r == 0:
            delta = torch.zeros_like(xa)
        else:
            delta = random_in_ball(xa, ea, norm, generator)
            delta = apply_clip(xa + delta, ca) - xa
        for t in range(steps + 1):
            xt = (xa + delta).detach().requires_grad_(True)
            with torch.enable_grad():
                lg = logits_of(forward, xt)
                loss = margin_loss(lg, ya)
                if ta is not None:
                    obj = lg.gather(1, ta.reshape(-1, 1)).squeeze(1) - lg.gather(1, ya.reshape(-1, 1)).squeeze(1)
                else:
                    obj = loss
            marg = (-loss.detach()).to(torch.float64)
            better = marg < best_margin[idx]
            if better.any():
                bi = idx[better]
                best_margin[bi] = marg[better]
                best_x[bi] = xt.detach()[better]
            if t == steps:
                break
            keep = marg > 0
            if not keep.any():
                break
            grad = grad_of(obj, xt)
            if not keep.all():
                idx, xa, ya, ea, sa = idx[keep], xa[keep], ya[keep], ea[keep], sa[keep]
                ca = clip_rows(ca, keep.nonzero().reshape(-1), x.dim())
                ta = None if ta is None else ta[keep]
                delta, grad = delta[keep], grad[keep]
            if schedule == "cosine":
                factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))
            else:
                factor = 1.0
            a = bcast(sa * factor, delta)
            with torch.no_grad():
                if norm == "2":
                    gn = flat_norm(grad, "2").clamp_min(torch.finfo(grad.dtype).tiny)
                    delta = delta + a * grad / bcast(gn, grad)
                else:
                    delta = delta + a * grad.sign()
                delta = project_ball(delta, ea, norm)
                delta = apply_clip(xa + delta, ca) - xa

    with torch.no_grad():
        margin = margin_of(forward, best_x, y)
    return AttackResult(x_adv=best_x, success=margin <= 0, margin=margin)
