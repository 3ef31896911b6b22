"""Local Lipschitz bounds and local margin constants on a ball ``B_p(x, eps)`` (SPEC section 4).

Method of Huang, Zhang, Shi, Kolter and Anandkumar, "Training certifiably robust neural networks with
efficient local Lipschitz bounds", NeurIPS 2021, generalised to the Lipschitz graph.

1. **Bounds on the ball.**  For every node ``v`` and every input ``x_b`` an interval ``[lb, ub]`` that
   contains ``v(x')`` for all ``x'`` with ``||x' - x_b||_p <= eps_b``:

   * input: ``x ± eps`` (each coordinate of an ``l_2`` or ``l_inf`` ball);
   * linear ``y = A h + b``: interval bound propagation (IBP) ``A c + b ± |A| r`` with
     ``c, r`` the centre and radius of the input interval (``|A|`` via ``LinearOp.abs_apply``),
     intersected with the *Lipschitz-ball* bound ``y_k(x) ± eps ||row_k(A)||_q L(h)`` where ``L(h)`` is
     the global ``l_p`` bound of the map input -> ``h`` (``propagate(graph, p)``) and ``q`` is the dual
     exponent (``q = 2`` for ``p = 2``; ``q = 1`` for ``p = inf``, where only the rows' entries on the
     coordinates of ``h`` that can vary on the ball are counted).  For the first linear node
     (``L = 1``) this is the exact range of every unit;
   * monotone activations: ``[phi(lb), phi(ub)]``; ``abs``: its exact image; other non-monotone
     activations (GELU, SiLU): ``phi(c) ± Lip(phi) r``;
   * maxpool: pool ``lb`` and ``ub``; MinMax: pairwise ``max`` / ``min`` of the bounds; ``add``: sum
     with the coefficients' signs; ``concat``: concatenation;
   * every node is also intersected with ``v(x) ± eps L(v)`` (``|v_k(x') - v_k(x)| <= ||v(x') - v(x)||_p``).

   Everything is computed in float64 with outward rounding (a relative ``1e-8`` slack on every
   linear node, and the value ``v(x)`` itself enclosed by the same propagation with ``eps = 0``).

2. **Masks.**  A unit of an activation node is *constant* on the ball when ``ub <= const_below``
   (ReLU: ``ub <= 0``) or ``lb >= const_above`` (clipped ReLU), or when its input coordinate is
   constant; otherwise it is *varying*.  Activations without constant regions have every unit varying.
   Varying sets are propagated through the other nodes (maxpool / MinMax / add / concat: union of the
   inputs feeding an output; linear: rows with a non-zero weight on a varying input).

3. **Masked operator norms.**  With ``I_in`` the varying set of a linear node's input and ``I_out`` the
   varying set of the activation it feeds (when that activation is its only consumer; all rows
   otherwise), ``h(x') - h(x'') = I_in (h(x') - h(x''))`` on the ball and the activation only sees
   ``I_out (A h + b)``, so the factor of that node is ``||I_out A I_in||_p`` for each example:

   * ``p = 2``: the exact float64 SVD of the masked matrix when ``#rows * #cols <= exact_max_entries``
     (times ``SOUND_FACTOR``); the sound global norm when nothing is masked; otherwise the smaller of
     the global norm and Schur's bound ``sqrt(||M||_1 ||M||_inf)``, improved — where batched power
     iteration (``u -> I_in A^T I_out A I_in u``, warm-started from the unmasked top singular vector,
     stopped per example when ``||u_{t+1} - u_t|| <= tol``) says it pays — by the certified Gram bound
     of the materialised masked matrix (Cholesky certificate seeded with the power iterate,
     :func:`lipverify.graph.operator_norms.dense_norm2_certified`) up to ``gram_max_entries``.  The
     power estimate itself only decides where to spend that work and is returned as ``K_estimate``;
   * ``p = inf``: the masked maximum row sum ``max_{k in I_out} (|A| I_in)_k`` (sound, exact for dense
     and conv layers, an upper bound for composed operators).

4. **Local constants.**  ``L_loc`` is propagated over the graph as in
   :func:`lipverify.bounds.global_bound.propagate` with the masked norms.  Margin constants: when the
   logits are a linear node ``f = T h + b``, ``K_ij = ||(T_j - T_i) I_h||_{q} * L_loc(h)`` (``q`` the dual
   norm, ``I_h`` the varying coordinates of ``h``); otherwise ``sqrt(2)`` (``l_2``) or ``2`` (``l_inf``)
   times ``L_loc(f)``.  Where the graph has rules for it, the Clarke-Jacobian interval bound
   (:mod:`lipverify.bounds.jacobian`, with ``L_loc`` at the nodes every path passes through) is
   computed for the requested class pairs and the smaller value kept.  Everything is finally clamped
   to the global ``K`` (``min`` of bounds valid on the ball is valid on the ball).

``K_local(eps)`` is non-decreasing in ``eps`` where the factors are exact: intervals grow with eps, so
varying sets grow and every masked matrix is a sub-matrix of the one for a larger eps.

Warnings
--------
* A local bound is valid **only inside the ball** ``B_p(x, eps)`` it was computed for: ``x`` is
  certified at ``eps`` iff ``f_j(x) - f_i(x) > eps * K_ij(x, eps)``; no radius above ``eps`` follows.
* ``K_estimate`` (power-iteration factors) is an estimate from below, never a certificate.  ``K``
  is always sound; where a factor falls back to the global or Schur bound (``exact`` false) it can be
  looser than the estimate, and its monotonicity in ``eps`` is then only approximate (the bisection
  keeps the invariant "the lower end is certified", so no radius is over-reported).
* Applied post hoc to a network not trained for it, the local bound is usually only a little tighter
  than the global one (Huang et al. gain 51.3% -> 51.8% certified accuracy that way; 54.3% when the
  network is trained with it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from lipverify.bounds import jacobian as jac
from lipverify.bounds.global_bound import margin_constants, propagate
from lipverify.graph import LipschitzGraph, minmax
from lipverify.graph import operator_norms as on
from lipverify.graph.operator_norms import SOUND_FACTOR
from lipverify.graph.domain import (
    REL_SLACK,
    activation_interval,
    attention_constant,
    attention_interval,
    linear_interval,
    linf_dist_interval,
    mul_interval,
    normalization_constants,
    normalization_interval,
    product_factors_batched,
)
from lipverify.limits import check_alloc

__all__ = [
    "LocalBoundResult",
    "local_margin_constants",
    "preactivation_bounds",
    "varying_masks",
    "operator_masks",
    "combine_local",
]

#: relative outward-rounding slack of interval bounds (float64 error is ~1e-16 per operation).
_REL_SLACK = REL_SLACK
#: full operator matrices up to this many entries are materialised once per layer (exact path).
_FULL_MATRIX_MAX_ENTRIES = 8_000_000
#: masked operators up to this many entries get the certified Gram-matrix bound (above the SVD size)
#: where the power-iteration estimate says it is worth it (estimate below REFINE_RATIO x the cheap bound).
GRAM_MAX_ENTRIES = 4_000_000
REFINE_RATIO = 0.95
#: basis vectors pushed at once when a masked matrix is built column by column.
_BASIS_CHUNK = 128


@dataclass
class LocalBoundResult:
    """Local bounds of a batch of balls ``B_p(x_b, eps_b)``.

    ``K``: float64 ``(B, m, m)`` margin constants valid on ``B(x_b, eps_b)`` only (symmetric, zero
    diagonal), always sound: the minimum of the masked-norm product (exact SVDs of small masked matrices,
    sound bounds of the others), the Clarke-Jacobian interval bound (for the pairs it was asked for,
    :mod:`lipverify.bounds.jacobian`) and the global ``K``.  ``lipschitz``: float64 ``(B,)`` sound local
    bound of the whole logit map on the ball.  ``sound``: bool ``(B,)``, ``True`` for every example (kept
    for callers that test it).  ``exact``: bool ``(B,)``, ``True`` where every masked operator norm was
    computed exactly (else a sound but looser factor was used).  ``K_estimate``: with ``estimate=True``,
    the same constants with power-iteration estimates of the large masked norms (``min`` with ``K``),
    the number training optimises -- *not* a certificate (``lipschitz_estimate`` likewise).
    ``varying_fraction``: per activation node
    (graph order), the mean fraction of varying units over the batch.  ``iterations``: ``(B,)`` power
    iterations used per example (0 without ``estimate``).  ``method``: how ``K`` was formed.
    """

    K: torch.Tensor
    lipschitz: torch.Tensor
    sound: torch.Tensor
    varying_fraction: list[float]
    iterations: torch.Tensor
    exact: torch.Tensor | None = None
    K_estimate: torch.Tensor | None = None
    lipschitz_estimate: torch.Tensor | None = None
    method: str = ""


# ------------------------------------------------------------------------------------------------
# per-graph preparation (cached in ``warm_start``)


class _Context:
    """Float64 copies of the linear ops, global constants and row norms of one graph and norm."""

    def __init__(self, graph: LipschitzGraph, p: str, cache: dict, domain=None):
        self.graph = graph
        self.p = p
        self.cache = cache
        self.domain = domain
        ops = cache.get("ops64")
        if ops is None:
            ops = {i: copy.deepcopy(n.op).to(torch.float64)
                   for i, n in enumerate(graph.nodes) if n.kind == "linear"}
            cache["ops64"] = ops
        self.ops: dict = ops
        key = ("consts", p, _domain_key(domain))
        if key not in cache:
            cache[key] = propagate(graph, p, domain=domain)
        self.consts = cache[key]
        key = ("K", p, _domain_key(domain))
        if key not in cache:
            cache[key] = margin_constants(graph, self.consts, p).K
        self.K_global: torch.Tensor = cache[key]
        self.device = self._device()

    def _device(self) -> torch.device:
        for op in self.ops.values():
            return op._device()
        return torch.device("cpu")

    def cum(self, i: int) -> float:
        """Sound global ``l_p`` bound of the map input -> node ``i``."""
        return float(self.consts[i].cumulative.value)

    def global_norm(self, i: int) -> float:
        return float(self.consts[i].constant.value)

    def row_norms(self, i: int) -> torch.Tensor:
        key = ("rows", i)
        if key not in self.cache:
            self.cache[key] = self.ops[i].row_norms("2").to(self.device) * (1 + _REL_SLACK)
        return self.cache[key]

    def full_matrix(self, i: int) -> torch.Tensor | None:
        op = self.ops[i]
        if op.in_dim * op.out_dim > _FULL_MATRIX_MAX_ENTRIES:
            return None
        key = ("matrix", i)
        if key not in self.cache:
            self.cache[key] = op.matrix(torch.float64).to(self.device)
        return self.cache[key]

    def full_gram_norm(self, i: int, max_entries: int) -> float:
        """Sound l2 norm of the whole operator of node ``i`` from its Gram matrix when it has at most
        ``max_entries`` entries (cached), else ``inf``."""
        op = self.ops[i]
        if op.in_dim * op.out_dim > max_entries:
            return math.inf
        key = ("gram", i)
        if key not in self.cache:
            m = self.full_matrix(i)
            if m is None:
                m = op.matrix(torch.float64).to(self.device)
            self.cache[key] = on.dense_norm2_gram(m)
        return self.cache[key]

    def top_vector(self, i: int) -> torch.Tensor:
        """Top right singular vector of the unmasked operator (warm start; cached under ``i``)."""
        if i not in self.cache:
            op = self.ops[i]
            g = torch.Generator().manual_seed(1234 + i)
            u0 = torch.randn(op.in_shape, generator=g, dtype=torch.float64).to(self.device)
            res = on.power_iteration(op.apply, op.adjoint, op.in_shape, u0=u0, tol=1e-7, max_iter=2000)
            self.cache[i] = res.u.detach()
        return self.cache[i].to(self.device, torch.float64)

    def jitter(self, i: int) -> torch.Tensor:
        """A fixed unit random vector mixed into every start vector (no start is orthogonal to the
        masked top singular vector with probability 1); the same for every example."""
        key = ("jitter", i)
        if key not in self.cache:
            op = self.ops[i]
            g = torch.Generator().manual_seed(4321 + i)
            v = torch.randn(op.in_shape, generator=g, dtype=torch.float64)
            self.cache[key] = (v / v.norm()).to(self.device)
        return self.cache[key]

    def tail_matrix(self) -> torch.Tensor:
        """Rows ``T_k`` of the output node's operator, ``(m, in_dim)`` float64."""
        key = "tail"
        if key not in self.cache:
            out = self.graph.output
            op = self.ops[out]
            m = op.out_dim
            eye = torch.eye(m, dtype=torch.float64, device=self.device)
            self.cache[key] = op.adjoint(eye.reshape((m,) + op.out_shape)).reshape(m, -1)
        return self.cache[key]


