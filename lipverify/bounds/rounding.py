"""Proven bounds on the rounding error of a float32 (or float64) forward pass over the Lipschitz graph.

Certificates speak of ``f``, the Lipschitz graph evaluated in exact arithmetic (its stored weights
taken as exact numbers): the margin constants ``K`` bound the Lipschitz constants of ``f``.  Computing
the logits in floating point gives ``f^(x) = f(x) + e(x)``.  :class:`RoundedForward` evaluates the
graph in a given precision and returns, per input, a proven ``Delta(x) >= max_i |e_j(x) - e_i(x)|``
for every pair of logits, so ``f^_j - f^_i - Delta > eps K_ji`` proves ``f_j - f_i > eps K_ji`` and the
certificate of the exact network.

Floating-point model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 2.2,
3.1, 3.5): every basic operation is ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u`` (``u = 2^-24`` in
float32, ``2^-53`` in float64), up to an absolute error of at most ``lambda`` (the smallest normal
number) per operation where results or inputs are subnormal (gradual underflow or flush-to-zero /
denormals-are-zero alike).  An ``n``-term dot product or sum computed in *any* order (recursive,
pairwise, blocked, split-K, with or without FMA) satisfies ``|fl(w . x) - w . x| <= gamma_n |w| . |x|``
with ``gamma_n = n u / (1 - n u)``.  Every kernel the evaluator calls is such a computation:
``F.linear`` (BLAS GEMM), ``F.conv2d`` / ``F.conv_transpose2d`` with the direct algorithm (oneDNN's
``convolution_direct``, which is what PyTorch requests, or im2col + GEMM), element-wise products and
sums; max, max pooling, ReLU, clipping, absolute values, reshapes and gathers are exact.  Kernels whose
error is *not* of that form are switched off while it runs (:func:`trusted_kernels`): NNPACK
(Winograd / FFT convolutions), cuDNN (whose heuristics may pick Winograd or FFT algorithms; the native
CUDA convolution is im2col + cuBLAS GEMM), TF32 and reduced-precision oneDNN math.

Error propagation.  Write the computed network as the exact one with a residual ``r_v`` injected at the
output of every evaluated step ``v`` (``r_v`` = computed output minus the exact step applied to the
*computed* inputs).  Telescoping over the steps, ``||f^(x) - f(x)|| <= sum_v G_v ||r_v||``, where
``G_v`` bounds the Lipschitz constant of the logits with respect to a perturbation at ``v``:
``G_out = 1`` and ``G_v = sum_{w reads v} L_{w<-v} G_w`` (``L`` the step's sound Lipschitz constant with
respect to that input: the graph node's constant from :func:`~lipverify.bounds.global_bound.propagate`
for a step that is a whole node, the proven ``||A||`` bounds below for steps inside a node).  For a
linear step ``y = A x + b`` with ``n`` terms per output, weights rounded once or twice into the
evaluation precision (folded batch norms) and the bias in the sum, componentwise
``|r| <= gamma_{n+3} (|A| |x^| + |b|)``, so ``||r||_p <= gamma_{n+3} (|| |A| ||_p ||x^||_p + ||b||_p)``
with ``|| |A| ||_inf`` the largest row abs-sum and ``|| |A| ||_2 <= min(sqrt(R C), ||M0||_F)`` (Schur's
bound with the largest row and column abs-sums ``R``, ``C``; for a convolution ``M0`` is the kernel's
abs-sum over taps, which dominates the operator's symbol at every frequency).  ``||x^||`` is measured
on the computed tensor at run time (itself rounded: ``s <= (s~ + 2 m lambda) / (1 - gamma_m)`` for the
computed sum of squares ``s~`` of ``m`` entries).  Sums of ``K`` scaled tensors: ``gamma_{2K+1}
sum |c_k| ||x_k||``; leaky ReLU / PReLU: ``gamma_2 |a| ||x||`` (the slope is rounded to the
tensor's precision, then multiplied).  Underflow adds ``lambda`` terms (proportional to
the tensor sizes) that only matter near ``1e-38``.  The margin error is ``|e_j - e_i| <= sqrt(2) ||e||_2``
or ``2 ||e||_inf``, and the final value is multiplied by ``1 + 1e-6`` (the float64 arithmetic of the
bound itself).

Warnings
--------
* Supported steps: dense, convolution, transposed convolution, scale, selection (linear ops, their
  chains and residual sums), ReLU, leaky ReLU / PReLU, clipping, absolute value, max pooling, MinMax,
  residual additions, concatenation.  Graphs with other nodes (tanh, sigmoid, GELU, ...: their library
  accuracy is not specified; products, normalisations, attention, l-inf distance layers) are refused
  (:attr:`RoundedForward.reason`); certification then runs the model in float64 as before.
* Certificates speak of the input as given: an input that the conversion to the evaluation precision
  changes (a float64 input with more digits than float32 holds) gets an infinite bound, so
  certification decides it in float64.
* ``ONEDNN_DEFAULT_FPMATH_MODE`` set to anything but ``STRICT`` lets oneDNN compute float32 in lower
  precision behind PyTorch's back: the float32 evaluator refuses to run.
* The bound is a worst case: on deep non-Lipschitz-trained networks ``G_v`` (products of layer
  constants) makes it much larger than the observed error; inputs whose decision it leaves open are
  recomputed in float64 by :func:`lipverify.certify.certify`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lipverify.graph.linear_ops import Chain, Conv, ConvTranspose, Dense, LinearOp, Residual, Scale, Select
from lipverify.graph.nodes import LipschitzGraph, minmax

#: unit roundoff and smallest normal number of each supported precision
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
SMALLEST_NORMAL = {torch.float32: 2.0 ** -126, torch.float64: 2.0 ** -1022}
#: relative safety factor on the final bound (the float64 arithmetic that computes it)
BOUND_FACTOR = 1.0 + 1e-6
#: activations computed exactly in floating point, and those whose slope and product each round once
EXACT_ACTIVATIONS = ("relu", "clip[", "abs")
ROUNDED_ACTIVATIONS = ("leaky_relu(", "prelu[")


def gamma(n: int, u: float) -> float:
    """``gamma_n = n u / (1 - n u)`` (infinite when ``n u >= 1/2``: no useful bound)."""
    nu = n * u
    return math.inf if nu >= 0.5 else nu / (1.0 - nu)


class UnsupportedRounding(Exception):
    """A graph step without a rounding model (the message names it)."""


def check_environment() -> None:
    """Refuse settings that lower float32 precision behind PyTorch's back."""
    mode = os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "STRICT").upper()
    if mode not in ("STRICT", ""):
        raise UnsupportedRounding(f"ONEDNN_DEFAULT_FPMATH_MODE={mode} lets oneDNN lower float32 precision")


