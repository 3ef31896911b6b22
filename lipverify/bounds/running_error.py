"""A proven bound on the rounding error of a float32 forward pass, carried forward entry by entry.

:class:`~lipverify.bounds.rounding.RoundedForward` bounds the error of the logits through sensitivities
valid on the whole input space (every ReLU may pass any error); on a normally trained deep network
those are products of layer norms and exceed most margins.  :class:`RunningError` follows the
computation of each input instead (running error analysis, Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., sec. 3.3): next to every computed tensor ``x^_v`` it computes a tensor
``E_v`` with ``|x^_v - x_v| <= E_v`` entry by entry, ``x_v`` the exact graph's value at the same input.

Rules (``u`` the unit roundoff, ``lambda`` the smallest normal number, the model of
:mod:`lipverify.bounds.rounding`: ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``, plus ``lambda`` per
operation for underflow; an ``n``-term dot product in any order within ``gamma_n |w| . |x|``):

* input: ``E = 0`` (the input as given; inputs the conversion changes get no bound).  Where only
  linear steps read it, no zero tensor is made: their error is ``(|A|^ gamma) |x^|`` in one kernel.
* linear step ``y = A x + b`` computed as ``fl(A32 x^ + b32)``, ``A32`` the weights rounded once or
  twice into float32: ``|y^ - y| <= |A| E + gamma_{n+3} (|A| |x^| + |b|)``, computed as
  ``|A|^ (E + gamma |x^|) + gamma |b|`` with ``|A|^ >= |A|`` (rounded up) and the whole float32
  evaluation of this non-negative expression scaled by ``1 / (1 - gamma_{n+8})`` (each of its roundings
  loses at most a factor ``1 - u``, the dot product ``1 - gamma_n``), plus ``lambda`` terms.
* ReLU: ``E_out = min(E, max(x^ + E, 0))``: ``|relu(a) - relu(b)| <= |a - b|``, and where ``x^ < 0``
  the computed output is 0 and the exact one at most ``max(x^ + E, 0)`` (0 where ``x^ < -E``: the
  exact value is negative too).  Computed as ``min(E', max(fl(x^ + E'), 0))`` with ``E' = c E``,
  ``c = 1 / (1 - u)^2`` taken into the factor of the linear step, sum or bias that produced ``E``:
  where ``x^ >= 0`` that is ``E' >= E``; where ``x^ < 0 < x^ + E``, ``fl(x^ + E') >= (x^ + c E)(1 - u)
  >= x^ + E + u (E - x^) / (1 - u) > x^ + E`` (a subnormal sum is exact); elsewhere it is ``>= 0``.
  After any other step the product by ``c`` is explicit.  Clipping, absolute value: ``E``.
  Leaky ReLU / PReLU (the slope rounded to float32, then the product): ``L E + gamma_2 |y^|``.
* max pooling: ``|max a^ - max a| <= max |a^ - a|``: the max pooling of ``E``.  MinMax: per pair, the
  larger of the two errors.  Sums ``sum c_k x_k``: ``sum |c_k| (E_k + gamma_{2K+1} |x^_k|)``; a
  residual addition ``x_1 + x_2`` rounds once, ``|fl(a + b) - (a + b)| <= u |a + b| + lambda``, so
  ``E_1 + E_2 + gamma_1 |y^| + 2 lambda``.  Concatenation and reshapes: exact.
* logits: ``|(f^_j - f^_i) - (f_j - f_i)| <= E_j + E_i`` (times ``1 + 1e-6`` for the float64 sum).

Buffers: a ReLU or residual addition whose input tensor no other step reads (and that its producer
made, not a view of another: :meth:`~lipverify.bounds.rounding.RoundedForward.buffer_owners`) is
computed into that tensor's value and error buffers -- the same floating-point operations, so the
same values and bounds with fewer new tensors; never into the caller's input, and not when the
pass keeps every tensor (``trace``).

It costs one more pass of every linear layer (with ``|A|``) over the error tensors, 2.4-2.6x the
plain forward on resnet_2b, and it is much tighter where ReLUs are inactive with a margin: the error through them
is exactly 0, and it shrinks where ReLU inputs are near 0.  :func:`lipverify.certify.certify` uses it
when the first inputs show that the cheaper bound leaves most decisions open.

Warnings
--------
* The same graphs as :class:`~lipverify.bounds.rounding.RoundedForward` (it reuses its steps); a
  graph without a rounding model is refused there.
* Overflow of ``E`` (or of the logits) gives an infinite bound: such inputs are recomputed in float64.
"""

