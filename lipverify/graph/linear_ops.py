"""Linear operators of the Lipschitz graph: forward, adjoint, bias and operator norms.

Every affine node of a network is ``y = A x + b``.  The classes here hold ``A`` in a structured form
(dense matrix, convolution, per-element scale, coordinate selection, composition, residual sum) and
know three things about it:

* ``apply(x)``: the linear part ``A x`` on a batch ``(B, *in_shape)``;
* ``adjoint(y)``: ``A^T y`` (explicit where cheap, otherwise the exact vector-Jacobian product of the
  linear map, which *is* the adjoint);
* ``norm(p)``: a sound upper bound of the ``l_p -> l_p`` operator norm for ``p`` in ``{"2", "inf"}``,
  as a :class:`Bound` that names the method.

Soundness rules (SPEC sections 2 and 11): sound values are computed in float64 and multiplied by
``SOUND_FACTOR``; power iteration is only ever reported as an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lipverify.graph import operator_norms as on
from lipverify.graph.conv_crop import cropped_conv_transpose

Shape = tuple[int, ...]

#: largest operator matrix (entries) that is materialised for an exact SVD.
EXACT_MAX_ENTRIES = 1_000_000
#: batches of at least this many rows try the cropped transposed convolution (graph/conv_crop.py)
CROP_MIN_ROWS = 8
#: materialisation also needs the smaller side to be at most this (number of basis vectors pushed).
EXACT_MAX_SIDE = 1024


@dataclass(frozen=True)
class Bound:
    """A Lipschitz constant with the method that produced it and whether it is a proven upper bound."""

    value: float
    method: str
    sound: bool

    def times(self, other: "Bound", method: str | None = None) -> "Bound":
        return Bound(self.value * other.value, method or f"{self.method} * {other.method}",
                     self.sound and other.sound)


def _live(weight, keep_params: bool) -> bool:
    """Keep ``weight`` itself (no detach) only when asked to and it is a model parameter."""
    return bool(keep_params) and isinstance(weight, torch.nn.Parameter)


def numel(shape: Shape) -> int:
    return int(math.prod(shape))


class LinearOp:
    """Base class: a linear map between per-example shapes, plus an affine offset ``bias``."""

    kind = "linear"

    def __init__(self, in_shape: Shape, out_shape: Shape, bias: torch.Tensor | None = None):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.bias = None if bias is None else bias.reshape(self.out_shape)
        self._u: dict[str, torch.Tensor] = {}  # power-iteration warm starts

    # -- maps -------------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` as the vector-Jacobian product of the linear map (exact for a linear map)."""
        x0 = torch.zeros((y.shape[0],) + self.in_shape, dtype=y.dtype, device=y.device,
                         requires_grad=True)
        with torch.enable_grad():
            out = self.apply(x0)
            (g,) = torch.autograd.grad(out, x0, grad_outputs=y)
        return g

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(self, k, v.to(dtype=dtype or v.dtype, device=device or v.device))
            elif isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device=device or v.device))
        for sub in self.children():
            sub.to(dtype, device)
        return self

    def children(self) -> Sequence["LinearOp"]:
        return ()

    @property
    def in_dim(self) -> int:
        return numel(self.in_shape)

    @property
    def out_dim(self) -> int:
        return numel(self.out_shape)

    def describe(self) -> str:
        return self.kind

    # -- norms ------------------------------------------------------------------------------------
    def norm(self, p: str = "2") -> Bound:
        """Sound upper bound of the operator norm; subclasses refine ``_norm_candidates``."""
        cands = list(self._norm_candidates(p))
        exact = self.exact_norm(p)
        if exact is not None:
            cands.append(exact)
        sound = [c for c in cands if c.sound]
        if not sound:
            raise RuntimeError(f"no sound norm for {self.describe()}")
        return min(sound, key=lambda b: b.value)

    def _norm_candidates(self, p: str) -> list[Bound]:
        return []

    def can_materialise(self) -> bool:
        return (min(self.in_dim, self.out_dim) <= EXACT_MAX_SIDE
                and self.in_dim * self.out_dim <= EXACT_MAX_ENTRIES)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """The operator matrix ``(out_dim, in_dim)`` built from impulse responses (or adjoint rows)."""
        dev = self._device()
        if self.in_dim <= self.out_dim:
            eye = torch.eye(self.in_dim, dtype=dtype, device=dev)
            cols = []
            for chunk in eye.split(256):
                cols.append(self.apply(chunk.reshape((-1,) + self.in_shape)).reshape(chunk.shape[0], -1))
            return torch.cat(cols).T.contiguous()
        eye = torch.eye(self.out_dim, dtype=dtype, device=dev)
        rows = []
        for chunk in eye.split(256):
            rows.append(self.adjoint(chunk.reshape((-1,) + self.out_shape)).reshape(chunk.shape[0], -1))
        return torch.cat(rows)

    def exact_norm(self, p: str) -> Bound | None:
        if not self.can_materialise():
            return None
        with torch.no_grad():
            m = self.to_double_copy().matrix()
        if p == "2":
            return Bound(on.dense_norm2(m), "exact SVD of the operator matrix", True)
        return Bound(on.dense_norm_inf(m), "exact row sums of the operator matrix", True)

    def to_double_copy(self) -> "LinearOp":
        import copy

        u, self._u = self._u, {}
        try:
            c = copy.deepcopy(self)  # children too: never convert the model's own operators in place
        finally:
            self._u = u
        return c.to(torch.float64)

    def power_norm(self, p: str = "2", tol: float = 1e-5, max_iter: int = 1000) -> Bound:
        """Power-iteration estimate of the l2 norm (approaches it from below; never sound)."""
        if p != "2":
            raise ValueError("power iteration estimates only the l2 norm")
        op = self.to_double_copy()
        res = on.power_iteration(op.apply, op.adjoint, self.in_shape, u0=self._u.get("2"), tol=tol,
                                 max_iter=max_iter, device=self._device())
        self._u["2"] = res.u.detach()
        return Bound(float(res.sigma), f"power iteration ({res.iterations} it, tol {tol:g})", False)

    # -- element-wise absolute values and row norms (local bounds, SPEC section 4) -----------------
    def abs_apply(self, x: torch.Tensor) -> torch.Tensor:
        """An element-wise upper bound of ``|A| x`` for a non-negative batch ``x`` (``(B, *in_shape)``).

        ``|A|`` is the operator matrix with every entry replaced by its absolute value.  Exact for
        :class:`Dense`, :class:`Conv`, :class:`Scale` and :class:`Select`; for compositions and sums it is
        ``|A_k| ... |A_1| x`` (resp. ``sum |s_b| |B_b| x``), which is ``>= |A| x`` entry by entry.  This
        generic version materialises the matrix when it is small and otherwise returns
        ``||A||_inf * max(x)`` in every output entry (each row's absolute sum is at most ``||A||_inf``).
        Interval bound propagation uses it for radii; it is never used for anything but ``x >= 0``.
        """
        b = x.shape[0]
        if self.can_materialise():
            m = self.matrix(torch.float64).abs().to(device=x.device, dtype=x.dtype)
            return (x.reshape(b, -1) @ m.T).reshape((b,) + self.out_shape)
        v = self.norm("inf").value
        mx = x.reshape(b, -1).amax(dim=1).clamp_min(0) * v
        return mx.reshape((b,) + (1,) * len(self.out_shape)).expand((b,) + self.out_shape).clone()

    def abs_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """An element-wise upper bound of ``|A|^T y`` for a non-negative batch ``y`` (``(B, *out_shape)``).

        Exact for :class:`Dense`, :class:`Conv`, :class:`ConvTranspose`, :class:`Scale` and
        :class:`Select`; ``|A_1|^T ... |A_k|^T y`` for compositions and ``sum |s_b| |B_b|^T y`` for sums
        (entry by entry ``>=``).  This generic version materialises small operators and otherwise
        raises ``NotImplementedError`` (no cheap bound of the column sums is known for it): backward
        interval propagation then does not apply to the graph.
        """
        b = y.shape[0]
        if self.can_materialise():
            m = self.matrix(torch.float64).abs().to(device=y.device, dtype=y.dtype)
            return (y.reshape(b, -1) @ m).reshape((b,) + self.in_shape)
        raise NotImplementedError(f"no |A|^T bound for {self.describe()}")

    def row_norms(self, q: str = "2") -> torch.Tensor:
        """Upper bounds of the ``l_q`` norm of every row of the operator matrix (one per output unit).

        ``q`` is ``"2"`` or ``"1"``.  Returns a float64 tensor of shape ``out_shape``.  Exact for
        :class:`Dense`, :class:`Conv`, :class:`Scale`, :class:`Select` and for small operators
        (materialised); otherwise a sound upper bound (here: the operator norm, which bounds every row
        norm: ``||A^T e_k||_2 <= ||A||_2`` and ``||row_k||_1 <= ||A||_inf``).  Computed in float64 without
        a safety factor: callers that need outward rounding add it.
        """
        _check_row_q(q)
        if self.can_materialise():
            return _matrix_row_norms(self.matrix(torch.float64), q).reshape(self.out_shape)
        v = self.norm("2" if q == "2" else "inf").value
        return torch.full(self.out_shape, v, dtype=torch.float64, device=self._device())

    def _device(self) -> torch.device:
        for v in vars(self).values():
            if isinstance(v, torch.Tensor):
                return v.device
        for c in self.children():
            return c._device()
        return torch.device("cpu")


