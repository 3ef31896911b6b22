"""Linear bound propagation (CROWN) over the Lipschitz graph.

Method of Zhang, Weng, Chen, Hsieh and Daniel, "Efficient neural network robustness certification with
general activation functions", NeurIPS 2018, in the general graph form of Xu et al., "Automatic
perturbation analysis for scalable certified robustness and beyond" (auto_LiRPA), NeurIPS 2020.

For a linear specification ``C v_t(x')`` of a node ``t`` over the input set ``S`` (the ball
``B_p(x, eps)`` intersected with the input domain ``[lo, hi]``), a lower bound is found by walking the
graph backwards from ``t`` with a coefficient tensor ``Lambda_v`` per node (``Lambda_t = C``) and a
constant ``beta``:

* linear ``y = A h + b``: ``Lambda_h += A^T Lambda_y`` (the operator's adjoint), ``beta += <Lambda_y, b>``;
* ``add`` ``y = sum_k c_k h_k``: ``Lambda_{h_k} += c_k Lambda_y``; ``concat``: the slices;
* element-wise ``y = phi(h)`` with ``h`` in ``[l, u]`` (intermediate bounds, below): a linear
  relaxation ``a_L h + b_L <= phi(h) <= a_U h + b_U`` on ``[l, u]``; then
  ``Lambda_h += Lambda_y^+ a_L + Lambda_y^- a_U`` and ``beta += Lambda_y^+ b_L + Lambda_y^- b_U``.
  ReLU and clipped ReLU (ReLU6, hardtanh): the triangle relaxation with CROWN's adaptive lower slope
  (``1`` where ``u >= -l``, else ``0``); leaky ReLU: the same for its two slopes; a clip with both
  kinks inside ``[l, u]``: the two parallel lines of slope ``(hi - lo) / (u - l)`` through the kinks;
  smooth activations: tangent and secant lines where the activation is convex or concave on
  ``[l, u]``, else mean-value lines and the secant moved by the largest gap its slope range allows
  (:mod:`lipverify.bounds.relaxations`, where every relaxation lives);
* max pooling: ``y >= h_k`` for the entry ``k`` of the window with the largest lower bound, and
  ``y <= max_window u`` (or ``y = h_k`` when ``l_k`` is at least every other entry's ``u``);
* the input: ``min_{x' in S} <Lambda, x'>`` — over the box ``[max(x - eps, lo), min(x + eps, hi)]``
  exactly (``l_inf``), and for ``l_2`` the larger of the box bound and the ball bound
  ``<Lambda, x> - eps ||Lambda||_2`` (both hold on the intersection).

Upper bounds are lower bounds of ``-C``.  Intermediate bounds (the ``[l, u]`` of every input of an
activation or pooling node) are computed the same way, with ``C`` the identity on the units that
interval propagation (:func:`lipverify.bounds.local.preactivation_bounds`) leaves undecided, in
topological order, and intersected with the interval bounds.

Everything runs in float64.  Outward rounding: every bound is moved outwards by
``ROUNDING_SLACK`` (``1e-8``, the relative slack of the local bounds) times the sum of the magnitudes of
the terms it adds up (the bias contributions and ``|Lambda| max(|lo|, |hi|)`` at the input), times the
number of nodes the walk crossed; exact ranges of affine nodes get the same slack on the magnitude
``|A| |x| + |b|`` of their values.  Intermediate bounds that come out NaN are never used (the interval
bound stays).

Warnings
--------
Raises :class:`~lipverify.errors.UnsupportedOpError` naming every node without a linear relaxation
(``minmax``, ``mul``, ``normalization``, ``attention``, ``linf_dist``).  Cost: one backward walk per
undecided intermediate unit (batched); on large convolutional networks the intermediate bounds
dominate, and :data:`MAX_ENTRIES` bounds the memory of one batch of specifications.  An input whose
ball does not meet the domain (an empty set) is refused.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from lipverify.errors import UnsupportedOpError, UserInputError
from lipverify.bounds.relaxations import pair_difference_bounds, pool_relaxation, relaxation, relaxation_relu
from lipverify.graph.domain import REL_SLACK, activation_interval, linear_interval
from lipverify.graph.nodes import LipschitzGraph, minmax

#: relative outward rounding per node crossed (see the module docstring)
ROUNDING_SLACK = 1e-8
#: node kinds with a linear relaxation here
SUPPORTED = ("input", "linear", "activation", "maxpool", "minmax", "add", "concat")
#: entries of one coefficient tensor (specs x units) before the specs are split into batches
MAX_ENTRIES = 30_000_000
#: float64 entries of a linear node's table of rows ``A^T e_u`` (read by refinement walks)
ROW_TABLE = 1 << 23


def check_supported(graph: LipschitzGraph) -> None:
    """Raise :class:`UnsupportedOpError` naming every node CROWN has no relaxation for."""
    bad = [(n.kind, n.name) for i, n in enumerate(graph.nodes) if i <= graph.output and n.kind not in SUPPORTED]
    if bad:
        raise UnsupportedOpError([(f"{k} (no linear relaxation for --method crown)", name) for k, name in bad])


def _add(lam, j, v):
    lam[j] = v if j not in lam else lam[j] + v


def _push_back(lam, nodes, n, A, op, lead: int):
    """Add to ``lam`` the coefficients of the inputs of the linear, add or concat node ``n`` for the
    coefficients ``A`` of its output (``lead`` leading batch dimensions; biases are the caller's)."""
    if n.kind == "linear":
        back = op.adjoint(A.reshape(-1, *n.out_shape))
        _add(lam, n.inputs[0], back.reshape(*A.shape[:lead], *nodes[n.inputs[0]].out_shape))
    elif n.kind == "add":
        for c, j in zip(n.op, n.inputs):
            _add(lam, j, A * c)
    else:  # concat
        start = 0
        for j in n.inputs:
            size = nodes[j].out_shape[n.op]
            _add(lam, j, A.narrow(n.op + lead, start, size))
            start += size


def _relu_like_step(A, aL, aU, bL, bU, beta, mag):
    """The activation step of a walk over one example (``A`` ``(1, S, *shape)``): where the lower and
    upper lines coincide (decided units) the coefficients are ``A aU`` and the intercepts ``A bU``
    whatever the sign; only the other units need the sign-dependent choice.  The same terms as the
    general step, computed on fewer units."""
    S = A.shape[1]
    aLf, aUf, bLf, bUf = (v.reshape(-1) for v in (aL, aU, bL, bU))
    Af = A.reshape(S, -1)
    differ = (aLf != aUf) | (bLf != bUf)
    open_ = differ.nonzero().squeeze(1)
    back = Af * aUf
    common = torch.where(differ, torch.zeros_like(bUf), bUf)
    if bool(common.any()):  # decided units with a non-zero intercept (a clip's flat parts)
        term = torch.matmul(Af, torch.stack([common, common.abs()], 1))
        beta, mag = beta + term[:, 0][None], mag + term[:, 1].abs()[None]
    if len(open_):
        As = Af[:, open_]
        pos = As >= 0
        back[:, open_] = As * torch.where(pos, aLf[open_], aUf[open_])
        for part, b in ((As.clamp_max(0), bUf[open_]), (As.clamp_min(0), bLf[open_])):
            term = torch.matmul(part, torch.stack([b, b.abs()], 1))
            beta, mag = beta + term[:, 0][None], mag + term[:, 1].abs()[None]
    return back.reshape(A.shape), beta, mag


class _Walk:
    def __init__(self, graph, x, eps, norm, box, bounds, relax_cache, ops):
        self.g, self.x, self.eps, self.norm, self.box = graph, x, eps, norm, box
        self.bounds, self.relax, self.ops = bounds, relax_cache, ops
        self.alpha: dict | None = None  # node -> (R, S, *shape) lower slopes of ReLU units that cross 0
        self.alpha_mask: dict = {}
        self.deadline: float | None = None  # time.perf_counter() after which alpha-CROWN stops
        self.stats: dict | None = None
        #: node -> bounds ``(B, c/2, *spatial)`` of the pair differences ``v[2k] - v[2k+1]`` it feeds
        #: to a MinMax node (CROWN's, where computed; else from the unit intervals)
        self.pairs: dict = {}

    def _relax(self, i):
        if i not in self.relax:
            n = self.g.nodes[i]
            l, u = self.bounds[n.inputs[0]]
            if n.kind == "minmax":
                dl, du = self.pairs.get(n.inputs[0]) or pair_difference_bounds(l, u)
                self.relax[i] = relaxation_relu(dl, du)
            elif n.kind == "activation":
                self.relax[i] = relaxation(n.op, l, u)
            else:
                in_shape = self.g.nodes[n.inputs[0]].out_shape
                self.relax[i] = pool_relaxation(n.op, in_shape, n.out_shape, l, u)
        return self.relax[i]

    def _rows(self, i):
        """The rows ``A^T e_u`` of linear node ``i``'s operator for every output unit ``u``, shaped
        ``(units, *in_shape)`` (memoised), or None when they would take over ``ROW_TABLE`` entries."""
        key = ("rows", i)
        if key not in self.relax:
            op = self.ops[i]
            n_out, n_in = math.prod(op.out_shape), math.prod(op.in_shape)
            self.relax[key] = (op.matrix(torch.float64).reshape(n_out, *op.in_shape)
                               if n_out * n_in <= ROW_TABLE else None)
        return self.relax[key]

    def lower(self, t: int, C: torch.Tensor, rows: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """Lower bounds ``(R, S)`` of ``C[r] . v_t`` over the input set of example ``rows[r]``;
        ``C`` is ``(R, S, *shape_t)``.  ``units`` ``(R, S)``: ``C[r, s]`` is zero except at flat unit
        ``units[r, s]``; the first linear steps then read their operators' rows instead of applying
        the adjoints (the same coefficients: a row is the adjoint applied to a unit vector)."""
        g = self.g
        R, S = C.shape[0], C.shape[1]
        lam: dict[int, torch.Tensor] = {t: C}
        fresh = {t} if units is not None else set()  # nodes whose coefficients sit at ``units`` only
        beta = torch.zeros(R, S, dtype=torch.float64, device=C.device)
        mag = torch.zeros_like(beta)
        crossed = 0
        for i in range(t, -1, -1):
            A = lam.pop(i, None)
            if A is None:
                continue
            crossed += 1
            n = g.nodes[i]
            k = n.kind
            if fresh:  # an add node passes A (times its coefficients) to inputs that have nothing yet
                keep = ({j for c, j in zip(n.op, n.inputs) if c != 0 and j not in lam}
                        if i in fresh and k == "add" else set())
                fresh.difference_update(n.inputs)
                fresh |= keep
            if k == "input":
                return self._concretise(A, rows, beta, mag, crossed)
            if k in ("linear", "add", "concat"):
                op = self.ops.get(i)
                if op is not None and op.bias is not None:
                    b = op.bias.to(A).expand(n.out_shape).reshape(-1)
                    Af = A.flatten(2)
                    beta = beta + torch.matmul(Af, b)
                    mag = mag + torch.matmul(Af.abs(), b.abs())
                table = self._rows(i) if i in fresh and k == "linear" and op is not None else None
                if table is not None:
                    val = A.flatten(2).gather(2, units.unsqueeze(2))  # (R, S, 1): the one coefficient
                    back = table[units.reshape(-1)].reshape(R, S, -1) * val
                    _add(lam, n.inputs[0], back.reshape(R, S, *g.nodes[n.inputs[0]].out_shape))
                    continue
                _push_back(lam, g.nodes, n, A, op, 2)
            elif k == "activation":
                aL, bL, aU, bU = (v[rows][:, None] for v in self._relax(i))
                if self.alpha is not None and i in self.alpha:  # optimised lower slopes (alpha-CROWN)
                    cross = self.alpha_mask[i][rows][:, None]
                    a = self.alpha[i]
                    a = a - (a - a.clamp(0.0, 1.0)).detach()  # the value clamped, the gradient kept at 0 and 1
                    aL = torch.where(cross, a, aL)
                if R == 1 and self.alpha is None:  # one example (a refinement walk): work on the open units
                    back, beta, mag = _relu_like_step(A, aL, aU, bL, bU, beta, mag)
                    _add(lam, n.inputs[0], back)
                    continue
                pos = A >= 0
                _add(lam, n.inputs[0], A * torch.where(pos, aL, aU))
                # the intercepts: sum_k A_k b_k with b = bL where A >= 0, bU elsewhere (and their sizes)
                for clamp, b in ((torch.clamp_max, bU), (torch.clamp_min, bL)):
                    if not bool(b.any()):  # ReLU's lower lines pass through 0: no pass over A
                        continue
                    bf = b.flatten(2)[:, 0]
                    term = torch.matmul(clamp(A, 0).flatten(2), torch.stack([bf, bf.abs()], 2))
                    beta = beta + term[..., 0]
                    mag = mag + term[..., 1].abs()
            elif k == "maxpool":
                sel_idx, dom, U = (v[rows] for v in self._relax(i))
                in_shape = g.nodes[n.inputs[0]].out_shape
                c = in_shape[0]
                Af = A.reshape(R, S, c, -1)
                Ap, An = Af.clamp_min(0), Af.clamp_max(0)
                domf = dom.reshape(R, 1, c, -1).to(A.dtype)
                coef = Ap + An * domf
                hw = math.prod(in_shape[1:])
                back = torch.zeros(R, S, c, hw, dtype=A.dtype, device=A.device)
                back.scatter_add_(3, sel_idx.reshape(R, 1, c, -1).expand(R, S, c, Af.shape[-1]), coef)
                _add(lam, n.inputs[0], back.reshape(R, S, *in_shape))
                term = (An * (1 - domf) * U.reshape(R, 1, c, -1)).flatten(2)
                beta = beta + term.sum(2)
                mag = mag + term.abs().sum(2)
            elif k == "minmax":
                # max(a, b) = b + r and min(a, b) = a - r with r = relu(a - b) relaxed on the pair's
                # difference bounds: lam1 max + lam2 min = lam2 a + lam1 b + (lam1 - lam2) r
                aL, bL, aU, bU = (v[rows][:, None] for v in self._relax(i))
                sh = A.shape
                P = A.reshape(R, S, sh[2] // 2, 2, *sh[3:])
                lam1, lam2 = P[:, :, :, 0], P[:, :, :, 1]
                cr = lam1 - lam2
                pos = cr >= 0
                cd = cr * torch.where(pos, aL, aU)
                term = (cr * torch.where(pos, bL, bU)).flatten(2)
                beta = beta + term.sum(2)
                mag = mag + term.abs().sum(2)
                _add(lam, n.inputs[0], torch.stack([lam2 + cd, lam1 - cd], dim=3).reshape(sh))
            else:  # pragma: no cover - check_supported refuses these first
                raise UnsupportedOpError([(k, n.name)])
        raise AssertionError("the backward walk never reached the input")  # pragma: no cover

    def _concretise(self, A, rows, beta, mag, crossed):
        # min over the box of A.v = A.c - |A|.r (centre c, radius r); the magnitude |A|.max(|lo|, |hi|)
        # sizes the slack: matrix products over the coefficients' rows, two passes over A
        lo, hi = (v[rows].flatten(1) for v in self.box)
        Af = A.flatten(2)
        cols = [(lo + hi) / 2]
        if self.norm == "2":
            cols.append(self.x[rows].flatten(1).to(Af.dtype))
        lin = torch.matmul(Af, torch.stack(cols, 2))  # (R, S, 1 or 2)
        Aabs = Af.abs()
        rad = torch.matmul(Aabs, torch.stack([(hi - lo) / 2, torch.maximum(lo.abs(), hi.abs())], 2))
        val = lin[..., 0] - rad[..., 0]
        if self.norm == "2":
            ball = lin[..., 1] - self.eps[rows][:, None] * Af.norm(dim=2)
            val = torch.maximum(val, ball)
        slack = ROUNDING_SLACK * crossed * (mag + rad[..., 1] + lin[..., 0].abs() + beta.abs())
        return val + beta - slack


def input_box(x: torch.Tensor, eps: torch.Tensor, domain=None):
    """The box ``[max(x - eps, lo), min(x + eps, hi)]`` (every coordinate of an l2 or l_inf ball)."""
    e = eps.reshape(-1, *([1] * (x.dim() - 1)))
    lo, hi = x - e, x + e
    if domain is not None:
        dlo, dhi = domain
        dlo = torch.as_tensor(dlo, dtype=torch.float64, device=x.device)
        dhi = torch.as_tensor(dhi, dtype=torch.float64, device=x.device)
        lo, hi = torch.maximum(lo, dlo), torch.minimum(hi, dhi)
    return lo, hi


def _needs_bounds(graph: LipschitzGraph) -> list[int]:
    return sorted({graph.nodes[i].inputs[0] for i in range(graph.output + 1)
                   if graph.nodes[i].kind in ("activation", "maxpool", "minmax")})


def _affine_nodes(graph: LipschitzGraph) -> set[int]:
    """Nodes that are affine functions of the input (only linear, add and concat nodes above them)."""
    out: set[int] = set()
    for i, n in enumerate(graph.nodes[:graph.output + 1]):
        if n.kind == "input" or (n.kind in ("linear", "add", "concat") and all(j in out for j in n.inputs)):
            out.add(i)
    return out


def _box_intervals(graph: LipschitzGraph, ops: dict, affine: set[int], box) -> dict:
    """Exact ranges over the box of the affine nodes (centre/radius through ``A`` and ``|A|``)."""
    lo, hi = box
    # centre, radius and magnitude |A| |x| + |b| of every affine node (the magnitude sizes the slack)
    cr = {0: ((lo + hi) / 2, (hi - lo) / 2, torch.maximum(lo.abs(), hi.abs()))}
    for i in sorted(affine):
        n = graph.nodes[i]
        if n.kind == "linear":
            op = ops[i]
            c, r, m = cr[n.inputs[0]]
            mag = op.abs_apply(m)
            if op.bias is not None:
                mag = mag + op.bias.to(mag).abs()
            cr[i] = (op.forward(c), op.abs_apply(r), mag)
        elif n.kind == "add":
            cr[i] = (sum(k * cr[j][0] for k, j in zip(n.op, n.inputs)),
                     sum(abs(k) * cr[j][1] for k, j in zip(n.op, n.inputs)),
                     sum(abs(k) * cr[j][2] for k, j in zip(n.op, n.inputs)))
        elif n.kind == "concat":
            cr[i] = tuple(torch.cat([cr[j][t] for j in n.inputs], dim=n.op + 1) for t in range(3))
    out = {}
    for i, (c, r, m) in cr.items():
        r = r * (1 + ROUNDING_SLACK) + ROUNDING_SLACK * (m + c.abs()) + 1e-300  # outward
        out[i] = (c - r, c + r)
    return out


def _affine_row_norms(graph: LipschitzGraph, ops: dict, j: int, device, cache: dict | None) -> torch.Tensor:
    """l2 norms of the rows of the affine node ``j`` as a map of the input (its exact range over an l2
    ball is ``value -+ eps * row norm``), shaped like the node; cached per graph in ``cache``."""
    key = ("crown-rownorm", j, str(device))
    nodes = graph.nodes
    if cache is None or key not in cache:
        shape = nodes[j].out_shape
        units = math.prod(shape)
        norms = torch.empty(units, dtype=torch.float64, device=device)
        step = _spec_batches(units, max(math.prod(nd.out_shape) for nd in nodes[:j + 1]), 1)
        for s0 in range(0, units, step):
            k = min(step, units - s0)
            rows = torch.zeros(k, units, dtype=torch.float64, device=device)
            rows[torch.arange(k, device=device), torch.arange(s0, s0 + k, device=device)] = 1.0
            lam = {j: rows.reshape(k, *shape)}
            for i in range(j, 0, -1):
                A = lam.pop(i, None)
                if A is None:
                    continue
                _push_back(lam, nodes, nodes[i], A, ops.get(i), 1)
            norms[s0:s0 + k] = lam[0].reshape(k, -1).norm(dim=1)
        if cache is None:
            cache = {}
        cache[key] = norms
    return cache[key].reshape(nodes[j].out_shape)


def _kinks(act) -> list[float] | None:
    """The kinks of a piecewise-linear activation (its relaxation is exact on a unit without one
    inside its interval); None for any other activation."""
    if act.name == "relu" or act.name.startswith("leaky_relu("):
        return [0.0]
    if act.name.startswith("clip["):
        return [v for v in (act.const_below, act.const_above) if v is not None]
    return None


def _open_units(graph: LipschitzGraph, consumers: list[int], l, u) -> torch.Tensor:
    """Units of a node whose bounds a consumer's relaxation depends on: a kink inside the interval of
    a piecewise-linear activation, any width for other activations and max pooling (``(B, units)``
    booleans)."""
    lf, uf = l.reshape(len(l), -1), u.reshape(len(u), -1)
    mask = torch.zeros_like(lf, dtype=torch.bool)
    for c in consumers:
        n = graph.nodes[c]
        if n.kind == "maxpool":
            mask |= uf > lf  # the selection and the window maxima use the bounds directly
            continue
        if n.kind != "activation":
            continue
        ks = _kinks(n.op)
        if ks is None:
            mask |= uf > lf
        else:
            for k in ks:
                mask |= (lf < k) & (uf > k)
    return mask


#: CROWN is used by default (audit, local constants) when at most this many units need intermediate
#: bounds by backward walks (:func:`refined_units`)
AFFORDABLE_UNITS = 20_000


def affordable(graph: LipschitzGraph) -> str | None:
    """``None`` when CROWN applies to ``graph`` and is affordable by default, else the reason."""
    try:
        check_supported(graph)
    except UnsupportedOpError as exc:
        return str(exc)
    units = refined_units(graph)
    if units > AFFORDABLE_UNITS:
        return f"{units} units would need intermediate bounds (more than {AFFORDABLE_UNITS})"
    return None


def refined_units(graph: LipschitzGraph) -> int:
    """Units whose intermediate bounds CROWN computes by backward walks (the inputs of activation and
    pooling nodes that are not affine in the input): the main term of its cost."""
    affine = _affine_nodes(graph)
    return sum(math.prod(graph.nodes[j].out_shape) for j in _needs_bounds(graph)
               if j not in affine and graph.nodes[j].kind in ("linear", "add", "concat"))


def _spec_batches(count: int, units: int, rows: int) -> int:
    return max(1, min(count, MAX_ENTRIES // max(units * rows, 1)))


def _interval_step(graph: LipschitzGraph, ops: dict, j: int, cur: dict):
    """Interval of node ``j`` from the intervals ``cur`` of its inputs (outward rounded), or None for a
    node kind without a rule here."""
    n = graph.nodes[j]
    k, ins = n.kind, n.inputs
    if k == "linear":
        return linear_interval(ops[j], *cur[ins[0]])
    if k == "activation":
        return activation_interval(n.op, *cur[ins[0]])
    if k == "maxpool":  # monotone in every entry
        l, u = cur[ins[0]]
        return n.op(l), n.op(u)
    if k == "minmax":  # max and min are monotone in both arguments
        l, u = cur[ins[0]]
        return minmax(l), minmax(u)
    if k == "add":
        lo = sum((c * cur[i][0] if c >= 0 else c * cur[i][1]) for c, i in zip(n.op, ins))
        hi = sum((c * cur[i][1] if c >= 0 else c * cur[i][0]) for c, i in zip(n.op, ins))
        w = REL_SLACK * (lo.abs() + hi.abs())
        return lo - w, hi + w
    if k == "concat":
        return (torch.cat([cur[i][0] for i in ins], dim=n.op + 1), torch.cat([cur[i][1] for i in ins], dim=n.op + 1))
    return None


def float64_ops(graph: LipschitzGraph, device, cache: dict | None = None) -> dict:
    """Float64 copies of the graph's linear operators on ``device`` (cached in ``cache``)."""
    key = ("crown-ops", str(device))
    if cache is not None and key in cache:
        return cache[key]
    ops = {i: copy.deepcopy(n.op).to(torch.float64, device) for i, n in enumerate(graph.nodes) if n.kind == "linear"}
    if cache is not None:
        cache[key] = ops
    return ops


def crown_bounds(graph: LipschitzGraph, x: torch.Tensor, eps, norm: str = "2", *, domain=None,
                 C: torch.Tensor | None = None, intermediate: str = "crown", cache: dict | None = None,
                 upper: bool = True, alpha_steps: int = 0, alpha_deadline: float | None = None,
                 stats: dict | None = None, intervals: dict | None = None):
    """Lower and upper bounds ``(B, S)`` of ``C v_out(x')`` over ``x'`` in ``B_p(x_b, eps_b)`` intersected
    with ``domain`` (``(lo, hi)`` floats or tensors; None: the whole ball).

    ``C``: ``(B, S, m)`` (default: the identity: bounds of every logit).  ``intermediate``: ``"crown"``
    (linear bounds for the undecided units of every activation/pooling input) or ``"ibp"`` (interval
    bounds only: the CROWN-IBP variant).  Returns ``(lower, upper, bounds)`` with ``bounds`` the
    intermediate intervals by node.  ``cache``: a dict kept between calls on the same graph (the
    float64 operators).  ``upper=False`` skips the upper bounds (None).  ``alpha_steps``: Adam steps
    optimising the lower slopes of the ReLU units that cross 0, for every intermediate bound and the
    final one (alpha-CROWN, Xu et al., ICLR 2021); every step's bound is valid, and the largest is kept
    per specification.  ``alpha_deadline``: a ``time.perf_counter()`` instant after which no further
    optimisation step runs (the bounds reached so far, CROWN's at least, are kept: sound either way);
    ``stats["alpha_cut"]`` is set when it stopped one.  ``intervals``: the interval bounds of every node
    on the (whole) balls when the caller has them (:func:`lipverify.bounds.local.preactivation_bounds`'
    format), else computed here.
    """
    from lipverify.bounds.local import preactivation_bounds

    check_supported(graph)
    norm = "inf" if str(norm) in ("inf", "linf") else "2"
    x = x.to(torch.float64)
    B = x.shape[0]
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    eps_t = eps_t.expand(B).clone() if eps_t.dim() == 0 else eps_t.reshape(B)
    box = input_box(x, eps_t, domain)
    empty = (box[0] > box[1]).reshape(B, -1).any(1)
    if bool(empty.any()):
        raise UserInputError(f"input {int(empty.nonzero()[0])} lies farther than eps outside the input domain: "
                             "its ball does not meet the domain")
    with torch.no_grad():
        ibp = intervals if intervals is not None else preactivation_bounds(graph, x, eps_t, norm)
        bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        relax: dict = {}
        walk = _Walk(graph, x, eps_t, norm, box, bounds, relax, float64_ops(graph, x.device, cache))
        walk.deadline, walk.stats = alpha_deadline, stats
        rows_all = torch.arange(B, device=x.device)
        affine = _affine_nodes(graph)
        exact = _box_intervals(graph, walk.ops, affine, box)
        at_x = _box_intervals(graph, walk.ops, affine, (x, x)) if norm == "2" else {}  # values at x, outwards
        consumers = graph.consumers()
        needs = set(_needs_bounds(graph))
        cur: dict = {}  # every node's tightest interval so far (the input: the ball's box)
        for j in range(graph.output + 1):
            # the interval of node j from its inputs' tightened intervals (those of the earlier
            # CROWN bounds, not the first interval pass's): fewer undecided units to refine below
            step = box if j == 0 else _interval_step(graph, walk.ops, j, cur)
            if j in ibp:
                l, u = (v.to(torch.float64) for v in ibp[j])
                if step is not None:
                    l, u = torch.maximum(l, step[0]), torch.minimum(u, step[1])
            elif step is not None:
                l, u = step
            else:  # pragma: no cover - every supported kind has an interval rule
                raise AssertionError(f"no interval for node {j}")
            if j in exact:
                l, u = torch.maximum(l, exact[j][0]), torch.minimum(u, exact[j][1])
                if norm == "2" and j and j in needs:  # and the exact range over the ball
                    rn = _affine_row_norms(graph, walk.ops, j, x.device, cache)
                    r = eps_t.reshape(-1, *([1] * rn.dim())) * rn[None] * (1 + ROUNDING_SLACK)
                    l, u = torch.maximum(l, at_x[j][0] - r), torch.minimum(u, at_x[j][1] + r)
            n = graph.nodes[j]
            # affine nodes have their exact ranges over the box and the ball already
            if (j in needs and intermediate == "crown" and n.kind in ("linear", "add", "concat")
                    and j not in affine):
                l, u = _refine(walk, graph, j, l, u, rows_all, _open_units(graph, consumers[j], l, u), alpha_steps)
            if j in needs:
                bounds[j] = (l, u)
            cur[j] = (l, u)
            if any(graph.nodes[c].kind == "minmax" for c in consumers[j]):  # the pairs' differences
                dl, du = pair_difference_bounds(l, u)
                if intermediate == "crown":
                    dl, du = _refine(walk, graph, j, dl, du, rows_all, (dl < 0) & (du > 0), alpha_steps, pairs=True)
                walk.pairs[j] = (dl, du)
        out_shape = graph.nodes[graph.output].out_shape
        m = math.prod(out_shape)
        if C is None:
            C = torch.eye(m, dtype=torch.float64, device=x.device).expand(B, m, m)
        C = C.to(torch.float64).reshape(B, C.shape[1], *out_shape)
        S = C.shape[1]
        lower = walk.lower(graph.output, C, rows_all)
        if alpha_steps:
            lower = _optimise_slopes(walk, graph, C, rows_all, lower, alpha_steps)
        up = -walk.lower(graph.output, -C, rows_all) if upper else None
    assert lower.shape == (B, S)
    return lower, up, bounds


def _refine(walk: _Walk, graph, j, l, u, rows_all, open_, alpha_steps: int = 0, pairs: bool = False):
    """CROWN bounds of node ``j``'s units in ``open_`` (``(B, units)``: those whose relaxation the
    intervals leave inexact), intersected with the intervals ``l, u``.  ``pairs``: ``l, u, open_`` are
    over the channel pairs ``(2k, 2k+1)`` of ``j`` instead, bounding the differences ``v[2k] - v[2k+1]``."""
    shape = graph.nodes[j].out_shape
    units = math.prod(shape)
    lf, uf = l.reshape(len(l), -1).clone(), u.reshape(len(u), -1).clone()
    spatial = math.prod(shape[1:])
    # the walk's coefficient tensors are as wide as the widest node it crosses
    widest = max(math.prod(nd.out_shape) for nd in graph.nodes[:j + 1])
    for b in range(len(l)):
        idx = open_[b].reshape(-1).nonzero().flatten()
        if not len(idx):
            continue
        step = _spec_batches(2 * len(idx), widest, 1) // 2 or 1
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            k = len(part)
            C = torch.zeros(1, 2 * k, units, dtype=torch.float64, device=l.device)
            ar = torch.arange(k, device=l.device)
            first = 2 * (part // spatial) * spatial + part % spatial if pairs else part
            C[0, ar, first] = 1.0
            C[0, k + ar, first] = -1.0
            if pairs:  # the second unit of each pair
                C[0, ar, first + spatial] = -1.0
                C[0, k + ar, first + spatial] = 1.0
            Cj = C.reshape(1, 2 * k, *shape)
            low = walk.lower(j, Cj, rows_all[b:b + 1], units=None if pairs else torch.cat([part, part])[None])
            if alpha_steps:
                low = _optimise_slopes(walk, graph, Cj, rows_all[b:b + 1], low, alpha_steps, target=j)
            low = low[0]
            # fmax/fmin: a NaN bound (never expected) leaves the interval bound in place
            lf[b, part] = torch.fmax(lf[b, part], low[:k])
            uf[b, part] = torch.fmin(uf[b, part], -low[k:])
    return lf.reshape(l.shape), uf.reshape(u.shape)


def _optimise_slopes(walk: _Walk, graph, C, rows, lower, steps: int, lr: float = 0.1, target: int | None = None):
    """alpha-CROWN on the specification ``C`` of node ``target`` (default: the output): gradient ascent
    on the lower bounds over the lower slopes in [0, 1] of the ReLU units that cross 0 (one per
    specification and unit), keeping the best bound of each."""
    R, S = C.shape[0], C.shape[1]
    t = graph.output if target is None else target
    alpha, walk.alpha_mask = {}, {}
    for i, n in enumerate(graph.nodes[:t]):
        if n.kind == "activation" and n.op.name == "relu":
            aL = walk._relax(i)[0]
            l, u = walk.bounds[n.inputs[0]]
            walk.alpha_mask[i] = (l < 0) & (u > 0)
            alpha[i] = aL[rows][:, None].expand(R, S, *aL.shape[1:]).clone().requires_grad_(True)
    if not alpha:
        return lower
    best = lower.clone()
    opt = torch.optim.Adam(list(alpha.values()), lr=lr)
    walk.alpha = alpha
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if walk.deadline is not None and time.perf_counter() > walk.deadline:
                    if walk.stats is not None:
                        walk.stats["alpha_cut"] = True
                    break
                opt.zero_grad()
                val = walk.lower(t, C, rows)
                best = torch.fmax(best, val.detach())  # a NaN step never replaces a bound
                (-val.sum()).backward()
                for a in alpha.values():  # the l2 norm of an all-zero row has a NaN gradient
                    a.grad.nan_to_num_(0.0)
                opt.step()
            with torch.no_grad():
                best = torch.fmax(best, walk.lower(t, C, rows))
    finally:
        walk.alpha = None
    return best


def margin_lower_bounds(graph: LipschitzGraph, x: torch.Tensor, pred: torch.Tensor, eps, norm: str = "2", *,
                        domain=None, intermediate: str = "crown", cache: dict | None = None,
                        alpha_steps: int = 0, alpha_deadline: float | None = None,
                        stats: dict | None = None) -> torch.Tensor:
    """``(B, m)`` lower bounds of ``f_pred - f_j`` over the input set (``+inf`` at ``j = pred``);
    ``alpha_deadline``, ``stats`` as :func:`crown_bounds`."""
    B = x.shape[0]
    m = math.prod(graph.nodes[graph.output].out_shape)
    pred = pred.to(x.device).long()
    C = -torch.eye(m, dtype=torch.float64, device=x.device).expand(B, m, m).clone()
    C[torch.arange(B), :, pred] += 1.0
    lower, _, _ = crown_bounds(graph, x, eps, norm, domain=domain, C=C, intermediate=intermediate, cache=cache,
                               upper=False, alpha_steps=alpha_steps, alpha_deadline=alpha_deadline, stats=stats)
    lower[torch.arange(B), pred] = math.inf
    return lower
