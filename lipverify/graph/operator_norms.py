"""Operator norms of dense and convolutional layers: sound bounds, exact oracles and estimates.

Every function here is pure: tensors in, Python floats (or float64 tensors) out.  The arithmetic
is done in float64 on the device of the input tensor, whatever the input dtype.  Values documented
as *sound* are upper bounds of the true operator norm and are multiplied by :data:`SOUND_FACTOR`
so that floating-point error in the float64 computation cannot make them smaller than the norm.

Contents
--------
* :func:`dense_norm2`, :func:`dense_norm_inf`: norms of a weight matrix ``x -> W x``.
* :func:`conv_norm2_fft`: sound l2 bound of ``conv2d`` / ``conv1d`` with any stride, zero padding
  (symmetric or not), dilation and groups, from the Fourier transform of the kernel (with a
  polyphase rearrangement for strides).
* :func:`conv_norm2_gram`: the same circular operator bounded by Gram iteration instead of an
  eigen-decomposition per frequency (looser, but only matrix products).
* :func:`conv_operator_matrix`, :func:`conv_norm2_exact`: the dense operator matrix of a small
  layer and its exact spectral norm (test oracle).
* :func:`conv_norm_inf`: sound l-inf bound of a convolution.
* :func:`conv_linear_maps`: the convolution and its adjoint as batched functions.
* :func:`power_iteration`, :func:`batched_power_iteration`: estimates of the l2 norm from below.

Convolution geometry
--------------------
The convolution is ``torch.nn.functional.conv2d(x, weight, stride=stride, padding=padding,
dilation=dilation, groups=groups)`` without bias (a bias never changes a Lipschitz constant), acting
on inputs of shape ``(C_in, H, W)`` with ``C_in = weight.shape[1] * groups``.

* ``weight``: ``(C_out, C_in / groups, k_h, k_w)``; a 3-d weight ``(C_out, C_in / groups, k)``
  is a 1-d convolution (``conv1d``), handled as a 2-d convolution with ``H = 1`` and a kernel of
  height 1.  For 1-d convolutions ``input_size`` is the length (an int or a 1-tuple) and
  stride/padding/dilation are ints or 1-tuples; padding may also be ``(left, right)``.
* ``input_size``: ``(H, W)`` (2-d) or ``L`` (1-d).
* ``stride``, ``dilation``: an int or a pair ``(h, w)``.
* ``padding``: zero padding; an int, a pair ``(p_h, p_w)`` (symmetric, as in PyTorch), a 4-tuple
  ``(top, bottom, left, right)`` (asymmetric; note the order differs from ``F.pad``, which takes
  ``(left, right, top, bottom)``), or the strings ``"valid"`` (no padding) and ``"same"``
  (stride 1 only; the odd pixel goes to the bottom/right, as in PyTorch).

Only zero padding is handled; a layer with ``padding_mode`` ``"circular"``, ``"reflect"`` or
``"replicate"`` is a different operator and must not be bounded with these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "GRAM_MIN_SIDE",
    "SOUND_FACTOR",
    "dense_norm2_gram",
    "ConvGeometry",
    "PowerIterationResult",
    "BatchedPowerIterationResult",
    "dense_norm2",
    "dense_norm_inf",
    "conv_geometry",
    "conv_norm2_fft",
    "conv1d_norm2_fft",
    "conv_norm2_gram",
    "conv_operator_matrix",
    "conv_norm2_exact",
    "conv_norm_inf",
    "conv_linear_maps",
    "power_iteration",
    "batched_power_iteration",
]

#: Multiplier applied to every sound value so that float64 rounding cannot make it unsound.
SOUND_FACTOR: float = 1.0 + 1e-6

IntOrSeq = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int]]

# Frequencies processed at once when bounding the per-frequency matrices (bounds the workspace).
_FREQ_CHUNK_ENTRIES = 2**22


# --------------------------------------------------------------------------------------------
# Dense layers
# --------------------------------------------------------------------------------------------


def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    W = torch.as_tensor(W)
    if W.dim() != 2:
        raise ValueError(f"expected a 2-d weight matrix, got shape {tuple(W.shape)}")
    return W.detach().to(torch.float64)


def dense_norm2(W: torch.Tensor) -> float:
    """Sound l2 operator norm of ``x -> W x``: the largest singular value of ``W``, times ``SOUND_FACTOR``.

    The singular values are computed in float64 (``torch.linalg.svdvals``), which is backward
    stable: the computed value is the exact norm of ``W + E`` with ``||E|| ~ 1e-15 ||W||``, far
    below the ``1e-6`` margin of :data:`SOUND_FACTOR`.

    Parameters
    ----------
    W:
        Weight matrix of shape ``(out_features, in_features)`` (any real dtype, any device).

    Returns
    -------
    float
        ``sigma_max(W) * SOUND_FACTOR`` (``0.0`` for an empty matrix).

    Warnings
    --------
    Cost is that of a full SVD, ``O(m n min(m, n))``; for very large matrices use a power
    iteration to *estimate* the norm, which is not sound.
    """
    W = _as_matrix(W)
    if W.numel() == 0:
        return 0.0
    if min(W.shape) >= GRAM_MIN_SIDE:
        return dense_norm2_gram(W)
    return float(torch.linalg.svdvals(W)[0]) * SOUND_FACTOR


#: from this smaller side on, :func:`dense_norm2` uses the Gram matrix (a few times faster than an SVD).
GRAM_MIN_SIDE = 256


def dense_norm2_gram(W: torch.Tensor) -> float:
    """Sound ``sigma_max(W)`` from the eigenvalues of the smaller Gram matrix ``G = W W^T`` (or ``W^T W``).

    ``sigma_max(W)^2 = lambda_max(G)``.  Forming ``G`` in float64 errs by ``|dG| <= gamma_n |W| |W|^T``
    entrywise (``gamma_n = n u / (1 - n u)``, ``u = 2^-53``, ``n`` the inner dimension), so
    ``||dG||_2 <= gamma_n ||W||_F^2``; the symmetric eigensolver is backward stable with error below
    ``c m u ||G||_2 <= c m u ||W||_F^2`` (``c = 10`` here, generous).  The bound returned is
    ``sqrt(lambda_max(fl(G)) + (gamma_n + 10 m u) ||W||_F^2) * SOUND_FACTOR``.  Cost: ``m^2 n`` for
    ``G`` plus ``O(m^3)`` for the eigenvalues (``m`` the smaller side), against ``O(m n min(m, n))``
    with a larger constant for an SVD.
    """
    W = _as_matrix(W).to(torch.float64)
    if W.shape[0] > W.shape[1]:
        W = W.T
    m, n = W.shape
    G = W @ W.T
    lam = float(torch.linalg.eigvalsh(G)[-1])
    u = 2.0 ** -53
    gamma = n * u / (1 - n * u)
    fro2 = float((W * W).sum()) * (1 + 2 * gamma)
    return math.sqrt(max(lam, 0.0) + (gamma + 10 * m * u) * fro2) * SOUND_FACTOR


def _lanczos_top(G: torch.Tensor, v: torch.Tensor, steps: int) -> float:
    """Largest Ritz value of ``steps`` Lanczos steps (full reorthogonalisation) on symmetric ``G`` from
    ``v``: at most ``lambda_max(G)`` up to rounding, and usually equal to it to many digits."""
    m = G.shape[0]
    steps = min(steps, m)
    Q = torch.zeros(m, steps, dtype=G.dtype, device=G.device)
    alpha = torch.zeros(steps, dtype=G.dtype)
    beta = torch.zeros(steps, dtype=G.dtype)
    nv = v.norm()
    if float(nv) == 0.0:
        v = torch.ones(m, dtype=G.dtype, device=G.device)
        nv = v.norm()
    q = v / nv
    k = 0
    for j in range(steps):
        Q[:, j] = q
        w = G @ q
        alpha[j] = float(q @ w)
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)  # twice is enough
        k = j + 1
        b = float(w.norm())
        if j + 1 == steps or b <= 1e-13 * max(float(alpha[:j + 1].abs().max()), 1e-300):
            break
        beta[j] = b
        q = w / b
    T = torch.diag(alpha[:k]) + torch.diag(beta[:k - 1], 1) + torch.diag(beta[:k - 1], -1)
    return float(torch.linalg.eigvalsh(T)[-1])


def dense_norm2_certified(W: torch.Tensor, v0: torch.Tensor | None = None, steps: int = 48,
                          lam: float | None = None) -> float:
    """Sound ``sigma_max(W)`` from a Cholesky certificate on the smaller Gram matrix (much cheaper than
    the eigenvalues of :func:`dense_norm2_gram` on matrices of a few hundred rows and more).

    With ``G^ = fl(W W^T)`` (``m x m``, ``m`` the smaller side, inner dimension ``n``), an estimate
    ``lam`` of ``lambda_max`` is the caller's (``lam``, e.g. the square of a power-iteration estimate of
    ``sigma_max``) or comes from ``steps`` Lanczos steps on ``G^`` (from ``v0`` when given: a vector of
    length ``m``; also used when no factorisation succeeds with the caller's estimate); for
    ``mu = lam (1 + delta)`` with ``delta = 1e-7, 1e-5, 1e-3, 1e-2`` in turn, if the float64 Cholesky factorisation of ``A = fl(mu I - G^)`` runs to completion then (Demmel; Higham,
    *Accuracy and Stability of Numerical Algorithms*, Thm 10.5) ``A + dA = R^T R`` is positive
    semi-definite with ``|dA| <= gamma_{m+1} |R^T| |R|``, so ``lambda_min(A) >= -gamma_{m+1} ||R||_F^2 >=
    -gamma_{m+1} tr(A) / (1 - gamma_{m+1})``.  The diagonal subtraction errs by at most
    ``u (mu + max_i G^_ii)`` in the 2-norm and forming ``G^`` by ``gamma_n ||W||_F^2``, hence

    ``sigma_max(W)^2 <= mu + gamma_{m+1} tr(A) / (1 - gamma_{m+1}) + u (mu + max G^_ii) + gamma_n ||W||_F^2``,

    returned (square root) times ``SOUND_FACTOR``.  ``W`` and then ``G^`` are first scaled by powers of
    two (exact) so that their entries are at most one (no overflow or underflow).  If no factorisation
    succeeds, :func:`dense_norm2_gram`.  Matrices with ``m <= 64`` go to :func:`dense_norm2_gram` directly.
    """
    W = _as_matrix(W).to(torch.float64)
    if W.numel() == 0:
        return 0.0
    if W.shape[0] > W.shape[1]:
        W = W.T
    m, n = W.shape
    amax = float(W.abs().max())
    if amax == 0.0:
        return 0.0
    kw = math.frexp(amax)[1]  # W = 2^kw W' with |W'| <= 1 exactly: no overflow or underflow in G
    if kw != 0:
        W = torch.ldexp(W, torch.tensor(-kw, dtype=torch.int32, device=W.device))
        if lam is not None:
            lam = math.ldexp(float(lam), -2 * kw)
    if m <= 64:
        return math.ldexp(dense_norm2_gram(W), kw)
    G = W @ W.T
    top = float(G.diagonal().max())
    if top <= 0.0:
        return 0.0
    k = math.frexp(top)[1]
    G = torch.ldexp(G, torch.tensor(-k, dtype=torch.int32, device=G.device))  # exact: entries <= 1
    if lam is not None:  # a caller's estimate of lambda_max(W W^T), in the scaled units
        lam = math.ldexp(float(lam), -k)
        if v0 is not None and v0.numel() == m:  # sharpen it from the caller's vector (a few steps)
            lam = max(lam, _lanczos_top(G, v0.to(G).reshape(m), steps))
    u = 2.0 ** -53
    gm = (m + 1) * u / (1 - (m + 1) * u)
    gn = n * u / (1 - n * u)
    fro2 = float(G.diagonal().sum()) * (1 + 2 * gn + m * u)  # ||W||_F^2 (scaled), rounded up
    gdiag = float(G.diagonal().max())
    eye = torch.eye(m, dtype=torch.float64, device=G.device)
    for attempt in range(2):
        if lam is None or attempt == 1:
            start = v0.to(G).reshape(m) if v0 is not None and v0.numel() == m else G.diagonal().clone()
            lam = _lanczos_top(G, start, steps)
        for delta in (1e-7, 1e-5, 1e-3, 1e-2):
            mu = max(lam, 0.0) * (1 + delta) + 1e-300
            A = mu * eye - G
            _, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                tr = float(A.diagonal().sum()) * (1 + m * u)
                bound = mu + gm * tr / (1 - gm) + u * (mu + gdiag) + gn * fro2
                return math.ldexp(math.sqrt(math.ldexp(bound * (1 + 4 * u), k)) * SOUND_FACTOR, kw)
    return math.ldexp(dense_norm2_gram(W), kw)


def dense_norm_inf(W: torch.Tensor) -> float:
    """Sound l-inf -> l-inf operator norm of ``x -> W x``: ``max_i sum_j |W_ij|``, times ``SOUND_FACTOR``.

    Parameters
    ----------
    W:
        Weight matrix of shape ``(out_features, in_features)``.

    Returns
    -------
    float
        The largest absolute row sum (computed in float64), times :data:`SOUND_FACTOR`.
    """
    W = _as_matrix(W)
    if W.numel() == 0:
        return 0.0
    return float(W.abs().sum(dim=1).max()) * SOUND_FACTOR


# --------------------------------------------------------------------------------------------
# Convolution geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised description of a zero-padded convolution (1-d convs have ``H = 1``, ``k_h = 1``)."""

    c_out: int
    c_in: int
    groups: int
    k_h: int
    k_w: int
    H: int
    W: int
    s_h: int
    s_w: int
    d_h: int
    d_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    is_1d: bool

    @property
    def H_padded(self) -> int:
        return self.H + self.pad_top + self.pad_bottom

    @property
    def W_padded(self) -> int:
        return self.W + self.pad_left + self.pad_right

    @property
    def H_out(self) -> int:
        return (self.H_padded - self.d_h * (self.k_h - 1) - 1) // self.s_h + 1

    @property
    def W_out(self) -> int:
        return (self.W_padded - self.d_w * (self.k_w - 1) - 1) // self.s_w + 1

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without batch dimension)."""
        return (self.c_in, self.W) if self.is_1d else (self.c_in, self.H, self.W)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one output example (without batch dimension)."""
        return (self.c_out, self.W_out) if self.is_1d else (self.c_out, self.H_out, self.W_out)


