"""Empirical Lipschitz *lower* bounds: witnesses that the true constant is at least some value.

Everything here uses only the model's forward pass (and autograd through it), never lipverify's
upper-bound code, so ``lower <= true <= upper`` is an independent check of the bounds; ``upper / lower``
is the tightness gap.

Maths
-----
For the margin ``m_ji(x) = f_j(x) - f_i(x)`` and any two points ``a != b``,

    Lip_p(m_ji) >= |m_ji(a) - m_ji(b)| / ||a - b||_p,

so every evaluated pair is a proven lower bound (up to the floating-point error of the forward pass,
see Warnings).  The supremum of such ratios is the constant itself.  For a function that is
differentiable almost everywhere the constant also equals ``sup_x ||grad m_ji(x)||_q`` (q the dual
norm: q = 2 for p = 2, q = 1 for p = inf), but a gradient norm is a lower bound only as a *limit* of
ratios; to stay strict we convert the best gradient point ``x`` into the finite-difference pair
``(x - h d, x + h d)`` with ``d = g / ||g||_2`` (p = 2) or ``d = sign(g)`` (p = inf), ``||d||_p = 1``,
whose ratio ``|m(x + h d) - m(x - h d)| / (2h)`` tends to ``g . d = ||g||_q`` as ``h -> 0`` (and equals it
for a piecewise-affine net once both points lie in the linear piece of ``x``).  Only ratios of explicit
pairs are ever reported.

Searches:

* Pair optimisation (Leino et al., 2021, appendix F, the GloRo lower bound): maximise the ratio over
  both points by Adam, started from data points plus small perturbations and from random points.
* Gradient points: the dual-norm gradient norm at the seeds and at the optimised pairs, optionally
  increased by ascent on ``||grad m||_q`` (double backpropagation; skipped when the second derivative
  vanishes, as it does almost everywhere for ReLU nets).
* Whole logit map, l2 (:func:`jacobian_spectral_lower_bound`): power iteration on ``J(x)^T J(x)`` with
  Jacobian-vector and vector-Jacobian products gives the top right singular vector ``v`` and
  ``sigma_max(J(x))``; ascent on ``x`` maximises the finite-difference ratio
  ``||f(x + h v) - f(x - h v)||_2 / (2h)`` (non-zero gradients even for ReLU nets) with ``h`` decaying.
  The reported value is again the ratio of the explicit pair ``(x - h v, x + h v)``.

Local versions (``eps`` given): every point is projected onto ``B_p(x_k, eps)`` for the seed ``x_k`` it
started from (and onto ``clip``), so the value bounds the Lipschitz constant of the margin restricted
to that ball from below.

References
----------
K. Leino, Z. Wang, M. Fredrikson. "Globally-Robust Neural Networks." ICML 2021 (appendix F: lower
bounds by optimising pairs of points with Adam).

Warnings
--------
* The final ratio is recomputed in float64 from the witness points, but through the *given* forward
  pass: with a float32 model the logits carry rounding errors of about ``1e-7 * |f|``, so the reported
  value can exceed the exact ratio of the same two points by about ``1e-7 |f| / ||a - b||``.  The
  finite-difference step ``h`` is kept large enough (``>= 3e-4`` times the data scale for float32) that
  this is negligible; pass ``recompute_forward`` (a float64 copy of the model) to remove it.
* A lower bound says nothing about robustness.  It shows how loose an upper bound *may* be; the true
  constant lies between the two.
* The forward must process rows independently (eval mode, no batch statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lipverify.attacks.core import (
    apply_clip,
    bcast,
    check_norm,
    flat_dual_norm,
    flat_norm,
    logits_of,
    project_ball,
    rand_like_gen,
    random_in_ball,
)

Forward = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["LowerBoundResult", "margin_lipschitz_lower_bound", "jacobian_spectral_lower_bound"]


@dataclass
class LowerBoundResult:
    """A proven lower bound on a Lipschitz constant, with the two points that prove it.

    Attributes
    ----------
    value:
        ``|g(a) - g(b)| / ||a - b||`` in float64 (g = the margin ``f_j - f_i``, or the logit map for the
        Jacobian bound), recomputed from the witnesses.  0 when no pair gave a positive ratio.
    pair:
        ``(j, i)`` for a margin bound, ``None`` for the whole logit map.
    witness_a, witness_b:
        The two points, each of shape ``input_shape`` (``None`` if value is 0).
    method:
        ``"pair-adam"``, ``"gradient-fd"`` (finite-difference pair at a gradient point) or
        ``"jacobian-power-fd"``.
    sound_lower:
        Always true: the value is the ratio of two explicit points (see the float32 caveat in the
        module docstring).
    seed_index:
        Index in ``x_seed`` of the seed the witness started from (for local bounds: the centre of the
        ball that contains both witnesses).
    """

    value: float
    pair: tuple | None
    witness_a: torch.Tensor | None
    witness_b: torch.Tensor | None
    method: str
    sound_lower: bool = True
    seed_index: int | None = None


# --------------------------------------------------------------------------------------------------
# helpers


def _data_scale(x: torch.Tensor, clip) -> float:
    if clip is not None:
        s = float(clip[1]) - float(clip[0])
        if s > 0:
            return s
    s = float(x.max() - x.min()) if x.numel() else 0.0
    if s <= 0:
        s = float(x.abs().max()) if x.numel() else 0.0
    return s if s > 0 else 1.0


def _fd_steps(dtype: torch.dtype, base: float) -> list[float]:
    if dtype == torch.float64:
        return [base * f for f in (1e-5, 1e-3, 1e-1)]
    return [base * f for f in (3e-4, 3e-3, 3e-2)]


class _Problem:
    """Shared state: forward, norm, ball/box constraints, float64 recomputation."""

    def __init__(self, forward, x_seed, norm, eps, clip, recompute_forward):
        self.forward = forward
        self.norm = check_norm(norm)
        self.x_seed = x_seed.detach()
        if self.x_seed.dim() < 2 or self.x_seed.shape[0] == 0:
            raise ValueError("x_seed must be a non-empty batch (S, *input_shape)")
        if eps is not None and not float(eps) > 0:
            raise ValueError("eps must be positive")
        self.eps = None if eps is None else float(eps)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.recompute = recompute_forward
        self.dim = self.x_seed[0].numel()
        self.scale = _data_scale(self.x_seed, self.clip)

    def project(self, z: torch.Tensor, seed_idx: torch.Tensor) -> torch.Tensor:
        if self.eps is not None:
            c = self.x_seed[seed_idx]
            e = torch.full((z.shape[0],), self.eps, dtype=torch.float64, device=z.device)
            z = c + project_ball(z - c, e, self.norm)
        return apply_clip(z, self.clip)

    def centres(self, restarts: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Start points: the seeds, perturbed seeds, and (global only) random points in the data box."""
        xs = self.x_seed
        S = xs.shape[0]
        out, sid = [], []
        for r in range(max(1, restarts)):
            idx = torch.arange(S, device=xs.device)
            if r == 0:
                c = xs.clone()
            elif self.eps is not None:
                e = torch.full((S,), self.eps, dtype=torch.float64, device=xs.device)
                c = xs + random_in_ball(xs, e, self.norm, generator)
            elif r % 2 == 1:
                e = torch.full((S,), 0.1 * self.scale, dtype=torch.float64, device=xs.device)
                e = e * (math.sqrt(self.dim) if self.norm == "2" else 1.0)
                c = xs + random_in_ball(xs, e, self.norm, generator)
            else:
                lo = float(xs.min()) if self.clip is None else self.clip[0]
                hi = float(xs.max()) if self.clip is None else self.clip[1]
                if hi <= lo:
                    lo, hi = lo - 1.0, hi + 1.0
                c = lo + (hi - lo) * rand_like_gen(xs.shape, xs, generator)
            out.append(self.project(c, idx))
            sid.append(idx)
        return torch.cat(out), torch.cat(sid)

    def logits64(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.recompute is not None:
                return logits_of(self.recompute, z.to(torch.float64)).to(torch.float64)
            return logits_of(self.forward, z).to(torch.float64)

    def margin_ratio64(self, a, b, j, i) -> torch.Tensor:
        la, lb = self.logits64(a), self.logits64(b)
        ma = la.gather(1, j.reshape(-1, 1)).squeeze(1) - la.gather(1, i.reshape(-1, 1)).squeeze(1)
        mb = lb.gather(1, j.reshape(-1, 1)).squeeze(1) - lb.gather(1, i.reshape(-1, 1)).squeeze(1)
        dn = flat_norm(a.to(torch.float64) - b.to(torch.float64), self.norm)
        return torch.where(dn > 0, (ma - mb).abs() / dn.clamp_min(1e-300), torch.zeros_like(dn))

    def logit_ratio64(self, a, b) -> torch.Tensor:
        la, lb = self.logits64(a), self.logits64(b)
        dn = flat_norm(a.to(torch.float64) - b.to(torch.float64), "2")
        num = (la - lb).norm(dim=1)
        return torch.where(dn > 0, num / dn.clamp_min(1e-300), torch.zeros_like(dn))

    def fd_pairs(self, z, d, seed_idx, h):
        a = self.project(z - h * d, seed_idx)
        b = self.project(z + h * d, seed_idx)
        return a, b


class _Adam:
    """Plain Adam ascent on a list of tensors (Kingma & Ba 2015); avoids torch.optim's import cost."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        """Move each parameter *down* its gradient (pass the gradient of the quantity to minimise)."""
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def _default_lr(prob: _Problem) -> float:
    """Adam step per coordinate: 3% of the data scale (global), or 5% of eps per l2/l-inf step (local).

    Tuned on a small MNIST CNN: 0.03 gave 20-45% larger global lower bounds than 5e-4 (GloRo's
    Keras default 1e-3 is meant for 7,500 steps; we default to 200).
    """
    if prob.eps is None:
        return 0.03 * prob.scale
    return 0.05 * prob.eps / (math.sqrt(prob.dim) if prob.norm == "2" else 1.0)


def _margin_of(logits, j, i):
    return logits.gather(1, j.reshape(-1, 1)).squeeze(1) - logits.gather(1, i.reshape(-1, 1)).squeeze(1)


def _unit_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """``d`` with ``||d||_p = 1`` and ``g . d = ||g||_q``."""
    if norm == "2":
        return g / bcast(flat_norm(g, "2").clamp_min(torch.finfo(g.dtype).tiny), g)
    return g.sign()


# --------------------------------------------------------------------------------------------------


def margin_lipschitz_lower_bound(
    forward: Forward,
    x_seed: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    norm: str = "2",
    steps: int = 200,
    restarts: int = 3,
    generator: torch.Generator | None = None,
    eps: float | None = None,
    clip=None,
    lr: float | None = None,
    grad_steps: int | None = None,
    recompute_forward: Forward | None = None,
    max_rows: int = 4096,
) -> list[LowerBoundResult]:
    """Lower bounds on the margin Lipschitz constants ``Lip_p(f_j - f_i)``, one per pair.

    Parameters
    ----------
    forward:
        Callable ``(B, *input_shape) -> (B, m)`` logits (eval mode; rows independent).
    x_seed:
        ``(S, *input_shape)`` data points; the searches start from them (and, for ``restarts > 1``, from
        perturbed copies and random points in the data box).  Device and dtype are taken from it.
    pairs:
        List of class pairs ``(j, i)``, ``j != i``.
    norm:
        ``"2"`` or ``"inf"`` (the input norm ``p``; the output is a scalar).
    steps:
        Adam steps of the pair optimisation.
    restarts:
        Number of start-point sets (each ``S`` points): seeds, perturbed seeds, random points, ...
    generator:
        ``torch.Generator`` for the random starts.
    eps:
        Local version: keep both points of every pair inside ``B_p(x_k, eps)`` for the seed ``x_k`` they
        started from.  ``None``: global.
    clip:
        Optional input box ``(lo, hi)`` for all points (a lower bound over the box is still a lower
        bound on the global constant).
    lr:
        Adam learning rate (per coordinate); default ``0.03 * data scale`` (global; the data scale is the
        clip width or the value range of ``x_seed``), or ``0.05 * eps`` per step of the ball's norm
        (local: ``0.05 * eps / sqrt(n)`` for p = 2).  The two points of a pair start within
        ``D / 2`` of their start point, ``D = eps`` (local) or ``0.01 * data scale`` per coordinate.
    grad_steps:
        Ascent steps on ``||grad m||_q`` (default ``steps // 4``; skipped automatically for piecewise
        linear nets).
    recompute_forward:
        Optional forward (e.g. a float64 copy of the model) used only to recompute the reported ratios.
    max_rows:
        Rows (pair x start point) optimised together; larger problems are processed in chunks.

    Returns
    -------
    list[LowerBoundResult]
        In the order of ``pairs``: the best verified ratio for each pair with its witnesses.

    Warnings
    --------
    Lower bounds only (see the module docstring, including the float32 caveat).  Never use them in
    place of an upper bound to certify anything.
    """
    prob = _Problem(forward, x_seed, norm, eps, clip, recompute_forward)
    pairs = [(int(j), int(i)) for j, i in pairs]
    with torch.no_grad():
        m = logits_of(forward, prob.x_seed[:1]).shape[1]
    for j, i in pairs:
        if j == i or not (0 <= j < m and 0 <= i < m):
            raise ValueError(f"invalid class pair ({j}, {i}) for {m} classes")
    if not pairs:
        return []
    centres, sid = prob.centres(restarts, generator)
    C = centres.shape[0]
    dev = centres.device
    pj = torch.tensor([p[0] for p in pairs], device=dev)
    pi = torch.tensor([p[1] for p in pairs], device=dev)
    P = len(pairs)
    # rows = (pair, centre)
    row_pair = torch.arange(P, device=dev).repeat_interleave(C)
    row_centre = torch.arange(C, device=dev).repeat(P)

    best = [(0.0, None, None, "none", None) for _ in range(P)]
    chunk = max(1, int(max_rows))
    for s in range(0, row_pair.numel(), chunk):
        rp, rc = row_pair[s : s + chunk], row_centre[s : s + chunk]
        vals, A, Bw, meth = _margin_chunk(prob, centres[rc], sid[rc], pj[rp], pi[rp], steps,
                                          grad_steps, lr, generator)
        for p in rp.unique().tolist():
            rows = (rp == p).nonzero().reshape(-1)
            k = rows[vals[rows].argmax()]
            v = float(vals[k])
            if v > best[p][0]:
                best[p] = (v, A[k].clone(), Bw[k].clone(), meth[int(k)], int(sid[rc[k]]))
    out = []
    for p, (v, a, b, meth, si) in enumerate(best):
        out.append(LowerBoundResult(value=v, pair=pairs[p], witness_a=a, witness_b=b, method=meth,
                                    sound_lower=True, seed_index=si))
    return out


def _margin_chunk(prob: _Problem, c, sid, j, i, steps, grad_steps, lr, generator):
    """Optimise one chunk of rows; return per-row best float64 ratio, witnesses and method names."""
    norm, n = prob.norm, prob.dim
    R = c.shape[0]
    if prob.eps is not None:
        D = prob.eps
    else:
        D = 0.01 * prob.scale * (math.sqrt(n) if norm == "2" else 1.0)
    if lr is None:
        lr = _default_lr(prob)
    e0 = torch.full((R,), D, dtype=torch.float64, device=c.device)

    # ---- phase 1: Adam on pairs (a, b) ------------------------------------------------------------
    a = prob.project(c + random_in_ball(c, e0 / 2, norm, generator), sid)
    b = prob.project(c + random_in_ball(c, e0 / 2, norm, generator), sid)
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = _Adam([a, b], lr=lr)
    best_v = torch.zeros(R, dtype=torch.float64, device=c.device)
    best_a, best_b = a.detach().clone(), b.detach().clone()
    for _ in range(max(0, steps) + 1):
        with torch.enable_grad():
            la = logits_of(prob.forward, a)
            lb = logits_of(prob.forward, b)
            num = (_margin_of(la, j, i) - _margin_of(lb, j, i)).abs()
            den = flat_norm(a - b, norm).clamp_min(torch.finfo(a.dtype).eps * prob.scale)
            ratio = num / den
        rv = ratio.detach().to(torch.float64)
        better = rv > best_v
        if better.any():
            best_v[better] = rv[better]
            best_a[better] = a.detach()[better]
            best_b[better] = b.detach()[better]
        if _ == steps:
            break
        # autograd.grad (not .backward) so that no gradient accumulates in the model's parameters
        opt.step(torch.autograd.grad(-ratio.sum(), [a, b]))
        with torch.no_grad():
            a.copy_(prob.project(a, sid))
            b.copy_(prob.project(b, sid))

    vals = prob.margin_ratio64(best_a, best_b, j, i)
    A, Bw = best_a.clone(), best_b.clone()
    meth = ["pair-adam"] * R

    # ---- phase 2: gradient points -> finite-difference pairs --------------------------------------
    # probes: start points, optimised pairs and their midpoints, random points around the start points
    probes = [c, best_a, best_b, (best_a + best_b) / 2]
    for rf in ((1.0,) if prob.eps is not None else (1.0, 10.0, 30.0)):
        probes.append(c + random_in_ball(c, e0 * rf, norm, generator))
    K = len(probes)
    pts = torch.cat(probes)
    psid = sid.repeat(K)
    pj, pi = j.repeat(K), i.repeat(K)
    pts = prob.project(pts, psid)
    gsteps = max(0, steps // 4 if grad_steps is None else grad_steps)
    z = pts.clone().requires_grad_(True)
    gbest = torch.full((z.shape[0],), -1.0, dtype=torch.float64, device=c.device)
    gz, gg = pts.clone(), torch.zeros_like(pts)
    opt = _Adam([z], lr=lr) if gsteps > 0 else None
    for t in range(gsteps + 1):
        with torch.enable_grad():
            mz = _margin_of(logits_of(prob.forward, z), pj, pi)
            (g,) = torch.autograd.grad(mz.sum(), z, create_graph=opt is not None and t < gsteps)
            gq = flat_dual_norm(g, norm)
        gv = gq.detach().to(torch.float64)
        better = gv > gbest
        if better.any():
            gbest[better] = gv[better]
            gz[better] = z.detach()[better]
            gg[better] = g.detach()[better]
        if opt is None or t == gsteps or not gq.requires_grad:
            break
        (gz2,) = torch.autograd.grad(-gq.sum(), z, allow_unused=True)
        if gz2 is None or not bool(gz2.abs().amax() > 0):
            break  # second derivative vanishes (piecewise-linear net): ascent cannot move
        opt.step([gz2])
        with torch.no_grad():
            z.copy_(prob.project(z, psid))

    d = _unit_direction(gg, norm)
    hbase = prob.eps if prob.eps is not None else prob.scale
    for h in _fd_steps(pts.dtype, hbase):
        fa, fb = prob.fd_pairs(gz, d, psid, h)
        r = prob.margin_ratio64(fa, fb, pj, pi).reshape(K, R)
        best_k = r.argmax(dim=0)
        rmax = r.max(dim=0).values
        better = rmax > vals
        if better.any():
            rows = better.nonzero().reshape(-1)
            src = best_k[rows] * R + rows
            vals[rows] = rmax[rows]
            A[rows] = fa[src]
            Bw[rows] = fb[src]
            for rr in rows.tolist():
                meth[rr] = "gradient-fd"
    return vals, A, Bw, meth


# --------------------------------------------------------------------------------------------------


def _jvp(forward: Forward, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J(z) v`` by the double-vjp trick: ``u -> J^T u`` is linear in u, and its vjp with v is ``J v``.

    (Plain autograd; ``torch.func.jvp`` would do the same but costs seconds of import time.)
    """
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = logits_of(forward, zz)
        u = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, zz, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v)
    return jv.detach()