from __future__ import annotations

import copy

import torch

from lipverify.bounds.rounding import (BOUND_FACTOR, RoundedForward, Step, UnsupportedRounding, abs_norm, as_upper,
                                       channel_vector, gamma, trusted_kernels)
from lipverify.graph.linear_ops import Scale


class RunningError:
    """``RunningError(rounded)``: the steps of a :class:`RoundedForward` evaluated with the entry-wise
    error tensors of the module docstring.  Calling it on a batch returns ``(logits, delta)`` like
    :class:`RoundedForward` (``delta[:, i]`` bounds the error of ``f^_j - f^_i``, ``j`` the computed
    argmax)."""

    def __init__(self, rounded: RoundedForward):
        if not rounded.supported:
            raise UnsupportedRounding(rounded.reason)
        self.rf = rounded
        self.dtype, self.u, self.lam = rounded.dtype, rounded.u, rounded.lam
        steps = rounded.steps
        # which steps compute into their inputs' value and error buffers: the float32 pass's choice (a
        # ReLU's rule reads x^ and E only, so it runs first; a residual addition's reads y^ and the errors)
        self.owned, self.into = rounded.owned, rounded.into
        self.reuse = True  # off while a pass keeps every tensor (trace)
        # producers whose error bound is raised by the ReLU rule's factor ``c``, so that the ReLU reading
        # them needs no product (:meth:`rule`)
        self.raised = {st.inputs[0] for st in steps[: rounded.output + 1]
                       if st.role == "activation" and st.label == "relu"
                       and steps[st.inputs[0]].role in ("linear", "sum", "bias")}
        self.c_relu = self.up(1.0 / (1.0 - self.u) ** 2)
        # the model input's error is 0 unless given: linear steps reading it then skip the zero tensor
        self.zero_input_ok = all(st.role == "linear" and not isinstance(st.data["op"], Scale)
                                 for st in steps[: rounded.output + 1] if 0 in st.inputs)
        self.rules = [self.rule(j, st) for j, st in enumerate(steps)]

    def up(self, value: float) -> float:
        """A float32 factor ``>= value``."""
        return float(as_upper(torch.tensor([value], dtype=torch.float64), self.dtype)[0])

    def rule(self, j: int, st: Step):
        """``(values of the inputs, their errors, the output value) -> output error`` for step ``j``."""
        u, lam, role = self.u, self.lam, st.role
        if role == "input":
            return None
        if role in ("reshape", "select", "concat"):
            fn = st.fn  # exact data movement: the same on the errors (selections copy, masks are 0 / 1)
            return lambda xs, es, y: fn(es)
        if role == "maxpool":
            pool = st.data["op"]
            return lambda xs, es, y: pool(es[0])
        if role == "minmax":
            def pair_max(xs, es, y):
                e = es[0]
                b, c = e.shape[0], e.shape[1]
                pairs = e.reshape(b, c // 2, 2, *e.shape[2:]).amax(2, keepdim=True)
                return pairs.expand(b, c // 2, 2, *e.shape[2:]).reshape(e.shape)
            return pair_max
        if role == "activation":
            if st.label == "relu":
                if st.inputs[0] in self.raised:
                    # the producer's bound E' is c E (c >= 1 / (1 - u)^2): min(E', max(fl(x^ + E'), 0)) is at
                    # least min(E, max(x^ + E, 0)) (class docstring), two passes and one new tensor
                    zero = torch.zeros((), dtype=self.dtype, device=self.rf.device)
                    return lambda xs, es, y: torch.clamp(torch.add(xs[0], es[0]), zero, es[0])
                # min(E, max(x^ + E, 0)), with fl(x^ + E) raised by c >= 1 / (1 - u)^2 (its own rounding
                # and the product's; a sum that is subnormal is exact, and rounding is monotone);
                # element-wise float arithmetic only (a selection by a mask costs several times more)
                c = self.c_relu
                return lambda xs, es, y: torch.minimum(torch.relu_(torch.add(xs[0], es[0]).mul_(c)), es[0])
            if st.rel == 0.0:  # clipping, absolute value: 1-Lipschitz and exact
                return lambda xs, es, y: es[0]
            L = self.up(float(st.data["slope"]))
            f = self.up(inverse(gamma(6, u)))
            a = self.up(st.rel)  # gamma_2: the slope's rounding and the product's
            return lambda xs, es, y: (es[0] * L + a * y.abs() + lam) * f
        if role == "sum":
            cs = [abs(c) for c in st.data["coefs"]]
            k = len(cs)
            g = self.up(gamma(2 * k + 1, u))
            f = self.up(inverse(gamma(4 * k + 6, u)) * (self.c_relu if j in self.raised else 1.0))
            if list(st.data["coefs"]) == [1.0, 1.0]:
                # a residual addition y^ = fl(x^_1 + x^_2): one rounding, |y^ - (x^_1 + x^_2)| <= u |x^_1 +
                # x^_2| + lambda <= gamma_1 |y^| + 2 lambda; E_1 + E_2 + gamma_1 |y^| + 7 lambda evaluated in
                # four roundings of non-negative terms (f undoes them); E_1's buffer reused when it is its own
                g1 = self.up(gamma(1, u))

                def residual_add(xs, es, y):
                    mine = self.into[j]
                    if mine is not None and self.reuse:  # into the error buffer that is this step's alone
                        a = st.inputs.index(mine)
                        t = es[a].add_(es[1 - a])
                    else:
                        t = torch.add(es[0], es[1])
                    return t.add_(y.abs(), alpha=g1).add_(lam * (2 * k + 3)).mul_(f)
                return residual_add
            ab = [c if c == 1.0 else self.up(c) for c in cs]  # 1 is exact: no product
            nonneg = [self.rf.nonneg[i] for i in st.inputs]

            def sum_rule(xs, es, y):
                # sum_k c_k E_k + g sum_k c_k |x^_k| (non-negative terms: every rounding is a factor >= 1 - u,
                # at most 4k + 6 of them on any path, undone by f)
                te = ta = None
                for c, x, e, pos in zip(ab, xs, es, nonneg):
                    a = x if pos else x.abs()
                    if c != 1.0:
                        e, a = e * c, a * c
                    te = e if te is None else te + e
                    ta = a if ta is None else ta + a
                return torch.add(te, ta, alpha=g).add_(lam * (2 * k + 3)).mul_(f)
            return sum_rule
        if role == "bias":
            b = st.data["bias"]
            g = gamma(2, u)
            gb = as_upper((b * g).to(self.rf.device), self.dtype)
            gg = self.up(g)
            f = self.up(inverse(gamma(8, u)) * (self.c_relu if j in self.raised else 1.0))
            return lambda xs, es, y: (es[0] + gg * xs[0].abs() + gb + 2 * lam) * f
        if role == "linear":
            return self.linear_rule(j, st)
        raise UnsupportedRounding(f"no running error rule for {st.label}")

    def linear_rule(self, j: int, st: Step):
        """``|A|^ (E + rel |x^|) + rel_b |b| + lambda terms``, the whole float32 evaluation scaled by ``f =
        1 / (1 - gamma_{n+8})``.  Dense and convolution layers: ``f`` goes into ``|A|^`` and the constant
        terms into the kernel's bias (rounded up): the kernel sums ``n + 1`` non-negative terms, and with
        the two roundings of ``E + rel |x^|`` every computed entry is at least ``(1 - gamma_{n+3}) f >= 1``
        times its exact value."""
        u, lam = self.u, self.lam
        op, n = st.data["op"], int(st.data["n"])
        rel = self.up(st.rel)
        f = self.up(inverse(gamma(n + 8, u)) * (self.c_relu if j in self.raised else 1.0))
        if isinstance(op, Scale):
            rows = float(op.scale.detach().double().abs().max()) if op.scale.numel() else 0.0
        else:
            rows = abs_norm(op, "inf")
        wmax = float(op.weight.detach().double().abs().max()) if hasattr(op, "weight") and op.weight.numel() else rows
        # underflow: the forward's allowance (as in RoundedForward) and the bound's own (n products and
        # sums, a few element-wise operations)
        lam_term = lam * ((2 * n + 3 + rows + wmax) + (2 * n + 12))
        dev = self.rf.device
        b64 = None
        if "bias" in st.data:
            b64 = st.data["bias"].to(dev, torch.float64) * st.data.get("bias_rel", st.rel)
        src = st.inputs[0]
        nonneg = self.rf.nonneg[src]

        def z_of(xs, es):
            if nonneg and self.reuse and self.owned[src]:  # E of the input is this step's alone
                return es[0].add_(xs[0], alpha=rel)
            return torch.add(es[0], xs[0] if nonneg else xs[0].abs(), alpha=rel)

        if isinstance(op, Scale):
            sc = as_upper(op.scale.detach().double().abs().to(dev), self.dtype)
            bias = None if b64 is None else as_upper(b64, self.dtype)

            def scale_rule(xs, es, y):
                t = z_of(xs, es) * sc
                if bias is not None:
                    t = t + bias
                return (t + lam_term) * f
            return scale_rule
        a = copy.copy(op)
        a.weight = as_upper(op.weight.detach().double().abs().to(dev) * f, self.dtype)
        consts = (b64 if b64 is not None else torch.zeros(op.out_shape, dtype=torch.float64, device=dev)) + lam_term
        vec = channel_vector(consts.reshape(op.out_shape), op)
        bias_up = None if vec is None else as_upper(vec * f, self.dtype)
        k = self.rf.kernel(a, bias_up)
        rest = None if vec is not None else as_upper(consts.reshape(op.out_shape) * f, self.dtype)
        k0 = None
        if src == 0:  # the model input, whose error is 0 unless given: |A|^ rel |x| in the kernel's weights
            a0 = copy.copy(op)
            a0.weight = as_upper(op.weight.detach().double().abs().to(dev) * (f * rel), self.dtype)
            k0 = self.rf.kernel(a0, bias_up)

        def linear(xs, es, y):
            if es[0] is None:  # E = 0: one rounding of E + rel |x^| fewer, within f
                x = xs[0]
                t = k0([x if bool(x.amin() >= 0) else x.abs()])  # (a NaN takes |x|)
            else:
                t = k([z_of(xs, es)])
            return t if rest is None else t.add_(rest)
        return linear

    def __call__(self, x: torch.Tensor, input_error: torch.Tensor | None = None, trace: bool = False):
        """``(logits, delta)`` for the batch ``x``.  ``input_error``: a bound ``E_0 >= 0`` (shape of ``x``)
        on how far the exact input may be from ``x`` entry by entry (default 0: ``x`` is the input).
        ``trace``: also return every step's computed value and error bound (lists by step)."""
        rf = self.rf
        B = len(x)
        xin, inexact = rf.converted(x)
        steps = rf.steps
        vals: list = [None] * len(steps)
        errs: list = [None] * len(steps)
        with trusted_kernels(), torch.no_grad():
            vals[0] = xin
            if input_error is not None:
                errs[0] = as_upper(input_error.to(xin.device, torch.float64), self.dtype).reshape(xin.shape)
            elif not self.zero_input_ok:
                errs[0] = torch.zeros_like(xin)  # (else None: the linear steps reading it know E = 0)
            self.reuse = not trace  # buffers of tensors read once are overwritten by their reader
            for j in range(1, rf.output + 1):
                st = steps[j]
                xs = [vals[i] for i in st.inputs]
                es = [errs[i] for i in st.inputs]
                mine = self.into[j] if self.reuse else None
                if mine is not None:
                    # the value into that input's buffer (the same operation): a ReLU's rule reads x^ and E,
                    # so it runs first; a residual addition's reads y^ and the errors
                    if st.role == "activation":
                        errs[j] = self.rules[j](xs, es, None)
                        vals[j] = rf.in_place(j, vals)
                    else:
                        vals[j] = rf.in_place(j, vals)
                        errs[j] = self.rules[j](xs, es, vals[j])
                else:
                    vals[j] = rf.plain_fn(j)(xs)
                    errs[j] = self.rules[j](xs, es, vals[j])
                if not trace:
                    for i in st.inputs:
                        if rf.last_use[i] == j and i != rf.output:
                            vals[i] = errs[i] = None
            out = vals[rf.output].reshape(B, -1)
            e = errs[rf.output].reshape(B, -1).double() * BOUND_FACTOR
        pred = out.argmax(1)
        delta = e.gather(1, pred[:, None]) + e
        res = rf.guard(out, delta, inexact)
        return (res[0], res[1], vals, errs) if trace else res


def inverse(g: float) -> float:
    """``1 / (1 - g)``: the factor that undoes roundings worth ``gamma = g`` on non-negative sums."""
    if not g < 0.5:
        raise UnsupportedRounding("a dot product too long for the running error bound (gamma_n >= 1/2)")
    return 1.0 / (1.0 - g)
