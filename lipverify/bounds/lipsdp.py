r"""LipSDP: semidefinite-programming l2 Lipschitz bounds for fully connected networks.

Network and notation
--------------------
``weights = [W_0, ..., W_L]`` describes ``f(x) = W_L phi(W_{L-1} phi( ... phi(W_0 x)))`` (biases do not
change a Lipschitz constant and are not needed).  ``W_k`` has shape ``n_{k+1} x n_k``; ``n_0`` is the
input dimension, ``n_1 .. n_L`` are the widths of the ``L`` hidden layers, ``N = n_1 + ... + n_L``.
Every scalar activation ``phi`` is *slope-restricted* in ``[alpha, beta]``:
``alpha <= (phi(a) - phi(b)) / (a - b) <= beta`` (ReLU, tanh, clipped ReLU: ``[0, 1]``; leaky ReLU with
slope ``a <= 1``: ``[a, 1]``).  It may differ from neuron to neuron and from layer to layer.

The LMI (LipSDP, Fazlyab et al. 2019)
-------------------------------------
For one neuron with pre-activation increment ``dv`` and output increment ``dx = phi(v + dv) - phi(v)``
the slope restriction is the quadratic constraint ``(dx - alpha dv)(beta dv - dx) >= 0``.  Weighting
the constraint of neuron ``i`` of hidden layer ``k`` by ``t_i >= 0`` (``T_k = diag(t)``) and adding
the target inequality ``||dy||^2 <= rho ||dx_0||^2`` (S-procedure) gives the symmetric matrix
``M(rho, T)`` over the stacked increments ``(dx_0, dx_1, ..., dx_L)`` (block sizes ``n_0 .. n_L``).
It is block tridiagonal:

* ``M_00 = -rho I - 2 alpha beta W_0^T T_1 W_0``
* ``M_kk = -2 T_k - 2 alpha beta W_k^T T_{k+1} W_k``   for ``1 <= k <= L-1``
* ``M_LL = -2 T_L + W_L^T W_L``                         (only ``W_L^T W_L`` enters)
* ``M_{k,k+1} = M_{k+1,k}^T = (alpha + beta) W_k^T T_{k+1}``   for ``0 <= k <= L-1``

If ``M(rho, T) <= 0`` (negative semidefinite) for some ``T >= 0`` then
``||f(a) - f(b)||_2 <= sqrt(rho) ||a - b||_2`` for **every** network with these weights and any
activations slope-restricted in ``[alpha, beta]``.  LipSDP minimises ``rho`` over ``(rho, T)``:

* ``form="neuron"``: ``T_k = diag(t)`` with one multiplier per hidden neuron (LipSDP-Neuron);
* ``form="layer"``: ``T_k = lambda_k I`` with one multiplier per hidden layer (LipSDP-Layer), cheaper
  and looser.

The "network" form of the original paper (coupled multipliers between neuron pairs) is **not
offered**: it was later shown not to be valid in general (the coupled constraints do not hold for
all slope-restricted activations).

Soundness: exact rho for the solver's multipliers
-------------------------------------------------
A first-order solver (SCS) returns ``(rho, T)`` that satisfy the LMI only up to its tolerance, so its
``sqrt(rho)`` is not a proof.  ``rho`` appears only in the ``(0, 0)`` block.  Write
``M(rho, T) = [[A - rho I, B], [B^T, C]]`` with ``A = -2 alpha beta W_0^T T_1 W_0`` (``n_0 x n_0``),
``B = [(alpha + beta) W_0^T T_1, 0, ..., 0]`` and ``C`` the hidden ``N x N`` part.  If ``C < 0``
(checked with a float64 Cholesky factorisation ``-C = R^T R``), the Schur complement says
``M(rho, T) <= 0  <=>  A - rho I - B C^{-1} B^T <= 0``, so for this ``T`` the smallest feasible rho is
exactly

    ``rho_min(T) = lambda_max(A - B C^{-1} B^T) = lambda_max(A + K^T K)``,   ``K = R^{-T} B^T``.

lipverify therefore keeps only the solver's ``T`` (negative entries clipped to zero; if ``C`` is not
negative definite, the multipliers are nudged upwards a little and retried), recomputes ``rho_min(T)``
in float64, inflates it by ``(1 + 1e-6)^2`` and checks the whole LMI once more on the *original*
weights with a shifted Cholesky factorisation of ``-M`` (shift ``~ (n+1) u trace(-M)``, a standard
way to make a floating-point Cholesky success imply positive definiteness, in the spirit of Rump 2006).
The reported value is ``sqrt(rho_min(T)) * (1 + 1e-6)``.  Any ``T >= 0`` that passes gives a valid
bound, so the solver tolerance only affects tightness, never soundness.

Speed
-----
* Each ``W_k`` is divided by its spectral norm before solving (the LMI is invariant under the block
  congruence ``diag(d_0 I, ..., d_L I)``, so the optimum scales exactly by ``prod ||W_k||``); this
  makes the problem well conditioned.  The multipliers are mapped back
  (``T_k <- T_k * prod_{j>=k} ||W_j||^2``) before the verification on the original weights.
* The input block is reduced to ``rank(W_0) <= n_1`` columns (``W_0 = R^T Q^T``, QR of ``W_0^T``) and
  the output block to ``rank(W_L) <= n_L`` rows: exact, because only ``W_0`` up to an orthogonal factor
  and ``W_L^T W_L`` enter the LMI.  For MNIST 784-50-10 the cone is 100 x 100 instead of 834 x 834.
* SCS is called directly (no modelling layer): the LMI is assembled as a sparse matrix in SCS's
  scaled lower-triangular vectorisation.  For deep networks the single cone is replaced by one cone
  per pair of consecutive layers (chordal decomposition of the block-tridiagonal pattern, exact).
  Other solvers (``solver="CLARABEL"``, ...) go through cvxpy with the same data.
* Polish: ``rho_min(T)`` is an explicit function of ``T`` with an explicit (sub)gradient
  ``d rho_min / d t_i = -2 (x_i - alpha p_i)(x_i - beta p_i)`` (``u = (v, x_1, .., x_L)`` the null
  vector of ``M(rho_min, T)``, ``p = W_{k-1} u_{k-1}``).  A few L-BFGS-B steps on ``log T`` from the
  solver's multipliers remove most of the error that a first-order solver leaves in ``T``.
  With ``tol=1e-6`` (default) the value matches the SDP optimum to about ``1e-5`` relative.
* ``solver="direct"`` skips the SDP solver: L-BFGS-B on ``rho_min`` from the chained product-bound
  certificate.  Exact to solver precision and nearly instant for the layer form; for the neuron form
  it can stall at a non-smooth point (typically 0.1-1 % above the optimum).  Always sound.
* ``max_neurons_per_block`` splits the network at activation layers into consecutive sub-networks
  with at most that many hidden neurons each; ``Lip(f) <= prod_j LipSDP(g_j) * max(|alpha|, |beta|)^c``
  (``c`` cut activations, each ``max(|alpha|,|beta|)``-Lipschitz).  A sub-network without hidden layer
  is one matrix, bounded by its largest singular value.  The split bound is never tighter than the
  unsplit one (certificates of the pieces chain into one for the whole network).  By default the
  network is split when it has more than 300 hidden neurons.

References
----------
* M. Fazlyab, A. Robey, H. Hassani, M. Morari, G. J. Pappas, "Efficient and accurate estimation of
  Lipschitz constants for deep neural networks", NeurIPS 2019 (LipSDP).
* B. O'Donoghue, E. Chu, N. Parikh, S. Boyd, "Conic optimization via operator splitting and
  homogeneous self-dual embedding", JOTA 2016 (SCS).
* S. M. Rump, "Verification of positive definiteness", BIT Numerical Mathematics 46, 2006.
* J. Agler, J. W. Helton, S. McCullough, L. Rodman, "Positive semidefinite matrices with a given
  sparsity pattern", Linear Algebra Appl. 107, 1988 (chordal decomposition).

Warnings
--------
* Only fully connected networks with scalar slope-restricted activations between consecutive affine
  layers (no convolutions, pooling, residual connections, GroupSort/MinMax); convolutions must be
  unrolled into dense matrices first.
* The network form of LipSDP is not offered (it is not valid in general).
* Cost grows quickly with the width: one SCS iteration eigen-decomposes an ``(n_0' + N)``-sized matrix
  (about 10 s for 300 hidden neurons on a laptop core); split larger networks.
* The float64 verification is not interval arithmetic: rounding in forming ``M`` is covered by the
  ``(1 + 1e-6)`` margin and the Cholesky shift, which is ample for well-scaled weights.
* LipSDP bounds the Lipschitz constant over *all* activations slope-restricted in ``[alpha, beta]``;
  it is therefore at least the maximum of ``||W_L D_L ... D_1 W_0||`` over all diagonal ``D_k`` with
  entries in ``[alpha, beta]``, even activation patterns that ReLU can never realise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipverify.errors import UserInputError

__all__ = [
    "LipSDPResult",
    "lipsdp",
    "lipsdp_matrix",
    "verify_multipliers",
    "split_network",
    "product_bound",
    "DEFAULT_MAX_NEURONS",
]

#: Total number of hidden neurons above which :func:`lipsdp` splits the network by default.
DEFAULT_MAX_NEURONS = 300

_MARGIN = 1e-6  # relative safety factor on the reported value
_U = np.finfo(np.float64).eps / 2  # unit roundoff


@dataclass
class LipSDPResult:
    """Result of :func:`lipsdp`.

    Attributes
    ----------
    value:
        l2 Lipschitz upper bound of ``x -> W_L phi(... phi(W_0 x))`` (a proven bound when ``sound``).
    sound:
        True when every sub-network's bound is backed by a certificate verified in float64: LipSDP
        multipliers that passed the a posteriori check *and* came with an optimal /
        optimal_inaccurate SDP-solver status (or from ``solver="direct"``), or the product of
        spectral norms used as a fallback.
    method:
        How the value was obtained, e.g. ``"lipsdp-neuron (SCS, verified a posteriori)"``.
    status:
        Solver status of each sub-network, ``";"``-separated.
    solve_time:
        Wall-clock seconds, including the verification.
    parts:
        Bound of each sub-network (one entry when the network is not split).  ``value`` is their
        product times ``max(|alpha|, |beta|)`` per cut activation.
    multipliers:
        Verified multipliers ``[T_1, ..., T_L]`` (diagonals, original weight scale) of each
        sub-network; ``None`` for a part bounded by a spectral norm / product bound.
    """

    value: float
    sound: bool
    method: str
    status: str
    solve_time: float
    parts: list[float] = field(default_factory=list)
    multipliers: list[list[np.ndarray] | None] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------------------------
# input checking and small helpers
# ----------------------------------------------------------------------------------------------


def as_weights(weights) -> list[np.ndarray]:
    if weights is None or len(weights) == 0:
        raise UserInputError("lipsdp: need at least one weight matrix")
    out = []
    for k, w in enumerate(weights):
        if hasattr(w, "detach"):  # torch tensor
            w = w.detach().cpu().numpy()
        a = np.array(w, dtype=np.float64, copy=True)
        if a.ndim != 2:
            raise UserInputError(f"lipsdp: weight {k} must be a 2-D matrix, got shape {a.shape}")
        if a.size == 0:
            raise UserInputError(f"lipsdp: weight {k} is empty (shape {a.shape})")
        if not np.all(np.isfinite(a)):
            raise UserInputError(f"lipsdp: weight {k} contains NaN or infinity")
        if k > 0 and a.shape[1] != out[-1].shape[0]:
            raise UserInputError(
                f"lipsdp: weight {k} has {a.shape[1]} columns but weight {k - 1} has "
                f"{out[-1].shape[0]} rows (expected W_k of shape n_(k+1) x n_k)"
            )
        out.append(a)
    return out


def check_slopes(alpha: float, beta: float) -> tuple[float, float]:
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise UserInputError("lipsdp: alpha and beta must be finite")
    if not alpha < beta:
        raise UserInputError(
            f"lipsdp: need alpha < beta (got alpha={alpha}, beta={beta}); a linear activation "
            "(alpha == beta) makes the network linear: bound it by the norm of the merged matrix"
        )
    return alpha, beta


def _sigma_max(w: np.ndarray) -> float:
    return float(np.linalg.norm(w, 2))


def product_bound(weights, alpha: float = 0.0, beta: float = 1.0) -> float:
    """Trivial sound bound ``prod_k ||W_k||_2 * max(|alpha|, |beta|)^L * (1 + 1e-6)``.

    Parameters
    ----------
    weights: list of 2-D arrays ``[W_0, ..., W_L]``.
    alpha, beta: slope bounds of the activations.

    Returns
    -------
    float: product of the spectral norms (float64 SVD) times the activations' Lipschitz constants,
    inflated by ``1e-6`` against rounding.
    """
    ws = as_weights(weights)
    lip_phi = max(abs(float(alpha)), abs(float(beta)))
    val = lip_phi ** (len(ws) - 1)
    for w in ws:
        val *= _sigma_max(w)
    return val * (1.0 + _MARGIN)


def split_network(weights, max_neurons_per_block: int) -> list[list[np.ndarray]]:
    """Split ``[W_0, ..., W_L]`` at activation layers into consecutive sub-networks.

    Greedy: hidden layers are added to the current sub-network while its total number of hidden
    neurons stays ``<= max_neurons_per_block``; the first hidden layer that does not fit becomes a
    *cut* (its activation lies between two sub-networks and is bounded by its Lipschitz constant).
    A hidden layer wider than the limit is always a cut.

    Returns
    -------
    list of weight lists; sub-network ``j`` maps the output of cut ``j-1`` (after its activation) to
    the pre-activation of cut ``j``.  ``f = g_last o phi o ... o phi o g_0``.
    """
    ws = list(weights)
    if max_neurons_per_block is None or max_neurons_per_block < 0:
        raise UserInputError("split_network: max_neurons_per_block must be a non-negative integer")
    chunks: list[list[np.ndarray]] = []
    cur = [ws[0]]
    used = 0
    for k in range(1, len(ws)):
        width = ws[k].shape[1]  # hidden layer k sits between W_{k-1} and W_k
        if used + width <= max_neurons_per_block:
            cur.append(ws[k])
            used += width
        else:
            chunks.append(cur)
            cur = [ws[k]]
            used = 0
    chunks.append(cur)
    return chunks


# ----------------------------------------------------------------------------------------------
# the LMI
# ----------------------------------------------------------------------------------------------


def _expand_multipliers(weights: list[np.ndarray], multipliers) -> list[np.ndarray]:
    """Per-layer diagonals; scalars (layer form) are broadcast to the layer width."""
    L = len(weights) - 1
    if len(multipliers) != L:
        raise UserInputError(f"need {L} multiplier vectors (one per hidden layer), got {len(multipliers)}")
    out = []
    for k in range(1, L + 1):
        n_k = weights[k].shape[1]
        t = np.asarray(multipliers[k - 1], dtype=np.float64).ravel()
        if t.size == 1:
            t = np.full(n_k, float(t[0]))
        if t.size != n_k:
            raise UserInputError(f"hidden layer {k} has {n_k} neurons but {t.size} multipliers were given")
        out.append(t)
    return out


def lipsdp_matrix(weights, rho: float, multipliers, alpha: float = 0.0, beta: float = 1.0) -> np.ndarray:
    """Dense symmetric LipSDP matrix ``M(rho, T)`` (see the module docstring for its blocks).

    Parameters
    ----------
    weights: ``[W_0, ..., W_L]`` with ``L >= 1`` hidden layers.
    rho: the squared Lipschitz candidate.
    multipliers: ``L`` arrays, the diagonal of ``T_k`` (or one scalar per layer for the layer form).
    alpha, beta: slope bounds.

    Returns
    -------
    ``(n_0 + N) x (n_0 + N)`` float64 array.  ``M <= 0`` certifies ``Lip_2(f) <= sqrt(rho)``.
    """
    ws = as_weights(weights)
    if len(ws) < 2:
        raise UserInputError("lipsdp_matrix: need at least one hidden layer (two weight matrices)")
    ts = _expand_multipliers(ws, multipliers)
    return _build_M(ws, float(rho), ts, float(alpha), float(beta))


def _build_M(ws, rho, ts, alpha, beta):
    L = len(ws) - 1
    sizes = [ws[0].shape[1]] + [w.shape[1] for w in ws[1:]]
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    M = np.zeros((n, n))
    ab2 = 2.0 * alpha * beta
    apb = alpha + beta
    M[: sizes[0], : sizes[0]] -= rho * np.eye(sizes[0])
    for k in range(1, L + 1):
        W = ws[k - 1]  # n_k x n_{k-1}
        t = ts[k - 1]
        a0, a1 = off[k - 1], off[k]
        b0, b1 = off[k], off[k + 1]
        if ab2 != 0.0:
            M[a0:a1, a0:a1] -= ab2 * (W.T * t) @ W
        cross = apb * (W.T * t)  # n_{k-1} x n_k
        M[a0:a1, b0:b1] += cross
        M[b0:b1, a0:a1] += cross.T
        M[b0:b1, b0:b1] -= 2.0 * np.diag(t)
    WL = ws[L]
    M[off[L]:, off[L]:] += WL.T @ WL
    return 0.5 * (M + M.T)


def _reduce_input(W0: np.ndarray) -> np.ndarray:
    """``F`` with ``W_0 = F Q^T`` (``Q`` orthonormal columns), ``F`` of shape ``n_1 x min(n_0, n_1)``."""
    if W0.shape[1] <= W0.shape[0]:
        return W0
    _q, r = np.linalg.qr(W0.T, mode="reduced")  # W0^T = Q R  ->  W0 = R^T Q^T
    return r.T


def _reduce_output(WL: np.ndarray) -> np.ndarray:
    """``G`` with ``G^T G = W_L^T W_L`` and at most ``n_L`` rows."""
    if WL.shape[0] <= WL.shape[1]:
        return WL
    _q, r = np.linalg.qr(WL, mode="reduced")
    return r


def _hidden_block(ws, ts, alpha, beta):
    """Hidden part ``C`` (N x N) and the first-layer data for the Schur complement."""
    L = len(ws) - 1
    sizes = [w.shape[1] for w in ws[1:]]
    off = np.concatenate([[0], np.cumsum(sizes)])
    N = int(off[-1])
    C = np.zeros((N, N))
    ab2 = 2.0 * alpha * beta
    apb = alpha + beta
    for k in range(1, L + 1):
        b0, b1 = off[k - 1], off[k]
        C[b0:b1, b0:b1] -= 2.0 * np.diag(ts[k - 1])
        if k < L:
            W = ws[k]  # n_{k+1} x n_k
            t_next = ts[k]
            if ab2 != 0.0:
                C[b0:b1, b0:b1] -= ab2 * (W.T * t_next) @ W
            cross = apb * (W.T * t_next)
            c0, c1 = off[k], off[k + 1]
            C[b0:b1, c0:c1] += cross
            C[c0:c1, b0:b1] += cross.T
    WL = ws[L]
    C[off[L - 1]:, off[L - 1]:] += WL.T @ WL
    return 0.5 * (C + C.T)


def reduce_weights(ws):
    """The exactly reduced weights (input block to ``rank(W_0)`` columns, output to ``rank(W_L)`` rows)
    on which :func:`exact_rho_min` works; compute once when evaluating it many times."""
    return [_reduce_input(ws[0])] + list(ws[1:-1]) + [_reduce_output(ws[-1])]


def exact_rho_min(ws, ts, alpha, beta, grad: bool = False, reduced: bool = False):
    """Exact smallest rho with ``M(rho, T) <= 0`` for fixed T (Schur complement).

    Returns None if the hidden block ``C`` is not negative definite.  With ``grad=True`` returns
    ``(rho, [d rho / d t for each hidden layer])``: with ``v`` the top unit eigenvector of the Schur
    complement and ``u = (v, -C^{-1} B^T v)`` the null vector of ``M(rho_min, T)``, the derivative
    for neuron ``i`` of layer ``k`` is ``u^T (dM/dt_i) u = -2 (x_i - alpha p_i)(x_i - beta p_i)``
    with ``x = u_k`` and ``p = W_{k-1} u_{k-1}`` (a subgradient where the top eigenvalue is multiple).
    """
    if not reduced:  # ``reduced``: the caller already applied the exact reductions (reduce_weights)
        ws = reduce_weights(ws)
    C = _hidden_block(ws, ts, alpha, beta)
    try:
        R = sla.cholesky(-C, lower=False, check_finite=True)
    except (np.linalg.LinAlgError, ValueError):
        return None
    F = ws[0]  # n_1 x r
    t1 = ts[0]
    n1 = F.shape[0]
    Bt = np.zeros((C.shape[0], F.shape[1]))
    Bt[:n1] = (alpha + beta) * (t1[:, None] * F)  # B^T = [(a+b) T_1 W_0; 0]
    K = sla.solve_triangular(R, Bt, trans="T", lower=False)  # R^T K = B^T
    S = K.T @ K
    if alpha * beta != 0.0:
        S -= 2.0 * alpha * beta * (F.T * t1) @ F
    S = 0.5 * (S + S.T)
    if not grad:
        lam = float(np.linalg.eigvalsh(S)[-1])
        return max(lam, 0.0) if math.isfinite(lam) else None
    evals, evecs = np.linalg.eigh(S)
    lam = float(evals[-1])
    if not math.isfinite(lam):
        return None
    v = evecs[:, -1]
    y = sla.solve_triangular(R, K @ v, lower=False)  # -C^{-1} B^T v = R^{-1} R^{-T} B^T v
    sizes = [w.shape[1] for w in ws[1:]]
    us = [v] + np.split(y, np.cumsum(sizes)[:-1])
    g = []
    for k in range(1, len(ws)):
        p = ws[k - 1] @ us[k - 1]
        x = us[k]
        g.append(-2.0 * (x - alpha * p) * (x - beta * p))
    return max(lam, 0.0), g


class _OutOfTime(Exception):
    pass


def polish_multipliers(ws, ts, alpha, beta, form, maxiter=60, ftol=None, deadline=None):
    """Improve the multipliers locally: L-BFGS-B on ``log t -> rho_min(t)`` from the solver's point.

    ``deadline`` (a ``time.perf_counter()`` value): stop there and return the best point so far.
    ``rho_min`` is quasi-convex in ``T`` and stationary at the optimum, so a few quasi-Newton steps
    from a loose solver solution recover several digits.  Only multipliers that the exact
    Schur-complement evaluation accepts are ever returned, so this affects tightness only.
    """
    from scipy.optimize import minimize

    sizes = [t.size for t in ts]
    cuts = np.cumsum(sizes)[:-1]
    pos = [np.maximum(t, 0.0) for t in ts]
    floor = 1e-12 * max(float(np.max(np.concatenate(pos))), 1e-300)
    if form == "neuron":
        u0 = np.log(np.maximum(np.concatenate(pos), floor))

        def unpack(u):
            return np.split(np.exp(u), cuts)

        def pack_grad(g, t):
            return np.concatenate(g) * np.concatenate(t)
    else:
        u0 = np.log(np.maximum(np.array([float(np.mean(t)) for t in pos]), floor))

        def unpack(u):
            return [np.full(n, float(np.exp(ui))) for n, ui in zip(sizes, u)]

        def pack_grad(g, t):
            return np.array([float(np.sum(gk)) * tk[0] for gk, tk in zip(g, t)])

    best = {"rho": math.inf, "ts": None}
    wr = reduce_weights(ws)

    def fun(u):
        if deadline is not None and best["ts"] is not None and time.perf_counter() > deadline:
            raise _OutOfTime
        with np.errstate(over="ignore", invalid="ignore"):
            t = unpack(u)
            try:
                out = exact_rho_min(wr, t, alpha, beta, grad=True, reduced=True)
            except (np.linalg.LinAlgError, ValueError):
                out = None
        if out is None:  # outside the domain C < 0: a large value makes the line search back off
            return (2.0 * best["rho"] if math.isfinite(best["rho"]) else 1e30), np.zeros_like(u)
        rho, g = out
        if rho < best["rho"]:
            best["rho"], best["ts"] = rho, t
        return rho, pack_grad(g, t)

    fun(u0)
    if best["ts"] is None:
        return None, None
    try:
        opts = {"maxiter": maxiter, "maxfun": 3 * maxiter}
        if ftol is not None:  # relative decrease below which L-BFGS-B stops
            opts["ftol"] = ftol
        minimize(fun, u0, jac=True, method="L-BFGS-B", options=opts)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError, _OutOfTime):
        pass
    return best["rho"], best["ts"]


def _nd_certified(M: np.ndarray) -> bool:
    """True when a shifted float64 Cholesky of ``-M`` succeeds, i.e. ``M`` is negative definite.

    ``-M`` is first scaled on both sides by a diagonal of powers of two (``D_ii ~ |M_ii|^(-1/2)``): a
    congruence, so definiteness is unchanged, and exact in floating point.  The diagonal of the scaled
    matrix is then of order one, so the shift (relative to its trace) does not swamp blocks whose
    multipliers are orders of magnitude smaller than the input block's ``rho``."""
    A = -M
    d = np.abs(np.diag(A))
    if np.all(d > 0) and np.all(np.isfinite(d)):
        e = -np.round(np.log2(d) / 2.0)
        D = np.ldexp(1.0, e.astype(np.int64))
        A = (A * D[:, None]) * D[None, :]
    n = A.shape[0]
    g = (n + 1) * _U / (1 - (n + 1) * _U)
    tr = float(np.sum(np.abs(np.diag(A))))
    shift = 2.0 * g / (1 - g) * tr + 1e-300
    try:
        sla.cholesky(A - shift * np.eye(n), lower=False)
    except (np.linalg.LinAlgError, ValueError):
        return False
    return True