def _vjp(forward: Forward, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = logits_of(forward, zz)
        (g,) = torch.autograd.grad(out, zz, u)
    return g.detach()


def _power(forward, z, v, iters):
    """``iters`` power-iteration steps on ``J^T J`` per row; returns (v, ||J v||_2)."""
    for _ in range(max(1, iters)):
        w = _vjp(forward, z, _jvp(forward, z, v))
        wn = flat_norm(w, "2")
        ok = wn > 0
        v = torch.where(bcast(ok, v), w / bcast(wn.clamp_min(torch.finfo(w.dtype).tiny), w), v)
    sigma = _jvp(forward, z, v).flatten(1).norm(dim=1).to(torch.float64)
    return v, sigma


def jacobian_spectral_lower_bound(
    forward: Forward,
    x_seed: torch.Tensor,
    *,
    steps: int = 50,
    iters: int = 30,
    restarts: int = 2,
    generator: torch.Generator | None = None,
    eps: float | None = None,
    clip=None,
    lr: float | None = None,
    recompute_forward: Forward | None = None,
) -> LowerBoundResult:
    """Lower bound on ``Lip_2(f)`` of the whole logit map by power iteration on ``J^T J`` with ascent on x.

    Parameters
    ----------
    forward:
        Callable ``(B, *input_shape) -> (B, m)`` (eval mode; rows independent).
    x_seed:
        ``(S, *input_shape)`` start points (plus perturbed copies / random points for ``restarts > 1``).
    steps:
        Ascent steps on x (each followed by a few warm-started power iterations).
    iters:
        Initial power iterations at each start point (``max(2, iters // 5)`` after every ascent step).
    restarts, generator, eps, clip, lr, recompute_forward:
        As in :func:`margin_lipschitz_lower_bound` (norm is l2 here).

    Returns
    -------
    LowerBoundResult
        ``pair=None``, ``method="jacobian-power-fd"``: the float64 ratio
        ``||f(b) - f(a)||_2 / ||b - a||_2`` of the pair ``(x - h v, x + h v)`` at the best point.

    Warnings
    --------
    A lower bound only; power iteration approaches ``sigma_max(J(x))`` from below and the ascent finds a
    local maximum over x.  See the module docstring for the float32 caveat.
    """
    prob = _Problem(forward, x_seed, "2", eps, clip, recompute_forward)
    z, sid = prob.centres(restarts, generator)
    if lr is None:
        lr = _default_lr(prob)
    dev = z.device
    v = torch.randn(z.shape, generator=generator, device=generator.device if generator else dev,
                    dtype=z.dtype).to(dev)
    v = v / bcast(flat_norm(v, "2"), v)
    v, sigma = _power(forward, z, v, iters)
    best_s, best_z, best_v = sigma.clone(), z.clone(), v.clone()
    hbase = prob.eps if prob.eps is not None else prob.scale
    zz = z.clone().requires_grad_(True)
    opt = _Adam([zz], lr=lr)
    for t in range(max(0, steps)):
        h = hbase * 0.1 * (1e-2 ** (t / max(steps - 1, 1)))
        with torch.enable_grad():
            diff = logits_of(forward, zz + h * v) - logits_of(forward, zz - h * v)
            obj = diff.flatten(1).pow(2).sum(dim=1) / (4 * h * h)
        opt.step(torch.autograd.grad(-obj.sum(), zz))
        with torch.no_grad():
            zz.copy_(prob.project(zz, sid))
        v, sigma = _power(forward, zz.detach(), v, max(2, iters // 5))
        better = sigma > best_s
        if better.any():
            best_s[better] = sigma[better]
            best_z[better] = zz.detach()[better]
            best_v[better] = v[better]

    value, wa, wb, wsid = 0.0, None, None, None
    for h in _fd_steps(z.dtype, hbase):
        a, b = prob.fd_pairs(best_z, best_v, sid, h)
        r = prob.logit_ratio64(a, b)
        k = int(r.argmax())
        if float(r[k]) > value:
            value, wa, wb, wsid = float(r[k]), a[k].clone(), b[k].clone(), int(sid[k])
    return LowerBoundResult(value=value, pair=None, witness_a=wa, witness_b=wb,
                            method="jacobian-power-fd", sound_lower=True, seed_index=wsid)
