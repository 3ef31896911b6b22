"""Interval bounds of every node over an input box, and the constants that hold only on such a domain.

Interval propagation (IBP) with outward rounding: an affine node maps the centre exactly and the
radius through ``|A|``; monotone activations map the end points, others use ``phi(c) +- Lip r``;
pooling, GroupSort, sums and concatenations act on the end points; a product takes the extremes of
the four end-point products; a normalisation's output lies in ``beta +- |gamma| min(sqrt(n - 1),
max|x - mean| / sigma_min)``.

Domain constants (issue: products and normalisations have no useful global constant):

* product ``a * b`` (broadcasting): ``a b - a' b' = a (b - b') + (a - a') b'``, so with
  ``S_a >= |a|`` and ``S_b >= |b|`` on the domain, ``||d(ab)||_2 <= F_b ||db||_2 + F_a ||da||_2`` where
  ``F_b = max_j sqrt(sum_{i -> j} S_a(i)^2)`` sums over the output positions ``i`` that read entry
  ``j`` of ``b`` (``sqrt(HW) max S_a`` at most for a per-channel gate) and symmetrically for ``F_a``;
  in l-inf ``F_b = max S_a``, ``F_a = max S_b``.  ``L(ab) <= F_b L(b) + F_a L(a)``.
* normalisation: ``var_min`` per group is the exact minimum of the (biased) variance over the input
  box, ``min_c (1/n) sum_i dist(c, [l_i, u_i])^2`` (the variance is ``min_c`` of the mean squared
  distance to ``c``), a convex one-dimensional problem solved by bisection on its derivative and
  turned into a proven lower bound with the convexity gap ``|phi'(c)| * bracket``.

Warnings
--------
Everything here holds for inputs inside the box only.  The product constants grow with the size of
the intervals, so on wide domains they can be loose by orders of magnitude; local bounds, which use the
intervals of a small ball, are much tighter.
"""

from __future__ import annotations

import math

import torch

from lipverify.graph.nodes import LipschitzGraph, minmax

__all__ = ["REL_SLACK", "activation_interval", "attention_constant", "attention_interval", "linf_dist_interval", "interval_bounds", "linear_interval", "min_variance", "mul_interval",
           "normalization_constants", "normalization_interval", "product_factors", "product_factors_batched"]

#: relative outward-rounding slack of interval bounds (float64 error is ~1e-16 per operation).
REL_SLACK = 1e-8
#: the largest difference tensor one chunk of an l-inf distance layer's interval bound materialises
_CHUNK_ELEMENTS = 1 << 22


def activation_interval(act, lb, ub):
    """Bounds of ``act(z)`` for ``z`` in ``[lb, ub]`` (outward rounded)."""
    fn = act.fn
    if act.lo >= 0:  # non-decreasing
        lo, hi = fn(lb), fn(ub)
    elif act.hi <= 0:  # non-increasing
        lo, hi = fn(ub), fn(lb)
    elif act.name == "abs":
        lo = torch.where(lb >= 0, lb, torch.where(ub <= 0, -ub, torch.zeros_like(lb)))
        hi = torch.maximum(lb.abs(), ub.abs())
    else:  # non-monotone: |phi(z) - phi(c)| <= Lip |z - c|
        c, r = (lb + ub) / 2, (ub - lb) / 2
        mid = fn(c)
        lo, hi = mid - act.lipschitz * r, mid + act.lipschitz * r
    # 1e-9: torch's softplus jumps by 1e-10 of its value where it switches to the identity
    return lo - 1e-9 * lo.abs(), hi + 1e-9 * hi.abs()


def linear_interval(op, lb, ub):
    """IBP through ``y = A z + b`` with outward rounding."""
    c = (lb + ub) / 2
    r = (ub - lb) / 2
    r = r + 1e-15 * (lb.abs() + ub.abs())  # c +- r covers [lb, ub] despite rounding
    yc = op.forward(c)
    yr = op.abs_apply(r)
    slack = op.abs_apply(c.abs()) + yr
    if op.bias is not None:
        slack = slack + op.bias.to(yc.dtype).abs()
    yr = yr + REL_SLACK * slack
    return yc - yr, yc + yr