def _domain_key(domain):
    if domain is None:
        return None
    return tuple(float(v) if not isinstance(v, torch.Tensor) else (tuple(v.shape), float(v.sum()), float(v.min()))
                 for v in domain)


def _norm_arg(norm) -> str:
    p = str(norm)
    if p in ("infinity", "linf", "l_inf"):
        p = "inf"
    if p not in ("2", "inf"):
        raise ValueError("norm must be '2' or 'inf'")
    return p


def _eps_tensor(eps, B: int, device) -> torch.Tensor:
    e = torch.as_tensor(eps, dtype=torch.float64, device=device)
    if e.dim() == 0:
        e = e.expand(B)
    e = e.reshape(-1)
    if e.numel() != B:
        raise ValueError(f"eps has {e.numel()} entries for a batch of {B}")
    if not bool(torch.all(torch.isfinite(e))) or bool(torch.any(e < 0)):
        raise ValueError("eps must be finite and non-negative")
    return e.clone()


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


# ------------------------------------------------------------------------------------------------
# 1. interval bounds and varying sets


def _propagate_intervals(ctx: _Context, x: torch.Tensor, eps: torch.Tensor, point=None):
    """Intervals and varying sets of every node over ``B_p(x_b, eps_b)``.

    ``point``: intervals enclosing the node values at ``x`` itself (from a run with ``eps = 0``); when
    given, every node is intersected with the Lipschitz-ball bounds around them.
    """
    g, p = ctx.graph, ctx.p
    nodes = g.nodes
    lbs: list = [None] * len(nodes)
    ubs: list = [None] * len(nodes)
    var: list = [None] * len(nodes)
    for i, n in enumerate(nodes):
        if i > g.output:
            break
        k = n.kind
        if k == "input":
            e = _bc(eps, x)
            lb, ub = x - e, x + e
            if ctx.domain is not None:  # the analysis covers the ball inside the domain
                dlo, dhi = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in ctx.domain)
                lb, ub = torch.maximum(lb, dlo), torch.minimum(ub, dhi)
                ub = torch.maximum(ub, lb)
            vm = _bc(eps > 0, x).expand(x.shape).clone()  # nothing varies on a ball of radius 0
        else:
            ins = n.inputs
            if k == "linear":
                op = ctx.ops[i]
                lb, ub = linear_interval(op, lbs[ins[0]], ubs[ins[0]])
                vm = op.abs_apply(var[ins[0]].to(torch.float64)) > 0
            elif k == "activation":
                act = n.op
                lb, ub = activation_interval(act, lbs[ins[0]], ubs[ins[0]])
                zl, zu = lbs[ins[0]], ubs[ins[0]]
                vm = var[ins[0]].clone()
                if act.const_below is not None:
                    vm &= ~(zu <= act.const_below)
                if act.const_above is not None:
                    vm &= ~(zl >= act.const_above)
            elif k == "maxpool":
                lb, ub = n.op(lbs[ins[0]]), n.op(ubs[ins[0]])
                vm = n.op(var[ins[0]].to(torch.float64)) > 0
            elif k == "minmax":
                lb, ub = minmax(lbs[ins[0]]), minmax(ubs[ins[0]])
                v = var[ins[0]]
                b, c = v.shape[0], v.shape[1]
                pairs = v.reshape(b, c // 2, 2, *v.shape[2:])
                anyv = pairs[:, :, 0] | pairs[:, :, 1]
                vm = torch.stack([anyv, anyv], dim=2).reshape(v.shape)
            elif k == "add":
                lb = ub = None
                vm = None
                for co, j in zip(n.op, ins):
                    lo_j, hi_j = (co * lbs[j], co * ubs[j]) if co >= 0 else (co * ubs[j], co * lbs[j])
                    lb = lo_j if lb is None else lb + lo_j
                    ub = hi_j if ub is None else ub + hi_j
                    if co != 0:
                        vm = var[j].clone() if vm is None else (vm | var[j])
                if vm is None:
                    vm = torch.zeros_like(lb, dtype=torch.bool)
                w = _REL_SLACK * (lb.abs() + ub.abs())
                lb, ub = lb - w, ub + w
            elif k == "concat":
                ax = n.op + 1
                lb = torch.cat([lbs[j] for j in ins], dim=ax)
                ub = torch.cat([ubs[j] for j in ins], dim=ax)
                vm = torch.cat([var[j] for j in ins], dim=ax)
            elif k == "mul":
                (la, ua), (lb_, ub_) = (lbs[ins[0]], ubs[ins[0]]), (lbs[ins[1]], ubs[ins[1]])
                lb, ub = mul_interval(la, ua, lb_, ub_)
                vm = (var[ins[0]] | var[ins[1]]).expand(lb.shape).clone()
            elif k == "normalization":
                lb, ub = normalization_interval(n.op, lbs[ins[0]], ubs[ins[0]])
                v = var[ins[0]]
                B_ = v.shape[0]
                vm = v.reshape(B_, n.op.groups, n.op.size).any(2, keepdim=True).expand(
                    B_, n.op.groups, n.op.size).reshape(v.shape).clone()
            elif k == "linf_dist":
                lb, ub = linf_dist_interval(n.op, lbs[ins[0]], ubs[ins[0]])
                v = var[ins[0]]
                vm = v.reshape(v.shape[0], -1).any(1, keepdim=True).expand(lb.shape).clone()
            elif k == "attention":
                lb, ub = attention_interval(n.op, lbs[ins[0]], ubs[ins[0]])
                v = var[ins[0]]
                vm = v.reshape(v.shape[0], -1).any(1).reshape((-1,) + (1,) * (lb.dim() - 1)).expand(lb.shape).clone()
            else:
                raise ValueError(f"unknown node kind {k}")
            if point is not None:
                plo, phi = point[0][i], point[1][i]
                e = _bc(eps, lb)
                rad = e * ctx.cum(i) * (1 + _REL_SLACK)
                lb, ub = torch.maximum(lb, plo - rad), torch.minimum(ub, phi + rad)
                if k == "linear":
                    h = ins[0]
                    if p == "2":
                        rn = ctx.row_norms(i)
                    else:
                        rn = ctx.ops[i].abs_apply(var[h].to(torch.float64)) * (1 + _REL_SLACK)
                    rad = e * rn * (ctx.cum(h) * (1 + _REL_SLACK))
                    lb, ub = torch.maximum(lb, plo - rad), torch.minimum(ub, phi + rad)
        lbs[i], ubs[i], var[i] = lb, ub, vm
    return lbs, ubs, var


def _analyse(ctx: _Context, x: torch.Tensor, eps: torch.Tensor):
    zero = torch.zeros_like(eps)
    point = _propagate_intervals(ctx, x, zero)
    return _propagate_intervals(ctx, x, eps, point=(point[0], point[1]))


def _prepare_inputs(graph, x, eps, norm, cache, domain=None):
    p = _norm_arg(norm)
    ctx = _Context(graph, p, cache, domain)
    x = torch.as_tensor(x).to(device=ctx.device, dtype=torch.float64)
    shape = tuple(graph.input_shape)
    if tuple(x.shape[1:]) != shape:
        if tuple(x.shape) == shape:
            x = x.unsqueeze(0)
        else:
            x = x.reshape((-1,) + shape)
    return ctx, x, _eps_tensor(eps, x.shape[0], ctx.device)


def preactivation_bounds(graph: LipschitzGraph, x: torch.Tensor, eps, norm: str = "2",
                         *, warm_start: dict | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 intervals ``(lb, ub)`` of every node's output over the balls ``B_p(x_b, eps_b)``.

    Node ``i`` maps to a pair of ``(B, *out_shape)`` tensors with ``lb <= v_i(x') <= ub`` for every
    ``x'`` in the ball of its example (see the module docstring for the propagation rules).  ``eps``
    is a float or a ``(B,)`` tensor, in the graph's input space.

    Warnings
    --------
    The bounds are valid only for inputs inside the ball; they are outer bounds (usually not tight
    beyond the first linear layer).
    """
    with torch.no_grad():
        ctx, x, e = _prepare_inputs(graph, x, eps, norm, {} if warm_start is None else warm_start)
        lbs, ubs, _ = _analyse(ctx, x, e)
    return {i: (lbs[i], ubs[i]) for i in range(len(lbs)) if lbs[i] is not None}


def varying_masks(graph: LipschitzGraph, x: torch.Tensor, eps, norm: str = "2",
                  *, warm_start: dict | None = None) -> dict[int, torch.Tensor]:
    """Boolean ``(B, *out_shape)`` sets of the coordinates of every node that may vary on the ball
    (``False``: provably constant on ``B_p(x_b, eps_b)``)."""
    with torch.no_grad():
        ctx, x, e = _prepare_inputs(graph, x, eps, norm, {} if warm_start is None else warm_start)
        _, _, var = _analyse(ctx, x, e)
    return {i: var[i] for i in range(len(var)) if var[i] is not None}


def operator_masks(graph: LipschitzGraph,
                   masks: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For every linear node the ``(in_mask, out_mask)`` of its masked operator ``I_out A I_in``.

    ``in_mask`` is the varying set of its input; ``out_mask`` that of the activation it feeds when
    that activation is its only consumer, else all rows.  ``masks`` come from :func:`varying_masks`.
    """
    cons = graph.consumers()
    res = {}
    for i, n in enumerate(graph.nodes):
        if n.kind != "linear" or i not in masks:
            continue
        m_in = masks[n.inputs[0]]
        c = cons[i]
        if len(c) == 1 and graph.nodes[c[0]].kind == "activation" and c[0] in masks:
            m_out = masks[c[0]]
        else:
            m_out = torch.ones_like(masks[i], dtype=torch.bool)
        res[i] = (m_in, m_out)
    return res


# ------------------------------------------------------------------------------------------------
# 2. masked operator norms


def _masked_submatrix(ctx: _Context, i: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    full = ctx.full_matrix(i)
    if full is not None:
        return full.index_select(0, rows).index_select(1, cols)
    op = ctx.ops[i]
    dev = ctx.device
    if cols.numel() <= rows.numel():
        parts = []
        for chunk in cols.split(_BASIS_CHUNK):
            e = torch.zeros(chunk.numel(), op.in_dim, dtype=torch.float64, device=dev)
            e[torch.arange(chunk.numel(), device=dev), chunk] = 1.0
            y = op.apply(e.reshape((-1,) + op.in_shape)).reshape(chunk.numel(), -1)
            parts.append(y.index_select(1, rows))
        return torch.cat(parts).T
    parts = []
    for chunk in rows.split(_BASIS_CHUNK):
        e = torch.zeros(chunk.numel(), op.out_dim, dtype=torch.float64, device=dev)
        e[torch.arange(chunk.numel(), device=dev), chunk] = 1.0
        y = op.adjoint(e.reshape((-1,) + op.out_shape)).reshape(chunk.numel(), -1)
        parts.append(y.index_select(1, cols))
    return torch.cat(parts)


def _masked_norms_2(ctx: _Context, i: int, m_in, m_out, tol, max_iter, exact_max_entries, estimate=True,
                    gram_max_entries=0, refine_ratio=REFINE_RATIO):
    """``(sound (B,), estimate (B,), exact (B,) bool, iterations (B,), refinable (B,) bool, vectors)`` for
    the masked operators of node ``i`` (module docstring, step 3):

    * up to ``exact_max_entries`` entries: the float64 SVD of the masked matrix;
    * larger ones: the smaller of the sound global norm (the FFT bound, or the full operator's
      certified Gram bound) and Schur's bound ``sqrt(max row sum * max column sum)`` of
      ``|I_out A I_in|``; the batched power iteration gives the estimate ``s``, and where ``s`` is below
      ``refine_ratio`` times that sound value and the masked matrix has at most ``gram_max_entries``
      entries, the matrix is materialised and bounded by the Cholesky certificate of
      :func:`lipverify.graph.operator_norms.dense_norm2_certified` seeded with ``s`` (sound, and
      within ``1e-7``-``1e-2`` relative of the true norm).  The estimate only decides where that work
      pays; every value returned as sound is a proven bound.

    ``exact`` is ``False`` where a factor is not an SVD or a certified Gram bound.  ``refinable`` marks
    the examples whose factor :func:`_refine_norms` may improve (it is not called here:
    :func:`local_margin_constants` refines only where the margin constants can gain); ``vectors`` is
    ``(examples, power iterates)`` to warm-start it, or ``None``.
    """
    op = ctx.ops[i]
    B = m_in.shape[0]
    fin = m_in.reshape(B, -1)
    fout = m_out.reshape(B, -1)
    n_cols = fin.sum(1)
    n_rows = fout.sum(1)
    gnorm = min(ctx.global_norm(i), ctx.full_gram_norm(i, gram_max_entries))
    val = torch.zeros(B, dtype=torch.float64, device=ctx.device)
    sound = torch.ones(B, dtype=torch.bool, device=ctx.device)
    iters = torch.zeros(B, dtype=torch.int64, device=ctx.device)
    empty = (n_cols == 0) | (n_rows == 0)
    size = n_rows * n_cols
    exact = ~empty & (size <= exact_max_entries)
    full = ~empty & ~exact & (n_cols == op.in_dim) & (n_rows == op.out_dim)
    power = ~empty & ~exact & ~full
    for b in torch.nonzero(exact).flatten().tolist():
        rows = torch.nonzero(fout[b]).flatten()
        cols = torch.nonzero(fin[b]).flatten()
        sub = _masked_submatrix(ctx, i, rows, cols)
        val[b] = float(torch.linalg.svdvals(sub)[0]) * SOUND_FACTOR
    val[full] = gnorm
    est = val.clone()
    vectors = None
    idx = torch.nonzero(power).flatten()
    if idx.numel():
        mi = m_in[idx].to(torch.float64)
        mo = m_out[idx].to(torch.float64)
        cheap = torch.minimum(_schur_bound(op, mi, mo), torch.full((idx.numel(),), gnorm, dtype=torch.float64,
                                                                  device=val.device))
        val[idx] = cheap
        sound[idx] = False
        want_gram = gram_max_entries > 0 and bool((size[idx] <= gram_max_entries).any())
        if estimate or want_gram:
            u0 = mi * (ctx.top_vector(i) + 1e-2 * ctx.jitter(i))
            sig, it, uvec = _masked_power_iteration(op, mi, mo, u0, tol, max_iter, return_vectors=True)
            est[idx] = torch.minimum(sig, cheap)
            iters[idx] = it
            vectors = (idx, uvec)  # warm starts of the certified Gram bounds
        else:
            est[idx] = cheap
    g = torch.full_like(val, gnorm)
    refinable = power & (size <= gram_max_entries) & (est < refine_ratio * torch.minimum(val, g))
    return torch.minimum(val, g), torch.minimum(est, g), sound, iters, refinable, vectors


def _refine_norms(ctx: _Context, i: int, m_in, m_out, which, val, est, sound, vectors):
    """Certified Gram bounds (in place in ``val``, ``sound``) of the masked operators of node ``i`` for the
    examples ``which``, seeded with the power-iteration estimates ``est`` and iterates ``vectors``."""
    B = m_in.shape[0]
    fin = m_in.reshape(B, -1)
    fout = m_out.reshape(B, -1)
    idx, uvec = vectors if vectors is not None else (None, None)
    pos = {} if idx is None else {int(b): k for k, b in enumerate(idx.tolist())}
    for b in which:
        rows = torch.nonzero(fout[b]).flatten()
        cols = torch.nonzero(fin[b]).flatten()
        sub = _masked_submatrix(ctx, i, rows, cols)
        s_hat = float(est[b])
        v0 = None
        if b in pos:  # the power iterate, on the side the Gram matrix lives on
            u = uvec[pos[b]].reshape(-1).index_select(0, cols)
            v0 = sub @ u if sub.shape[0] <= sub.shape[1] else u
        v = on.dense_norm2_certified(sub, v0=v0, lam=(s_hat * s_hat) if s_hat > 0 else None, steps=12)
        if v < float(val[b]):
            val[b] = v
            sound[b] = True


def _schur_bound(op, mi, mo) -> torch.Tensor:
    """``sqrt(||M||_1 ||M||_inf)`` for ``M = I_out A I_in`` (Schur's test, ``>= ||M||_2``), from the row
    sums ``(|A| m_in) m_out`` and column sums ``(|A|^T m_out) m_in``; ``inf`` where ``|A|^T`` has no
    bound.  Rounded outwards."""
    B = mi.shape[0]
    rows = (op.abs_apply(mi) * mo).reshape(B, -1).amax(1)
    try:
        cols = (op.abs_adjoint(mo) * mi).reshape(B, -1).amax(1)
    except NotImplementedError:
        return torch.full((B,), math.inf, dtype=torch.float64, device=mi.device)
    return (rows * cols).sqrt() * SOUND_FACTOR


def _flat_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _masked_power_iteration(op, mi, mo, u0, tol, max_iter, return_vectors: bool = False):
    """Per-example power iteration on ``G_b = I_in A^T I_out A I_in`` for a batch of masks.

    Iterates ``u <- G u / ||G u||`` (unit vectors) and stops example ``b`` when the iterate moves by
    ``||u_{t+1} - u_t|| <= tol`` (the criterion of Huang et al.; a relative change since ``||u|| = 1``)
    or ``G u = 0``.  A criterion on the change of the estimate instead stops too early where the top
    singular values are close (it left the MNIST conv layers 0.5-1% low at ``tol = 1e-3``).  Only the
    examples still running are computed at each step, and each follows exactly the computation it
    would follow alone.  The estimate is ``sqrt(||G u||)`` for the last unit ``u``: it is at least
    the Rayleigh estimate ``||A I_in u||`` and at most ``sigma_max`` (an estimate from below).
    Returns ``(sigma (B,), iterations (B,))``, or with ``return_vectors`` also the last unit iterates.
    """
    B = u0.shape[0]
    dev = u0.device
    n0 = _flat_norms(u0)
    u0 = torch.where(_bc(n0 > 0, u0), u0, mi)  # an empty start: the mask itself (or zero: sigma 0)
    n0 = _flat_norms(u0)
    u = u0 / _bc(torch.where(n0 > 0, n0, torch.ones_like(n0)), u0)
    sigma = torch.zeros(B, dtype=torch.float64, device=dev)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    act = torch.arange(B, device=dev)
    ua, mia, moa = u, mi, mo
    last = u.clone() if return_vectors else None
    for t in range(1, max_iter + 1):
        w = mia * op.adjoint(moa * op.apply(mia * ua))
        wn = _flat_norms(w)
        sigma[act] = wn.sqrt()
        iters[act] = t
        un = w / _bc(torch.where(wn > 0, wn, torch.ones_like(wn)), w)
        if last is not None:
            last[act] = un
        done = (wn == 0) | (_flat_norms(un - ua) <= tol)
        keep = torch.nonzero(~done).flatten()
        if keep.numel() == 0:
            break
        if keep.numel() < act.numel():
            act, un, mia, moa = act[keep], un[keep], mia[keep], moa[keep]
        ua = un
    return (sigma, iters, last) if return_vectors else (sigma, iters)


def _masked_norms_inf(ctx: _Context, i: int, m_in, m_out):
    op = ctx.ops[i]
    B = m_in.shape[0]
    s = op.abs_apply(m_in.to(torch.float64)) * m_out.to(torch.float64)
    val = s.reshape(B, -1).amax(dim=1) * SOUND_FACTOR
    val = torch.minimum(val, torch.full_like(val, ctx.global_norm(i)))
    return val, torch.ones(B, dtype=torch.bool, device=val.device), torch.zeros(B, dtype=torch.int64,
                                                                                device=val.device)


# ------------------------------------------------------------------------------------------------
# 3. local constants over the graph


def combine_local(graph: LipschitzGraph, norms: dict[int, torch.Tensor], masks: dict[int, torch.Tensor],
                  norm: str = "2", *, warm_start: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local ``K`` ``(B, m, m)`` and local Lipschitz bound ``(B,)`` from per-example masked operator
    norms ``norms[i]`` (``(B,)`` for every linear node ``i``) and varying sets ``masks``.

    ``L_loc`` follows :func:`lipverify.bounds.global_bound.propagate` with the masked norms; the margin
    constants use the masked affine tail (module docstring, step 4).  No safety factor and no clamp
    to the global constants is applied here.
    """
    p = _norm_arg(norm)
    ctx = _Context(graph, p, {} if warm_start is None else warm_start)
    K, L = _combine(ctx, norms, masks)
    return K, L[graph.output]


def _combine(ctx: _Context, norms, masks, bounds=None):
    g, p = ctx.graph, ctx.p
    B = next(iter(masks.values())).shape[0]
    L: list = [None] * len(g.nodes)
    for i, n in enumerate(g.nodes):
        if i > g.output:
            break
        k = n.kind
        if k == "input":
            L[i] = torch.ones(B, dtype=torch.float64, device=ctx.device)
        elif k == "linear":
            L[i] = norms[i].to(ctx.device) * L[n.inputs[0]]
        elif k == "add":
            L[i] = sum(abs(co) * L[j] for co, j in zip(n.op, n.inputs))
        elif k == "concat":
            st = torch.stack([L[j] for j in n.inputs])
            L[i] = st.pow(2).sum(0).sqrt() if p == "2" else st.amax(0)
        elif k == "mul":
            # product rule with the factors' intervals on each example's ball
            f_a, f_b = product_factors_batched(g, i, bounds, p)
            L[i] = f_b.to(ctx.device) * L[n.inputs[1]] + f_a.to(ctx.device) * L[n.inputs[0]]
        elif k == "normalization":
            lb, ub = bounds[n.inputs[0]]
            L[i] = normalization_constants(n.op, lb, ub, p).to(ctx.device) * L[n.inputs[0]]
        elif k == "attention":
            lb, ub = bounds[n.inputs[0]]
            L[i] = attention_constant(n.op, lb, ub, p).to(ctx.device) * L[n.inputs[0]]
        else:
            L[i] = float(ctx.consts[i].constant.value) * L[n.inputs[0]]
    out = g.nodes[g.output]
    m = int(math.prod(out.out_shape))
    check_alloc(3 * B * m * m * 8, f"the local margin constants of a batch ({B} x {m} x {m} float64, with "
                "temporaries; a smaller --batch-size needs less)")
    if out.kind == "linear":
        h = out.inputs[0]
        T = ctx.tail_matrix()
        Tm = T.unsqueeze(0) * masks[h].reshape(B, 1, -1).to(torch.float64)
        D = torch.cdist(Tm, Tm, p=2.0 if p == "2" else 1.0, compute_mode="donot_use_mm_for_euclid_dist")
        K = D * L[h][:, None, None]
    else:
        factor = math.sqrt(2.0) if p == "2" else 2.0
        K = (factor * L[g.output])[:, None, None].expand(B, m, m).clone()
    K = K.clone()
    diag = torch.arange(m, device=K.device)
    K[:, diag, diag] = 0.0
    return K, L


def _jacobian_mode(graph: LipschitzGraph, jacobian) -> str:
    if jacobian is False or jacobian == "none":
        return "none"
    if jacobian is True or jacobian == "interval":
        return "interval"
    if jacobian not in ("auto", "linear", "linear-refined"):
        raise ValueError(f"jacobian must be auto, none, interval, linear or linear-refined, not {jacobian!r}")
    from lipverify.bounds.crown import affordable, check_supported
    from lipverify.bounds.jacobian_linear import linear_supports
    from lipverify.errors import UnsupportedOpError

    if linear_supports(graph) is not None:
        return "interval"
    if jacobian == "auto":
        return "interval" if affordable(graph) is not None else "linear"
    try:
        check_supported(graph)
    except UnsupportedOpError:
        return "interval"
    return jacobian


def _linear_jacobian(graph, ctx, x, e, lbs, ubs, C, box, refine: bool):
    """Linear-relaxation Jacobian bounds ``(B, P)`` with CROWN's pre-activation bounds (on the balls
    intersected with ``box`` when every ball meets it), or None when the relaxation has no rule."""
    from lipverify.bounds.crown import crown_bounds, input_box
    from lipverify.bounds.jacobian_linear import REFINE_ROWS, linear_jacobian_bounds

    if box is not None:
        lo_b, hi_b = input_box(x, e, box)
        if bool((lo_b > hi_b).reshape(x.shape[0], -1).any()):
            box = None  # a ball misses the box: the whole balls
    cache = ctx.cache.setdefault("crown", {})
    _, _, cb = crown_bounds(graph, x, e, ctx.p, domain=box, upper=False, cache=cache,
                            C=torch.zeros(x.shape[0], 1, *graph.nodes[graph.output].out_shape,
                                          dtype=torch.float64, device=x.device),
                            intervals={i: (l, u) for i, (l, u) in enumerate(zip(lbs, ubs)) if l is not None})
    lb2, ub2 = list(lbs), list(ubs)
    for j, (l, u) in cb.items():
        if lb2[j] is not None:
            lb2[j], ub2[j] = torch.maximum(lb2[j], l), torch.minimum(ub2[j], u)
    try:
        lin, itv = linear_jacobian_bounds(graph, ctx.ops, lb2, ub2, C, ctx.p,
                                          refine_rows=REFINE_ROWS if refine else 0)
    except NotImplementedError:
        return None
    return torch.minimum(lin, itv)


def local_margin_constants(graph: LipschitzGraph, x: torch.Tensor, eps, norm: str = "2", *,
                           tol: float = 1e-3, max_iter: int = 2000, exact_max_entries: int = 250_000,
                           gram_max_entries: int = GRAM_MAX_ENTRIES,
                           warm_start: dict | None = None, clamp_to_global: bool = True,
                           domain=None, rows=None, jacobian: bool | str = "interval",
                           estimate: bool = False, need=None, box=None) -> LocalBoundResult:
    """Local margin constants ``K_ij(x_b, eps_b)`` and local Lipschitz bounds on ``B_p(x_b, eps_b)``.

    Huang et al. 2021 ("Training certifiably robust neural networks with efficient local Lipschitz
    bounds", NeurIPS): units of activations that are constant on the ball are deleted from the rows of
    the linear node feeding them and from the columns of the linear node reading them, and the
    Lipschitz product / margin constants are formed with the masked operator norms
    ``||I_out A I_in||`` (see the module docstring for the maths).

    Parameters
    ----------
    graph:
        The Lipschitz graph (``LipModel.graph``); its ops may be float32, everything here runs in
        float64 copies.
    x:
        ``(B, *input_shape)`` centres, in the graph's input space.
    eps:
        Radius (float) or ``(B,)`` radii, in the graph's input space.
    norm:
        ``"2"`` or ``"inf"`` (the ball's norm; the margin constants use the dual norm of tail rows).
    tol, max_iter:
        Per-example stopping rule of the batched power iteration: relative change of the (unit)
        iterate ``||u_{t+1} - u_t|| <= tol``, at most ``max_iter`` iterations.
    exact_max_entries:
        A masked operator with at most this many entries (varying rows x varying columns) is
        materialised and its norm taken by a float64 SVD (sound).
    gram_max_entries:
        Larger masked operators get the smaller of the global norm and Schur's bound; those with at most
        this many entries are also materialised and bounded by a certified Gram bound (Cholesky
        certificate at the power estimate, :func:`~lipverify.graph.operator_norms.dense_norm2_certified`)
        where that can matter (see ``need``).  ``0`` and ``exact_max_entries=0`` leave every masked
        operator to the global and Schur bounds (and to power iteration for ``K_estimate``).
    warm_start:
        A dict owned by the caller and reused across calls **on the same graph**: it caches the float64
        ops, global constants, row norms, small operator matrices and, under the linear node's index,
        the unmasked top right singular vector that warm-starts every power iteration.
    domain:
        ``(lo, hi)`` input box of graphs with products or normalisations (``LipModel.effective_domain()``):
        the analysis then covers the part of each ball inside the domain, with the factors' intervals
        on it (much tighter than on the whole domain).  Ignored for other graphs.
    clamp_to_global:
        Return ``min(local, global)`` elementwise (default).  Both bounds hold on the ball, so the
        minimum does too; ``False`` returns the local values alone (for checks).
    rows:
        ``(B,)`` class indices (the predictions): the Clarke-Jacobian bound is computed for the pairs
        ``(rows_b, j)`` only (``m`` backward passes per example); ``None``: for every pair.
    jacobian:
        Bounds of the Clarke Jacobian, taken where smaller than the masked-norm product:

        * ``"interval"`` (or ``True``, the default): interval bounds (:mod:`lipverify.bounds.jacobian`)
          where the graph has rules for them;
        * ``"linear"``: also CROWN's pre-activation bounds on the ball intersected with ``box`` (which
          decide which units' slopes are fixed) and the linear relaxation of the backward graph
          (:mod:`lipverify.bounds.jacobian_linear`, Shi et al., NeurIPS 2022);
        * ``"linear-refined"``: ``"linear"`` with linear (not interval) bounds of the gradient units
          the relaxation depends on, Shi et al.'s tightness at a cost of seconds per input;
        * ``"auto"``: ``"linear"`` where CROWN applies and is affordable
          (:func:`lipverify.bounds.crown.affordable`), else ``"interval"``;
        * ``False`` / ``"none"``: the masked-norm product alone.
    box:
        ``(lo, hi)`` input domain the linear relaxations intersect the ball with (the constants then
        hold on ``B_p(x_b, eps_b)`` intersected with the box); ignored for a batch with a ball that
        misses it.  None: the whole ball.
    estimate:
        Also run the batched power iteration on the large masked operators and return ``K_estimate``
        (an estimate from below of the masked-norm product; what training uses).
    need:
        With ``rows``: ``(B, m)`` thresholds (``margin_j / eps``, ``inf`` for pairs that do not matter)
        of a certification decision ``K[b, rows_b, j] < need[b, j]``.  The certified Gram bounds of
        large masked operators are then computed only for examples whose decision they can turn
        (undecided by the cheap sound bounds, decided by the power estimates); without ``need``,
        wherever the estimates promise a gain above ``1 - REFINE_RATIO``.  The returned ``K`` is sound
        either way.

    Returns
    -------
    LocalBoundResult

    Warnings
    --------
    Valid only inside ``B_p(x_b, eps_b)``: never certify a radius larger than ``eps_b`` with these
    constants.  ``K_estimate`` holds power-iteration estimates from below and is never a certificate.
    On networks not trained for local bounds, the gain over the global bound is usually small.
    """
    if graph.domain_nodes() and domain is None:
        from lipverify.errors import UserInputError

        raise UserInputError("local bounds of products/normalisations need the input domain (domain=(lo, hi))")
    if not graph.domain_nodes():
        domain = None
    cache = {} if warm_start is None else warm_start
    with torch.no_grad():
        ctx, x, e = _prepare_inputs(graph, x, eps, norm, cache, domain)
        B = x.shape[0]
        lbs, ubs, var = _analyse(ctx, x, e)
        masks = {i: v for i, v in enumerate(var) if v is not None}
        opm = operator_masks(graph, masks)
        norms: dict[int, torch.Tensor] = {}
        norms_est: dict[int, torch.Tensor] = {}
        exacts: dict[int, torch.Tensor] = {}
        refinable: dict[int, torch.Tensor] = {}
        vectors: dict = {}
        iters = torch.zeros(B, dtype=torch.int64, device=ctx.device)
        for i, (m_in, m_out) in opm.items():
            if ctx.p == "2":
                v, v_est, ex, it, rf, vectors[i] = _masked_norms_2(ctx, i, m_in, m_out, tol, max_iter,
                                                                   exact_max_entries, estimate, gram_max_entries)
            else:
                v, ex, it = _masked_norms_inf(ctx, i, m_in, m_out)
                v_est, rf = v, torch.zeros_like(ex)
            norms[i], norms_est[i], exacts[i], refinable[i] = v, v_est, ex, rf
            iters = torch.maximum(iters, it)
        bounds = list(zip(lbs, ubs))
        mode = _jacobian_mode(graph, jacobian)
        use_jac = mode != "none" and jac.supports(graph) is None
        m = int(math.prod(graph.nodes[graph.output].out_shape))
        C = I = J = None
        if use_jac:
            C, I, J = jac.pair_directions(m, rows, B, device=ctx.device)

        def assemble(nrm):
            """Margin constants and node bounds from the factors ``nrm`` (times the rounding factor)."""
            Kp, L = _combine(ctx, nrm, masks, bounds)
            Kp = Kp * SOUND_FACTOR
            L = [None if t is None or not isinstance(t, torch.Tensor) else t * SOUND_FACTOR for t in L]
            return Kp, L

        K, L_sound = assemble(norms)
        lip = L_sound[graph.output]
        method = "masked operator norms (exact SVD or certified Gram bound where small, sound bounds otherwise)"
        any_refinable = any(bool(r.any()) for r in refinable.values())
        if use_jac:
            sets = [L_sound]
            if any_refinable:
                Ke, L_e = assemble(norms_est)
                sets.append(L_e)
            try:
                Kp = jac.margin_jacobian_bounds(graph, ctx.ops, lbs, ubs, C, ctx.p, node_lipschitz_sets=sets)
            except NotImplementedError:
                Kp, use_jac = None, False
            if use_jac and mode.startswith("linear"):
                Kl = _linear_jacobian(graph, ctx, x, e, lbs, ubs, C, box, mode == "linear-refined")
                if Kl is not None:
                    Kp = torch.minimum(Kp, Kl[None])
                    method += " and the linear relaxation of the Clarke Jacobian (Shi et al. 2022)"
            if use_jac:
                bi = torch.arange(B, device=ctx.device)[:, None].expand_as(I)
                cur = torch.minimum(K[bi, I, J], Kp[0])
                method += " and Clarke-Jacobian intervals"
        if any_refinable:
            # refine (certified Gram bounds) only the examples whose constants the estimates say can
            # fall by more than the refinement threshold
            if use_jac and need is not None and rows is not None:
                # only where it can turn the decision: not certified now, certified with the estimates
                pot = torch.minimum(Ke[bi, I, J], Kp[1])
                nd = torch.as_tensor(need, dtype=torch.float64, device=ctx.device).reshape(B, m)
                live = (J != I) & torch.isfinite(nd)
                gain = ((cur >= nd) & live).any(1) & ((pot < nd) | ~live).all(1)
            elif use_jac:
                pot = torch.minimum(Ke[bi, I, J], Kp[1])
                gain = ((pot < REFINE_RATIO * cur) & (J != I)).any(1)
            else:
                Ke, _ = assemble(norms_est)
                gain = (Ke < REFINE_RATIO * K).reshape(B, -1).any(1)
            todo = gain & torch.stack([r for r in refinable.values()]).any(0)
            which = torch.nonzero(todo).flatten()
            if which.numel():
                for i, (m_in, m_out) in opm.items():
                    sel = [int(b) for b in which if bool(refinable[i][b])]
                    if sel:
                        _refine_norms(ctx, i, m_in, m_out, sel, norms[i], norms_est[i], exacts[i], vectors.get(i))
                K, L_sound = assemble(norms)
                lip = L_sound[graph.output]
                if use_jac:
                    wl = which.tolist()
                    Kp_w = jac.margin_jacobian_bounds(
                        graph, ctx.ops, [None if t is None else t[which] for t in lbs],
                        [None if t is None else t[which] for t in ubs], C[which], ctx.p,
                        node_lipschitz=[None if t is None else t[which] for t in L_sound])
                    Kp0 = Kp[0].clone()
                    Kp0[wl] = torch.minimum(Kp0[wl], Kp_w)
                    Kp = Kp0[None]
        if use_jac:
            Kj = torch.full_like(K, math.inf)
            Kj[bi, I, J] = Kp[0]
            Kj[bi, J, I] = Kp[0]
            K = torch.minimum(K, Kj)
        exact = torch.ones(B, dtype=torch.bool, device=ctx.device)
        for ex in exacts.values():
            exact &= ex
        K_est = lip_est = None
        if estimate:
            Ke2, Le = _combine(ctx, norms_est, masks, bounds)
            K_est = torch.minimum(Ke2, K)
            lip_est = torch.minimum(Le[graph.output], lip)
        if clamp_to_global:
            Kg = ctx.K_global.to(K.device).unsqueeze(0)
            K = torch.minimum(K, Kg)
            lip = torch.minimum(lip, torch.full_like(lip, ctx.cum(graph.output)))
            if K_est is not None:
                K_est = torch.minimum(K_est, Kg)
                lip_est = torch.minimum(lip_est, lip)
        diag = torch.arange(K.shape[1], device=K.device)
        K[:, diag, diag] = 0.0
        frac = [float(masks[i].reshape(B, -1).to(torch.float64).mean())
                for i, n in enumerate(graph.nodes) if n.kind == "activation" and i in masks]
    return LocalBoundResult(K=K, lipschitz=lip, sound=torch.ones(B, dtype=torch.bool, device=ctx.device),
                            varying_fraction=frac, iterations=iters, exact=exact, K_estimate=K_est,
                            lipschitz_estimate=lip_est, method=method)
