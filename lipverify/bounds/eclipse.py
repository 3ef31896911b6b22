r"""Fast compositional l2 bounds for chains of dense layers (ECLipsE-Fast, and a polished variant).

Network: ``f(x) = W_L phi(W_{L-1} ... phi(W_0 x))`` as in :mod:`lipverify.bounds.lipsdp`, every
activation slope-restricted in ``[alpha, beta]`` with ``0 <= alpha < beta`` (then also in
``[0, beta]``, which is what is used).  Following Xu and Sivaranjani ("ECLipsE: efficient compositional
Lipschitz constant estimation for deep neural networks", NeurIPS 2024), the LipSDP matrix inequality
is replaced by a sequence of small conditions, one per layer.  With ``dv_k`` the increment of the
output of hidden layer ``k`` (``dv_0 = dx``) and a multiplier ``lam_k >= 0`` per layer, the slope
restriction gives ``2 lam_k dv_k^T (beta W_{k-1} dv_{k-1} - dv_k) >= 0``.  If

.. math::
    Q_k = \begin{pmatrix} X_{k-1} & -\beta \lambda_k W_{k-1}^T \\ -\beta \lambda_k W_{k-1} &
          2 \lambda_k I - X_k \end{pmatrix} \succeq 0 ,

then ``dv_k^T X_k dv_k <= dv_{k-1}^T X_{k-1} dv_{k-1}`` for every admissible pair (add the slope
inequality to the quadratic form of ``Q_k``).  Starting from ``X_0 = I`` and taking ``X_k`` as the
Schur complement ``2 lam_k I - beta^2 lam_k^2 W_{k-1} X_{k-1}^{-1} W_{k-1}^T`` with the closed-form
``lam_k = 1 / (beta^2 lambda_max(W_{k-1} X_{k-1}^{-1} W_{k-1}^T))`` (which maximises the smallest
eigenvalue of ``X_k``), the chain ends with

.. math::
    \|W_L dv_L\|^2 \le \lambda_{\max}(W_L X_L^{-1} W_L^T)\, dv_L^T X_L dv_L
        \le \lambda_{\max}(W_L X_L^{-1} W_L^T)\, \|dx\|^2 ,

i.e. ``Lip(f) <= sqrt(lambda_max(W_L X_L^{-1} W_L^T))`` (ECLipsE-Fast).  Summing the ``Q_k`` (embedded
in the stacked increments) and scaling by ``rho = Lip^2`` gives exactly the LipSDP-Neuron matrix with
multipliers ``T_k = rho lam_k I`` (layer form), so the sequence is a LipSDP certificate found without
a solver.

Soundness: the numbers of the recursion are never reported.  Its multipliers ``T_k`` go to
:func:`lipverify.bounds.lipsdp.verify_multipliers`, which computes the exact smallest ``rho`` for
them (Schur complement, float64) and checks the whole LMI with a shifted Cholesky factorisation; the
reported value is that certified ``sqrt(rho)``.  ``eclipse`` then improves the multipliers by
quasi-Newton steps on that exact ``rho_min(T)`` (first one per layer, then one per neuron, within a
time budget) from the ECLipsE-Fast point; every point it keeps is verified the same way, so the
budget and the optimiser affect tightness only.

Warnings
--------
* Only chains of dense (or materialisable) layers with element-wise slope-restricted activations
  with ``alpha >= 0`` (ReLU, tanh, sigmoid, clipped ReLU, leaky ReLU with a non-negative slope);
  GELU/SiLU-type slopes, pooling, residuals and MinMax are refused by the extraction.
* The bound holds for every activation slope-restricted in ``[0, beta]``, hence it is at least the
  largest ``||W_L D_L ... D_1 W_0||`` over diagonal ``D_k`` with entries in ``[0, beta]``.
* ECLipsE-Fast is greedy (each ``lam_k`` is chosen for its own layer) and can be far from LipSDP on
  deep networks; ``eclipse`` closes much of the gap, at the cost of ``N^3`` work per evaluation
  (``N`` hidden neurons in total).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from lipverify.errors import UserInputError

__all__ = ["EclipseResult", "eclipse_fast", "eclipse"]

#: relative strictness of each Schur complement (keeps every block positive definite)
_STRICT = 1e-6


@dataclass
class EclipseResult:
    """``value``: certified l2 Lipschitz bound (``sound``); ``method``; ``time_s``; ``estimate``: the
    recursion's own value (not verified); ``multipliers``: the verified ``T_k`` (per neuron)."""

    value: float
    sound: bool
    method: str
    time_s: float
    estimate: float
    multipliers: list = field(default_factory=list, repr=False)


def _sym_top(S: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(0.5 * (S + S.T))[-1])


