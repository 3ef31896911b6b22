"""The Lipschitz graph: one small typed graph that every analysis in lipverify consumes.

A model becomes a list of :class:`Node` in topological order.  Node kinds:

``input``       the model input (per-example shape ``out_shape``);
``linear``      an affine op ``y = A x + b`` (:mod:`lipverify.graph.linear_ops`), one input;
``activation``  an element-wise nonlinearity with slope range ``[lo, hi]`` and Lipschitz constant;
``minmax``      GroupSort-2 over channel pairs (1-Lipschitz in l2 and l-inf);
``maxpool``     max pooling;
``add``         ``sum_k c_k x_k`` of several tensors (residual connections);
``concat``      concatenation along a per-example axis;
``mul``         the element-wise product of two input-dependent tensors (broadcasting: squeeze-excitation
                gates, gated units) -- Lipschitz only on a bounded input domain;
``attention``   multi-head self-attention (:class:`Attention`) -- Lipschitz only on a bounded domain;
``linf_dist``   a layer of l-p distance neurons ``||x - w_j||_p + b_j`` (Zhang et al. 2021): 1-Lipschitz
                from l-inf to l-inf for ``p = inf``;
``normalization`` a normalisation by a data-dependent scale (LayerNorm, GroupNorm, InstanceNorm;
                :class:`Normalization`).

The graph is executable (:meth:`LipschitzGraph.forward`); the importer checks that it computes the
same function as the model it came from, so every analysis runs on the function the user gave us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lipverify.graph.linear_ops import Shape


@dataclass(frozen=True)
class Activation:
    """Element-wise ``phi`` with ``phi'`` in ``[lo, hi]`` wherever it exists.

    ``lip2`` and ``lip_inf`` are both ``max(|lo|, |hi|)`` for an element-wise map.  ``const_below`` /
    ``const_above`` give the input ranges where ``phi`` is constant (used by local bounds): ReLU is
    constant for ``x <= 0``; a ReLU clipped at ``theta`` is also constant for ``x >= theta``.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lo: float
    hi: float
    const_below: float | None = None
    const_above: float | None = None

    @property
    def lipschitz(self) -> float:
        return max(abs(self.lo), abs(self.hi))


def make_activation(name: str, **kw) -> Activation:
    """Activation table (SPEC section 2).  Raises KeyError for names lipverify cannot bound."""
    if name == "relu":
        return Activation("relu", F.relu, 0.0, 1.0, const_below=0.0)
    if name == "leaky_relu":
        a = float(kw.get("negative_slope", 0.01))
        return Activation(f"leaky_relu({a:g})", lambda x: F.leaky_relu(x, a), min(a, 1.0), max(a, 1.0))
    if name == "clip":
        lo, hi = kw.get("min"), kw.get("max")
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        return Activation(f"clip[{lo:g},{hi:g}]", lambda x: torch.clamp(x, lo, hi), 0.0, 1.0,
                          const_below=lo if math.isfinite(lo) else None,
                          const_above=hi if math.isfinite(hi) else None)
    if name == "tanh":
        return Activation("tanh", torch.tanh, 0.0, 1.0)
    if name == "abs":
        return Activation("abs", torch.abs, -1.0, 1.0)
    if name == "sigmoid":
        return Activation("sigmoid", torch.sigmoid, 0.0, 0.25)
    if name == "gelu":
        # GELU' ranges over [-0.12891, 1.12891] (extremes at x = -+sqrt(2)); the table keeps a wider
        # lower end.  ``scale`` s: the map s * GELU(x) (exporters write x * (1 + erf(x / sqrt 2)) = 2 GELU)
        # The tanh approximation's slope ranges over [-0.128993, 1.128993] (dense grid): 1.1291 above.
        sc = float(kw.get("scale", 1.0))
        ap = str(kw.get("approximate", "none"))
        if sc <= 0:
            raise KeyError("gelu with a non-positive scale")
        if ap not in ("none", "tanh"):
            raise KeyError(f"gelu with approximate={ap!r}")
        hi = 1.1290 if ap == "none" else 1.1291
        base = "gelu" if ap == "none" else "gelu(tanh)"
        if sc == 1.0:
            return Activation(base, lambda x: F.gelu(x, approximate=ap), -0.1701, hi)
        return Activation(f"{sc:g}*{base}", lambda x: sc * F.gelu(x, approximate=ap), -0.1701 * sc, hi * sc)
    if name == "silu":
        # SiLU' ranges over about [-0.0998, 1.0998]
        return Activation("silu", F.silu, -0.0999, 1.0999)
    if name == "elu":
        # slope alpha e^x in (0, alpha] below 0, 1 above
        a = float(kw.get("alpha", 1.0))
        if a < 0:
            raise KeyError("elu with a negative alpha")
        return Activation(f"elu({a:g})", lambda x: F.elu(x, a), 0.0, max(1.0, a))
    if name == "softplus":
        beta = float(kw.get("beta", 1.0))
        return Activation("softplus", lambda x: F.softplus(x, beta), 0.0, 1.0)
    if name == "hardtanh":
        lo, hi = float(kw.get("min_val", -1.0)), float(kw.get("max_val", 1.0))
        return make_activation("clip", min=lo, max=hi)
    if name == "relu6":
        return make_activation("clip", min=0.0, max=6.0)
    if name == "hardswish":
        # x * relu6(x + 3) / 6: slope 0 below -3, (2x + 3)/6 on [-3, 3] (from -1/2 to 3/2), 1 above 3
        return Activation("hardswish", F.hardswish, -0.5, 1.5)
    if name == "hardsigmoid":
        # clip(alpha x + beta, 0, 1): slope alpha on the ramp, 0 outside (torch: alpha 1/6, beta 1/2)
        a, b = float(kw.get("alpha", 1.0 / 6.0)), float(kw.get("beta", 0.5))
        if a < 0:
            raise KeyError("hardsigmoid with a negative slope")
        return Activation(f"hardsigmoid({a:g},{b:g})", lambda x: torch.clamp(a * x + b, 0.0, 1.0), 0.0, a)
    if name == "selu":
        # lambda x (x > 0), lambda alpha (e^x - 1) (x <= 0): slope in (0, lambda alpha] = (0, 1.7581]
        return Activation("selu", F.selu, 0.0, 1.0507009873554805 * 1.6732632423543772 * (1 + 1e-9))
    if name == "celu":
        a = float(kw.get("alpha", 1.0))
        if a <= 0:
            raise KeyError("celu with alpha <= 0")
        return Activation(f"celu({a:g})", lambda x: F.celu(x, a), 0.0, 1.0)
    if name == "softsign":
        # x / (1 + |x|): slope 1 / (1 + |x|)^2 in (0, 1]
        return Activation("softsign", F.softsign, 0.0, 1.0)
    if name == "mish":
        # x tanh(softplus(x)): slope in [-0.11253, 1.08850] (dense grid and refinement), rounded outwards
        return Activation("mish", F.mish, -0.1126, 1.0886)
    if name == "prelu":
        w = kw["weight"].detach()
        lo, hi = min(float(w.min()), 1.0), max(float(w.max()), 1.0)
        return Activation(f"prelu[{float(w.min()):.3g},{float(w.max()):.3g}]", lambda x: F.prelu(x, w.to(x)),
                          lo, hi)
    raise KeyError(name)