def min_variance(lb: torch.Tensor, ub: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Proven lower bound of ``min_{x in [lb, ub]} var(x)`` along the last axis (biased variance)."""
    lb, ub = lb.to(torch.float64), ub.to(torch.float64)
    n = lb.shape[-1]

    def phi(c):
        below = (lb - c[..., None]).clamp_min(0.0)
        above = (c[..., None] - ub).clamp_min(0.0)
        return (below ** 2 + above ** 2).sum(-1), 2.0 * (above.sum(-1) - below.sum(-1))

    a, b = lb.amin(-1), ub.amax(-1)
    for _ in range(iters):
        m = (a + b) / 2
        _, d = phi(m)
        a, b = torch.where(d < 0, m, a), torch.where(d < 0, b, m)
    c = (a + b) / 2
    val, der = phi(c)
    low = (val - der.abs() * (b - a)).clamp_min(0.0)  # convexity: phi(c') >= phi(c) + phi'(c)(c' - c)
    return low / n * (1.0 - 1e-9)


def _mul_interval(la, ua, lb, ub):
    prods = torch.stack([la * lb, la * ub, ua * lb, ua * ub])
    lo, hi = prods.amin(0), prods.amax(0)
    w = REL_SLACK * (lo.abs() + hi.abs())
    return lo - w, hi + w


def _norm_interval(norm, lb, ub):
    B = lb.shape[0]
    gl, gu = lb.reshape(B, norm.groups, norm.size), ub.reshape(B, norm.groups, norm.size)
    sig = torch.sqrt(min_variance(gl, gu) + norm.eps)[..., None]
    ml, mu = gl.mean(-1, keepdim=True), gu.mean(-1, keepdim=True)
    dev = torch.maximum((gl - mu).abs(), (gu - ml).abs())
    z = torch.minimum(dev / sig, torch.full_like(dev, math.sqrt(max(norm.size - 1, 0))))
    z = (z * (1 + REL_SLACK)).reshape(lb.shape)
    g = torch.ones_like(z) if norm.gamma is None else norm.gamma.to(z).abs().expand_as(z)
    b = torch.zeros_like(z) if norm.beta is None else norm.beta.to(z).expand_as(z)
    return b - g * z, b + g * z


def interval_bounds(graph: LipschitzGraph, lo, hi) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(lb, ub)`` (float64, batch 1) of every node up to the output for inputs in ``[lo, hi]``
    (floats or tensors broadcasting against the input shape)."""
    shape = (1,) + tuple(graph.input_shape)
    first = next((n for n in graph.nodes if n.kind == "linear"), None)
    dev = first.op._device() if first is not None else torch.device("cpu")
    lo = torch.as_tensor(lo, dtype=torch.float64, device=dev).expand(shape).clone()
    hi = torch.as_tensor(hi, dtype=torch.float64, device=dev).expand(shape).clone()
    out: list = [None] * len(graph.nodes)
    for i, n in enumerate(graph.nodes):
        if i > graph.output:
            break
        k = n.kind
        ins = [out[j] for j in n.inputs]
        if k == "input":
            out[i] = (lo, hi)
        elif k == "linear":
            out[i] = linear_interval(n.op.to_double_copy(), *ins[0])
        elif k == "activation":
            out[i] = activation_interval(n.op, *ins[0])
        elif k == "maxpool":
            out[i] = (n.op(ins[0][0]), n.op(ins[0][1]))
        elif k == "minmax":
            out[i] = (minmax(ins[0][0]), minmax(ins[0][1]))
        elif k == "add":
            lb = ub = None
            for co, (l_, u_) in zip(n.op, ins):
                a, b = (co * l_, co * u_) if co >= 0 else (co * u_, co * l_)
                lb = a if lb is None else lb + a
                ub = b if ub is None else ub + b
            w = REL_SLACK * (lb.abs() + ub.abs())
            out[i] = (lb - w, ub + w)
        elif k == "concat":
            ax = n.op + 1
            out[i] = (torch.cat([t[0] for t in ins], dim=ax), torch.cat([t[1] for t in ins], dim=ax))
        elif k == "mul":
            out[i] = _mul_interval(ins[0][0], ins[0][1], ins[1][0], ins[1][1])
        elif k == "normalization":
            out[i] = _norm_interval(n.op, *ins[0])
        elif k == "attention":
            out[i] = attention_interval(n.op, *ins[0])
        elif k == "linf_dist":
            out[i] = linf_dist_interval(n.op, *ins[0])
        else:
            raise ValueError(f"node kind {k} has no interval rule")
    return out


def _gather_factor(sup_other: torch.Tensor, mine_shape: tuple, out_shape: tuple, p: str) -> torch.Tensor:
    """``F`` per example for the term ``other * d(mine)``: ``sup_other`` (B, *out_shape) bounds ``|other|``
    at every output position; ``mine`` is broadcast from ``mine_shape`` to ``out_shape``."""
    B = sup_other.shape[0]
    if p != "2":
        return sup_other.reshape(B, -1).amax(1)
    mine = (1,) * (len(out_shape) - len(mine_shape)) + tuple(mine_shape)
    dims = [d + 1 for d, (a, b) in enumerate(zip(mine, out_shape)) if a == 1 and b != 1]
    sq = sup_other.to(torch.float64) ** 2
    if dims:
        sq = sq.sum(dim=dims, keepdim=True)
    return torch.sqrt(sq.reshape(B, -1).amax(1)) * (1 + 1e-12)


def product_factors_batched(graph: LipschitzGraph, i: int, bounds, p: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F_a, F_b)`` per example (``(B,)`` tensors) of product node ``i`` from per-example intervals
    ``bounds[j] = (lb, ub)`` of ``(B, *shape)``: ``L <= F_b L(b) + F_a L(a)``."""
    n = graph.nodes[i]
    ja, jb = n.inputs
    out_shape = tuple(n.out_shape)
    (la, ua), (lb, ub) = bounds[ja], bounds[jb]
    B = la.shape[0]
    sa = torch.maximum(la.abs(), ua.abs()).expand((B,) + out_shape)
    sb = torch.maximum(lb.abs(), ub.abs()).expand((B,) + out_shape)
    f_b = _gather_factor(sa, tuple(graph.nodes[jb].out_shape), out_shape, p)
    f_a = _gather_factor(sb, tuple(graph.nodes[ja].out_shape), out_shape, p)
    return f_a, f_b


def product_factors(graph: LipschitzGraph, i: int, bounds, p: str) -> tuple[float, float]:
    """``(F_a, F_b)`` of product node ``i`` (see the module docstring): ``L <= F_b L(b) + F_a L(a)``."""
    f_a, f_b = product_factors_batched(graph, i, bounds, p)
    return float(f_a.max()), float(f_b.max())


def normalization_constants(norm, lb: torch.Tensor, ub: torch.Tensor, p: str) -> torch.Tensor:
    """Per example (``(B,)``): the constant of normalisation ``norm`` when its input lies in ``[lb, ub]``."""
    B = lb.shape[0]
    vmin = min_variance(lb.reshape(B, norm.groups, norm.size), ub.reshape(B, norm.groups, norm.size)).amin(1)
    base = norm.gamma_max / torch.sqrt(vmin + norm.eps)
    return base if p == "2" else base * (2.0 + math.sqrt(norm.size))


def mul_interval(la, ua, lb, ub):
    """Bounds of ``a * b`` (broadcasting) for ``a`` in ``[la, ua]`` and ``b`` in ``[lb, ub]``."""
    return _mul_interval(la, ua, lb, ub)


def normalization_interval(norm, lb, ub):
    """Bounds of the normalisation's output for inputs in ``[lb, ub]``."""
    return _norm_interval(norm, lb, ub)


# ------------------------------------------------------------------------------------------------
# multi-head self-attention (Kim et al. 2021: dot-product attention has no global Lipschitz constant;
# on a bounded domain the product rule applies to each of its products)


def _interval_affine(lb, ub, w, b):
    """``x W^T + b`` for ``x`` in ``[lb, ub]`` (last axis), outward rounded."""
    c, r = (lb + ub) / 2, (ub - lb) / 2
    w = w.to(c)
    yc = c @ w.T
    if b is not None:
        yc = yc + b.to(c)
    yr = r @ w.abs().T
    slack = REL_SLACK * (c.abs() @ w.abs().T + yr + (0 if b is None else b.to(c).abs()))
    return yc - yr - slack, yc + yr + slack


def _interval_matmul(al, au, bl, bu):
    """``A @ B`` for ``A`` in ``[al, au]``, ``B`` in ``[bl, bu]`` (batched), outward rounded."""
    ac, ar = (al + au) / 2, (au - al) / 2
    bc, br = (bl + bu) / 2, (bu - bl) / 2
    cc = ac @ bc
    cr = ac.abs() @ br + ar @ bc.abs() + ar @ br
    slack = REL_SLACK * (ac.abs() @ bc.abs() + cr)
    return cc - cr - slack, cc + cr + slack


def _softmax_interval(sl, su):
    """Row-wise softmax of ``S`` in ``[sl, su]`` (last axis): ``p_i >= exp(sl_i) / sum_j exp(su_j)`` and
    ``p_i <= min(1, exp(su_i) / sum_j exp(sl_j))`` (each denominator only grows or shrinks)."""
    lo = torch.exp(sl - torch.logsumexp(su, dim=-1, keepdim=True)) * (1 - 1e-12)
    hi = torch.minimum(torch.exp(su - torch.logsumexp(sl, dim=-1, keepdim=True)) * (1 + 1e-12),
                       torch.ones_like(su))
    return lo.clamp_min(0.0), hi


def _heads(t, att):
    N, T, E = t.shape
    return t.reshape(N, T, att.heads, E // att.heads).transpose(1, 2)


def _attention_parts(att, lb, ub):
    """Intervals of ``A``, ``B``, ``V`` (``(N, h, T, d)``) and of the attention weights ``P``."""
    E = lb.shape[-1]
    d = E // att.heads
    A = [_heads(t, att) for t in _interval_affine(lb, ub, att.wq, att.bq)]
    Bk = [_heads(t, att) for t in _interval_affine(lb, ub, att.wk, att.bk)]
    V = [_heads(t, att) for t in _interval_affine(lb, ub, att.wv, att.bv)]
    sl, su = _interval_matmul(A[0], A[1], Bk[0].transpose(-1, -2), Bk[1].transpose(-1, -2))
    P = _softmax_interval(sl / math.sqrt(d), su / math.sqrt(d))
    return A, Bk, V, P


def attention_interval(att, lb, ub):
    """Bounds of the attention's output for token inputs in ``[lb, ub]`` (``(N, T, E)``)."""
    N, T, E = lb.shape
    _, _, V, P = _attention_parts(att, lb, ub)
    ol, ou = _interval_matmul(P[0], P[1], V[0], V[1])
    ol, ou = (t.transpose(1, 2).reshape(N, T, E) for t in (ol, ou))
    return _interval_affine(ol, ou, att.wo, att.bo)


def _head_norms(w, heads, p):
    """Per head, the l2 (or l-inf) operator norm of ``x -> x W_h^T`` (rows of head ``h``)."""
    from lipverify.graph.operator_norms import SOUND_FACTOR

    E = w.shape[0]
    d = E // heads
    out = []
    for h in range(heads):
        wh = w[h * d:(h + 1) * d].to(torch.float64)
        out.append(float(torch.linalg.svdvals(wh)[0]) * SOUND_FACTOR if p == "2" else float(wh.abs().sum(1).max()))
    return torch.tensor(out, dtype=torch.float64)


def attention_constant(att, lb, ub, p: str) -> torch.Tensor:
    """Per example (``(N,)``): a Lipschitz constant of the attention for token inputs in ``[lb, ub]``.

    With ``S = A B^T / sqrt(d)``, ``P = softmax(S)`` row-wise (whose Jacobian ``diag(p) - p p^T`` has
    norm at most 1/2 in l2 and l-inf, by Gershgorin) and ``O = P V``, the product rule gives per head
    (l2, Frobenius norms over the tokens)::

        c_h = 1/2 (||W_q,h|| ||B_h|| + ||A_h|| ||W_k,h||) / sqrt(d) * ||V_h|| + ||P_h|| ||W_v,h||

    with ``||A_h||_2 <= ||sup|A_h| ||_F`` from the intervals and ``||P_h||_2 <= sqrt(max_j sum_i sup
    P_ij)`` (rows sum to 1); the output is ``||W_o|| sqrt(sum_h c_h^2)``.  In l-inf the same with row
    sums: ``c_h = 1/2 (n_q max_i sum_k sup|B_ik| + max_i sum_k sup|A_ik| n_k) / sqrt(d) * max_k
    sum_j sup|V_jk| + n_v`` (``n`` the max row abs-sums), and the output ``n_o max_h c_h``.
    """
    from lipverify.graph.operator_norms import SOUND_FACTOR

    E = lb.shape[-1]
    d = E // att.heads
    A, Bk, V, P = _attention_parts(att, lb, ub)
    sup = [torch.maximum(t[0].abs(), t[1].abs()) for t in (A, Bk, V)]
    nq, nk, nv = (_head_norms(w, att.heads, p).to(lb.device) for w in (att.wq, att.wk, att.wv))
    if p == "2":
        sA, sB, sV = (s.pow(2).sum((-1, -2)).sqrt() for s in sup)  # (N, h)
        sP = P[1].sum(-2).amax(-1).sqrt()  # max column sum of the upper bounds
        c = 0.5 * (nq * sB + sA * nk) / math.sqrt(d) * sV + sP * nv
        no = float(torch.linalg.svdvals(att.wo.to(torch.float64))[0]) * SOUND_FACTOR
        return no * c.pow(2).sum(-1).sqrt() * (1 + 1e-9)
    rA, rB = (s.sum(-1).amax(-1) for s in sup[:2])  # max row sums over tokens
    cV = sup[2].sum(-2).amax(-1)  # max column sums
    c = 0.5 * (nq * rB + rA * nk) / math.sqrt(d) * cV + nv
    no = float(att.wo.to(torch.float64).abs().sum(1).max())
    return no * c.amax(-1) * (1 + 1e-9)


def linf_dist_interval(layer, lb: torch.Tensor, ub: torch.Tensor):
    """Bounds of an l-inf distance layer ``||x - w_j||_inf + b_j`` for ``x`` in ``[lb, ub]`` (``(B, in)``):
    ``max_i dist(w_ji, [l_i, u_i])`` and ``max_i max(|l_i - w_ji|, |u_i - w_ji|)`` (chunked over outputs)."""
    if not math.isinf(layer.p):
        raise ValueError("interval bounds of l-p distance layers need p = inf")
    lb, ub = lb.reshape(lb.shape[0], -1), ub.reshape(ub.shape[0], -1)
    w = layer.weight.detach().to(lb)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, lb.shape[0] * w.shape[1]))
    los, his = [], []
    for s in range(0, w.shape[0], chunk):
        ws = w[None, s:s + chunk, :]
        below, above = lb[:, None, :] - ws, ws - ub[:, None, :]
        los.append(torch.maximum(below, above).clamp_min(0.0).amax(-1))
        his.append(torch.maximum((lb[:, None, :] - ws).abs(), (ub[:, None, :] - ws).abs()).amax(-1))
    lo, hi = torch.cat(los, 1), torch.cat(his, 1)
    if layer.bias is not None:
        b = layer.bias.detach().to(lb)
        lo, hi = lo + b, hi + b
    w_ = REL_SLACK * (lo.abs() + hi.abs())
    return lo - w_, hi + w_