TRUSTED_DEPTH = [0]  # nesting depth of :func:`trusted_kernels` (inner ones change nothing)


@contextlib.contextmanager
def trusted_kernels():
    """Run only kernels whose rounding satisfies the dot-product error bound (module docstring).

    Turns off TF32, NNPACK and cuDNN and asks oneDNN for IEEE float32 math while it runs; restores
    the previous settings afterwards.  Nested uses cost nothing."""
    if TRUSTED_DEPTH[0]:
        TRUSTED_DEPTH[0] += 1
        try:
            yield
        finally:
            TRUSTED_DEPTH[0] -= 1
        return
    saved = []
    for mod in (getattr(torch.backends.mkldnn, "matmul", None), getattr(torch.backends.mkldnn, "conv", None)):
        if mod is not None and getattr(mod, "fp32_precision", "none") not in ("none", "ieee"):
            saved.append((mod, mod.fp32_precision))
            mod.fp32_precision = "ieee"
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    TRUSTED_DEPTH[0] += 1
    try:
        with torch.backends.nnpack.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        TRUSTED_DEPTH[0] -= 1
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
        for mod, v in saved:
            mod.fp32_precision = v


@dataclass
class Step:
    """One evaluated operation: ``fn(inputs) -> output`` with its rounding residual bound
    ``||r|| <= sum_k coef[k] ||x_k|| + const`` (norm-wise), Lipschitz constants ``lip[k]`` per input, and
    what the element-wise bound needs: ``role`` (``input``, ``reshape``, ``select``, ``linear``, ``sum``,
    ``bias``, ``activation``, ``maxpool``, ``minmax``, ``concat``), ``rel`` (the relative factor of its
    residual: ``|r| <= rel * (|A| |x| + |b|)``) and ``data`` (the op, coefficients, ...)."""

    fn: Callable | None
    inputs: list[int]
    coef: list[float]
    const: float
    lip: list[float]
    label: str
    out_numel: int = 0
    role: str = "input"
    rel: float = 0.0
    data: dict = field(default_factory=dict)