def _pair(value: IntOrSeq, name: str, is_1d: bool) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        v = (1, value) if is_1d else (value, value)
    else:
        seq = tuple(int(x) for x in value)  # type: ignore[union-attr]
        if is_1d and len(seq) == 1:
            v = (1, seq[0])
        elif not is_1d and len(seq) == 2:
            v = (seq[0], seq[1])
        else:
            raise ValueError(f"{name} must be an int or a {'1' if is_1d else '2'}-tuple, got {value!r}")
    if min(v) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return v


def _padding4(padding: Padding, is_1d: bool, k: tuple[int, int], d: tuple[int, int],
              s: tuple[int, int]) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if s != (1, 1):
                raise ValueError("padding='same' is only defined for stride 1")
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"unknown padding string {padding!r} (expected 'valid' or 'same')")
    if isinstance(padding, int) and not isinstance(padding, bool):
        p = (0, 0, padding, padding) if is_1d else (padding, padding, padding, padding)
    else:
        seq = tuple(int(x) for x in padding)
        if is_1d and len(seq) == 1:
            p = (0, 0, seq[0], seq[0])
        elif is_1d and len(seq) == 2:
            p = (0, 0, seq[0], seq[1])
        elif not is_1d and len(seq) == 2:
            p = (seq[0], seq[0], seq[1], seq[1])
        elif not is_1d and len(seq) == 4:
            p = seq  # (top, bottom, left, right)
        else:
            raise ValueError(f"cannot interpret padding {padding!r}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple(p)  # type: ignore[return-value]


def conv_geometry(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                  padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1) -> ConvGeometry:
    """Validate and normalise the arguments of a convolution (see the module docstring).

    Raises
    ------
    ValueError
        On inconsistent shapes, non-positive sizes, or an empty output.
    """
    if weight.dim() not in (3, 4):
        raise ValueError(f"conv weight must be 3-d (conv1d) or 4-d (conv2d), got shape {tuple(weight.shape)}")
    is_1d = weight.dim() == 3
    groups = int(groups)
    c_out, c_in_g = int(weight.shape[0]), int(weight.shape[1])
    if groups < 1 or c_out % groups != 0:
        raise ValueError(f"groups={groups} must divide the {c_out} output channels")
    k = (1, int(weight.shape[2])) if is_1d else (int(weight.shape[2]), int(weight.shape[3]))
    if is_1d:
        if isinstance(input_size, int):
            hw = (1, int(input_size))
        else:
            seq = tuple(int(x) for x in input_size)
            if len(seq) != 1:
                raise ValueError(f"1-d conv input_size must be an int or a 1-tuple, got {input_size!r}")
            hw = (1, seq[0])
    else:
        if isinstance(input_size, int):
            hw = (int(input_size), int(input_size))
        else:
            seq = tuple(int(x) for x in input_size)
            if len(seq) != 2:
                raise ValueError(f"2-d conv input_size must be (H, W), got {input_size!r}")
            hw = seq  # type: ignore[assignment]
    if min(hw) < 1 or min(k) < 1 or c_out < 1 or c_in_g < 1:
        raise ValueError("empty convolution (zero-sized input, kernel or channel count)")
    s = _pair(stride, "stride", is_1d)
    d = _pair(dilation, "dilation", is_1d)
    p = _padding4(padding, is_1d, k, d, s)
    geo = ConvGeometry(c_out=c_out, c_in=c_in_g * groups, groups=groups, k_h=k[0], k_w=k[1],
                       H=hw[0], W=hw[1], s_h=s[0], s_w=s[1], d_h=d[0], d_w=d[1],
                       pad_top=p[0], pad_bottom=p[1], pad_left=p[2], pad_right=p[3], is_1d=is_1d)
    if geo.H_out < 1 or geo.W_out < 1:
        raise ValueError(
            f"kernel extent {(d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)} exceeds the padded "
            f"input {(geo.H_padded, geo.W_padded)}: the convolution has no output")
    return geo


def _weight4(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    return w.unsqueeze(2) if w.dim() == 3 else w


# --------------------------------------------------------------------------------------------
# FFT bound (circular embedding + polyphase decomposition)
# --------------------------------------------------------------------------------------------


def _frequency_matrices(weight: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Per-frequency transfer matrices of the circular operator dominating the convolution.

    Returns a complex128 tensor of shape ``(n_freq * groups, C_out/groups, (C_in/groups) * s_h * s_w)``
    whose largest singular value (over the batch) is an upper bound of the l2 norm of the conv.

    Construction.  Let ``x_p`` be the zero-padded input.  Output ``(i, j)`` reads the rows
    ``s_h i + d_h a`` (``a < k_h``) of ``x_p``, so only the first ``L_h = s_h (H_out - 1) +
    d_h (k_h - 1) + 1`` rows matter (dropping the others is a coordinate projection, norm <= 1);
    extend them with zeros to ``M_h = ceil(L_h / s_h)`` multiples of the stride (an isometry).
    Write ``d_h a = s_h q_a + r_a`` with ``0 <= r_a < s_h``: then ``x_p[s_h i + d_h a] =
    X_{r_a}[i + q_a]`` where ``X_r[m] = x_p[s_h m + r]`` is a polyphase component (the
    rearrangement is a permutation).  The layer becomes a stride-1, dilation-1 "valid"
    correlation on the ``M_h x M_w`` phase grid with ``s_h s_w C_in`` input channels and taps
    ``(q_a, q_b)``; every output it computes reads indices ``i + q_a <= M_h - 1``, so it is a crop
    (norm <= 1) of the circular correlation on that grid.  A circular (block-circulant) operator is
    block-diagonalised by the unitary 2-d DFT; its singular values are those of the ``C_out x
    (s_h s_w C_in)`` matrices ``K_hat(u, v) = sum_q W'[:, :, q] exp(-2 pi i (u q_h / M_h +
    v q_w / M_w))`` (Sedghi et al., 2019; the sign convention does not change singular values).
    Taps that would fall outside the grid are wrapped modulo its size (they cannot occur for a
    valid convolution, but the circular operator is still the right object).  Groups make the
    operator block diagonal, so its norm is the maximum over the groups.
    """
    w = _weight4(weight)
    G = geo.groups
    co_g = geo.c_out // G
    ci_g = w.shape[1]
    s_h, s_w = geo.s_h, geo.s_w
    L_h = s_h * (geo.H_out - 1) + geo.d_h * (geo.k_h - 1) + 1
    L_w = s_w * (geo.W_out - 1) + geo.d_w * (geo.k_w - 1) + 1
    M_h = -(-L_h // s_h)
    M_w = -(-L_w // s_w)

    # Polyphase kernel on the phase grid: (C_out, C_in/G, s_h, s_w, M_h, M_w).
    grid = torch.zeros((geo.c_out, ci_g, s_h, s_w, M_h, M_w), dtype=torch.float64, device=w.device)
    for a in range(geo.k_h):
        qa, ra = divmod(geo.d_h * a, s_h)
        for b in range(geo.k_w):
            qb, rb = divmod(geo.d_w * b, s_w)
            grid[:, :, ra, rb, qa % M_h, qb % M_w] += w[:, :, a, b]

    # Real kernel: K_hat(-u, -v) = conj(K_hat(u, v)) has the same singular values, so the
    # half spectrum of rfft2 covers every frequency.
    khat = torch.fft.rfft2(grid)  # (C_out, C_in/G, s_h, s_w, M_h, M_w // 2 + 1)
    n_freq = khat.shape[-2] * khat.shape[-1]
    khat = khat.reshape(G, co_g, ci_g * s_h * s_w, n_freq)
    return khat.permute(0, 3, 1, 2).reshape(G * n_freq, co_g, ci_g * s_h * s_w)


def _max_sigma(mats: torch.Tensor) -> float:
    """Largest singular value over a batch of complex matrices (float64 arithmetic, chunked).

    Uses the eigenvalues of the smaller Gram matrix (``K K^H`` or ``K^H K``); ``eigvalsh`` is
    backward stable, so the relative error of the result is ``O(n * 1e-16)``.
    """
    n_b, m, n = mats.shape
    chunk = max(1, _FREQ_CHUNK_ENTRIES // max(1, m * n + min(m, n) ** 2))
    best = 0.0
    for start in range(0, n_b, chunk):
        k = mats[start:start + chunk]
        gram = k @ k.mH if m <= n else k.mH @ k
        lam = torch.linalg.eigvalsh(gram)[:, -1]
        best = max(best, float(lam.max().clamp_min(0.0)))
    return math.sqrt(best)


def conv_norm2_fft(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                   padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1) -> float:
    """Sound upper bound of the l2 operator norm of a zero-padded convolution, from its spectrum.

    Maths
    -----
    Zero padding is an isometry into the padded grid and the stride-1 "valid" convolution is a
    crop (norm <= 1) of the circular convolution on that grid, whose singular values are those of
    the ``C_out x C_in`` matrices ``K_hat(w)`` (2-d DFT of the kernel) at every frequency ``w`` of
    the grid.  Hence ``||conv||_2 <= max_w sigma_max(K_hat(w))``.  A stride ``s`` is handled
    exactly by the polyphase decomposition: the (further zero-extended) padded input is
    rearranged into ``s_h * s_w`` phase components, turning the layer into a stride-1 conv with
    ``s_h * s_w * C_in`` input channels on the phase grid, which is bounded the same way.  This is
    much tighter than the stride-1 norm of the same kernel (e.g. ``1/2`` instead of ``1`` for
    2 x 2 average pooling).  Dilation places the taps at multiples of the dilation; groups give a
    block-diagonal operator (maximum over groups).  The per-frequency matrices are computed with
    ``torch.fft.rfft2`` and their largest singular values in batched float64.

    Parameters
    ----------
    weight:
        ``(C_out, C_in / groups, k_h, k_w)`` for ``conv2d`` or ``(C_out, C_in / groups, k)`` for
        ``conv1d`` (treated as ``H = 1``).
    input_size:
        ``(H, W)`` of the layer's input (``L`` for 1-d).
    stride, padding, dilation, groups:
        As for ``torch.nn.functional.conv2d``; ``padding`` may also be a 4-tuple
        ``(top, bottom, left, right)`` or ``"same"`` / ``"valid"`` (see the module docstring).

    Returns
    -------
    float
        An upper bound of ``max_x ||conv(x)||_2 / ||x||_2`` (bias excluded), times :data:`SOUND_FACTOR`.

    References
    ----------
    H. Sedghi, V. Gupta, P. M. Long, "The singular values of convolutional layers", ICLR 2019;
    polyphase decomposition of multirate filter banks (P. P. Vaidyanathan, "Multirate Systems and
    Filter Banks", 1993).

    Warnings
    --------
    * The bound is exact for circular padding and only an upper bound for zero padding: the
      circular operator also mixes the padding zeros, so the true norm can be smaller (the gap
      shrinks as the input grows).  It is never smaller than the true norm.
    * Only zero padding is supported (not reflect/replicate/circular ``padding_mode``).
    * Memory is about ``C_out * C_in/groups * s_h * s_w * (H_pad/s_h) * (W_pad/s_w) / 2``
      complex128 numbers (twice that transiently), e.g. 40 MB for 64 -> 64 channels on 32 x 32.
    """
    geo = conv_geometry(weight, input_size, stride, padding, dilation, groups)
    if geo.k_h == 1 and geo.k_w == 1:
        # a single tap: K_hat(u, v) is the same matrix [W_g, 0, ...] at every frequency (the other
        # polyphase components are zero columns), so the bound is max_g ||W_g||_2, one SVD per group
        w = _weight4(weight)[:, :, 0, 0]
        G = geo.groups
        mats = w.reshape(G, geo.c_out // G, w.shape[1]).to(torch.complex128)
        return _max_sigma(mats) * SOUND_FACTOR
    return _max_sigma(_frequency_matrices(weight, geo)) * SOUND_FACTOR


def conv1d_norm2_fft(weight: torch.Tensor, length: int, stride: int = 1, padding: Padding = 0,
                     dilation: int = 1, groups: int = 1) -> float:
    """Sound l2 bound of ``conv1d`` on inputs of length ``length``: :func:`conv_norm2_fft` with ``H = 1``.

    ``weight`` has shape ``(C_out, C_in / groups, k)``; ``padding`` is an int, ``(left, right)``,
    or ``"same"`` / ``"valid"``.  Same maths, references and warnings as :func:`conv_norm2_fft`.
    """
    if weight.dim() != 3:
        raise ValueError(f"conv1d weight must be 3-d, got shape {tuple(weight.shape)}")
    return conv_norm2_fft(weight, int(length), stride, padding, dilation, groups)


def conv_norm2_gram(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                    padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1,
                    n_iter: int = 6) -> float:
    """Sound l2 bound of a convolution by Gram iteration on its per-frequency matrices.

    Maths
    -----
    With the per-frequency matrices ``K`` of :func:`conv_norm2_fft`, set ``G_0 = K`` and
    ``G_{t+1} = G_t^H G_t``.  Then ``sigma_max(G_t) = sigma_max(K)^(2^t)`` and
    ``sigma_max <= ||.||_F``, so ``sigma_max(K) <= ||G_t||_F^(1/2^t)`` for every ``t``: an upper
    bound at every step, converging quadratically (the ratio to the true value is at most
    ``rank^(1/2^(t+1))``).  Each iterate is rescaled to unit Frobenius norm and the scales are
    accumulated in logarithms, so nothing overflows.  Only matrix products are needed (no
    eigen-decomposition); the bound is never tighter than :func:`conv_norm2_fft`.

    Parameters
    ----------
    weight, input_size, stride, padding, dilation, groups:
        As for :func:`conv_norm2_fft`.
    n_iter:
        Number of Gram squarings ``t`` (``>= 0``); 6 gives a factor at most ``rank^(1/128)``.

    Returns
    -------
    float
        ``max_w ||G_t(w)||_F^(1/2^t)``, times :data:`SOUND_FACTOR`.

    References
    ----------
    B. Delattre, Q. Barthelemy, A. Araujo, A. Allauzen, "Efficient bound of Lipschitz constant
    for convolutional layers by Gram iteration", ICML 2023; Sedghi et al. 2019 (see
    :func:`conv_norm2_fft`).

    Warnings
    --------
    Same zero-padding caveat as :func:`conv_norm2_fft` (exact only for the circular operator), and
    looser than it by up to ``rank^(1/2^(n_iter+1))``.
    """
    if n_iter < 0:
        raise ValueError("n_iter must be >= 0")
    geo = conv_geometry(weight, input_size, stride, padding, dilation, groups)
    K = _frequency_matrices(weight, geo)
    fro = torch.linalg.matrix_norm(K, ord="fro")  # (B,)
    zero = fro == 0
    fro = torch.where(zero, torch.ones_like(fro), fro)
    Gm = K / fro[:, None, None]
    log_scale = torch.log(fro)
    for t in range(n_iter):
        Gm = Gm.mH @ Gm
        n = torch.linalg.matrix_norm(Gm, ord="fro")
        n = torch.where(n == 0, torch.ones_like(n), n)
        Gm = Gm / n[:, None, None]
        log_scale = 2.0 * log_scale + torch.log(n)
    # ||G_T||_F = exp(log_scale) * ||Gm||_F with ||Gm||_F = 1 (up to rounding; use it anyway).
    log_bound = (log_scale + torch.log(torch.linalg.matrix_norm(Gm, ord="fro").clamp_min(1e-300))) / 2.0**n_iter
    log_bound = torch.where(zero, torch.full_like(log_bound, -math.inf), log_bound)
    return float(torch.exp(log_bound.max())) * SOUND_FACTOR


# --------------------------------------------------------------------------------------------
# Exact operator matrix, l-inf bound, forward/adjoint maps
# --------------------------------------------------------------------------------------------


def _apply_conv(x4: torch.Tensor, w4: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Zero-pad explicitly then apply a "valid" conv2d (x4: (B, C_in, H, W), float64)."""
    xp = F.pad(x4, (geo.pad_left, geo.pad_right, geo.pad_top, geo.pad_bottom))
    return F.conv2d(xp, w4, stride=(geo.s_h, geo.s_w), dilation=(geo.d_h, geo.d_w), groups=geo.groups)


def conv_linear_maps(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                     padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], ConvGeometry]:
    """The convolution ``A`` (bias excluded) and its adjoint ``A^T`` as batched float64 functions.

    ``forward`` maps ``(B, *geo.in_shape) -> (B, *geo.out_shape)``; ``adjoint`` maps back, using
    ``conv_transpose2d`` (with the ``output_padding`` that restores the padded input size) followed
    by removal of the padding.  Both cast their argument to float64.  Suited to
    :func:`power_iteration` and :func:`batched_power_iteration`.

    Returns
    -------
    (forward, adjoint, geometry)
    """
    geo = conv_geometry(weight, input_size, stride, padding, dilation, groups)
    w4 = _weight4(weight)
    full_h = (geo.H_out - 1) * geo.s_h + geo.d_h * (geo.k_h - 1) + 1
    full_w = (geo.W_out - 1) * geo.s_w + geo.d_w * (geo.k_w - 1) + 1
    out_pad = (geo.H_padded - full_h, geo.W_padded - full_w)  # each in [0, stride - 1]

    def to4(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return x.unsqueeze(2) if geo.is_1d else x

    def from4(y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(2) if geo.is_1d else y

    def forward(x: torch.Tensor) -> torch.Tensor:
        return from4(_apply_conv(to4(x), w4, geo))

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        xp = F.conv_transpose2d(to4(y), w4, stride=(geo.s_h, geo.s_w), output_padding=out_pad,
                                groups=geo.groups, dilation=(geo.d_h, geo.d_w))
        xp = xp[:, :, geo.pad_top:geo.pad_top + geo.H, geo.pad_left:geo.pad_left + geo.W]
        return from4(xp)

    return forward, adjoint, geo


def conv_operator_matrix(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                         padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1,
                         max_entries: float | None = None) -> torch.Tensor:
    """Dense float64 matrix ``M`` of a convolution: ``conv(x).flatten() == M @ x.flatten()``.

    Built from impulse responses: column ``j`` is the (float64) output for the ``j``-th basis input,
    computed in batches.  Flattening is row-major over ``(C, H, W)`` (``(C, L)`` for 1-d).

    Parameters
    ----------
    weight, input_size, stride, padding, dilation, groups:
        As for :func:`conv_norm2_fft`.
    max_entries:
        If given, raise ``ValueError`` when the matrix would have more entries.

    Returns
    -------
    Tensor
        float64, shape ``(C_out * H_out * W_out, C_in * H * W)``, on the weight's device.

    Warnings
    --------
    Memory and time grow as ``(C_out H_out W_out) * (C_in H W)``: only for small layers.
    """
    geo = conv_geometry(weight, input_size, stride, padding, dilation, groups)
    n_in = geo.c_in * geo.H * geo.W
    n_out = geo.c_out * geo.H_out * geo.W_out
    if max_entries is not None and n_in * n_out > max_entries:
        raise ValueError(f"operator matrix would have {n_in} x {n_out} = {n_in * n_out} entries "
                         f"(> max_entries={int(max_entries)})")
    w4 = _weight4(weight)
    cols = torch.empty((n_out, n_in), dtype=torch.float64, device=w4.device)
    batch = max(1, min(n_in, 2**21 // max(1, n_in + n_out)))
    for start in range(0, n_in, batch):
        stop = min(n_in, start + batch)
        basis = torch.zeros((stop - start, n_in), dtype=torch.float64, device=w4.device)
        basis[torch.arange(stop - start, device=w4.device), torch.arange(start, stop, device=w4.device)] = 1.0
        out = _apply_conv(basis.reshape(-1, geo.c_in, geo.H, geo.W), w4, geo)
        cols[:, start:stop] = out.reshape(stop - start, n_out).T
    return cols


def conv_norm2_exact(weight: torch.Tensor, input_size: IntOrSeq, stride: IntOrSeq = 1,
                     padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1,
                     max_entries: float = 4e6) -> float:
    """Exact l2 operator norm of a small convolution: float64 SVD of :func:`conv_operator_matrix`.

    Returns
    -------
    float
        ``sigma_max(M) * SOUND_FACTOR`` (sound, and tight).

    Raises
    ------
    ValueError
        If the operator matrix would have more than ``max_entries`` entries (default ``4e6``,
        32 MB of float64; the SVD is cubic in the smaller dimension).

    Warnings
    --------
    Only for small layers (test oracle, tiny networks); use :func:`conv_norm2_fft` otherwise.
    """
    M = conv_operator_matrix(weight, input_size, stride, padding, dilation, groups, max_entries=max_entries)
    return float(torch.linalg.svdvals(M)[0]) * SOUND_FACTOR


def conv_norm_inf(weight: torch.Tensor, groups: int = 1) -> float:
    """Sound l-inf -> l-inf bound of a convolution: ``max_o sum_{c,a,b} |weight[o, c, a, b]|``.

    An output unit of channel ``o`` is the dot product of the kernel ``weight[o]`` with distinct
    input entries (zero padding only removes terms), so its row of the operator matrix has absolute
    sum at most that of the kernel; the bound is attained when some output unit touches the whole
    kernel inside the input (always the case without padding).  Stride, dilation, padding and input
    size do not change the bound; ``groups`` does not either (each output channel's kernel already
    lists only the ``C_in / groups`` channels it reads) and is accepted for a uniform signature.

    Returns
    -------
    float
        The bound, computed in float64, times :data:`SOUND_FACTOR`.
    """
    if weight.dim() < 2:
        raise ValueError(f"conv weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must divide the {weight.shape[0]} output channels")
    w = weight.detach().to(torch.float64)
    return float(w.abs().reshape(w.shape[0], -1).sum(dim=1).max()) * SOUND_FACTOR


# --------------------------------------------------------------------------------------------
# Power iteration (estimates)
# --------------------------------------------------------------------------------------------


@dataclass
class PowerIterationResult:
    """Result of :func:`power_iteration`.

    ``sigma``: estimate of the largest singular value (from below); ``u``: final unit right
    singular vector estimate (shape ``in_shape``, reuse it as ``u0`` to warm-start);
    ``iterations``: forward passes done; ``converged``: whether the tolerance was met.
    """

    sigma: float
    u: torch.Tensor
    iterations: int
    converged: bool


@dataclass
class BatchedPowerIterationResult:
    """Result of :func:`batched_power_iteration` (one entry per example of the batch).

    ``sigma``: (B,) float64 estimates; ``u``: (B, *in_shape) unit vectors; ``iterations``: (B,)
    int64; ``converged``: (B,) bool.
    """

    sigma: torch.Tensor
    u: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


def _batch_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def batched_power_iteration(forward: Callable[[torch.Tensor], torch.Tensor],
                            adjoint: Callable[[torch.Tensor], torch.Tensor],
                            u0: torch.Tensor, tol: float = 1e-5, max_iter: int = 1000
                            ) -> BatchedPowerIterationResult:
    """Independent power iterations for a batch of linear operators ``A_b``, run together.

    ``forward`` maps ``(B, *in_shape) -> (B, *out_shape)`` applying ``A_b`` to example ``b``;
    ``adjoint`` applies ``A_b^T``.  Each example iterates ``u <- A^T A u / ||A^T A u||`` with the
    estimate ``sigma = ||A u||`` (``||u|| = 1``) and stops when ``|sigma_t - sigma_{t-1}| <= tol *
    sigma_t``; converged examples are frozen (their ``u``, ``sigma`` and iteration count no longer
    change) while the others go on, and the loop ends when all have converged or after
    ``max_iter`` forward passes.  Every example follows exactly the computation it would follow
    alone.

    Parameters
    ----------
    forward, adjoint:
        Batched linear maps (they receive the whole batch, frozen examples included).
    u0:
        ``(B, *in_shape)`` starting vectors (any non-zero scale); their dtype and device are used.
    tol:
        Relative tolerance on the change of ``sigma`` between consecutive iterations.
    max_iter:
        Maximum number of forward passes.

    Returns
    -------
    BatchedPowerIterationResult
        ``sigma`` (B,), ``u`` (B, *in_shape), ``iterations`` (B,), ``converged`` (B,).  For an
        example that did not converge, ``u`` is one step ahead of ``sigma``.

    Warnings
    --------
    Power iteration is an ESTIMATE from below, never a sound bound: ``||A u|| <= ||A||`` for unit
    ``u``, and a small relative change does not mean a small error (slow convergence when the top
    singular values are close, as for convolutions).  A start vector orthogonal to the top singular
    vector (or in the null space: ``sigma = 0`` is then reported as converged) gives a wrong answer.
    Use :func:`conv_norm2_fft` / :func:`dense_norm2` for certified values.
    """
    if u0.dim() < 2:
        raise ValueError("u0 must have shape (B, *in_shape)")
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    B = u0.shape[0]
    dev = u0.device
    u = u0.clone()
    n0 = _batch_norms(u)
    if bool((n0 == 0).any()):
        raise ValueError("u0 contains a zero vector")
    u = u / _bcast(n0, u)
    dt = n0.dtype
    sigma = torch.zeros(B, dtype=dt, device=dev)
    prev = torch.full((B,), math.nan, dtype=dt, device=dev)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for it in range(1, max_iter + 1):
        v = forward(u)
        s = _batch_norms(v).to(dt)
        sigma = torch.where(active, s, sigma)
        iters = torch.where(active, torch.full_like(iters, it), iters)
        small_change = ~torch.isnan(prev) & ((s - prev).abs() <= tol * s)
        done = active & ((s == 0) | small_change)
        active = active & ~done
        if not bool(active.any()):
            break
        w = adjoint(v).to(u.dtype)
        wn = _batch_norms(w)
        wn_safe = torch.where(wn > 0, wn, torch.ones_like(wn))
        u = torch.where(_bcast(active, u), w / _bcast(wn_safe, w), u)
        prev = torch.where(active, s, prev)
    return BatchedPowerIterationResult(sigma=sigma, u=u, iterations=iters, converged=~active)


def power_iteration(forward: Callable[[torch.Tensor], torch.Tensor],
                    adjoint: Callable[[torch.Tensor], torch.Tensor],
                    in_shape: Sequence[int], *, u0: torch.Tensor | None = None, tol: float = 1e-5,
                    max_iter: int = 1000, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
                    ) -> PowerIterationResult:
    """Estimate the l2 operator norm of a linear map ``A`` by power iteration on ``A^T A``.

    Iterates ``u <- A^T A u / ||A^T A u||`` and estimates ``sigma = ||A u|| / ||u||``, stopping
    when the relative change of ``sigma`` is at most ``tol`` (GloRo certifies with ``1e-5``).

    Parameters
    ----------
    forward, adjoint:
        ``A`` and ``A^T`` on a batch with leading dimension 1: ``forward`` takes ``(1, *in_shape)``
        (e.g. the ``forward`` of :func:`conv_linear_maps`).  They must accept ``dtype``.
    in_shape:
        Shape of one input (without the batch dimension).
    u0:
        Start vector (shape ``in_shape`` or ``(1, *in_shape)``); pass the ``u`` of a previous result
        to warm-start.  Default: a Gaussian vector drawn with ``generator``.
    tol, max_iter:
        Relative tolerance on the change of ``sigma``; maximum number of forward passes.
    generator, dtype, device:
        Random source, dtype and device of the default start vector (``u0`` is cast to them).

    Returns
    -------
    PowerIterationResult
        ``sigma`` (estimate), ``u`` (unit vector of shape ``in_shape``), ``iterations``, ``converged``.

    Warnings
    --------
    An ESTIMATE that approaches the norm from below, never a sound upper bound; see
    :func:`batched_power_iteration` for the failure cases.  Use :func:`conv_norm2_fft` or
    :func:`dense_norm2` for certified values.
    """
    in_shape = tuple(int(s) for s in in_shape)
    if u0 is None:
        u0 = torch.randn(in_shape, generator=generator, dtype=dtype,
                         device=device if device is not None else (generator.device if generator is not None else None))
    else:
        u0 = u0.detach().to(dtype=dtype, device=device if device is not None else u0.device)
    if tuple(u0.shape) == in_shape:
        u0 = u0.unsqueeze(0)
    if tuple(u0.shape) != (1,) + in_shape:
        raise ValueError(f"u0 has shape {tuple(u0.shape)}, expected {in_shape}")
    res = batched_power_iteration(forward, adjoint, u0, tol=tol, max_iter=max_iter)
    return PowerIterationResult(sigma=float(res.sigma[0]), u=res.u[0], iterations=int(res.iterations[0]),
                                converged=bool(res.converged[0]))