@dataclass(frozen=True)
class MaxPool:
    """2-d max pooling (1-d stored with height 1).  Padding is with -inf (never selected)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    one_d: bool = False

    def __call__(self, x):
        if self.one_d:
            return F.max_pool1d(x, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1],
                                ceil_mode=self.ceil_mode)
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode)

    def windows_per_input(self) -> int:
        """Upper bound on the number of pooling windows that contain one input entry."""
        n = 1
        for k, s, d in zip(self.kernel, self.stride, self.dilation):
            n *= min(k, math.ceil(((k - 1) * d + 1) / s))
        return n

    @property
    def lip2(self) -> float:
        # |max(a) - max(b)| <= max_window |a - b|, and each input lies in at most N windows:
        # ||P a - P b||_2^2 <= N ||a - b||_2^2.
        return math.sqrt(self.windows_per_input())

    lip_inf = 1.0


def minmax(x: torch.Tensor) -> torch.Tensor:
    """GroupSort-2 over channel pairs ``(2k, 2k+1)`` -> ``(max, min)``."""
    b, c = x.shape[0], x.shape[1]
    pairs = x.reshape(b, c // 2, 2, *x.shape[2:])
    hi = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])
    lo = torch.minimum(pairs[:, :, 0], pairs[:, :, 1])
    return torch.stack([hi, lo], dim=2).reshape(x.shape)


@dataclass(frozen=True)
class Normalization:
    """``y = gamma * (x_g - mean(x_g)) / sqrt(var(x_g) + eps) + beta`` over the groups of
    ``x.reshape(B, groups, size)`` (biased variance), ``gamma``/``beta`` broadcast against the
    per-example shape (None: 1 and 0).  LayerNorm over the last k axes, GroupNorm(G) and InstanceNorm
    on channel-first tensors all have this form.

    Its Jacobian on a group is ``(1/sigma) diag(gamma) (I - 11^T/n - z z^T/n)`` with ``z`` the
    normalised group and ``sigma = sqrt(var + eps)``; the bracket is an orthogonal projection, so the
    l2 constant is ``max|gamma| / sqrt(var_min + eps)`` and the l-inf constant at most
    ``max|gamma| (2 + sqrt(n)) / sqrt(var_min + eps)``, with ``var_min = 0`` everywhere and the exact
    minimum of the variance over a box on a domain (:mod:`lipverify.graph.domain`).
    """

    name: str
    groups: int
    size: int
    eps: float
    gamma: torch.Tensor | None = None
    beta: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.shape[0], self.groups, self.size)
        mu = g.mean(dim=2, keepdim=True)
        var = ((g - mu) ** 2).mean(dim=2, keepdim=True)
        y = ((g - mu) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.gamma is not None:
            y = y * self.gamma.to(y)
        if self.beta is not None:
            y = y + self.beta.to(y)
        return y

    @property
    def gamma_max(self) -> float:
        return 1.0 if self.gamma is None else float(self.gamma.abs().max())

    def lipschitz(self, p: str, var_min: float = 0.0) -> float:
        base = self.gamma_max / math.sqrt(var_min + self.eps)
        return base if p == "2" else base * (2.0 + math.sqrt(self.size))


@dataclass(frozen=True)
class Attention:
    """Multi-head self-attention on ``(T, E)`` tokens (``nn.MultiheadAttention`` with ``batch_first``):
    ``Y = concat_h(softmax(A_h B_h^T / sqrt(d)) V_h) W_o^T + b_o`` with ``A_h = X W_q,h^T + b_q,h`` (and
    ``B``, ``V`` likewise), ``h`` heads of width ``d = E / h``.  Weights are float64 ``(E, E)``.  Its
    constant exists on a bounded domain only (:func:`lipverify.graph.domain.attention_constant`)."""

    heads: int
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None

    def projections(self, x: torch.Tensor):
        """``(A, B, V)`` of shape ``(N, h, T, d)``."""
        N, T, E = x.shape
        h = self.heads

        def proj(w, b):
            y = x @ w.to(x).T
            if b is not None:
                y = y + b.to(x)
            return y.reshape(N, T, h, E // h).transpose(1, 2)

        return proj(self.wq, self.bq), proj(self.wk, self.bk), proj(self.wv, self.bv)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        N, T, E = x.shape
        a, b, v = self.projections(x)
        p = torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(E // self.heads), dim=-1)
        o = (p @ v).transpose(1, 2).reshape(N, T, E)
        y = o @ self.wo.to(x).T
        return y if self.bo is None else y + self.bo.to(x)


@dataclass
class Node:
    name: str
    kind: str
    inputs: list[int]
    out_shape: Shape
    op: Any = None
    sources: list[str] = field(default_factory=list)  # names of original model nodes merged here

    def describe(self) -> str:
        if self.kind == "linear":
            return self.op.describe()
        if self.kind == "activation":
            return self.op.name
        if self.kind == "maxpool":
            return f"maxpool k{self.op.kernel[-1]} s{self.op.stride[-1]}"
        if self.kind == "add":
            return "add(" + ", ".join(f"{c:+g}" for c in self.op) + ")"
        if self.kind == "concat":
            return f"concat(axis {self.op})"
        if self.kind == "normalization":
            return f"{self.op.name} ({self.op.groups} groups of {self.op.size})"
        if self.kind == "linf_dist":
            return f"l-inf distance {self.op.in_features}->{self.op.out_features} (p={self.op.p:g})"
        if self.kind == "attention":
            return f"self-attention ({self.op.heads} heads, width {self.op.wq.shape[0]})"
        return self.kind


class LipschitzGraph:
    """Nodes in topological order; node 0 is the input; ``output`` is the index of the logits."""

    def __init__(self, nodes: list[Node], output: int, notes: list[str] | None = None):
        self.nodes = nodes
        self.output = output
        self.notes = list(notes or [])

    @property
    def input_shape(self) -> Shape:
        return self.nodes[0].out_shape

    def consumers(self) -> list[list[int]]:
        cons: list[list[int]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            for j in n.inputs:
                cons[j].append(i)
        return cons

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        vals = self.forward_all(x, upto)
        return vals[self.output if upto is None else upto]

    def forward_all(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor | None]:
        vals: list[torch.Tensor | None] = [None] * len(self.nodes)
        last = self.output if upto is None else upto
        for i, n in enumerate(self.nodes):
            if i > last:
                break
            vals[i] = x if n.kind == "input" else apply_node(n, [vals[j] for j in n.inputs])
        return vals

    def to(self, dtype=None, device=None) -> "LipschitzGraph":
        for n in self.nodes:
            if n.kind == "linear":
                n.op.to(dtype, device)
        return self

    def domain_nodes(self) -> list[int]:
        """Nodes whose Lipschitz constant depends on the input domain (products of input-dependent
        tensors; normalisations, which have a global constant that the domain tightens)."""
        return [i for i, n in enumerate(self.nodes) if n.kind in ("mul", "normalization", "attention")]


def apply_node(n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    k = n.kind
    if k == "linear":
        return n.op.forward(xs[0])
    if k == "activation":
        return n.op.fn(xs[0])
    if k == "minmax":
        return minmax(xs[0])
    if k == "maxpool":
        return n.op(xs[0])
    if k == "add":
        y = xs[0] * n.op[0]
        for c, t in zip(n.op[1:], xs[1:]):
            y = y + c * t
        return y
    if k == "concat":
        return torch.cat(xs, dim=n.op + 1)
    if k == "mul":
        return xs[0] * xs[1]
    if k in ("normalization", "attention", "linf_dist"):
        return n.op(xs[0])
    raise ValueError(f"unknown node kind {k}")