class Dense(LinearOp):
    """``y = x W^T`` on the last axis (``nn.Linear`` semantics); leading axes are batched blocks.

    On leading axes the map is ``I (x) W`` (block diagonal), whose l2 and l-inf norms equal those of W.
    """

    kind = "dense"

    def __init__(self, weight: torch.Tensor, in_shape: Shape, bias: torch.Tensor | None = None,
                 keep_params: bool = False):
        out_shape = tuple(in_shape[:-1]) + (weight.shape[0],)
        if bias is not None:
            bias = bias.expand(out_shape)
        super().__init__(in_shape, out_shape, bias)
        # keep_params: reference a live ``nn.Parameter`` (not a detached copy), so that ``apply`` is
        # differentiable with respect to the model's weights (certified fine-tuning).
        self.weight = weight if _live(weight, keep_params) else weight.detach()

    def apply(self, x):
        return x @ self.weight.to(x.dtype).T

    def adjoint(self, y):
        return y @ self.weight.to(y.dtype)

    def abs_apply(self, x):
        return x @ self.weight.to(x.dtype).abs().T

    def abs_adjoint(self, y):
        return y @ self.weight.to(y.dtype).abs()

    def row_norms(self, q: str = "2"):
        _check_row_q(q)
        w = self.weight.double()
        r = w.norm(dim=1) if q == "2" else w.abs().sum(dim=1)
        return r.expand(self.out_shape).clone()

    def describe(self):
        return f"dense {self.weight.shape[1]}->{self.weight.shape[0]}"

    def _norm_candidates(self, p):
        if p == "2":
            return [Bound(on.dense_norm2(self.weight), "exact SVD (float64)", True)]
        return [Bound(on.dense_norm_inf(self.weight), "exact max row sum", True)]

    def exact_norm(self, p):
        return None  # the candidate above is already exact


