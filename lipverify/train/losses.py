"""Losses for certified fine-tuning (SPEC section 7), as pure functions of logits and margin constants.

Notation: ``logits`` ``(B, m)``, labels ``y`` ``(B,)``, ``K`` ``(m, m)`` margin constants (``K[j, i]`` bounds
the Lipschitz constant of ``f_j - f_i``; the same for every input) or ``(B, m, m)`` / ``(B, m)`` rows
(local bounds, one per input), ``eps`` the training radius.

* :func:`gloro_bottom` / :func:`gloro_logits`: the GloRo net output ``[f(x), y_bot]`` with
  ``y_bot = max_{i != j} (f_i(x) + eps K_ji)``, ``j = argmax f(x)``.
* :func:`gloro_predict`: the class, or ``m`` (bottom) when the strict certification rule fails.
* :func:`gloro_ce`: cross-entropy over the ``m + 1`` GloRo logits (bottom is never a label).
* :func:`gloro_trades`: ``CE(f, y) + lambda * KL(p || q)``, ``p = [softmax(f), 0]``,
  ``q = softmax([f, y_bot])`` (GloRo-TRADES, Leino et al. 2021, as in the reference code).
* :func:`emma`: Efficient Margin MAXimization (Hu et al. 2023, as in the authors' PyTorch code):
  ``eps_i = clip((f_y - f_i) / (eps K_yi), 0.01, 1)`` without gradient, then cross-entropy on
  ``f_i + eps_i * eps * K_yi`` (``i != y``) and ``f_y``.
* :func:`worst_case_ce`: cross-entropy on the label-based worst-case logits ``f_i + eps K_yi`` (``i != y``),
  used with local margin constants (Huang et al. 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("gloro", "trades", "emma", "local")


def _rows_for(K: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``K[idx[b]]`` for every example: ``(B, m)``.  ``K`` is ``(m, m)`` (global) or ``(B, m, m)``."""
    if K.dim() == 2:
        return K[idx]
    return K.gather(1, idx.view(-1, 1, 1).expand(-1, 1, K.shape[-1])).squeeze(1)


def gloro_bottom(logits: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``y_bot = max_{i != j} (f_i + eps K_ji)`` with ``j = argmax f`` (no gradient through the argmax)."""
    j = logits.detach().argmax(1)
    Kj = _rows_for(K, j).to(logits.dtype)
    cand = logits + eps * Kj
    mask = F.one_hot(j, logits.shape[1]).bool()
    return cand.masked_fill(mask, float("-inf")).amax(1)


def gloro_logits(logits: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``[f(x), y_bot]``: ``(B, m + 1)``."""
    return torch.cat([logits, gloro_bottom(logits, K, eps)[:, None]], dim=1)


def gloro_predict(logits: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Prediction of the GloRo net: ``j = argmax f`` when ``f_j > y_bot`` (the strict rule
    ``f_j - f_i > eps K_ji`` for every ``i != j``), otherwise ``m`` (bottom: not certified).  A tie for
    the top logit is never certified (the second class has margin 0)."""
    j = logits.argmax(1)
    top = logits.gather(1, j[:, None])[:, 0]
    bot = gloro_bottom(logits, K, eps)
    return torch.where(top > bot, j, torch.full_like(j, logits.shape[1]))


def gloro_ce(logits: torch.Tensor, y: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(gloro_logits(logits, K, eps), y)


def gloro_trades(logits: torch.Tensor, y: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor,
                 lam: float) -> torch.Tensor:
    ext = gloro_logits(logits, K, eps)
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(ext, dim=1)[:, :-1]
    kl = (log_p.exp() * (log_p - log_q)).sum(1)  # the bottom entry of p is 0
    return F.cross_entropy(logits, y) + lam * kl.mean()


def emma_eps_i(logits: torch.Tensor, y: torch.Tensor, Ky: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``clip((f_y - f_i) / (eps K_yi), 0.01, 1)``, detached (a constant for the gradient)."""
    with torch.no_grad():
        fy = logits.gather(1, y[:, None])
        d = fy - logits
        denom = eps * Ky
        ratio = torch.where(denom > 0, d / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.ones_like(d))
        return ratio.clamp(0.01, 1.0).detach()


def emma(logits: torch.Tensor, y: torch.Tensor, K: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    Ky = _rows_for(K, y).to(logits.dtype)
    eps_i = emma_eps_i(logits, y, Ky, eps)
    not_y = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits + eps_i * eps * Ky * not_y, y)


def worst_case_ce(logits: torch.Tensor, y: torch.Tensor, Ky: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Cross-entropy on ``f_i + eps K_yi`` (``i != y``), ``f_y``; ``Ky`` are the label rows ``(B, m)``."""
    not_y = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits + eps * Ky.to(logits.dtype) * not_y, y)


def warm_start_loss(logits: torch.Tensor, y: torch.Tensor, K: torch.Tensor, weight: float) -> torch.Tensor:
    """The warm-start phase of a fine-tuning run: ``CE(f, y) + weight * log(max K)``.  Cross-entropy
    keeps the pre-trained accuracy while the log of the largest margin constant brings the (often huge)
    bound of a normally trained network down by orders of magnitude; the log makes the pull the same
    at K = 1e7 as at K = 10, where ``eps * K`` in a certified loss would swamp the cross-entropy."""
    return F.cross_entropy(logits, y) + weight * torch.log(K.max().clamp_min(1e-12))


def robust_loss(kind: str, logits, y, K, eps, lam: float = 1.0):
    """Dispatch for the global-bound losses."""
    if kind == "gloro":
        return gloro_ce(logits, y, K, eps)
    if kind == "trades":
        return gloro_trades(logits, y, K, eps, lam)
    if kind == "emma":
        return emma(logits, y, K, eps)
    raise ValueError(f"unknown loss {kind!r}")