def _fast_multipliers(ws, beta):
    """The ECLipsE-Fast recursion: ``(estimate, [T_k])`` with ``T_k = rho lam_k`` per neuron."""
    X = np.eye(ws[0].shape[1])
    lams = []
    for W in ws[:-1]:
        S = W @ np.linalg.solve(X, W.T)
        s = beta * beta * _sym_top(S)
        if not (s > 0 and math.isfinite(s)):
            raise UserInputError("eclipse: a layer maps everything to zero or overflows")
        lam = 1.0 / s
        X = 2.0 * lam * np.eye(W.shape[0]) - (beta * lam) ** 2 * S
        X = 0.5 * (X + X.T)
        X -= _STRICT * float(np.abs(np.diag(X)).max()) * np.eye(W.shape[0])
        lams.append(lam)
    WL = ws[-1]
    rho = _sym_top(WL @ np.linalg.solve(X, WL.T)) * (1 + 1e-6)
    return math.sqrt(max(rho, 0.0)), [np.full(W.shape[0], rho * lam) for W, lam in zip(ws[:-1], lams)]


def _check(weights, alpha, beta):
    from lipverify.bounds.lipsdp import as_weights, check_slopes

    ws = as_weights(weights)
    alpha, beta = check_slopes(alpha, beta)
    if alpha < 0:
        raise UserInputError(f"eclipse needs activations with slopes >= 0 (got [{alpha:g}, {beta:g}])")
    if len(ws) < 2:
        raise UserInputError("eclipse: need at least one hidden layer")
    return ws, beta


def eclipse_fast(weights, alpha: float = 0.0, beta: float = 1.0) -> EclipseResult:
    """ECLipsE-Fast: the closed-form sequence of the module docstring, verified a posteriori.

    ``weights = [W_0, ..., W_L]`` (``W_k`` of shape ``n_{k+1} x n_k``), activations slope-restricted in
    ``[alpha, beta]`` with ``alpha >= 0``.  Returns the certified value (``sound``) or, if the
    verification fails, the product of spectral norms (``sound``, method says so).
    """
    from lipverify.bounds.lipsdp import product_bound, verify_multipliers

    t0 = time.perf_counter()
    ws, beta = _check(weights, alpha, beta)
    est, ts = _fast_multipliers(ws, beta)
    val = verify_multipliers(ws, ts, 0.0, beta)
    prod = product_bound(ws, 0.0, beta)
    if val is None or val > prod:
        return EclipseResult(prod, True, "product of spectral norms (ECLipsE-Fast certificate not verified)",
                             time.perf_counter() - t0, est)
    return EclipseResult(val, True, "eclipse-fast (closed-form sequential LipSDP certificate, verified a posteriori)",
                         time.perf_counter() - t0, est, ts)


def eclipse(weights, alpha: float = 0.0, beta: float = 1.0, time_limit: float = 10.0) -> EclipseResult:
    """ECLipsE-Fast, then quasi-Newton steps on the exact ``rho_min(T)`` of LipSDP (one multiplier per
    layer, then one per neuron) from its multipliers, for at most about ``time_limit`` seconds; the
    best verified point is returned (module docstring)."""
    from lipverify.bounds.lipsdp import polish_multipliers, exact_rho_min, verify_multipliers

    t0 = time.perf_counter()
    fast = eclipse_fast(weights, alpha, beta)
    ws, beta = _check(weights, alpha, beta)
    if not fast.multipliers:
        return fast
    ts = fast.multipliers
    n_hidden = sum(w.shape[0] for w in ws[:-1])
    # one rho_min evaluation costs ~N^3: timed here to size the iteration budget to the time limit
    t_eval = time.perf_counter()
    out = exact_rho_min(ws, ts, 0.0, beta, grad=True)
    t_eval = max(time.perf_counter() - t_eval, 1e-4)
    best_rho, best_ts = (out[0], ts) if out is not None else (math.inf, None)
    for form in ("layer", "neuron"):
        # L-BFGS-B: about 3 evaluations per iteration with its line searches.  The layer form has one
        # variable per layer and converges in a few iterations: it always gets at least 5.
        if form == "layer":
            iters = max(5, min(30, int(0.5 * time_limit / (3.0 * t_eval))))
        else:
            iters = int((time_limit - (time.perf_counter() - t0)) / (3.0 * t_eval))
        if iters < 3 or best_ts is None:
            break
        deadline = t0 + (0.5 * time_limit if form == "layer" else 0.9 * time_limit)
        r, cand = polish_multipliers(ws, best_ts, 0.0, beta, form, maxiter=min(iters, 300), ftol=1e-5,
                                     deadline=deadline)
        if cand is not None and r is not None and r < best_rho:
            best_rho, best_ts = r, cand
    val = verify_multipliers(ws, best_ts, 0.0, beta) if best_ts is not None else None
    if val is None or val >= fast.value:
        fast.time_s = time.perf_counter() - t0
        return fast
    return EclipseResult(val, True, f"eclipse (ECLipsE-Fast start, quasi-Newton on LipSDP's rho_min over "
                         f"{n_hidden} neurons, verified a posteriori)", time.perf_counter() - t0, fast.estimate,
                         best_ts)