class Conv(LinearOp):
    """2-d convolution (1-d convolutions are stored as 2-d with height 1), zero padding, no bias."""

    kind = "conv"

    def __init__(self, weight, in_shape, stride, padding, dilation, groups, bias=None, one_d=False,
                 keep_params: bool = False):
        self.one_d = one_d
        if one_d:
            weight = weight.unsqueeze(2)
            stride, padding, dilation = (1, stride[0]), (0, 0, padding[0], padding[1]), (1, dilation[0])
        self.weight = weight if _live(weight, keep_params) else weight.detach()  # see Dense
        self.stride = tuple(stride)
        # padding as (top, bottom, left, right)
        self.padding = tuple(padding) if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        c, h, w = self._in_chw(in_shape)
        ho = (h + self.padding[0] + self.padding[1] - self.dilation[0] * (weight.shape[2] - 1) - 1) // self.stride[0] + 1
        wo = (w + self.padding[2] + self.padding[3] - self.dilation[1] * (weight.shape[3] - 1) - 1) // self.stride[1] + 1
        out_shape = (weight.shape[0], wo) if one_d else (weight.shape[0], ho, wo)
        if bias is not None:
            bias = bias.reshape((-1, 1) if one_d else (-1, 1, 1)).expand(out_shape)
        super().__init__(in_shape, out_shape, bias)
        self.hw = (h, w)

    def _in_chw(self, in_shape):
        if self.one_d:
            return in_shape[0], 1, in_shape[1]
        return in_shape

    def _pad(self, x):
        t, b, l, r = self.padding
        if any(self.padding):
            x = F.pad(x, (l, r, t, b))
        return x

    def apply(self, x):
        if self.one_d:
            x = x.unsqueeze(2)
        y = F.conv2d(self._pad(x), self.weight.to(x.dtype), stride=self.stride, dilation=self.dilation,
                     groups=self.groups)
        return y.squeeze(2) if self.one_d else y

    def adjoint(self, y):
        return self._adjoint_with(y, self.weight)

    def abs_adjoint(self, y):
        return self._adjoint_with(y, self.weight.abs())

    def _adjoint_with(self, y, weight):
        """The adjoint of this convolution's geometry with another kernel (same shape as ``self.weight``)."""
        if self.one_d:
            y = y.unsqueeze(2)
        c, h, w = self._in_chw(self.in_shape)
        t, b, l, r = self.padding
        hp, wp = h + t + b, w + l + r
        ho, wo = y.shape[-2], y.shape[-1]
        op_h = hp - ((ho - 1) * self.stride[0] + self.dilation[0] * (self.weight.shape[2] - 1) + 1)
        op_w = wp - ((wo - 1) * self.stride[1] + self.dilation[1] * (self.weight.shape[3] - 1) + 1)
        if op_h >= max(self.stride[0], self.dilation[0]) or op_w >= max(self.stride[1], self.dilation[1]):
            # no output padding reproduces the input size: the vector-Jacobian product of the geometry
            src = self if weight is self.weight else _with_weight(self, weight)
            return LinearOp.adjoint(src, y.squeeze(2) if self.one_d else y)
        xp = cropped_conv_transpose(y, weight, self.stride, self.dilation, self.groups, (hp, wp)) \
            if y.shape[0] >= CROP_MIN_ROWS else None
        if xp is None:  # rows with non-zeros all over the map
            xp = F.conv_transpose2d(y, weight.to(y.dtype), stride=self.stride, dilation=self.dilation,
                                    groups=self.groups, output_padding=(op_h, op_w))
        x = xp[..., t:t + h, l:l + w]
        return x.squeeze(2) if self.one_d else x

    def _conv_with(self, x, weight):
        """This convolution's geometry applied with another kernel (same shape as ``self.weight``)."""
        if self.one_d:
            x = x.unsqueeze(2)
        y = F.conv2d(self._pad(x), weight.to(x.dtype), stride=self.stride, dilation=self.dilation,
                     groups=self.groups)
        return y.squeeze(2) if self.one_d else y

    def abs_apply(self, x):
        return self._conv_with(x, self.weight.abs())

    def row_norms(self, q: str = "2"):
        # An output unit reads distinct input entries through distinct kernel taps (zero padding only
        # removes taps), so its row holds exactly the in-range kernel entries: squared / absolute row
        # sums are the convolution of an all-ones input with the squared / absolute kernel.
        _check_row_q(q)
        ones = torch.ones((1,) + self.in_shape, dtype=torch.float64, device=self.weight.device)
        w = self.weight.double()
        if q == "2":
            return self._conv_with(ones, w * w)[0].clamp_min(0).sqrt()
        return self._conv_with(ones, w.abs())[0]

    def describe(self):
        k = tuple(self.weight.shape[2:]) if not self.one_d else (self.weight.shape[3],)
        return (f"conv{'1d' if self.one_d else ''} {self.weight.shape[1] * self.groups}->{self.weight.shape[0]} "
                f"k{'x'.join(map(str, k))} s{self.stride[-1] if self.one_d else self.stride[0]}")

    def _norm_candidates(self, p):
        if p == "2":
            v = on.conv_norm2_fft(self.weight, self.hw, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, groups=self.groups)
            return [Bound(v, "FFT bound (circular embedding, polyphase for strides)", True)]
        return [Bound(on.conv_norm_inf(self.weight, groups=self.groups), "kernel abs-sum bound", True)]