def _certify(ws, ts, alpha, beta, rho_min) -> float | None:
    """Smallest ``rho >= rho_min * (1+1e-6)^2`` (on a short escalation ladder) that passes the full check."""
    n0 = ws[0].shape[1]
    check_ws = ws
    if n0 > 4000:  # the full matrix would be too large: check the exactly reduced LMI instead
        check_ws = [_reduce_input(ws[0])] + list(ws[1:])
    scale = 0.0
    for w in ws:
        scale += math.log(max(_sigma_max(w), 1e-300))
    floor = 1e-12 * math.exp(2 * scale)
    for m in (_MARGIN, 1e-5, 1e-4, 1e-3):
        rho = max(rho_min, floor) * (1.0 + m) ** 2
        if _nd_certified(_build_M(check_ws, rho, ts, alpha, beta)):
            return rho
    return None


def verify_multipliers(weights, multipliers, alpha: float = 0.0, beta: float = 1.0) -> float | None:
    """Sound l2 Lipschitz bound certified by fixed LipSDP multipliers ``T``, or None.

    Computes ``rho_min(T) = lambda_max(A - B C^{-1} B^T)`` (exact smallest feasible rho for this T),
    inflates it by ``(1 + 1e-6)^2`` and checks ``M(rho, T) < 0`` with a shifted float64 Cholesky
    factorisation.  Negative multipliers are clipped to zero.

    Parameters
    ----------
    weights: ``[W_0, ..., W_L]``, ``L >= 1``.
    multipliers: ``L`` arrays (diagonals of ``T_k``) or scalars (layer form).
    alpha, beta: slope bounds.

    Returns
    -------
    ``sqrt(rho)`` for the certified rho (at least ``sqrt(rho_min(T)) * (1 + 1e-6)``), or None when
    the hidden block ``C`` is not negative definite for these multipliers or the check fails.
    """
    ws = as_weights(weights)
    alpha, beta = check_slopes(alpha, beta)
    if len(ws) < 2:
        raise UserInputError("verify_multipliers: need at least one hidden layer")
    ts = [np.maximum(t, 0.0) for t in _expand_multipliers(ws, multipliers)]
    rho_min = exact_rho_min(ws, ts, alpha, beta)
    if rho_min is None:
        return None
    rho = _certify(ws, ts, alpha, beta, rho_min)
    return None if rho is None else math.sqrt(rho)