def abs_norm(op: LinearOp, p: str) -> float:
    """A proven upper bound of ``|| |A| ||_p`` (hence of ``||A||_p``) for a primitive linear op."""
    if isinstance(op, Select):
        if op.multiplicity == 0:
            return 0.0
        return math.sqrt(op.multiplicity) if p == "2" else 1.0
    if isinstance(op, Scale):
        return float(op.scale.double().abs().max()) if op.scale.numel() else 0.0
    if isinstance(op, Dense):
        a = op.weight.detach().double().abs()
        rows, cols, fro = a.sum(1).max(), a.sum(0).max(), a.norm()
    elif isinstance(op, (Conv, ConvTranspose)):
        a = op.weight.detach().double().abs()
        g = op.groups
        m0 = a.sum(dim=(2, 3))  # conv: (out, in/g); transposed: (in, out/g)
        if isinstance(op, ConvTranspose):  # its operator is the adjoint of a convolution with this kernel
            per_in, per_out_groups = m0.sum(1), [m0[k * (m0.shape[0] // g):(k + 1) * (m0.shape[0] // g)].sum(0)
                                                 for k in range(g)]
            rows, cols = torch.cat(per_out_groups).max(), per_in.max()
            blocks = [m0[k * (m0.shape[0] // g):(k + 1) * (m0.shape[0] // g)] for k in range(g)]
        else:
            o_g = m0.shape[0] // g
            rows = m0.sum(1).max()
            cols = torch.cat([m0[k * o_g:(k + 1) * o_g].sum(0) for k in range(g)]).max()
            blocks = [m0[k * o_g:(k + 1) * o_g] for k in range(g)]
        fro = max(float(b.norm()) for b in blocks)
        fro = torch.tensor(fro, dtype=torch.float64)
    else:
        raise UnsupportedRounding(f"no rounding model for the linear op {op.describe()}")
    val = float(rows) if p == "inf" else min(math.sqrt(float(rows) * float(cols)), float(fro))
    return val * (1.0 + 1e-12)


def terms(op: LinearOp) -> int:
    """Terms per output entry of a primitive linear op's dot products."""
    if isinstance(op, Dense):
        return int(op.weight.shape[1])
    if isinstance(op, Conv):
        return int(op.weight.shape[1] * op.weight.shape[2] * op.weight.shape[3])
    if isinstance(op, ConvTranspose):
        return int(op.weight.shape[0] // op.groups * op.weight.shape[2] * op.weight.shape[3])
    return 1


def fold_scales(ops: list[LinearOp]) -> list[LinearOp]:
    """Fold per-channel scales into the neighbouring convolution or dense layer (the folded weight is a
    product of two stored numbers, computed in float64: one rounding), drop identity selections; the
    result composes to the same linear map (biases are not part of it)."""
    work = list(ops)
    changed = True
    while changed:
        changed = False
        for i in range(len(work) - 1):
            a, b = work[i], work[i + 1]
            merged = None
            if isinstance(a, Conv) and isinstance(b, Scale) and not a.one_d:
                cs = b.channel_scale()
                if cs is not None:
                    w = a.weight.detach().double() * cs.double().view(-1, 1, 1, 1)
                    merged = Conv(w, a.in_shape, a.stride, a.padding, a.dilation, a.groups)
            elif isinstance(a, Scale) and isinstance(b, Conv) and not b.one_d:
                cs = a.channel_scale()
                if cs is not None:
                    w = b.weight.detach().double().clone()
                    cin_g, o_g = w.shape[1], w.shape[0] // b.groups
                    for g in range(b.groups):
                        w[g * o_g:(g + 1) * o_g] *= cs.double()[g * cin_g:(g + 1) * cin_g].view(1, -1, 1, 1)
                    merged = Conv(w, a.in_shape, b.stride, b.padding, b.dilation, b.groups)
            elif isinstance(a, Dense) and isinstance(b, Scale) and len(b.in_shape) == 1:
                merged = Dense(a.weight.detach().double() * b.scale.double().expand(b.in_shape).view(-1, 1),
                               a.in_shape)
            elif isinstance(a, Scale) and isinstance(b, Dense) and len(a.in_shape) == 1:
                merged = Dense(b.weight.detach().double() * a.scale.double().expand(a.in_shape).view(1, -1),
                               a.in_shape)
            if merged is not None:
                work[i:i + 2] = [merged]
                changed = True
                break
    return work


def channel_vector(bias: torch.Tensor, op: LinearOp) -> torch.Tensor | None:
    """The per-channel bias vector of a dense / convolution output when ``bias`` is constant along the
    other axes (so it can go into the kernel's own bias), else None."""
    b = bias.detach()
    if isinstance(op, Dense):
        flat = b.reshape(-1, b.shape[-1])
    elif isinstance(op, (Conv, ConvTranspose)) and not getattr(op, "one_d", False) and b.dim() == 3:
        flat = b.reshape(b.shape[0], -1).T
    else:
        return None
    return flat[0] if bool(torch.all(flat == flat[:1])) else None


class RoundedForward:
    """The Lipschitz graph evaluated in ``dtype`` together with a proven bound on the margin error.

    ``RoundedForward(graph, constants, p, dtype)``: ``constants`` are the graph's sound node constants
    in norm ``p`` (``"2"`` or ``"inf"``, :func:`~lipverify.bounds.global_bound.propagate`), used for the
    norm-wise error propagation.  Calling it on a batch returns ``(logits, delta)``: logits ``(B, m)`` in
    ``dtype`` and ``delta`` (float64, ``(B, m)``) with ``|(f^_j - f^_i) - (f_j - f_i)| <= delta[:, i]``
    for ``j`` the computed argmax of each row (``inf`` where the evaluation overflowed).

    Two bounds of the residuals fed by each computed tensor exist: the norm-wise one of the module
    docstring, and an element-wise one: ``|e_i| <= sum_v rel_v (g_v^(i) . |x^_v| + h_v^(i) . |b_v|)``,
    where ``h_v^(i) >= |d f_i / d(step v's output)|`` entry by entry on the whole input space (``e_i``
    pulled back through ``|A|^T``, slope bounds, pooling routes, once per model) and ``g_v = |A_v|^T h_v``;
    ``|e_j - e_i| <= |e_j| + |e_i|``.  Per input it costs one ``|x^| @ g`` product per step input, with
    ``m`` columns; when the tensor is non-negative and read only by a dense layer, that layer's GEMM
    computes it (``g^T`` appended to its weight as ``m`` extra rows: dot products of the same form, so
    the same error model), and the tensor is read once.  For dense layers ``rel`` uses the number of
    non-zero inputs of each example (adding an exact zero does not round).  Both bound the same
    residual pieces, so any choice per tensor is proven: at construction both are computed on 8 fixed
    inputs uniform in ``[0, 1]``, and from then on only the one whose median was smaller there, per
    tensor (so an input's bound does not depend on the batch it comes in).  When the graph has a step
    without a rounding model, ``supported`` is false and ``reason`` names it.
    """

    #: most float64 entries the element-wise bound's weights may take (else the norm-wise bound only)
    MAX_WEIGHT_ENTRIES = 20_000_000

    def __init__(self, graph: LipschitzGraph, constants, p: str, dtype=torch.float32, device=None):
        self.p = str(p)
        if self.p not in ("2", "inf"):
            raise ValueError("norm must be '2' or 'inf'")
        self.dtype = dtype
        self.u = UNIT_ROUNDOFF[dtype]
        self.lam = SMALLEST_NORMAL[dtype]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.steps: list[Step] = []
        self.supported, self.reason = True, ""
        self.elementwise = False
        self.decided = False
        self.fused: dict[int, int] = {}  # dense step -> the tensor whose element-wise product it computes
        self.fused_inputs: set[int] = set()
        self.stash: dict[int, tuple] = {}  # tensor -> (product, non-zeros) from a fused GEMM
        self.norm_used: dict[int, bool] = {}  # per tensor: its norm-wise term is computed
        self.ew_used: dict[int, bool] = {}  # per tensor: its element-wise term is computed
        self.domain_cache: dict = {}  # box -> constant terms (lipverify.bounds.domain)
        try:
            if dtype == torch.float32:
                check_environment()
            self.build(graph, constants)
        except UnsupportedRounding as e:
            self.supported, self.reason = False, str(e)
            self.steps = []
            return
        self.input_shape = tuple(graph.input_shape)
        self.finish()
        self.prepare_elementwise()
        if self.elementwise:
            # which bound each tensor keeps is decided once, on fixed inputs (uniform in [0, 1]), so the
            # bound of an input never depends on the batch it came in
            probe = torch.rand((8,) + self.input_shape, generator=torch.Generator().manual_seed(0))
            self(probe.to(self.device))

    # -- construction -----------------------------------------------------------------------------
    def size(self, numel: int) -> float:
        """The norm of an all-ones tensor of ``numel`` entries (turns per-entry terms into norms)."""
        return math.sqrt(numel) if self.p == "2" else 1.0

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device, self.dtype)

    def add_step(self, step: Step) -> int:
        self.steps.append(step)
        return len(self.steps) - 1

    def norm_of(self, t: torch.Tensor) -> float:
        t = t.detach().double()
        return float(t.norm()) if self.p == "2" else float(t.abs().max()) if t.numel() else 0.0

    def reshape_step(self, src: int, shape, numel: int) -> int:
        shape = tuple(shape)
        return self.add_step(Step(lambda xs: xs[0].reshape((xs[0].shape[0],) + shape), [src], [0.0],
                                  self.lam * self.size(numel), [1.0], "reshape", numel, "reshape"))

    def check_weights(self, w: torch.Tensor, what: str) -> None:
        """Weights must be normal numbers in the evaluation precision (a flushed subnormal weight is not
        covered by the model)."""
        w32 = w.detach().to(self.dtype)
        tiny = (w32 != 0) & (w32.abs() < self.lam)
        if bool(tiny.any()) or bool(((w.detach() != 0) & (w32 == 0)).any()):
            raise UnsupportedRounding(f"{what} has weights below the normal range of {self.dtype}")
        if not bool(torch.isfinite(w32).all()):
            raise UnsupportedRounding(f"{what} has weights that overflow {self.dtype}")

    def linear_prim(self, op: LinearOp, src: int, lip: float | None) -> int:
        """One kernel for a primitive linear op (no bias yet; :meth:`fuse_bias` may add one)."""
        u, lam = self.u, self.lam
        out_numel = op.out_dim
        if isinstance(op, Select):
            if op.is_identity():
                return self.reshape_step(src, op.out_shape, out_numel)
            idx = op.idx.to(self.device)
            safe, keep = idx.clamp(min=0), (idx >= 0)
            shape = tuple(op.out_shape)
            if bool(keep.all()):
                def fn(xs):
                    return xs[0].reshape(xs[0].shape[0], -1)[:, safe].reshape((xs[0].shape[0],) + shape)
            else:
                mask = keep.to(self.dtype)

                def fn(xs):
                    return (xs[0].reshape(xs[0].shape[0], -1)[:, safe] * mask).reshape((xs[0].shape[0],) + shape)
            a = abs_norm(op, self.p)
            return self.add_step(Step(fn, [src], [0.0], lam * self.size(out_numel), [a if lip is None else lip],
                                      op.describe(), out_numel, "select", 0.0, {"op": op}))
        a = abs_norm(op, self.p)
        if isinstance(op, Scale):
            self.check_weights(op.scale, "a scale")
            sc = self.tensor(op.scale)
            return self.add_step(Step(lambda xs: xs[0] * sc, [src], [gamma(3, u) * a], 2 * lam * self.size(out_numel),
                                      [a if lip is None else lip], "scale", out_numel, "linear", gamma(3, u),
                                      {"op": op, "n": 1}))
        if isinstance(op, (Dense, Conv, ConvTranspose)):
            self.check_weights(op.weight, op.describe())
            n = terms(op)
            wmax = float(op.weight.detach().double().abs().max()) if op.weight.numel() else 0.0
            rows = abs_norm(op, "inf")
            rel = gamma(n + 3, u)
            return self.add_step(Step(self.kernel(op, None), [src], [rel * a], lam * (2 * n + 3 + rows + wmax)
                                      * self.size(out_numel), [a if lip is None else lip], op.describe(), out_numel,
                                      "linear", rel, {"op": op, "n": n, "dense": isinstance(op, Dense)}))
        raise UnsupportedRounding(f"no rounding model for the linear op {op.describe()}")

    def kernel(self, op: LinearOp, bias: torch.Tensor | None) -> Callable:
        """The evaluation closure of a dense / convolution / transposed-convolution op."""
        w = self.tensor(op.weight)
        b = None if bias is None else self.tensor(bias)
        if isinstance(op, Dense):
            return lambda xs: F.linear(xs[0], w, b)
        if isinstance(op, ConvTranspose):
            return lambda xs: F.conv_transpose2d(xs[0], w, b, op.stride, op.padding, op.output_padding,
                                                 op.groups, op.dilation)
        t, bo, le, r = op.padding
        if t == bo and le == r:  # symmetric zero padding inside the kernel call
            def conv(x):
                return F.conv2d(x, w, b, op.stride, (t, le), op.dilation, op.groups)
        else:
            def conv(x):
                return F.conv2d(F.pad(x, (le, r, t, bo)), w, b, op.stride, 0, op.dilation, op.groups)
        if op.one_d:
            return lambda xs: conv(xs[0].unsqueeze(2)).squeeze(2)
        return lambda xs: conv(xs[0])

    def linear_op(self, op: LinearOp, src: int, lip: float | None) -> int:
        """Steps for ``A x`` (no bias); ``lip``: the op's proven norm when it becomes a single step."""
        if isinstance(op, Chain):
            parts = fold_scales(op.ops)
            parts = [o for o in parts if not (isinstance(o, Select) and o.is_identity())] or parts[:1]
            # identity selections only reshape: a reshape step where the next part expects another shape
            cur = src
            for k, o in enumerate(parts):
                prev_shape = op.ops[0].in_shape if k == 0 else parts[k - 1].out_shape
                if tuple(prev_shape) != tuple(o.in_shape):
                    cur = self.reshape_step(cur, o.in_shape, o.in_dim)
                cur = self.linear_op(o, cur, lip if len(parts) == 1 else None)
            if tuple(parts[-1].out_shape) != tuple(op.out_shape):
                cur = self.reshape_step(cur, op.out_shape, op.out_dim)
            return cur
        if isinstance(op, Residual):
            outs = [self.linear_op(br, src, None) for br in op.branches]
            return self.sum_step(outs, op.signs, op.out_dim, "residual sum")
        return self.linear_prim(op, src, lip)

    def sum_step(self, ins: list[int], coefs: list[float], out_numel: int, label: str) -> int:
        k = len(ins)
        g = gamma(2 * k + 1, self.u)
        cs = [float(c) for c in coefs]
        if all(c == 1.0 for c in cs):
            def fn(xs):
                y = xs[0]
                for t in xs[1:]:
                    y = y + t
                return y
        else:
            def fn(xs):
                y = xs[0] * cs[0]
                for c, t in zip(cs[1:], xs[1:]):
                    y = y + c * t
                return y
        return self.add_step(Step(fn, list(ins), [g * abs(c) for c in cs], self.lam * (2 * k + 1) * self.size(out_numel),
                                  [abs(c) for c in cs], label, out_numel, "sum", g, {"coefs": cs}))

    def fuse_bias(self, last: int, first_new: int, bias: torch.Tensor, out_numel: int) -> int:
        """Add a node's bias: into the last kernel's own bias slot when that kernel was made for this
        node and the bias is per channel (same error model: one more term in each sum), else a step."""
        st = self.steps[last]
        bnorm = self.norm_of(bias)
        self.check_weights(bias, "a bias")
        b = self.tensor(bias)
        if last >= first_new and st.role == "linear" and "n" in st.data and "bias" not in st.data:
            # fl(fl(A x) + b) - (A x + b) is within rel (|A| |x| + |b|) as well (one more term in each sum)
            # in the kernel's own sum the bias may pass through every rounding (rel); added afterwards, once
            vec = channel_vector(bias, st.data["op"]) if not isinstance(st.data["op"], Scale) else None
            if vec is not None:
                st.fn = self.kernel(st.data["op"], vec)
                st.data["bias_rel"] = st.rel
                st.data["vec"] = vec
            else:
                st.fn = (lambda f: (lambda xs: f(xs) + b))(st.fn)
                st.data["bias_rel"] = gamma(2, self.u)
                st.data["post_bias"] = True
            st.data["bias"] = bias.detach().double().abs().reshape(st.data["op"].out_shape)
            st.data["signed_bias"] = bias.detach().double().reshape(st.data["op"].out_shape)
            st.const += st.data["bias_rel"] * bnorm
            return last
        g2 = gamma(2, self.u)
        return self.add_step(Step(lambda xs: xs[0] + b, [last], [g2], g2 * bnorm + self.lam * self.size(out_numel),
                                  [1.0], "bias", out_numel, "bias", g2, {"bias": bias.detach().double().abs(),
                                                                 "signed_bias": bias.detach().double()}))

    def build(self, graph: LipschitzGraph, constants) -> None:
        node_out: list[int] = []
        for i, n in enumerate(graph.nodes):
            k = n.kind
            numel = 1
            for s_ in n.out_shape:
                numel *= int(s_)
            const = constants[i].constant if constants is not None else None
            lip = const.value if const is not None else None
            if k == "input":
                node_out.append(self.add_step(Step(None, [], [], 0.0, [], "input", numel)))
                continue
            src = [node_out[j] for j in n.inputs]
            if k == "linear":
                first_new = len(self.steps)
                out = self.linear_op(n.op, src[0], lip)
                if n.op.bias is not None:
                    out = self.fuse_bias(out, first_new, n.op.bias, numel)
                node_out.append(out)
            elif k == "activation":
                name = n.op.name
                if name.startswith(EXACT_ACTIVATIONS):
                    rel = 0.0
                elif name.startswith(ROUNDED_ACTIVATIONS):
                    rel = gamma(2, self.u)  # the slope rounded to the tensor's precision, then the product
                else:
                    raise UnsupportedRounding(f"{n.name}: the rounding of {name} is not modelled (library "
                                              "accuracy unspecified)")
                L = n.op.lipschitz
                node_out.append(self.add_step(Step(lambda xs, f=n.op.fn: f(xs[0]), src, [rel * L],
                                                   2 * self.lam * self.size(numel), [lip], name, numel,
                                                   "activation", rel, {"slope": L})))
            elif k in ("maxpool", "minmax"):
                f = n.op if k == "maxpool" else minmax
                node_out.append(self.add_step(Step(lambda xs, f=f: f(xs[0]), src, [0.0],
                                                   self.lam * self.size(numel), [lip if lip is not None else 1.0],
                                                   k, numel, k, 0.0, {"op": n.op})))
            elif k == "add":
                node_out.append(self.sum_step(src, list(n.op), numel, "add"))
            elif k == "concat":
                node_out.append(self.add_step(Step(lambda xs, d=n.op + 1: torch.cat(xs, dim=d), src,
                                                   [0.0] * len(src), self.lam * self.size(numel), [1.0] * len(src),
                                                   "concat", numel, "concat", 0.0, {"dim": n.op + 1})))
            else:
                raise UnsupportedRounding(f"{n.name}: {k} nodes have no rounding model")
        self.output = node_out[graph.output]
        self.node_steps = node_out  # graph node -> the step computing its output

    def finish(self) -> None:
        """Sensitivities ``G`` (reverse topological order) and the per-norm weights of the bound."""
        ns = len(self.steps)
        G = [0.0] * ns
        G[self.output] = 1.0
        for j in range(ns - 1, -1, -1):
            if G[j] == 0.0:
                continue
            for pos, i in enumerate(self.steps[j].inputs):
                G[i] += self.steps[j].lip[pos] * G[j]
        weight = [0.0] * ns
        const = 0.0
        for j, st in enumerate(self.steps[: self.output + 1]):
            if G[j] == 0.0 or st.fn is None:
                continue
            const += G[j] * st.const
            for pos, i in enumerate(st.inputs):
                weight[i] += G[j] * st.coef[pos]
        self.const = const
        self.weights = {i: w for i, w in enumerate(weight) if w > 0}
        last_use = [-1] * ns
        for j, st in enumerate(self.steps):
            for i in st.inputs:
                last_use[i] = j
        self.last_use = last_use
        self.buffer_owners()
        self.margin_factor = (math.sqrt(2.0) if self.p == "2" else 2.0) * BOUND_FACTOR
        with torch.no_grad(), trusted_kernels():  # the per-example shapes of every step
            vals = self.run(torch.zeros((1,) + self.input_shape, dtype=self.dtype, device=self.device), keep=True)
        self.shapes = [tuple(v.shape[1:]) if v is not None else None for v in vals]
        # tensors that are >= 0 by construction (ReLU outputs and what only reshapes or pools them)
        self.nonneg = [False] * ns
        for j, st in enumerate(self.steps):
            if st.role == "activation" and (st.label == "relu" or (st.label.startswith("clip[") and
                                                                   float(st.label[5:].split(",")[0]) >= 0)):
                self.nonneg[j] = True
            elif st.role in ("reshape", "select", "maxpool", "minmax", "concat") and st.inputs:
                self.nonneg[j] = all(self.nonneg[i] for i in st.inputs)
        # the input itself and its reshapes: >= 0 or not by the data (checked per batch where it matters)
        self.from_input: list[bool] = []
        for j, st in enumerate(self.steps):
            self.from_input.append(j == 0 or (st.role == "reshape" and self.from_input[st.inputs[0]]))

    def buffer_owners(self) -> None:
        """Which steps may compute into the buffers of their inputs (fewer new tensors, each of which costs
        its page faults).  ``owned[j]``: step ``j``'s tensors are its own (:func:`fresh`) and exactly one
        step reads them -- never the model input, a view of it, or the logits.  ``into[j]``: the input
        whose buffer step ``j`` computes into, or None: a ReLU of an owned tensor, and a residual
        addition ``x_1 + x_2`` with an owned input (``x_1 + x_2 = x_2 + x_1`` exactly).  The same
        floating-point operations, so the same values and error model; by then every bound term of the
        input has been taken (:meth:`run` calls ``on_value`` as each value is computed).  The running
        error bound uses the same choice for its error tensors."""
        readers = [0] * len(self.steps)
        for st in self.steps[: self.output + 1]:
            for i in st.inputs:
                readers[i] += 1
        self.owned = [j not in (0, self.output) and readers[j] == 1 and fresh(st) for j, st in enumerate(self.steps)]
        self.into: list = [None] * len(self.steps)
        for j, st in enumerate(self.steps[: self.output + 1]):
            if st.role == "activation" and st.label == "relu" and self.owned[st.inputs[0]]:
                self.into[j] = st.inputs[0]
            elif st.role == "sum" and list(st.data.get("coefs", ())) == [1.0, 1.0] and st.inputs[0] != st.inputs[1]:
                self.into[j] = next((i for i in st.inputs if self.owned[i]), None)

    def in_place(self, j: int, vals: list):
        """Step ``j`` computed into the buffer of its input ``into[j]`` (:meth:`buffer_owners`)."""
        st, i = self.steps[j], self.into[j]
        if st.role == "activation":
            return torch.relu_(vals[i])
        return vals[i].add_(vals[st.inputs[1] if i == st.inputs[0] else st.inputs[0]])

    # -- the element-wise bound -------------------------------------------------------------------
    def back(self, st: Step, h: torch.Tensor) -> list[torch.Tensor]:
        """``|J_k|^T h`` bounds for each input ``k`` of a step (``h``: ``(m, *out_shape)``, float64, >= 0)."""
        ins = [self.shapes[i] for i in st.inputs]
        m = h.shape[0]
        role = st.role
        if role == "reshape":
            return [h.reshape((m,) + ins[0])]
        if role in ("select", "linear"):
            op = st.data["op"].to_double_copy()
            return [op.abs_adjoint(h).reshape((m,) + ins[0])]
        if role == "bias":
            return [h]
        if role == "activation":
            return [h * st.data["slope"]]
        if role == "sum":
            return [h * abs(c) for c in st.data["coefs"]]
        if role == "concat":
            sizes = [s[st.data["dim"] - 1] for s in ins]
            return list(torch.split(h, sizes, dim=st.data["dim"]))
        if role == "minmax":
            b, c = h.shape[0], h.shape[1]
            pairs = h.reshape(b, c // 2, 2, *h.shape[2:]).sum(2, keepdim=True)
            return [pairs.expand(b, c // 2, 2, *h.shape[2:]).reshape(h.shape)]
        if role == "maxpool":
            return [pool_routes(st.data["op"], h, ins[0])]
        raise UnsupportedRounding(f"no element-wise bound through {st.label}")

    def prepare_elementwise(self) -> None:
        """The weights ``g`` of the element-wise bound (module docstring), when they fit in memory."""
        m = 1
        for s_ in self.shapes[self.output]:
            m *= s_
        need = sum(m * int(math.prod(self.shapes[i])) for st in self.steps for i in st.inputs if st.rel > 0)
        biggest = max(m * int(math.prod(s_)) for s_ in self.shapes if s_ is not None)
        if need + biggest > self.MAX_WEIGHT_ENTRIES:
            return
        ns = len(self.steps)
        H: list = [None] * ns
        H[self.output] = torch.eye(m, dtype=torch.float64, device=self.device).reshape((m,) + self.shapes[self.output])
        terms_const = torch.zeros(m, dtype=torch.float64, device=self.device)
        const_w: dict[int, torch.Tensor] = {}  # input step -> weight (m, size) with a constant factor
        nnz_w: dict[int, list] = {}  # input step -> [(n, weight)] for dense layers (factor by non-zeros)
        try:
            for j in range(self.output, 0, -1):
                st, h = self.steps[j], H[j]
                if h is None:
                    continue
                outs = self.back(st, h)
                if st.rel > 0:
                    if "bias" in st.data:
                        terms_const += st.data.get("bias_rel", st.rel) * (h.reshape(m, -1) @ st.data["bias"].reshape(-1).to(h))
                    for pos, i in enumerate(st.inputs):
                        # linear: |A|^T h; activation: slope * h; sum: |c_k| h; bias: h
                        g = outs[pos].reshape(m, -1)
                        if st.role == "linear" and st.data.get("dense"):
                            nnz_w.setdefault(i, []).append((st.data["n"], g))
                        else:
                            const_w[i] = const_w.get(i, 0) + st.rel * g
                # underflow: every entry's absolute allowance is at most const / size (it is part of const)
                terms_const += h.reshape(m, -1).sum(1) * st.const / max(self.size(st.out_numel), 1.0)
                for pos, i in enumerate(st.inputs):
                    H[i] = outs[pos] if H[i] is None else H[i] + outs[pos]
                if j != self.output:
                    H[j] = None
        except (UnsupportedRounding, NotImplementedError):
            return
        if not bool(torch.isfinite(terms_const).all()):
            return
        self.ew_const = terms_const * BOUND_FACTOR
        self.ew = {}
        self.ew_lam = {}
        for i in set(const_w) | set(nnz_w):
            blocks = ([(0, const_w[i])] if i in const_w else []) + nnz_w.get(i, [])
            cols = len(blocks) * m
            pad = -cols % 16  # skinny products run much faster with a multiple of 16 columns
            w = torch.cat([blk.T for _, blk in blocks] + ([torch.zeros(blocks[0][1].shape[1], pad, dtype=torch.float64,
                                                                       device=self.device)] if pad else []), dim=1)
            w32 = as_upper(w.contiguous(), self.dtype)
            numel = int(math.prod(self.shapes[i]))
            up = 1.0 / (1.0 - gamma(numel + 1, self.u))  # the product's own rounding (module docstring)
            # per block: (c1, c0) with factor c1 * nnz + c0 (dense layers) or c0
            factors = []
            for n, _ in blocks:
                if n:
                    den = 1.0 - (max(n, numel) + 3) * self.u
                    factors.append((self.u * up / den, 3 * self.u * up / den) if den > 0.5 else (math.inf, math.inf))
                else:
                    factors.append((0.0, up))
            finite = all(math.isfinite(c) for f in factors for c in f)
            if finite and bool(torch.isfinite(w32).all()):  # else (sensitivities beyond the float range,
                self.ew[i] = (w32, factors, m)  # gamma without a bound): norm-wise only
                self.ew_lam[i] = 2 * self.lam * numel
        self.elementwise = True

    def elementwise_terms(self, j: int, v: torch.Tensor) -> torch.Tensor:
        """The element-wise bound's contribution ``(B, m)`` of the computed tensor ``v`` of step ``j``,
        without its underflow allowance (:attr:`ew_lam`, a constant).

        ``t = fl(|v| @ w)`` is a sum of non-negative terms, so the exact product is at most
        ``t / (1 - gamma_{N+1})`` (``up``).  A dense layer's block is scaled by ``gamma_{nnz+3}``, with
        ``nnz`` the example's number of non-zero inputs (adding an exact zero does not round), bounded
        above by ``(nnz + 3) u / (1 - (N + 3) u)``: one product and one sum per block."""
        a = v.reshape(v.shape[0], -1)
        if not self.nonneg[j]:
            a = a.abs()
        return self.combine(j, (a @ self.ew[j][0]).double(), a)

    def combine(self, j: int, t: torch.Tensor, a: torch.Tensor | None, nnz: torch.Tensor | None = None):
        """The blocks of ``t = fl(|v| @ w)`` (float64) scaled by their factors (``nnz`` of ``a = |v|``,
        or given)."""
        _, blocks, m = self.ew[j]
        tot = None
        for b, (c1, c0) in enumerate(blocks):
            blk = t[:, b * m:(b + 1) * m]
            if c1:
                if nnz is None:
                    nnz = count_nonzero(a)
                blk = blk * (nnz.double() * c1 + c0)[:, None]
            else:
                blk = blk * c0
            tot = blk if tot is None else tot + blk
        return tot

    def fuse_dense(self) -> None:
        """Compute ``|v| @ w`` of a non-negative tensor that only a dense layer reads in that layer's own
        GEMM, its weight with ``w^T`` appended as extra rows (one pass over the tensor instead of two;
        every extra output is a dot product of the same form, any order).  Run once the probe has
        chosen the element-wise bound for the tensor."""
        readers: dict[int, list[int]] = {}
        for c, st in enumerate(self.steps[: self.output + 1]):
            for i in st.inputs:
                readers.setdefault(i, []).append(c)
        for i, (w, blocks, m) in self.ew.items():
            if not ((self.nonneg[i] or self.from_input[i]) and self.ew_used.get(i, True)) or \
                    len(readers.get(i, [])) != 1:
                continue
            c = readers[i][0]
            st = self.steps[c]
            op = st.data.get("op")
            if st.role != "linear" or not st.data.get("dense") or st.data.get("post_bias") or \
                    len(op.in_shape) != 1 or op.in_shape[0] != w.shape[0]:
                continue
            W = self.tensor(op.weight)
            rows = W.shape[0]
            w_aug = torch.cat([W, w.T.to(W)]).contiguous()
            vec = st.data.get("vec")
            b_aug = None if vec is None else torch.cat([self.tensor(vec), torch.zeros(w.shape[1], dtype=W.dtype,
                                                                                      device=W.device)])
            nnz_needed = any(c1 for c1, _ in blocks)
            stash = self.stash
            plain = st.fn
            checked = not self.nonneg[i]  # the model input: |x| = x only when the batch is >= 0

            def fn(xs, w_aug=w_aug, b_aug=b_aug, rows=rows, i=i, nnz_needed=nnz_needed, plain=plain, checked=checked,
                   w=w):
                v = xs[0]
                if checked and not bool(v.amin() >= 0):  # (also false with a NaN)
                    a = v.abs()
                    stash[i] = (a @ w, count_nonzero(a) if nnz_needed else None)
                    return plain(xs)
                y = F.linear(v, w_aug, b_aug)
                stash[i] = (y[:, rows:], count_nonzero(v) if nnz_needed else None)
                return y[:, :rows]

            st.data["plain_fn"] = st.fn
            st.fn = fn
            self.fused[c] = i

    def plain_fn(self, j: int) -> Callable:
        """Step ``j``'s evaluation without a fused bound product (:meth:`fuse_dense`)."""
        st = self.steps[j]
        return st.data.get("plain_fn", st.fn)

    def ew_terms(self, j: int, v: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """The element-wise term that becomes known once step ``j`` has computed ``v``: that of ``v``
        itself, or of the tensor whose product step ``j``'s fused GEMM computed."""
        i = self.fused.get(j)
        if i is not None:
            t, nnz = self.stash.pop(i)
            return i, self.combine(i, t.double(), None, nnz)
        if j in self.ew and j not in self.fused_inputs and self.ew_used.get(j, True):
            return j, self.elementwise_terms(j, v)
        return None

    # -- evaluation -------------------------------------------------------------------------------
    def norm_upper(self, t: torch.Tensor, nonneg: bool = False) -> torch.Tensor:
        """Per example: a proven upper bound (float64) of the ``p``-norm of the computed tensor ``t``.

        l2: one reduction, ``r = fl(sqrt(S~))`` with ``S~`` the sum of the squares computed in the tensor's
        precision or better (``m`` terms, any order: within ``gamma_m`` of the exact sum ``S``, plus
        ``lambda`` per square that underflows) and a correctly rounded square root, so ``S~ <= (r / (1 -
        u))^2`` and ``S <= (S~ + 2 m lambda) / (1 - gamma_m)``; the bound takes ``gamma_{m+4}`` and ``(1 -
        u)^3`` instead (a reduction that scaled by the largest entry first would add that many roundings).
        No tensor of ``t``'s size is made (a new one costs its page faults).  l-inf: the largest entry
        and the smallest (exact)."""
        flat = t.reshape(t.shape[0], -1)
        m = flat.shape[1]
        if not m:
            return torch.zeros(len(t), dtype=torch.float64, device=t.device)
        if self.p == "inf":
            if nonneg:
                top = flat.amax(1)
            else:
                top = torch.maximum(flat.amax(1), -flat.amin(1))  # (aminmax runs far slower on CPUs)
            v = top.double() + self.lam
        else:
            r = torch.linalg.vector_norm(flat, 2, dim=1).double()
            s = (r / (1.0 - self.u) ** 3) ** 2
            v = ((s + 2 * m * self.lam) / (1.0 - gamma(m + 4, self.u))).sqrt()
        return torch.nan_to_num(v, nan=math.inf)

    def run(self, x: torch.Tensor, keep: bool = False, on_value: Callable | None = None, plain: bool = False) -> list:
        """Every step's value (freed after its last use unless ``keep``); ``plain``: without the products
        fused GEMMs compute for the bound (:meth:`plain_fn`)."""
        vals: list = [None] * len(self.steps)
        vals[0] = x
        for j, st in enumerate(self.steps[: self.output + 1]):
            if j:
                if not keep and self.into[j] is not None:  # an input's buffer, this step's alone
                    vals[j] = self.in_place(j, vals)
                else:
                    vals[j] = (self.plain_fn(j) if plain else st.fn)([vals[i] for i in st.inputs])
                if not keep:
                    for i in st.inputs:
                        if self.last_use[i] == j and i != self.output:
                            vals[i] = None
            if on_value is not None:
                on_value(j, vals[j])
        return vals

    def converted(self, x: torch.Tensor):
        """``x`` in the evaluation precision, and per example whether the conversion changed it (the
        certificates speak of the input as given; a float64 input that float32 cannot represent gets
        no float32 bound, so it is decided in float64), or None when it cannot have."""
        xin = x.to(self.device, self.dtype)
        if x.dtype == self.dtype:
            return xin, None
        return xin, (xin.to(x.dtype) != x.to(self.device)).reshape(len(x), -1).any(1)

    def __call__(self, x: torch.Tensor):
        if not self.supported:
            raise UnsupportedRounding(self.reason)
        if self.dtype == torch.float32:
            check_environment()
        if self.elementwise and not self.decided:
            return self.probe_call(x)
        B = len(x)
        mf = self.margin_factor
        acc: dict[str, torch.Tensor] = {}  # "norm": (B,) sum of norm-wise terms; "ew": (B, m) element-wise

        def on_value(j, v):
            w = self.weights.get(j)
            if w is not None and self.norm_used.get(j, True):
                t = w * self.norm_upper(v, self.nonneg[j])
                acc["norm"] = t if "norm" not in acc else acc["norm"] + t
            if self.elementwise:
                term = self.ew_terms(j, v)
                if term is not None:
                    acc["ew"] = term[1] if "ew" not in acc else acc["ew"] + term[1]

        xin, inexact = self.converted(x)
        with trusted_kernels(), torch.no_grad():
            vals = self.run(xin, on_value=on_value)
            out = vals[self.output].reshape(B, -1)
        if not self.elementwise:
            tot = acc["norm"] + self.const if "norm" in acc else \
                torch.full((B,), self.const, dtype=torch.float64, device=out.device)
            delta = (tot * mf)[:, None].expand(B, out.shape[1])
        else:
            # per pair: the constants (the smaller of the two bounds) and the sums of the tensors' terms,
            # each tensor with the bound the probe chose for it (pairs e_j + e_i, j the computed argmax)
            pred = out.argmax(1)
            delta = self.const_pair[pred]
            if "norm" in acc:
                delta = delta + (acc["norm"] * mf)[:, None]
            if "ew" in acc:
                e = acc["ew"] * BOUND_FACTOR
                delta = delta + (e.gather(1, pred[:, None]) + e)
        return self.guard(out, delta, inexact)

    @staticmethod
    def guard(out: torch.Tensor, delta: torch.Tensor, inexact: torch.Tensor | None = None):
        """Overflowed logits, 0 * inf from overflowed sensitivities, and inputs the conversion to the
        evaluation precision changed (``inexact``): no bound (inf)."""
        bad = ~torch.isfinite(out.sum(1))  # a sum is finite only if every term is (overflow: also bad)
        if inexact is not None:
            bad = bad | inexact
        delta = torch.nan_to_num(delta, nan=math.inf)
        return out, torch.where(bad[:, None], torch.full_like(delta, math.inf), delta)

    def probe_call(self, x: torch.Tensor):
        """The first call (fixed inputs, at construction): both bounds of every tensor, their sum of
        per-tensor minima as the bound, and the choice of the bound each tensor keeps from then on (the
        one with the smaller median: either is proven; computing both costs more than the few inputs it
        helps)."""
        B = len(x)
        norm_parts: dict[int, torch.Tensor] = {}
        ew_parts: dict[int, torch.Tensor] = {}

        def on_value(j, v):
            w = self.weights.get(j)
            if w is not None:
                norm_parts[j] = w * self.norm_upper(v, self.nonneg[j])
            if j in self.ew:
                ew_parts[j] = self.elementwise_terms(j, v) + self.ew_lam[j]

        xin, inexact = self.converted(x)
        with trusted_kernels(), torch.no_grad():
            vals = self.run(xin, on_value=on_value)
            out = vals[self.output].reshape(B, -1)
        mf = self.margin_factor
        pred = out.argmax(1)

        def pair(e):
            e = e * BOUND_FACTOR
            return e.gather(1, pred[:, None]) + e

        m = out.shape[1]
        delta = torch.minimum(torch.full((B, m), self.const * mf, dtype=torch.float64, device=out.device),
                              pair(self.ew_const.expand(B, -1)))
        for j in set(norm_parts) | set(ew_parts):
            n = norm_parts[j][:, None] * mf if j in norm_parts else None
            e = pair(ew_parts[j]) if j in ew_parts else None
            delta = delta + (n if e is None else e if n is None else torch.minimum(n, e))
        self.norm_used, self.ew_used = {j: True for j in norm_parts}, {j: True for j in ew_parts}
        for j in set(norm_parts) & set(ew_parts):
            nm = float((norm_parts[j] * mf).median())
            em = float(pair(ew_parts[j]).amax(1).median())
            self.norm_used[j], self.ew_used[j] = nm < em, not nm < em
        # the constant part of every pair (j, i): the smaller constant, plus the underflow allowances of
        # the element-wise terms kept (each e_j and e_i carries them)
        lam = sum(self.ew_lam[j] for j in ew_parts if self.ew_used[j])
        ec = self.ew_const * BOUND_FACTOR
        self.const_pair = torch.minimum(torch.full((m, m), self.const * mf, dtype=torch.float64, device=out.device),
                                        ec[:, None] + ec[None, :]) + 2 * lam * BOUND_FACTOR
        self.decided = True
        self.fuse_dense()
        self.fused_inputs = set(self.fused.values())
        return self.guard(out, delta, inexact)


def fresh(st: Step) -> bool:
    """Whether step ``st`` computes its value (and its running error bound) into tensors of its own, or
    into the buffers of inputs that were its own: linear steps, sums of several terms, biases, ReLU and
    the rounded activations (clipping and absolute value pass their input's error tensor on, a sum of
    one term its input, data movement views)."""
    if st.role == "activation":
        return st.label == "relu" or st.rel > 0
    return st.role in ("linear", "bias") or (st.role == "sum" and len(st.inputs) > 1)


def count_nonzero(a: torch.Tensor) -> torch.Tensor:
    """Per example, the number of non-zero entries of ``a >= 0`` (``(B, n)``) as computed: the float sum of
    ``n < 2^24`` signs (0 or 1) is exact; larger rows count ``n``.  (The "0-norm" reduction would make
    no temporary, but it runs some 20 times slower on CPUs.)"""
    a = a.reshape(a.shape[0], -1)
    if a.shape[1] < 2 ** 24:
        return a.sign().sum(1)
    return torch.full((a.shape[0],), float(a.shape[1]), dtype=a.dtype, device=a.device)


def as_upper(w: torch.Tensor, dtype) -> torch.Tensor:
    """A copy of the non-negative float64 ``w`` in ``dtype`` that is entry by entry ``>= w`` (round to
    nearest loses at most one unit roundoff; tiny entries are raised above the subnormal range)."""
    w = torch.where((w > 0) & (w < 2.0 ** -100), torch.full_like(w, 2.0 ** -100), w)
    return (w * (1.0 + 4 * UNIT_ROUNDOFF[dtype])).to(dtype)


def pool_routes(pool, h: torch.Tensor, in_shape) -> torch.Tensor:
    """``sum over the pooling windows containing each input of h``: a bound of ``|J|^T h`` for max
    pooling (each output equals one input of its window) -- the adjoint of sum pooling."""
    one_d = pool.one_d
    x = torch.zeros((h.shape[0],) + tuple(in_shape), dtype=h.dtype, device=h.device, requires_grad=True)
    xi = x.unsqueeze(2) if one_d else x
    hh = h.unsqueeze(2) if one_d else h
    kh, kw = pool.kernel
    sh, sw = pool.stride
    ph, pw = pool.padding if not one_d else (0, pool.padding[1])
    dh, dw = pool.dilation
    ho, wo = hh.shape[-2], hh.shape[-1]
    H, W = xi.shape[-2], xi.shape[-1]
    eh = max(0, (ho - 1) * sh + dh * (kh - 1) + 1 - H - 2 * ph)
    ew = max(0, (wo - 1) * sw + dw * (kw - 1) + 1 - W - 2 * pw)
    with torch.enable_grad():
        xp = F.pad(xi, (pw, pw + ew, ph, ph + eh))
        cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        lh = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
        lw = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
        c = xi.shape[1]
        sums = cols.reshape(xi.shape[0], c, kh * kw, lh, lw)[..., :ho, :wo].sum(2)
        (g,) = torch.autograd.grad(sums, x, grad_outputs=hh.reshape(sums.shape))
    return g