def _with_weight(op: LinearOp, weight: torch.Tensor) -> LinearOp:
    """A shallow copy of ``op`` with another weight tensor (same shape)."""
    import copy

    other = copy.copy(op)
    other.weight = weight
    other._u = {}
    return other


class ConvTranspose(LinearOp):
    """2-d transposed convolution ``y = conv_transpose2d(x, W)``: the adjoint of ``conv2d(., W)`` on the
    output's grid (same stride, padding, dilation, groups), so both have the same l2 norm.

    l2: the FFT bound of that convolution (input size = this op's output size). l-inf: an output
    pixel of channel ``o`` reads at most every tap of ``W[:, o]`` once per input channel, so its row
    abs-sum is at most ``max_o sum_{c, a, b} |W[c, o, a, b]|`` (per group).
    """

    kind = "convtranspose"

    def __init__(self, weight, in_shape, stride, padding, output_padding, dilation, groups, bias=None):
        self.weight = weight.detach()
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.output_padding, self.dilation, self.groups = tuple(output_padding), tuple(dilation), int(groups)
        c, h, w = in_shape
        k_h, k_w = weight.shape[2], weight.shape[3]
        ho = (h - 1) * self.stride[0] - 2 * self.padding[0] + self.dilation[0] * (k_h - 1) + self.output_padding[0] + 1
        wo = (w - 1) * self.stride[1] - 2 * self.padding[1] + self.dilation[1] * (k_w - 1) + self.output_padding[1] + 1
        out_shape = (weight.shape[1] * self.groups, ho, wo)
        if bias is not None:
            bias = bias.reshape(-1, 1, 1).expand(out_shape)
        super().__init__(in_shape, out_shape, bias)

    def apply(self, x):
        return F.conv_transpose2d(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def abs_apply(self, x):
        return _with_weight(self, self.weight.abs()).apply(x)

    def abs_adjoint(self, y):
        return LinearOp.adjoint(_with_weight(self, self.weight.abs()), y)

    def describe(self):
        return (f"conv-transpose {self.in_shape[0]}->{self.out_shape[0]} k{self.weight.shape[2]}x"
                f"{self.weight.shape[3]} s{self.stride[0]}")

    def _norm_candidates(self, p):
        if p == "2":
            v = on.conv_norm2_fft(self.weight, self.out_shape[1:], stride=self.stride,
                                  padding=(self.padding[0], self.padding[0], self.padding[1], self.padding[1]),
                                  dilation=self.dilation, groups=self.groups)
            return [Bound(v, "FFT bound of the adjoint convolution", True)]
        w = self.weight.double().abs()
        G = self.groups
        ci_g = w.shape[0] // G
        per_out = torch.cat([w[g * ci_g:(g + 1) * ci_g].sum(dim=(0, 2, 3)) for g in range(G)])
        return [Bound(float(per_out.max()) * on.SOUND_FACTOR, "tap abs-sum bound", True)]


class Scale(LinearOp):
    """Element-wise scale ``y = a * x`` with ``a`` broadcast to the input shape (BatchNorm in eval,
    normalisation by constants, multiplication by constants)."""

    kind = "scale"

    def __init__(self, scale: torch.Tensor, in_shape: Shape, bias: torch.Tensor | None = None):
        scale = torch.as_tensor(scale)
        while scale.dim() > len(in_shape):
            if scale.shape[0] != 1:
                raise ValueError("scale has a batch dimension")
            scale = scale[0]
        out_shape = tuple(torch.broadcast_shapes(scale.shape, tuple(in_shape)))
        if out_shape != tuple(in_shape):
            raise ValueError("scale would change the shape")
        if bias is not None:
            bias = torch.as_tensor(bias).expand(out_shape)
        super().__init__(in_shape, out_shape, bias)
        self.scale = scale.detach()

    def apply(self, x):
        return x * self.scale.to(x.dtype)

    def adjoint(self, y):
        return y * self.scale.to(y.dtype)

    def channel_scale(self) -> torch.Tensor | None:
        """The per-channel vector if ``a`` varies only along axis 0 of the input (else None)."""
        if len(self.in_shape) == 0:
            return None
        s = self.scale
        full = s.expand(self.in_shape).reshape(self.in_shape[0], -1)
        if torch.all(full == full[:, :1]):
            return full[:, 0]
        return None

    def abs_apply(self, x):
        return x * self.scale.to(x.dtype).abs()

    def abs_adjoint(self, y):
        return y * self.scale.to(y.dtype).abs()

    def row_norms(self, q: str = "2"):
        _check_row_q(q)
        return self.scale.double().abs().expand(self.out_shape).clone()

    def describe(self):
        return "scale"

    def _norm_candidates(self, p):
        return [Bound(float(self.scale.double().abs().max()) if self.scale.numel() else 0.0,
                      "max |scale|", True)]

    def exact_norm(self, p):
        return None


class Select(LinearOp):
    """A coordinate selection: ``y[k] = x[idx[k]]`` or 0 where ``idx[k] < 0``.

    Reshape, flatten, transpose, slicing, zero padding, squeeze/unsqueeze are all of this form.  The
    index map is found by pushing exact integers through the original op, so it is checked, not
    assumed.  When no input coordinate is used twice the operator is a partial isometry: norm 1 (or 0
    if nothing is selected); otherwise the l2 norm is ``sqrt(max multiplicity)`` and the l-inf norm 1.
    """

    kind = "select"

    def __init__(self, idx: torch.Tensor, in_shape: Shape, out_shape: Shape, bias=None, label="select"):
        super().__init__(in_shape, out_shape, bias)
        self.idx = idx.reshape(-1).long()
        self.label = label
        used = self.idx[self.idx >= 0]
        self.multiplicity = int(torch.bincount(used).max()) if used.numel() else 0

    def apply(self, x):
        flat = x.reshape(x.shape[0], -1)
        safe = self.idx.clamp(min=0)
        y = flat[:, safe] * (self.idx >= 0).to(x.dtype)
        return y.reshape((x.shape[0],) + self.out_shape)

    def adjoint(self, y):
        flat = y.reshape(y.shape[0], -1) * (self.idx >= 0).to(y.dtype)
        x = torch.zeros(y.shape[0], self.in_dim, dtype=y.dtype, device=y.device)
        x.index_add_(1, self.idx.clamp(min=0), flat)
        return x.reshape((y.shape[0],) + self.in_shape)

    def is_identity(self) -> bool:
        return self.in_dim == self.out_dim and bool(
            torch.equal(self.idx, torch.arange(self.in_dim, device=self.idx.device)))

    def abs_apply(self, x):
        return self.apply(x)  # entries are 0 or 1

    def abs_adjoint(self, y):
        return self.adjoint(y)

    def row_norms(self, q: str = "2"):
        _check_row_q(q)
        return (self.idx >= 0).to(torch.float64).reshape(self.out_shape)

    def describe(self):
        return self.label

    def _norm_candidates(self, p):
        if self.multiplicity == 0:
            return [Bound(0.0, "selects nothing", True)]
        if p == "2":
            return [Bound(math.sqrt(self.multiplicity), "coordinate selection (exact)", True)]
        return [Bound(1.0, "coordinate selection (exact)", True)]

    def exact_norm(self, p):
        return None


class Chain(LinearOp):
    """Composition ``A_k ... A_1`` of affine ops with no nonlinearity between them.

    The norm of the merged operator is at most the product of the parts' norms and often much
    smaller; we take the best of (a) the product after folding per-channel scales into neighbouring
    convolutions / dense layers and multiplying consecutive dense matrices, and (b) the exact SVD of
    the materialised operator when it is small enough.
    """

    kind = "chain"

    def __init__(self, ops: Sequence[LinearOp]):
        flat: list[LinearOp] = []
        for o in ops:
            flat.extend(o.ops if isinstance(o, Chain) else [o])
        self.ops = flat
        super().__init__(flat[0].in_shape, flat[-1].out_shape, None)
        with torch.no_grad():
            z = torch.zeros((1,) + self.in_shape, dtype=torch.float64, device=self._device())
            for o in flat:
                z = o.to_double_copy().forward(z)
        b = z[0]  # kept in float64: the chain's offset is not rounded to the parameters' precision
        self.bias = b if bool(torch.any(b != 0)) else None

    def children(self):
        return self.ops

    def apply(self, x):
        for o in self.ops:
            x = o.apply(x)
        return x

    def adjoint(self, y):
        for o in reversed(self.ops):
            y = o.adjoint(y)
        return y

    def abs_apply(self, x):
        # |A_k ... A_1| <= |A_k| ... |A_1| entry by entry
        for o in self.ops:
            x = o.abs_apply(x)
        return x

    def abs_adjoint(self, y):
        for o in reversed(self.ops):
            y = o.abs_adjoint(y)
        return y

    def row_norms(self, q: str = "2"):
        """Exact when the chain can be materialised; otherwise for ``q = "1"`` the row sums of
        ``|A_k| ... |A_1|`` and for ``q = "2"`` ``||row_k(A_n)||_2 * prod_{i<n} ||A_i||_2`` over the folded
        chain (``||A_1^T ... A_{n-1}^T r|| <= ||r|| prod ||A_i||``): upper bounds."""
        _check_row_q(q)
        if self.can_materialise():
            return _matrix_row_norms(self.matrix(torch.float64), q).reshape(self.out_shape)
        if q == "1":
            ones = torch.ones((1,) + self.in_shape, dtype=torch.float64, device=self._device())
            return self.abs_apply(ones)[0]
        folded = fold_chain(self.ops)
        r = folded[-1].row_norms("2")
        prod = 1.0
        for o in folded[:-1]:
            prod *= o.norm("2").value
        return r * prod

    def describe(self):
        return " > ".join(o.describe() for o in self.ops if not (isinstance(o, Select) and o.is_identity()))

    def _norm_candidates(self, p):
        folded = fold_chain(self.ops)
        prod_val, methods = 1.0, []
        for o in folded:
            b = o.norm(p)
            prod_val *= b.value
            methods.append(b.method)
        label = "product over merged chain" if len(folded) > 1 else methods[0]
        n_real = sum(1 for o in self.ops if not (isinstance(o, Select) and o.is_identity()))
        if len(folded) < n_real:
            label += " (affine chain folded)"
        return [Bound(prod_val, label, True)]


class Residual(LinearOp):
    """Sum of linear branches from one source: ``y = sum_k s_k B_k x`` (e.g. ``x + W x``).

    Norm: ``sum_k ||B_k||`` in general; when the sum is ``x + conv(x)`` with a stride-1 conv that keeps
    the shape and has a centre tap, the identity is folded into the kernel's centre (LiResNet) and the
    single convolution is bounded; the exact SVD when the operator is small.
    """

    kind = "residual"

    def __init__(self, branches: Sequence[LinearOp], signs: Sequence[float]):
        self.branches = list(branches)
        self.signs = [float(s) for s in signs]
        super().__init__(self.branches[0].in_shape, self.branches[0].out_shape, None)
        bias = None
        for br, s in zip(self.branches, self.signs):
            if br.bias is not None:
                bias = s * br.bias if bias is None else bias + s * br.bias
        self.bias = bias

    def children(self):
        return self.branches

    def _signed_sum(self, method: str, x, absolute: bool = False):
        """``sum_b s_b B_b.method(x)`` (with ``|s_b|`` when ``absolute``)."""
        total = None
        for br, s in zip(self.branches, self.signs):
            t = getattr(br, method)(x) * (abs(s) if absolute else s)
            total = t if total is None else total + t
        return total

    def apply(self, x):
        return self._signed_sum("apply", x)

    def adjoint(self, y):
        return self._signed_sum("adjoint", y)

    def abs_apply(self, x):
        merged = self._as_single_conv()
        if merged is not None:
            return merged.abs_apply(x)
        return self._signed_sum("abs_apply", x, absolute=True)

    def abs_adjoint(self, y):
        merged = self._as_single_conv()
        if merged is not None:
            return merged.abs_adjoint(y)
        return self._signed_sum("abs_adjoint", y, absolute=True)

    def row_norms(self, q: str = "2"):
        """Exact when materialisable or when the sum folds into one convolution; otherwise the
        triangle inequality ``sum_b |s_b| ||row_k(B_b)||`` (an upper bound)."""
        _check_row_q(q)
        if self.can_materialise():
            return _matrix_row_norms(self.matrix(torch.float64), q).reshape(self.out_shape)
        merged = self._as_single_conv()
        if merged is not None:
            return merged.row_norms(q)
        r = None
        for br, s in zip(self.branches, self.signs):
            t = br.row_norms(q) * abs(s)
            r = t if r is None else r + t
        return r

    def describe(self):
        parts = []
        for br, s in zip(self.branches, self.signs):
            d = "identity" if isinstance(br, Select) and br.is_identity() else br.describe()
            parts.append(("- " if s < 0 else "+ ") + d)
        return "residual(" + " ".join(parts).lstrip("+ ") + ")"

    def _norm_candidates(self, p):
        total, sound = 0.0, True
        for br, s in zip(self.branches, self.signs):
            b = br.norm(p)
            total += abs(s) * b.value
            sound = sound and b.sound
        cands = [Bound(total, "sum of branch norms", sound)]
        merged = self._as_single_conv()
        if merged is not None:
            cands.append(Bound(merged.norm(p).value, "identity folded into the conv centre tap, then "
                               + merged.norm(p).method, True))
        return cands

    def _as_single_conv(self) -> Conv | None:
        """``s_0 x + s_1 conv(x)`` as one convolution when the conv has a usable centre tap."""
        ident, conv = None, None
        for br, s in zip(self.branches, self.signs):
            inner = fold_chain(br.ops) if isinstance(br, Chain) else [br]
            inner = [o for o in inner if not (isinstance(o, Select) and o.is_identity())]
            if not inner:
                if ident is not None:
                    return None
                ident = s
            elif len(inner) == 1 and isinstance(inner[0], Conv):
                if conv is not None:
                    return None
                conv = (s, inner[0])
            else:
                return None
        if ident is None or conv is None:
            return None
        s, c = conv
        kh, kw = c.weight.shape[2:]
        if (c.one_d or c.stride != (1, 1) or c.in_shape != c.out_shape or kh % 2 == 0 or kw % 2 == 0
                or c.padding != (c.dilation[0] * (kh // 2),) * 2 + (c.dilation[1] * (kw // 2),) * 2):
            return None
        w = c.weight.double() * s
        ch = torch.arange(w.shape[0], device=w.device)
        w[ch, ch % w.shape[1], kh // 2, kw // 2] += ident
        return Conv(w, c.in_shape, c.stride, c.padding, c.dilation, c.groups)


def _check_row_q(q: str) -> None:
    if q not in ("1", "2"):
        raise ValueError("row norms are l1 ('1') or l2 ('2')")


def _matrix_row_norms(m: torch.Tensor, q: str) -> torch.Tensor:
    m = m.to(torch.float64)
    return m.norm(dim=1) if q == "2" else m.abs().sum(dim=1)


# ------------------------------------------------------------------------------------------------
# folding of affine chains


def fold_chain(ops: Sequence[LinearOp]) -> list[LinearOp]:
    """Fold per-channel scales into adjacent convs/dense layers, drop identity selections and multiply
    consecutive dense matrices.  The result composes to the same linear map (biases are dropped: they
    do not affect norms)."""
    work = [o for o in ops if not (isinstance(o, Select) and o.is_identity())]
    changed = True
    while changed:
        changed = False
        for i in range(len(work) - 1):
            a, b = work[i], work[i + 1]
            merged = _fold_pair(a, b)
            if merged is not None:
                work[i:i + 2] = [merged]
                changed = True
                break
    return work or [ops[0]]


def _fold_pair(a: LinearOp, b: LinearOp) -> LinearOp | None:
    if isinstance(a, Scale) and isinstance(b, Scale):
        prod = a.scale.double() * b.scale.double()
        while prod.dim() > len(a.in_shape) and prod.shape[0] == 1:
            prod = prod[0]
        if tuple(torch.broadcast_shapes(prod.shape, tuple(a.in_shape))) != tuple(a.in_shape):
            return None  # scales stored with other layouts: leave the pair unfolded
        return Scale(prod, a.in_shape)
    if isinstance(a, Scale) and isinstance(b, Conv) and not b.one_d:
        cs = a.channel_scale()
        if cs is not None:
            w = b.weight.double().clone()
            cin_g = w.shape[1]
            for g in range(b.groups):
                w[g * (w.shape[0] // b.groups):(g + 1) * (w.shape[0] // b.groups)] *= \
                    cs.double()[g * cin_g:(g + 1) * cin_g].view(1, -1, 1, 1)
            return Conv(w, a.in_shape, b.stride, b.padding, b.dilation, b.groups)
    if isinstance(a, Conv) and isinstance(b, Scale) and not a.one_d:
        cs = b.channel_scale()
        if cs is not None:
            w = a.weight.double() * cs.double().view(-1, 1, 1, 1)
            return Conv(w, a.in_shape, a.stride, a.padding, a.dilation, a.groups)
    if isinstance(a, Dense) and isinstance(b, Dense) and tuple(a.out_shape) == tuple(b.in_shape) \
            and tuple(a.in_shape[:-1]) == tuple(b.in_shape[:-1]):
        # both act on the same last axis (same leading blocks): B (I x W_a) = I x (W_b W_a)
        return Dense(b.weight.double() @ a.weight.double(), a.in_shape)
    if isinstance(a, Scale) and isinstance(b, Dense) and len(a.in_shape) == 1:
        return Dense(b.weight.double() * a.scale.double().expand(a.in_shape).view(1, -1), a.in_shape)
    if isinstance(a, Dense) and isinstance(b, Scale) and len(b.in_shape) == 1:
        return Dense(a.weight.double() * b.scale.double().expand(b.in_shape).view(-1, 1), a.in_shape)
    return None


def identity_select(shape: Shape, device=None) -> Select:
    n = numel(shape)
    return Select(torch.arange(n, device=device), shape, shape, label="identity")


def probe_select(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Shape, batch: int,
                 label: str) -> Select | None:
    """Find the index map of a coordinate-selection op by pushing exact integers through it.

    ``fn`` must be the original (affine) op.  Returns None when the op is not a selection (some
    output is not exactly 0 or one input coordinate), or when it mixes batch elements.
    """
    n = numel(in_shape)
    base = torch.arange(1, batch * n + 1, dtype=torch.float64).reshape((batch,) + tuple(in_shape))
    with torch.no_grad():
        zero_out = fn(torch.zeros_like(base))
        out = fn(base) - zero_out
    if out.shape[0] != batch:
        return None
    first = out[0].reshape(-1)
    if not torch.all(first == torch.round(first)) or torch.any(first < 0) or torch.any(first > n):
        return None
    idx = first.long() - 1
    sel = Select(idx, in_shape, tuple(out.shape[1:]),
                 bias=zero_out[0] if bool(torch.any(zero_out != 0)) else None, label=label)
    # every batch element must see the same map
    check = sel.apply(base)
    if not torch.equal(check, out):
        return None
    return sel