# ----------------------------------------------------------------------------------------------
# solver data: M(x) = M_const + sum_v x_v G_v, x = (rho, t) or (rho, lambda)
# ----------------------------------------------------------------------------------------------


def _lmi_triplets(ws, alpha, beta):
    """Lower-triangle entries of ``G_v`` and ``M_const`` for the neuron form.

    Returns ``(n, rows, cols, var, vals, c_rows, c_cols, c_vals, layer_of_var)``; variable 0 is rho,
    variable ``1 + g`` is the multiplier of hidden neuron ``g`` (global numbering).
    """
    L = len(ws) - 1
    sizes = [ws[0].shape[1]] + [w.shape[1] for w in ws[1:]]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(off[-1])
    R, Cc, V, X = [], [], [], []
    n0 = sizes[0]
    idx = np.arange(n0)
    R.append(idx)
    Cc.append(idx)
    V.append(np.zeros(n0, np.int64))
    X.append(-np.ones(n0))
    ab2 = 2.0 * alpha * beta
    apb = alpha + beta
    layer_of_var = [0]
    gvar = 1
    for k in range(1, L + 1):
        W = ws[k - 1]
        nk, nprev = W.shape
        var = gvar + np.arange(nk)
        layer_of_var += [k] * nk
        # diagonal -2 t_i
        R.append(off[k] + np.arange(nk))
        Cc.append(off[k] + np.arange(nk))
        V.append(var)
        X.append(np.full(nk, -2.0))
        # cross (row in block k, column in block k-1): (alpha+beta) W[i, j]
        ii, jj = np.meshgrid(np.arange(nk), np.arange(nprev), indexing="ij")
        vals = apb * W[ii, jj]
        nz = vals != 0.0
        R.append((off[k] + ii)[nz])
        Cc.append((off[k - 1] + jj)[nz])
        V.append(np.broadcast_to(var[:, None], ii.shape)[nz])
        X.append(vals[nz])
        if ab2 != 0.0:
            a, b = np.tril_indices(nprev)
            vals = -ab2 * W[:, a] * W[:, b]  # nk x npairs
            vv = np.broadcast_to(var[:, None], vals.shape)
            nz = vals != 0.0
            R.append(np.broadcast_to(off[k - 1] + a, vals.shape)[nz])
            Cc.append(np.broadcast_to(off[k - 1] + b, vals.shape)[nz])
            V.append(vv[nz])
            X.append(vals[nz])
        gvar += nk
    WL = ws[L]
    G = WL.T @ WL
    a, b = np.tril_indices(sizes[L])
    c_rows = off[L] + a
    c_cols = off[L] + b
    c_vals = G[a, b]
    return (
        n,
        np.concatenate(R),
        np.concatenate(Cc),
        np.concatenate(V),
        np.concatenate(X),
        c_rows,
        c_cols,
        c_vals,
        np.asarray(layer_of_var),
    )


