"""A rounding-error bound proven once for every input in a box, so a float32 pass does no bound work.

The bound of :class:`~lipverify.bounds.rounding.RoundedForward` is a constant plus a sum over the
computed tensors ``x^_v`` of terms ``t_v(|x^_v|)``: ``rel_v g_v . |x^_v|`` (element-wise, with
``gamma`` of the example's number of non-zero inputs for dense layers) or ``w_v ||x^_v||``
(norm-wise); either form bounds the residuals ``x^_v`` feeds, and both are non-decreasing in
``|x^_v|`` entry by entry.  So any ``M_v >= |x^_v|`` valid for every input of a set gives constants
``t_v(M_v)`` that bound the error of every input in it, and a pass over such inputs is the plain
forward pass (the same kernels, hence the same residual model) plus one gather: an a-priori forward error bound over a whole input
domain, computed once (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 3.1).

``M_v`` comes from interval arithmetic on the *computed* values over the box ``D = [lo, hi]`` (the
range of the inputs being certified), float64, rounded outward:

* input: ``[lo, hi]``;
* linear step ``y^ = fl(A x^ + b)``: ``x^ in c +- r`` gives ``y^ in (A c + b) +- (|A| r + rel (|A| M + |b|)
  + lambda terms)``, ``M = |c| + r`` (the forward's own residual bound, :mod:`~lipverify.bounds.rounding`),
  plus ``2 gamma_{n+2}`` (float64) of ``|A| M + |b|`` and a relative ``1e-12`` for this evaluation's own
  rounding;
* ReLU, clipping, max pooling, MinMax (non-decreasing in every input, exact in floating point): the
  map applied to both ends; sums ``sum c_k x_k``: as a linear step; other activations: ``|y^| <= L M (1 +
  rel) + lambda`` (``L`` the slope bound);
* reshapes, selections, concatenation: the same data movement on centres and radii.

Interval bounds grow with depth (every layer adds ``|A| r``), so on the tensors of deep layers
``M_v`` is orders of magnitude above the per-example values: measured on the public models, ``D`` is 9
to 36 times the median per-example bound.  :func:`lipverify.certify.certify` uses it where its probe
shows that it is small against the margins (it lowers the proven radii by ``D / K``) and decides
nearly every input, with the per-example bound as a second stage on the others.

Warnings
--------
* The bound holds for inputs inside the box only: :class:`DomainForward` checks every row (``check``),
  except where :func:`lipverify.certify.certify` built the box from the very inputs it evaluates.
* Activations other than ReLU and clipping lose the sign information (the symmetric magnitude rule).
"""

from __future__ import annotations

import math

import torch

from lipverify.bounds.rounding import BOUND_FACTOR, abs_norm, as_upper, gamma, trusted_kernels

#: float64 unit roundoff (this module's own arithmetic)
U64 = 2.0 ** -53
#: relative allowance for the few float64 roundings of each interval step
SLACK = 1e-12


