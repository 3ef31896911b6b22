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
from typing import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]

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
# helpers shared with the min-norm attack (private)


def _check_norm(norm) -> str:
    s = str(norm).strip().lower()
    if s in ("2", "2.0", "l2"):
        return "2"
    if s in ("inf", "linf", "l-inf", "infinity"):
        return "inf"
    raise ValueError(f"norm must be '2' or 'inf', got {norm!r}")


def _flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ``||t_b||_p`` over all non-batch dimensions."""
    f = t.flatten(1)
    if norm == "2":
        return f.norm(p=2, dim=1)
    return f.abs().amax(dim=1) if f.shape[1] > 0 else f.new_zeros(f.shape[0])


def _flat_dual_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example dual norm ``||t_b||_q`` (q = 2 for p = 2, q = 1 for p = inf)."""
    f = t.flatten(1)
    return f.norm(p=2, dim=1) if norm == "2" else f.abs().sum(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _project_ball(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each ``delta_b`` onto ``{||d||_p <= eps_b}``."""
    e = eps.to(delta.dtype)
    if norm == "2":
        n = _flat_norm(delta, "2")
        factor = torch.where(n > e, e / n.clamp_min(torch.finfo(delta.dtype).tiny), torch.ones_like(n))
        return delta * _bcast(factor, delta)
    eb = _bcast(e, delta)
    return torch.maximum(torch.minimum(delta, eb), -eb)


def _check_clip(clip, x: torch.Tensor):
    """``(lo, hi)`` as floats, or as tensors broadcastable to ``x`` (a per-coordinate box)."""
    if clip is None:
        return None
    lo, hi = clip
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
        if bool((lo > hi).any()):
            raise ValueError("clip box has lo > hi somewhere")
        if x.numel() and (bool((x < lo - 1e-6).any()) or bool((x > hi + 1e-6).any())):
            raise ValueError("inputs lie outside the clip box")
        return lo, hi
    lo, hi = float(lo), float(hi)
    if not lo <= hi:
        raise ValueError(f"clip must be (lo, hi) with lo <= hi, got {clip!r}")
    if x.numel() and (float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6):
        raise ValueError(
            f"inputs lie outside the clip box [{lo}, {hi}] (min {float(x.min())}, max {float(x.max())})"
        )
    return lo, hi


def _prepare(x: torch.Tensor, y: torch.Tensor, clip):
    """Detached inputs, labels as a flat long tensor on x's device, checked clip box."""
    x = x.detach()
    B = x.shape[0]
    y = y.detach().to(device=x.device, dtype=torch.long).reshape(-1)
    if y.numel() != B:
        raise ValueError(f"y has {y.numel()} labels for {B} inputs")
    return x, y, B, _check_clip(clip, x)


def _apply_clip(z: torch.Tensor, clip) -> torch.Tensor:
    if clip is None:
        return z
    if isinstance(clip[0], torch.Tensor):
        return torch.maximum(torch.minimum(z, clip[1]), clip[0])
    return z.clamp(clip[0], clip[1])


def _per_example(v, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or a ``(n,)`` tensor as a float64 tensor of shape ``(n,)`` on ``like``'s device."""
    t = torch.as_tensor(v, dtype=torch.float64, device=like.device).detach()
    if t.dim() == 0:
        t = t.expand(n).clone()
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} must be a float or have one entry per example ({n}), got {t.numel()}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return t


def _randn(shape, like: torch.Tensor, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _random_in_ball(like: torch.Tensor, eps: torch.Tensor, norm: str, generator) -> torch.Tensor:
    """Random points uniform in the eps-ball of each example (eps: (B,))."""
    e = _bcast(eps.to(like.dtype), like)
    if norm == "inf":
        return (2 * _rand(like.shape, like, generator) - 1) * e
    d = like[0].numel()
    g = _randn(like.shape, like, generator)
    g = g / _bcast(_flat_norm(g, "2").clamp_min(1e-30), g)
    r = _rand((like.shape[0],), like, generator) ** (1.0 / max(d, 1))
    return g * _bcast(r, g) * e


def _logits(forward: Forward, z: torch.Tensor) -> torch.Tensor:
    out = forward(z)
    if out.dim() != 2:
        out = out.reshape(out.shape[0], -1)
    return out


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margin loss ``max_{i != y} f_i - f_y`` per example (``>= 0`` means broken; ties count as broken).

    Parameters
    ----------
    logits: ``(B, m)`` with ``m >= 2``.
    y: ``(B,)`` integer labels.

    Returns
    -------
    ``(B,)`` tensor in the dtype of ``logits`` (differentiable).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, m) with m >= 2, got {tuple(logits.shape)}")
    y = y.to(device=logits.device, dtype=torch.long).reshape(-1, 1)
    f_y = logits.gather(1, y).squeeze(1)
    others = logits.scatter(1, y, float("-inf"))
    return others.amax(dim=1) - f_y


def _ranked_targets(forward: Forward, x: torch.Tensor, y: torch.Tensor, norm: str,
                    max_candidates: int = 10) -> torch.Tensor:
    """Classes ordered by the distance to their linearised boundary at x (nearest first).

    For class ``i != y`` the distance is ``(f_y - f_i)^+ / ||grad(f_y - f_i)||_q`` (q the dual norm);
    it is exact for an affine model.  Only the ``max_candidates`` classes with the highest logits are
    ranked (all of them when ``m - 1 <= max_candidates``).  Returns ``(B, K)`` class indices, y excluded.
    Costs one forward and ``K`` backward passes.
    """
    xt = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lg = _logits(forward, xt)
        B, m = lg.shape
        K = min(m - 1, max_candidates)
        others = lg.detach().scatter(1, y.reshape(-1, 1), float("-inf"))
        cand = others.topk(K, dim=1).indices                      # (B, K)
        fy = lg.gather(1, y.reshape(-1, 1)).squeeze(1)
        dists = torch.empty((B, K), dtype=torch.float64, device=x.device)
        for c in range(K):
            d = fy - lg.gather(1, cand[:, c : c + 1]).squeeze(1)
            (g,) = torch.autograd.grad(d.sum(), xt, retain_graph=c < K - 1)
            gq = _flat_dual_norm(g, norm).to(torch.float64)
            dists[:, c] = d.detach().to(torch.float64).clamp_min(0) / gq.clamp_min(1e-30)
    order = dists.argsort(dim=1, stable=True)
    return cand.gather(1, order)


def _margin(forward: Forward, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{i != y} f_i`` at z, float64, without gradients."""
    with torch.no_grad():
        return (-margin_loss(_logits(forward, z), y)).to(torch.float64)


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
    norm = _check_norm(norm)
    if steps < 0 or restarts < 0:
        raise ValueError("steps and restarts must be non-negative")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    x, y, B, clip = _prepare(x, y, clip)
    eps_t = _per_example(eps, B, x, "eps")
    if step_size is None:
        step_t = eps_t / 4
    else:
        step_t = _per_example(step_size, B, x, "step_size")

    best_x = x.clone()
    best_margin = _margin(forward, x, y)

    ranked = None
    for r in range(restarts if steps > 0 else 0):
        idx = ((best_margin > 0) & (eps_t > 0)).nonzero().reshape(-1)
        if idx.numel() == 0:
            break
        xa, ya, ea, sa = x[idx], y[idx], eps_t[idx], step_t[idx].to(x.dtype)
        ta = None
        if multi_targeted and r % 2 == 1:
            if ranked is None:
                ranked = _ranked_targets(forward, x, y, norm)
            ta = ranked[idx, ((r - 1) // 2) % ranked.shape[1]]
        if r == 0:
            delta = torch.zeros_like(xa)
        else:
            delta = _random_in_ball(xa, ea, norm, generator)
            delta = _apply_clip(xa + delta, clip) - xa
        for t in range(steps + 1):
            xt = (xa + delta).detach().requires_grad_(True)
            with torch.enable_grad():
                lg = _logits(forward, xt)
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
            (grad,) = torch.autograd.grad(obj.sum(), xt)
            if not keep.all():
                idx, xa, ya, ea, sa = idx[keep], xa[keep], ya[keep], ea[keep], sa[keep]
                ta = None if ta is None else ta[keep]
                delta, grad = delta[keep], grad[keep]
            if schedule == "cosine":
                factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))
            else:
                factor = 1.0
            a = _bcast(sa * factor, delta)
            with torch.no_grad():
                if norm == "2":
                    gn = _flat_norm(grad, "2").clamp_min(torch.finfo(grad.dtype).tiny)
                    delta = delta + a * grad / _bcast(gn, grad)
                else:
                    delta = delta + a * grad.sign()
                delta = _project_ball(delta, ea, norm)
                delta = _apply_clip(xa + delta, clip) - xa

    with torch.no_grad():
        margin = _margin(forward, best_x, y)
    return AttackResult(x_adv=best_x, success=margin <= 0, margin=margin)
