"""Decoupled direction and norm (DDN): an l2 minimum-norm attack.

Our own implementation of the algorithm of Rony et al. (CVPR 2019, "Decoupling Direction and Norm for
Efficient Gradient-Based L2 Adversarial Attacks and Defenses").  The perturbation's direction and its
norm are updated separately:

    delta~   = delta_k + a_k g_k / ||g_k||_2,       g_k = grad CE(f(x + delta_k), y)   (ascent)
    eps_k    = eps_{k-1} (1 - gamma)  if x + delta_k is adversarial,  else eps_{k-1} (1 + gamma)
    delta_k+1 = clip(x + eps_k delta~ / ||delta~||_2) - x

with ``a_k`` cosine-annealed from ``alpha`` to ``alpha / 100`` and ``gamma = 0.05``; the closest
adversarial point seen is kept.  On networks with max pooling, where the margin's gradient changes
abruptly, it often finds smaller perturbations than FMN.

Warnings
--------
l2 only.  Points are judged in the forward's precision here;
:func:`lipverify.attacks.minnorm.min_norm_radius` re-checks them in float64.
"""

from __future__ import annotations

import math

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
)

__all__ = ["ddn_attack"]


def ddn_attack(forward: Forward, x: torch.Tensor, y: torch.Tensor, *, clip=None, steps: int = 500,
               gamma: float = 0.05, alpha: float = 1.0, init_eps: float = 1.0):
    """DDN (l2).  Returns ``(radius, x_adv)``: float64 radius, ``inf`` / ``x`` where nothing was found."""
    B = x.shape[0]
    x = x.detach()
    delta = torch.zeros_like(x)
    eps = torch.full((B,), init_eps, dtype=torch.float64, device=x.device)
    best_r = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    best_x = x.clone()
    for k in range(steps):
        z = (x + delta).detach().requires_grad_(True)
        with torch.enable_grad():
            lg = logits_of(forward, z)
            loss = F.cross_entropy(lg, y, reduction="sum")
            g = grad_of(loss, z)
        with torch.no_grad():
            adv = margin_loss(lg.detach(), y) >= 0
            r = flat_norm(delta.to(torch.float64), "2")
            better = adv & (r < best_r)
            best_r = torch.where(better, r, best_r)
            best_x[better] = z.detach()[better]
            a = alpha * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / max(steps, 1))))
            gn = flat_norm(g, "2").clamp_min(1e-30)
            step = delta + a * g / bcast(gn, g)
            # once something was found, never grow beyond it
            eps = torch.where(adv, eps * (1 - gamma), eps * (1 + gamma))
            eps = torch.where(torch.isfinite(best_r), torch.minimum(eps, best_r), eps)
            sn = flat_norm(step, "2").clamp_min(1e-30)
            delta = step * bcast((eps.to(x.dtype) / sn).to(x.dtype), step)
            delta = apply_clip(x + delta, clip) - x
    return best_r, best_x