def _svec_index(r, c, n):
    return c * n - (c * (c - 1)) // 2 + (r - c)


def _aggregate_layer(Gcols: sp.csc_matrix, layer_of_var: np.ndarray, form: str) -> sp.csc_matrix:
    """Map neuron variables to layer variables (sum of columns) for the layer form."""
    if form == "neuron":
        return Gcols
    L = int(layer_of_var.max())
    P = sp.csr_matrix(
        (np.ones(layer_of_var.size), (np.arange(layer_of_var.size), layer_of_var)),
        shape=(layer_of_var.size, L + 1),
    )
    return (Gcols @ P).tocsc()


def _scs_data(ws, alpha, beta, form, chordal=False):
    """SCS data for ``min rho  s.t.  t >= 0,  -M(rho, t) in PSD`` (scaled lower-triangular svec).

    With ``chordal=True`` (and ``L >= 2``) the single ``n x n`` cone is replaced by ``L`` cones over
    the consecutive block pairs ``(k, k+1)``: ``M`` is block tridiagonal, its sparsity graph is
    chordal with these cliques, so ``-M >= 0`` iff ``-M`` is a sum of PSD matrices supported on the
    cliques (Agler et al. 1988).  The diagonal block ``k`` shared by cliques ``k-1`` and ``k`` is split
    as ``-M_kk = (-M_kk - Z_k) + Z_k`` with a free symmetric ``Z_k``.  Exact, and much cheaper per
    iteration for deep networks (eigendecompositions of ``n_k + n_{k+1}`` instead of ``n``).

    Returns ``(data, cone, layer_of_var, x_layout)`` where ``x_layout`` holds what is needed to build
    a warm start: ``(nvar_main, z_slices)``.
    """
    n, r, c, v, x, cr, cc, cv, layer_of_var = _lmi_triplets(ws, alpha, beta)
    L = len(ws) - 1
    sizes = [ws[0].shape[1]] + [w.shape[1] for w in ws[1:]]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nvar_neuron = layer_of_var.size
    agg = _aggregate_layer(sp.identity(nvar_neuron, format="csc"), layer_of_var, form)  # var map
    nvar_main = agg.shape[1]
    nt = nvar_main - 1
    if not chordal or L < 2:
        cones_n = [n]
        m_psd = n * (n + 1) // 2
        scale = np.where(r == c, 1.0, math.sqrt(2.0))
        G = sp.csc_matrix((x * scale, (_svec_index(r, c, n), v)), shape=(m_psd, nvar_neuron)) @ agg
        cscale = np.where(cr == cc, 1.0, math.sqrt(2.0))
        b_psd = np.zeros(m_psd)
        np.add.at(b_psd, _svec_index(cr, cc, n), -cv * cscale)  # b = svec(-M_const)
        z_slices = []
        nvar = nvar_main
    else:
        # clique j = blocks (j, j+1), local offset of its first block is 0, of its second n_j
        cones_n = [sizes[j] + sizes[j + 1] for j in range(L)]
        cone_start = np.concatenate([[0], np.cumsum([m * (m + 1) // 2 for m in cones_n])]).astype(np.int64)
        m_psd = int(cone_start[-1])
        blk = np.searchsorted(off, np.arange(n), side="right") - 1  # block of each global index

        def place(rr, cc_):
            bi, bj = blk[rr], blk[cc_]
            # clique: off-diagonal pair (j+1, j) -> j; diagonal block k -> k-1 except block 0 -> 0
            clique = np.where(bi == bj, np.maximum(bi - 1, 0), bj)
            base = off[clique]
            lr, lc = rr - base, cc_ - base
            m = np.asarray(cones_n)[clique]
            return cone_start[clique] + _svec_index(lr, lc, m), lr == lc

        idx, diag = place(r, c)
        G = sp.csc_matrix((x * np.where(diag, 1.0, math.sqrt(2.0)), (idx, v)), shape=(m_psd, nvar_neuron)) @ agg
        cidx, cdiag = place(cr, cc)
        b_psd = np.zeros(m_psd)
        np.add.at(b_psd, cidx, -cv * np.where(cdiag, 1.0, math.sqrt(2.0)))
        # Z_k variables, k = 1 .. L-1: +Z_k in clique k (first block), -Z_k in clique k-1 (second block)
        zr, zc, zx = [], [], []
        z_slices = []
        col = nvar_main
        for k in range(1, L):
            nk = sizes[k]
            a_, b_ = np.tril_indices(nk)
            nz = a_.size
            cols = col + np.arange(nz)
            z_slices.append((k, col, a_, b_))
            sc = np.where(a_ == b_, 1.0, math.sqrt(2.0))
            # s = b - A x, s holds svec(-M split); Z enters s with +1 in clique k -> A coefficient -1
            zr.append(cone_start[k] + _svec_index(a_, b_, cones_n[k]))
            zc.append(cols)
            zx.append(-sc)
            mprev = cones_n[k - 1]
            zr.append(cone_start[k - 1] + _svec_index(sizes[k - 1] + a_, sizes[k - 1] + b_, mprev))
            zc.append(cols)
            zx.append(sc)
            col += nz
        nvar = col
        Z = sp.csc_matrix((np.concatenate(zx), (np.concatenate(zr), np.concatenate(zc))), shape=(m_psd, nvar))
        G = sp.hstack([G, sp.csc_matrix((m_psd, nvar - nvar_main))], format="csc") + Z
    A_lin = sp.hstack(
        [sp.csc_matrix((nt, 1)), -sp.identity(nt, format="csc"), sp.csc_matrix((nt, nvar - nvar_main))], format="csc"
    )
    A = sp.vstack([A_lin, G], format="csc")
    b = np.concatenate([np.zeros(nt), b_psd])
    cvec = np.zeros(nvar)
    cvec[0] = 1.0
    return {"A": A, "b": b, "c": cvec}, {"l": nt, "s": cones_n}, layer_of_var, (nvar_main, z_slices, off)


def _initial_point(ws, alpha, beta):
    """Warm start for the normalised problem (every ``||W_k|| <= 1``): the chained product certificate.

    With ``lip = max(|alpha|, |beta|)``, a neuron obeys ``lip^2 dv^2 - dx^2 >= lam * q(dv, dx)``
    where ``q = 2 (dx - alpha dv)(beta dv - dx)`` is its slope constraint, for the ``lam`` that makes
    the 2 x 2 form ``[[lip^2 + 2 lam alpha beta, -lam (alpha+beta)], [., 2 lam - 1]]`` PSD (``lam = 1``
    for ReLU).  Chaining ``||dv_{k+1}|| <= ||dx_k||`` through the layers shows that
    ``rho = lip^(2L)``, ``T_k = lam lip^(2(L-k)) I`` satisfies the LMI (the product bound).
    """
    L = len(ws) - 1
    lip = max(abs(alpha), abs(beta))
    best_lam, best_eig = 1.0, -math.inf
    for lam in np.geomspace(1e-3, 1e3, 241):
        q = np.array([[lip**2 + 2 * lam * alpha * beta, -lam * (alpha + beta)], [-lam * (alpha + beta), 2 * lam - 1]])
        e = float(np.linalg.eigvalsh(q)[0]) / (1.0 + lam)
        if e > best_eig:
            best_lam, best_eig = float(lam), e
    scalars = [best_lam * lip ** (2 * (L - k)) for k in range(1, L + 1)]
    ts = [np.full(ws[k].shape[1], c) for k, c in zip(range(1, L + 1), scalars)]
    return lip ** (2 * L), scalars, ts


def _scs_status(status: str) -> str:
    """SCS 3 status text -> cvxpy-style status ("solved (inaccurate - reached max_iters)" etc.)."""
    st = status.lower().strip()
    if st.startswith("solved"):
        return "optimal_inaccurate" if "inaccurate" in st else "optimal"
    if "infeasible" in st or "unbounded" in st:
        return st.replace(" ", "_")
    return st


def _use_chordal(ws) -> bool:
    """Chordal splitting pays off when the clique cones are clearly smaller than the full cone."""
    sizes = [ws[0].shape[1]] + [w.shape[1] for w in ws[1:]]
    if len(sizes) < 3:
        return False
    full = float(sum(sizes)) ** 3
    split = sum(float(sizes[j] + sizes[j + 1]) ** 3 for j in range(len(sizes) - 1))
    return split < 0.6 * full


#: wall-clock limit of one SCS solve (seconds); an unfinished solve still yields verified multipliers
SCS_TIME_LIMIT = 60.0


def _solve_scs(ws, alpha, beta, form, tol, verbose, max_iters=None, warm_start=False, chordal=None):
    import scs

    if chordal is None:
        chordal = _use_chordal(ws)
    if max_iters is None:
        # the layer form has few multipliers: SCS converges slowly on deep nets, but an approximate
        # solution followed by the exact-rho polish reaches the optimum (see polish_multipliers)
        max_iters = 1000 if form == "layer" else 20000
    data, cone, layer_of_var, (nvar_main, z_slices, off) = _scs_data(ws, alpha, beta, form, chordal=chordal)
    settings = dict(
        eps_abs=tol, eps_rel=tol, eps_infeas=1e-9, verbose=bool(verbose), max_iters=max_iters,
        acceleration_lookback=10, time_limit_secs=SCS_TIME_LIMIT,
    )
    solver = scs.SCS(data, cone, **settings)
    init = _initial_point(ws, alpha, beta) if warm_start else None
    if init is not None:
        rho0, scalars, ts0 = init
        main = np.concatenate([[rho0], np.concatenate(ts0) if form == "neuron" else scalars])
        x0 = np.zeros(data["A"].shape[1])
        x0[:nvar_main] = main
        if z_slices:
            Mfull = _build_M(ws, rho0, ts0, alpha, beta)
            for k, col, a_, b_ in z_slices:
                blkk = -Mfull[off[k]:off[k + 1], off[k]:off[k + 1]]
                x0[col:col + a_.size] = 0.5 * blkk[a_, b_]
        s0 = data["b"] - data["A"] @ x0
        y0 = np.zeros_like(s0)
        sol = solver.solve(warm_start=True, x=x0, y=y0, s=s0)
    else:
        sol = solver.solve(warm_start=False)
    info = sol["info"]
    status = str(info.get("status", "unknown"))
    norm_status = _scs_status(status)
    xs = np.asarray(sol["x"], dtype=np.float64)[:nvar_main]
    return xs, norm_status, layer_of_var


def _solve_cvxpy(ws, alpha, beta, form, tol, verbose, solver):
    import cvxpy as cp

    n, r, c, v, x, cr, cc, cv, layer_of_var = _lmi_triplets(ws, alpha, beta)
    nvar_neuron = layer_of_var.size
    # full (column-major) vectorisation of the symmetric matrix
    off = r != c
    rows = np.concatenate([r + c * n, (c + r * n)[off]])
    cols = np.concatenate([v, v[off]])
    vals = np.concatenate([x, x[off]])
    G = sp.csc_matrix((vals, (rows, cols)), shape=(n * n, nvar_neuron))
    G = _aggregate_layer(G, layer_of_var, form)
    g0 = np.zeros(n * n)
    offc = cr != cc
    np.add.at(g0, np.concatenate([cr + cc * n, (cc + cr * n)[offc]]), np.concatenate([cv, cv[offc]]))
    nvar = G.shape[1]
    xv = cp.Variable(nvar)
    Mexpr = cp.reshape(G @ xv + g0, (n, n), order="F")
    cons = [xv[1:] >= 0, -(Mexpr + Mexpr.T) / 2 >> 0]
    prob = cp.Problem(cp.Minimize(xv[0]), cons)
    kwargs = {}
    name = solver.upper()
    if name == "SCS":
        kwargs = dict(eps_abs=tol, eps_rel=tol)
    elif name == "CLARABEL":
        kwargs = dict(tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    try:
        prob.solve(solver=name, verbose=bool(verbose), **kwargs)
    except cp.error.SolverError as exc:
        return None, f"solver_error: {exc}", layer_of_var
    status = str(prob.status)
    xs = None if xv.value is None else np.asarray(xv.value, dtype=np.float64)
    return xs, status, layer_of_var


def _multipliers_from_x(xs, layer_of_var, ws, form):
    L = len(ws) - 1
    out = []
    if form == "neuron":
        t_all = xs[1:]
        for k in range(1, L + 1):
            out.append(np.asarray(t_all[layer_of_var[1:] == k], dtype=np.float64))
    else:
        for k in range(1, L + 1):
            out.append(np.full(ws[k].shape[1], float(xs[k])))
    return out


def _repair_candidates(ts: list[np.ndarray]):
    """The clipped multipliers, then versions nudged upwards (per layer, relative to its mean)."""
    ts = [np.maximum(t, 0.0) for t in ts]
    yield ts
    for delta in (1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1):
        out = []
        for t in ts:
            ref = float(np.mean(t)) if np.any(t > 0) else 1.0
            out.append(t + delta * ref)
        yield out


def _direct_start(ws, alpha, beta):
    """Starting multipliers for ``solver="direct"``: the chained product certificate, scaled."""
    _rho, _scalars, ts0 = _initial_point(ws, alpha, beta)
    best = (None, None)
    for f in (1.01, 2.0, 0.5, 4.0, 0.25, 16.0):
        cand = [t * f for t in ts0]
        r = exact_rho_min(ws, cand, alpha, beta)
        if r is not None and (best[0] is None or r < best[0]):
            best = (r, cand)
    return best


def _solve_direct(ws, alpha, beta, form):
    """``solver="direct"``: minimise the exact ``rho_min(T)`` by L-BFGS-B, no SDP solver.

    Layer form first (``L`` variables, from the chained product certificate), then, for the neuron
    form, all ``N`` multipliers from the layer optimum.  Any point it returns is verified like an SDP
    solution; it is not guaranteed to reach the SDP optimum (``rho_min`` is non-smooth where the top
    eigenvalue is multiple), which matters most for the neuron form.
    """
    rho, ts = _direct_start(ws, alpha, beta)
    if ts is None:
        return None, None, "direct: no strictly feasible start"
    r, cand = polish_multipliers(ws, ts, alpha, beta, "layer", maxiter=300)
    if cand is not None and r < rho:
        rho, ts = r, cand
    if form == "neuron":
        r, cand = polish_multipliers(ws, ts, alpha, beta, "neuron", maxiter=300)
        if cand is not None and r < rho:
            rho, ts = r, cand
    return rho, ts, "direct"


def _solve_part(ws, alpha, beta, form, solver, tol, verbose, polish=True, warm_start=False):
    """LipSDP for one sub-network (>= 1 hidden layer).  Returns (value, sound, note, status, T)."""
    L = len(ws) - 1
    sig = [_sigma_max(w) for w in ws]
    if min(sig) == 0.0:
        return 0.0, True, "zero weight matrix", "trivial", None
    # normalised and exactly reduced problem for the solver
    wn = [w / s for w, s in zip(ws, sig)]
    wred = [_reduce_input(wn[0])] + wn[1:-1] + [_reduce_output(wn[-1])]
    sname = solver.upper()
    best_rho, best_ts = None, None
    if sname == "DIRECT":
        best_rho, best_ts, status = _solve_direct(wred, alpha, beta, form)
        if best_ts is None:
            return None, False, status, status, None
    else:
        if sname == "SCS":
            xs, status, layer_of_var = _solve_scs(wred, alpha, beta, form, tol, verbose, warm_start=warm_start)
        else:
            xs, status, layer_of_var = _solve_cvxpy(wred, alpha, beta, form, tol, verbose, solver)
        if xs is None or not np.all(np.isfinite(xs)):
            return None, False, f"{sname} returned no solution", status, None
        t_norm = _multipliers_from_x(xs, layer_of_var, wred, form)
        for cand in _repair_candidates(t_norm):
            r = exact_rho_min(wred, cand, alpha, beta)
            if r is not None:
                best_rho, best_ts = r, cand
                break
        if best_ts is not None and polish:
            r, cand = polish_multipliers(wred, best_ts, alpha, beta, form, maxiter=300 if form == "layer" else 100)
            if cand is not None and r < best_rho:
                best_rho, best_ts = r, cand
        if best_ts is None:
            return None, False, f"{sname} multipliers do not certify the LMI", status, None
    # map to the original scale: T_k <- T_k * prod_{j >= k} ||W_j||^2, then verify there
    tail = [float(np.prod(np.square(sig[k:]))) for k in range(1, L + 1)]
    ts_orig = [t * s for t, s in zip(best_ts, tail)]
    rho_orig = exact_rho_min(ws, ts_orig, alpha, beta)
    if rho_orig is None:
        return None, False, "verification on the original weights failed", status, None
    rho_cert = _certify(ws, ts_orig, alpha, beta, rho_orig)
    if rho_cert is None:
        return None, False, "final Cholesky check failed", status, None
    value = math.sqrt(rho_cert)
    # an SDP solver's multipliers count only with an optimal status; "direct" has no such status,
    # its multipliers are a certificate on their own once verified
    ok_status = status in ("optimal", "optimal_inaccurate", "direct")
    return value, ok_status, sname, status, ts_orig


def lipsdp(
    weights,
    *,
    form: str = "neuron",
    alpha: float = 0.0,
    beta: float = 1.0,
    solver: str = "SCS",
    max_neurons_per_block: int | None = None,
    tol: float = 1e-6,
    verbose: bool = False,
    polish: bool = True,
    warm_start: bool = False,
) -> LipSDPResult:
    """Sound l2 Lipschitz upper bound of a fully connected network by LipSDP (neuron or layer form).

    Minimises ``rho`` subject to ``M(rho, T) <= 0`` (the block-tridiagonal LMI of the module
    docstring), then recomputes the exact smallest ``rho`` for the solver's multipliers ``T`` by a
    Schur complement and verifies the LMI in float64; the bound is ``sqrt(rho) * (1 + 1e-6)``.

    Parameters
    ----------
    weights:
        ``[W_0, ..., W_L]`` (numpy arrays or torch tensors), ``W_k`` of shape ``n_{k+1} x n_k``;
        an activation sits between every pair of consecutive matrices.  Biases are irrelevant.
    form:
        ``"neuron"`` (one multiplier per hidden neuron, LipSDP-Neuron) or ``"layer"`` (one per hidden
        layer, LipSDP-Layer).  ``"network"`` is refused: it is not valid in general.
    alpha, beta:
        Slope bounds of every activation, ``alpha < beta`` (ReLU / tanh: 0, 1; leaky ReLU(a): a, 1).
    solver:
        ``"SCS"`` (default; called directly, fast), any cvxpy SDP solver name (e.g. ``"CLARABEL"``,
        much slower beyond ~50 neurons), or ``"direct"`` (no SDP solver: quasi-Newton minimisation
        of the exact ``rho_min(T)``; as good as SCS and nearly instant for the layer form, possibly
        0.1-1 % looser for the neuron form).
    max_neurons_per_block:
        Split the network at activation layers into sub-networks with at most this many hidden
        neurons each and multiply their bounds (see :func:`split_network`).  ``None``: split at
        ``DEFAULT_MAX_NEURONS`` (300) when the network has more hidden neurons than that.
    tol:
        Solver tolerance (SCS ``eps_abs = eps_rel``).  Affects tightness only, not soundness.
    verbose:
        Print the solver log.
    polish:
        Refine the solver's multipliers by L-BFGS-B on the exact ``rho_min(T)`` (default True).
    warm_start:
        Start SCS from the chained product-bound certificate (primal only; default False: it did
        not reduce the iteration count in our measurements).

    Returns
    -------
    :class:`LipSDPResult`.  ``sound`` requires, for every sub-network, a verified certificate and
    (for an SDP solver) an ``optimal`` / ``optimal_inaccurate`` status; a verified bound from a
    solver with another status is returned with ``sound=False`` and the status named in ``method``.
    For a sub-network whose LipSDP certificate cannot be verified, the
    product of spectral norms is used instead (stated in ``method``); it is also used when it is
    smaller (only possible through solver inaccuracy when LipSDP gains nothing).

    Raises
    ------
    UserInputError: bad shapes / values, ``alpha >= beta``, unknown or unsupported ``form``.
    """
    t_start = time.perf_counter()
    form = str(form).lower()
    if form == "network":
        raise UserInputError(
            "lipsdp: the 'network' form (coupled neuron-pair multipliers) is not offered: it was shown "
            "not to be valid in general; use form='neuron' or form='layer'"
        )
    if form not in ("neuron", "layer"):
        raise UserInputError(f"lipsdp: unknown form {form!r}; use 'neuron' or 'layer'")
    ws = as_weights(weights)
    alpha, beta = check_slopes(alpha, beta)
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise UserInputError(f"lipsdp: tol must be in (0, 1), got {tol!r}")
    solver = str(solver)
    if solver.upper() not in ("SCS", "DIRECT"):
        import cvxpy as cp

        if solver.upper() not in cp.installed_solvers():
            raise UserInputError(
                f"lipsdp: solver {solver!r} is not available; use 'SCS', 'direct' or one of {cp.installed_solvers()}"
            )
    lip_phi = max(abs(alpha), abs(beta))
    total_hidden = sum(w.shape[1] for w in ws[1:])
    if max_neurons_per_block is None:
        max_neurons_per_block = total_hidden if total_hidden <= DEFAULT_MAX_NEURONS else DEFAULT_MAX_NEURONS
    chunks = split_network(ws, int(max_neurons_per_block))

    parts: list[float] = []
    mults: list = []
    statuses: list[str] = []
    notes: list[str] = []
    sound = True
    for chunk in chunks:
        if len(chunk) == 1:
            parts.append(_sigma_max(chunk[0]) * (1.0 + _MARGIN))
            mults.append(None)
            statuses.append("svd")
            continue
        prod = product_bound(chunk, alpha, beta)
        value, ok, note, status, ts = _solve_part(
            chunk, alpha, beta, form, solver, tol, verbose, polish=polish, warm_start=warm_start
        )
        statuses.append(status)
        if value is None:
            # no verified certificate: the product of spectral norms is the (sound) fallback
            parts.append(prod)
            mults.append(None)
            notes.append(f"product-bound fallback ({note})")
            continue
        if value > prod:
            parts.append(prod)
            mults.append(None)
            notes.append("product bound tighter than LipSDP on a sub-network")
            continue
        parts.append(value)
        mults.append(ts)
        if not ok:
            sound = False
            notes.append(f"solver status {status}")
    n_cuts = len(chunks) - 1
    value = float(np.prod(parts)) * lip_phi**n_cuts
    sname = solver.upper() if solver.upper() != "DIRECT" else "direct rho_min minimisation"
    method = f"lipsdp-{form} ({sname}, verified a posteriori)"
    if len(chunks) > 1:
        method += f", split into {len(chunks)} sub-networks (<= {max_neurons_per_block} hidden neurons each)"
    if len(ws) == 1:
        method = "spectral norm (no hidden layer)"
    if notes:
        method += "; " + "; ".join(dict.fromkeys(notes))
    return LipSDPResult(
        value=value,
        sound=sound,
        method=method,
        status=";".join(statuses),
        solve_time=time.perf_counter() - t_start,
        parts=parts,
        multipliers=mults,
    )