def widen(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A radius covering the rounding of ``c +- r`` into ends and back (a few float64 operations)."""
    return r + 4 * U64 * (c.abs() + r)


def computed_intervals(rf, lo: float, hi: float) -> tuple[list, list]:
    """Centres and radii (float64, per example shape with a batch of 1) of every computed tensor of the
    :class:`~lipverify.bounds.rounding.RoundedForward` ``rf`` over all inputs in ``[lo, hi]`` (module
    docstring); None for steps the output does not need."""
    steps = rf.steps
    ns = len(steps)
    C: list = [None] * ns
    R: list = [None] * ns
    shape = (1,) + tuple(rf.input_shape)
    dev = rf.device
    lo_t = torch.full(shape, float(lo), dtype=torch.float64, device=dev)
    hi_t = torch.full(shape, float(hi), dtype=torch.float64, device=dev)
    C[0] = (lo_t + hi_t) / 2
    R[0] = widen(C[0], (hi_t - lo_t) / 2)
    lam = rf.lam
    for j in range(1, rf.output + 1):
        st = steps[j]
        cs = [C[i] for i in st.inputs]
        rs = [R[i] for i in st.inputs]
        ms = [c.abs() + r for c, r in zip(cs, rs)]
        role = st.role
        if role in ("reshape", "select", "concat"):
            C[j], R[j] = st.fn(cs), st.fn(rs)
        elif role == "linear":
            op = st.data["op"].to_double_copy()
            n = int(st.data["n"])
            am = op.abs_apply(ms[0])
            c = op.apply(cs[0])
            r = op.abs_apply(rs[0]) + (st.rel + 2 * gamma(n + 2, U64)) * am
            b = st.data.get("signed_bias")
            if b is not None:
                b = b.to(dev).reshape(c.shape[1:])
                c = c + b
                r = r + (st.data.get("bias_rel", st.rel) + 2 * gamma(n + 2, U64)) * b.abs()
            rows = abs_norm(op, "inf")
            wmax = float(op.weight.abs().max()) if hasattr(op, "weight") and op.weight.numel() else rows
            C[j], R[j] = c, widen(c, (r + lam * (2 * n + 3 + rows + wmax)) * (1 + SLACK))
        elif role == "bias":
            b = st.data["signed_bias"].to(dev).reshape(cs[0].shape[1:])
            c = cs[0] + b
            C[j], R[j] = c, widen(c, (rs[0] + (st.rel + 2 * U64) * (ms[0] + b.abs()) + 2 * lam) * (1 + SLACK))
        elif role == "sum":
            co = [float(k) for k in st.data["coefs"]]
            c = sum(k * x for k, x in zip(co, cs))
            r = sum(abs(k) * x for k, x in zip(co, rs))
            a = sum(abs(k) * x for k, x in zip(co, ms))
            g = st.rel + 2 * gamma(2 * len(co) + 1, U64)
            C[j], R[j] = c, widen(c, (r + g * a + lam * (2 * len(co) + 1)) * (1 + SLACK))
        elif role in ("maxpool", "minmax") or (role == "activation" and (
                st.label == "relu" or st.label.startswith("clip["))):
            # non-decreasing in every input and exact: the ends map to ends
            lo_v, hi_v = st.fn([cs[0] - rs[0]]), st.fn([cs[0] + rs[0]])
            c = (lo_v + hi_v) / 2
            C[j], R[j] = c, widen(c, (hi_v - lo_v) / 2)
        elif role == "activation":
            L = float(st.data["slope"])
            C[j] = torch.zeros_like(ms[0])
            R[j] = (L * ms[0] * (1 + st.rel) + 2 * lam) * (1 + SLACK)
        else:  # every role of RoundedForward is handled above; a new one must be added here
            raise NotImplementedError(f"no interval rule for {role}")
    return C, R


def domain_delta(rf, lo: float, hi: float) -> torch.Tensor:
    """The ``(m, m)`` matrix ``D`` with ``|(f^_j - f^_i) - (f_j - f_i)| <= D[j, i]`` for every input in
    ``[lo, hi]`` evaluated by the plain steps of ``rf``: its constant part plus, per tensor with a
    residual term, the smaller of the norm-wise and element-wise forms at ``M_j = |c_j| + r_j`` (rounded
    up into float32; either form bounds the term, :class:`~lipverify.bounds.rounding.RoundedForward`).
    Entries are ``inf`` where an interval overflowed."""
    C, R = computed_intervals(rf, lo, hi)
    m = int(math.prod(rf.shapes[rf.output]))
    dev = rf.device
    if rf.elementwise:
        tot = rf.const_pair.clone()
    else:
        tot = torch.full((m, m), rf.const * rf.margin_factor, dtype=torch.float64, device=dev)
    for j in range(rf.output + 1):
        norm_w = rf.weights.get(j)
        ew = rf.elementwise and j in rf.ew
        if norm_w is None and not ew:
            continue
        M = as_upper(C[j].abs() + R[j], rf.dtype)
        if not bool(torch.isfinite(M).all()):
            return torch.full((m, m), math.inf, dtype=torch.float64, device=dev)
        terms = []
        if norm_w is not None:
            v = float(norm_w * rf.norm_upper(M)[0]) * rf.margin_factor
            terms.append(torch.full((m, m), v, dtype=torch.float64, device=dev))
        if ew:
            # the element-wise term's own underflow allowance: in const_pair only for tensors the
            # per-example bound computes that way
            e = (rf.elementwise_terms(j, M)[0] + rf.ew_lam[j]) * BOUND_FACTOR
            terms.append(e[:, None] + e[None, :])
        tot = tot + (terms[0] if len(terms) == 1 else torch.minimum(terms[0], terms[1]))
    return torch.nan_to_num(tot, nan=math.inf)


#: boxes whose bound each evaluator keeps (most recent last)
CACHED_BOXES = 4


class DomainForward:
    """``DomainForward(rf, lo, hi)``: the plain float32 steps of ``rf`` (no per-example bound work) with
    the constant bound :func:`domain_delta` of the box ``[lo, hi]``.  Calling it on a batch returns
    ``(logits, delta)`` like :class:`~lipverify.bounds.rounding.RoundedForward`, ``delta = D[pred]``;
    rows outside the box (when ``check``) or whose logits overflowed get ``inf``.

    The matrix is computed once per box and kept on ``rf`` for the last :data:`CACHED_BOXES` boxes (a
    model certified again on inputs of the same range reuses it, like its margin constants)."""

    def __init__(self, rf, lo: float, hi: float, check: bool = True):
        self.rf, self.lo, self.hi, self.check = rf, float(lo), float(hi), check
        key = (self.lo, self.hi)
        cache = rf.domain_cache
        if key not in cache:
            while len(cache) >= CACHED_BOXES:
                cache.pop(next(iter(cache)))
            cache[key] = domain_delta(rf, self.lo, self.hi)
        self.D = cache[key]

    def __call__(self, x: torch.Tensor):
        rf = self.rf
        xin, inexact = rf.converted(x)
        with trusted_kernels(), torch.no_grad():
            out = rf.run(xin, plain=True)[rf.output].reshape(len(x), -1)
        delta = self.D[out.argmax(1)]
        if self.check:
            flat = x.reshape(len(x), -1)
            outside = ~((flat >= self.lo) & (flat <= self.hi)).all(1)
            inexact = outside if inexact is None else inexact | outside
        return rf.guard(out, delta, inexact)
