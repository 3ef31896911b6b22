"""Tests of lipverify.graph.operator_norms against independent oracles.

Oracles: numpy's matrix norms; the exact operator matrix obtained by applying PyTorch's own conv2d
(with its own padding argument) to every basis input, without the code under test; the autograd
Jacobian of conv1d; a naive loop convolution in numpy; and circularly padded convolutions, for
which the FFT bound is exact.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipverify.graph.operator_norms import (
    SOUND_FACTOR,
    batched_power_iteration,
    conv1d_norm2_fft,
    conv_linear_maps,
    conv_norm2_exact,
    conv_norm2_fft,
    conv_norm2_gram,
    conv_norm_inf,
    conv_operator_matrix,
    dense_norm2,
    dense_norm_inf,
    power_iteration,
)

REL = 1e-9  # slack for float64 rounding when comparing two sound/exact values


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small problems: one intra-op thread avoids spin-wait slowdowns on a busy, shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------


def _pad4(padding):
    """(top, bottom, left, right) from an int, a pair or a 4-tuple (test-side interpretation)."""
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return tuple(padding)


def _torch_conv(x, w, stride, padding, dilation, groups):
    """The layer as a user would write it: explicit F.pad for 4-tuples, else conv2d's own padding."""
    if isinstance(padding, tuple) and len(padding) == 4:
        t, b, l, r = padding
        return F.conv2d(F.pad(x, (l, r, t, b)), w, stride=stride, dilation=dilation, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _jacobian_matrix(w, input_size, stride=1, padding=0, dilation=1, groups=1, mode="zeros"):
    """Exact operator matrix of the conv (float64): PyTorch's conv applied to every basis input.

    Independent of the code under test: it calls ``F.conv2d`` with its own padding argument (or
    ``F.pad`` for asymmetric/circular padding) on the rows of an identity matrix.
    """
    w = w.to(torch.float64)
    c_in = w.shape[1] * groups
    n_in = c_in * int(np.prod(input_size))
    x = torch.eye(n_in, dtype=torch.float64).reshape((n_in, c_in) + tuple(input_size))
    if mode == "circular":
        t, b, l, r = _pad4(padding)
        y = F.conv2d(F.pad(x, (l, r, t, b), mode="circular"), w, stride=stride, dilation=dilation, groups=groups)
    else:
        y = _torch_conv(x, w, stride, padding, dilation, groups)
    return y.reshape(n_in, -1).T.numpy()


def _naive_conv(x, w, stride, padding, dilation, groups):
    """Loop implementation of the conv2d definition in numpy (x: (C, H, W), w: (O, C/g, kh, kw))."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    t, b, l, r = _pad4(padding)
    C, H, W = x.shape
    xp = np.zeros((C, H + t + b, W + l + r))
    xp[:, t:t + H, l:l + W] = x
    O, Cg, kh, kw = w.shape
    Ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    og = O // groups
    y = np.zeros((O, Ho, Wo))
    for o in range(O):
        g = o // og
        for i in range(Ho):
            for j in range(Wo):
                acc = 0.0
                for c in range(Cg):
                    for a in range(kh):
                        for bb in range(kw):
                            acc += w[o, c, a, bb] * xp[g * Cg + c, sh * i + dh * a, sw * j + dw * bb]
                y[o, i, j] = acc
    return y


def _np_norm2(M):
    """Spectral norm in float64 (numpy for small matrices; torch's LAPACK for operator matrices,
    which avoids numpy's BLAS thread pool fighting torch's on a small shared CPU)."""
    if M.size <= 4096:
        return float(np.linalg.norm(M, 2))
    return float(torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(M)))[0])


# ---------------------------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (20, 20), (1, 5)])
def test_dense_norm2_matches_numpy(shape):
    W = torch.randn(shape, dtype=torch.float32)
    ref = _np_norm2(W.double().numpy())
    got = dense_norm2(W)
    assert got >= ref
    assert got == pytest.approx(ref * SOUND_FACTOR, rel=1e-12)


def test_dense_norm2_orthonormal_is_one():
    Q, _ = torch.linalg.qr(torch.randn(12, 8, dtype=torch.float64))
    got = dense_norm2(Q)
    assert 1.0 <= got <= SOUND_FACTOR * (1 + 1e-12)
    got_t = dense_norm2(Q.T)
    assert 1.0 <= got_t <= SOUND_FACTOR * (1 + 1e-12)


def test_dense_norm_inf_matches_numpy():
    W = torch.randn(9, 5)
    ref = float(np.linalg.norm(W.double().numpy(), np.inf))
    assert dense_norm_inf(W) == pytest.approx(ref * SOUND_FACTOR, rel=1e-12)
    assert dense_norm_inf(W) >= ref


# ---------------------------------------------------------------------------------------------
# The operator matrix (oracle) is itself validated
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,stride,padding,dilation,groups",
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 2),
        (2, (2, 3), (1, 0), (1, 2), 1),
        (4, 3, 2, 2, 4),
        (1, 1, 0, 1, 1),
        (3, 2, (0, 2, 1, 0), 1, 2),
    ],
)
def test_conv_operator_matrix_applies_the_conv(k, stride, padding, dilation, groups):
    c_in, c_out, size = 4, 4, (7, 9)
    w = torch.randn(c_out, c_in // groups, k, k)
    M = conv_operator_matrix(w, size, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert M.dtype == torch.float64
    x = torch.randn(c_in, *size, dtype=torch.float64)
    y_torch = _torch_conv(x.unsqueeze(0), w.double(), stride, padding, dilation, groups)[0]
    assert M.shape == (y_torch.numel(), x.numel())
    torch.testing.assert_close(M @ x.flatten(), y_torch.flatten(), rtol=1e-12, atol=1e-12)
    y_naive = _naive_conv(x.numpy(), w.double().numpy(), stride, padding, dilation, groups)
    np.testing.assert_allclose((M @ x.flatten()).numpy(), y_naive.flatten(), rtol=1e-12, atol=1e-12)


def test_conv_norm2_exact_matches_jacobian_svd_and_limits_memory():
    w = torch.randn(3, 2, 3, 3)
    ref = _np_norm2(_jacobian_matrix(w, (6, 5), stride=2, padding=1))
    assert conv_norm2_exact(w, (6, 5), stride=2, padding=1) == pytest.approx(ref * SOUND_FACTOR, rel=1e-12)
    with pytest.raises(ValueError):
        conv_norm2_exact(w, (64, 64), padding=1, max_entries=1e5)


def test_invalid_geometries_raise():
    w = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError):
        conv_norm2_fft(w, (3, 3))  # kernel larger than input: no output
    with pytest.raises(ValueError):
        conv_norm2_fft(w, (8, 8), stride=2, padding="same")
    with pytest.raises(ValueError):
        conv_norm2_fft(torch.randn(3, 2, 3, 3), (8, 8), groups=2)  # 3 outputs, 2 groups


# ---------------------------------------------------------------------------------------------
# FFT bound: soundness over a grid of geometries
# ---------------------------------------------------------------------------------------------

PADDINGS = [0, 1, 2, (0, 2, 1, 0)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_norm2_fft_is_sound_over_a_grid(k, stride):
    size = (8, 11)  # non-square
    c = 4
    checked = 0
    for padding, dilation, groups in itertools.product(PADDINGS, [1, 2], [1, 2, 4]):
        t, b, l, r = _pad4(padding)
        ext = dilation * (k - 1) + 1
        if size[0] + t + b < ext or size[1] + l + r < ext:
            continue
        w = torch.randn(c, c // groups, k, k)
        exact = _np_norm2(_jacobian_matrix(w, size, stride, padding, dilation, groups))
        bound = conv_norm2_fft(w, size, stride=stride, padding=padding, dilation=dilation, groups=groups)
        assert bound >= exact * (1 - REL), (k, stride, padding, dilation, groups, bound, exact)
        # The bound of a group-structured conv is a max over groups: not wildly loose either.
        assert bound <= 3.0 * exact, (k, stride, padding, dilation, groups, bound, exact)
        checked += 1
    assert checked >= 20


def test_conv_norm2_fft_sound_with_rectangular_kernel_and_mixed_params():
    w = torch.randn(5, 3, 2, 4)
    for stride, padding, dilation in [((1, 2), (1, 0), (2, 1)), ((3, 1), (2, 0, 0, 3), (1, 3)), (2, "same", 1)]:
        if padding == "same":
            stride = 1
        size = (9, 10)
        exact = _np_norm2(_jacobian_matrix(w, size, stride, (1, 1, 2, 1) if padding == "same" else padding, dilation))
        bound = conv_norm2_fft(w, size, stride=stride, padding=padding, dilation=dilation)
        assert bound >= exact * (1 - REL)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_matches_pytorch_convention():
    w = torch.randn(2, 2, 2, 4)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    M = conv_operator_matrix(w, (6, 7), padding="same")
    y = F.conv2d(x, w.double(), padding="same")
    torch.testing.assert_close(M @ x.flatten(), y.flatten())


# ---------------------------------------------------------------------------------------------
# FFT bound: exactness and tightness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (3, 1)])
def test_conv_norm2_fft_is_exact_for_circular_convolution(stride, dilation):
    # A "valid" conv on an n x n input is bounded through the circular conv on the n x n grid
    # (n a multiple of the stride here); that circular conv's exact norm must equal the bound.
    n, k = 12, 3
    ext = dilation * (k - 1)
    w = torch.randn(3, 2, k, k)
    bound = conv_norm2_fft(w, (n, n), stride=stride, dilation=dilation)
    circ = _np_norm2(_jacobian_matrix(w, (n, n), stride, (0, ext, 0, ext), dilation, mode="circular"))
    assert bound == pytest.approx(circ * SOUND_FACTOR, rel=1e-9)


def test_conv_norm2_fft_is_tight_for_stride_one():
    for k, padding in [(3, 1), (5, 2), (3, 0)]:
        w = torch.randn(3, 3, k, k)
        size = (10, 10)
        exact = _np_norm2(_jacobian_matrix(w, size, 1, padding, 1))
        bound = conv_norm2_fft(w, size, padding=padding)
        assert exact * (1 - REL) <= bound <= 1.5 * exact


def test_polyphase_is_much_tighter_than_stride_one_bound():
    # 2x2 average pooling: stride-1 bound of the kernel is 1, the strided operator has norm 1/2.
    w = torch.full((1, 1, 2, 2), 0.25)
    assert conv_norm2_fft(w, (8, 8), stride=1) == pytest.approx(1.0 * SOUND_FACTOR, rel=1e-9)
    assert conv_norm2_fft(w, (8, 8), stride=2) == pytest.approx(0.5 * SOUND_FACTOR, rel=1e-9)
    # Random strided kernel: polyphase bound is valid and clearly below the stride-1 bound.
    gains = []
    for _ in range(3):
        w = torch.randn(4, 4, 4, 4)
        exact = _np_norm2(_jacobian_matrix(w, (10, 10), 2, 1, 1))
        strided = conv_norm2_fft(w, (10, 10), stride=2, padding=1)
        unstrided = conv_norm2_fft(w, (10, 10), stride=1, padding=1)
        assert strided >= exact * (1 - REL)
        gains.append(unstrided / strided)
    assert max(gains) > 1.3


@pytest.mark.parametrize("k,padding", [(1, 0), (3, 1), (5, 2)])
def test_identity_conv_has_norm_one(k, padding):
    c = 3
    w = torch.zeros(c, c, k, k)
    for i in range(c):
        w[i, i, k // 2, k // 2] = 1.0
    assert conv_norm2_fft(w, (6, 7), padding=padding) == pytest.approx(SOUND_FACTOR, rel=1e-12)
    assert conv_norm2_exact(w, (6, 7), padding=padding) == pytest.approx(SOUND_FACTOR, rel=1e-12)


def test_average_pooling_as_depthwise_conv_has_norm_half():
    C = 3
    w = torch.full((C, 1, 2, 2), 0.25)
    x = torch.randn(1, C, 6, 8, dtype=torch.float64)
    # The conv is average pooling (validates the set-up).
    torch.testing.assert_close(F.conv2d(x, w.double(), stride=2, groups=C), F.avg_pool2d(x, 2, 2))
    assert conv_norm2_fft(w, (6, 8), stride=2, groups=C) == pytest.approx(0.5 * SOUND_FACTOR, rel=1e-9)
    assert conv_norm2_exact(w, (6, 8), stride=2, groups=C) == pytest.approx(0.5 * SOUND_FACTOR, rel=1e-9)
    assert _np_norm2(_jacobian_matrix(w, (6, 8), 2, 0, 1, C)) == pytest.approx(0.5, rel=1e-12)


def test_conv1d():
    w = torch.randn(3, 2, 4)
    for stride, padding, dilation in [(1, 1, 1), (2, (0, 3), 1), (3, 2, 2)]:
        L = 13
        if isinstance(padding, tuple):
            xpad = (padding[0], padding[1])
        else:
            xpad = (padding, padding)

        # Autograd Jacobian of F.conv1d: an oracle independent of the basis-input construction.
        def f(x):
            return F.conv1d(F.pad(x.unsqueeze(0), xpad), w.double(), stride=stride, dilation=dilation)[0]

        J = torch.autograd.functional.jacobian(f, torch.zeros(2, L, dtype=torch.float64))
        exact = _np_norm2(J.reshape(-1, 2 * L).numpy())
        bound = conv1d_norm2_fft(w, L, stride=stride, padding=padding, dilation=dilation)
        assert bound >= exact * (1 - REL)
        assert bound <= 2.0 * exact
        M = conv_operator_matrix(w, L, stride=stride, padding=padding, dilation=dilation)
        np.testing.assert_allclose(M.numpy(), J.reshape(-1, 2 * L).numpy(), atol=1e-12)
        # Same as a 2-d conv with a kernel of height 1 on a height-1 input.
        pad4 = (0, 0) + xpad
        bound2d = conv_norm2_fft(w.unsqueeze(2), (1, L), stride=(1, stride), padding=pad4, dilation=(1, dilation))
        assert bound2d == pytest.approx(bound, rel=1e-12)


def test_fft_bound_fast_for_realistic_layers():
    import time

    w = torch.randn(64, 64, 3, 3)
    t0 = time.perf_counter()
    b = conv_norm2_fft(w, (32, 32), padding=1)
    elapsed = time.perf_counter() - t0
    assert np.isfinite(b) and b > 0
    assert elapsed < 10.0  # generous smoke check for a shared CPU; typically ~0.3 s
    w = torch.randn(128, 128, 3, 3)
    b2 = conv_norm2_fft(w, (16, 16), padding=1, stride=2)
    assert np.isfinite(b2) and b2 > 0


# ---------------------------------------------------------------------------------------------
# Gram iteration
# ---------------------------------------------------------------------------------------------


def test_gram_iteration_is_an_upper_bound_that_converges_to_fft_bound():
    for stride, padding, groups in [(1, 1, 1), (2, 1, 2), (3, (1, 0, 2, 1), 1)]:
        w = torch.randn(6, 6 // groups, 3, 3)
        size = (9, 8)
        fft = conv_norm2_fft(w, size, stride=stride, padding=padding, groups=groups)
        exact = _np_norm2(_jacobian_matrix(w, size, stride, padding, 1, groups))
        previous = None
        for t in [0, 1, 3, 6, 10]:
            g = conv_norm2_gram(w, size, stride=stride, padding=padding, groups=groups, n_iter=t)
            assert g >= fft * (1 - REL) >= exact * (1 - 2 * REL)
            if previous is not None:
                assert g <= previous * (1 + REL)  # monotone tightening
            previous = g
        assert previous <= fft * (1 + 1e-2)


# ---------------------------------------------------------------------------------------------
# l-inf bound
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 0, 2, 2), (1, 1, 1, 1), (2, 2, 1, 4), (3, (0, 2, 1, 0), 1, 1)])
def test_conv_norm_inf_bounds_exact_inf_norm(stride, padding, dilation, groups):
    w = torch.randn(4, 4 // groups, 3, 3)
    M = _jacobian_matrix(w, (8, 9), stride, padding, dilation, groups)
    exact = float(np.abs(M).sum(axis=1).max())
    bound = conv_norm_inf(w, groups=groups)
    assert bound >= exact * (1 - REL)
    if padding == 0:
        assert bound == pytest.approx(exact * SOUND_FACTOR, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Adjoint and power iteration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 2), (3, (0, 2, 1, 0), 2, 1), ((2, 3), (2, 1), (1, 2), 4)])
def test_conv_linear_maps_adjoint(stride, padding, dilation, groups):
    w = torch.randn(4, 4 // groups, 3, 2)
    fwd, adj, geo = conv_linear_maps(w, (9, 10), stride, padding, dilation, groups)
    M = torch.from_numpy(_jacobian_matrix(w, (9, 10), stride, padding, dilation, groups))
    x = torch.randn(2, *geo.in_shape, dtype=torch.float64)
    y = torch.randn(2, *geo.out_shape, dtype=torch.float64)
    torch.testing.assert_close(fwd(x).reshape(2, -1), x.reshape(2, -1) @ M.T)
    torch.testing.assert_close(adj(y).reshape(2, -1), y.reshape(2, -1) @ M)


def test_power_iteration_dense_converges_from_below_and_warm_starts():
    A = torch.randn(30, 20, dtype=torch.float64)
    exact = _np_norm2(A.numpy())
    fwd = lambda x: x @ A.T  # noqa: E731
    adj = lambda y: y @ A  # noqa: E731
    g = torch.Generator().manual_seed(1)
    res = power_iteration(fwd, adj, (20,), tol=1e-12, max_iter=5000, generator=g)
    assert res.converged
    assert res.u.shape == (20,)
    assert float(res.u.norm()) == pytest.approx(1.0, abs=1e-12)
    assert res.sigma <= exact * (1 + REL)
    assert res.sigma == pytest.approx(exact, rel=1e-4)
    # Loose tolerance first, then warm start: fewer iterations than the cold run.
    g = torch.Generator().manual_seed(2)
    cold = power_iteration(fwd, adj, (20,), tol=1e-10, max_iter=5000, generator=g)
    warm = power_iteration(fwd, adj, (20,), u0=res.u, tol=1e-10, max_iter=5000)
    assert warm.converged and cold.converged
    assert warm.iterations < cold.iterations
    assert warm.sigma <= exact * (1 + REL)


def test_power_iteration_conv_operator():
    w = torch.randn(4, 3, 3, 3)
    fwd, adj, geo = conv_linear_maps(w, (7, 6), stride=2, padding=1)
    exact = _np_norm2(_jacobian_matrix(w, (7, 6), 2, 1, 1))
    res = power_iteration(fwd, adj, geo.in_shape, tol=1e-13, max_iter=20000,
                          generator=torch.Generator().manual_seed(0))
    assert res.sigma <= exact * (1 + REL)
    assert res.sigma == pytest.approx(exact, rel=1e-4)
    warm = power_iteration(fwd, adj, geo.in_shape, u0=res.u, tol=1e-13, max_iter=20000)
    assert warm.iterations < res.iterations
    # The estimate never exceeds the sound FFT bound.
    assert res.sigma <= conv_norm2_fft(w, (7, 6), stride=2, padding=1)


def test_power_iteration_stops_at_max_iter_without_convergence():
    A = torch.randn(10, 10, dtype=torch.float64)
    res = power_iteration(lambda x: x @ A.T, lambda y: y @ A, (10,), tol=0.0, max_iter=3,
                          generator=torch.Generator().manual_seed(0))
    assert res.iterations == 3 and not res.converged
    assert res.sigma <= _np_norm2(A.numpy()) * (1 + REL)


def test_batched_power_iteration_equals_separate_runs():
    B, m, n = 4, 12, 9
    A = torch.randn(B, m, n, dtype=torch.float64)
    A[1] *= 5.0
    A[2, :, 0] *= 10.0  # fast convergence for this one
    u0 = torch.randn(B, n, dtype=torch.float64)
    fwd = lambda x: torch.einsum("bmn,bn->bm", A, x)  # noqa: E731
    adj = lambda y: torch.einsum("bmn,bm->bn", A, y)  # noqa: E731
    res = batched_power_iteration(fwd, adj, u0, tol=1e-9, max_iter=5000)
    assert res.sigma.shape == (B,) and res.u.shape == (B, n) and res.iterations.shape == (B,)
    assert bool(res.converged.all())
    assert len(set(res.iterations.tolist())) > 1  # examples stopped at different times
    for b in range(B):
        Ab = A[b]
        single = power_iteration(lambda x: x @ Ab.T, lambda y: y @ Ab, (n,), u0=u0[b], tol=1e-9, max_iter=5000)
        assert single.iterations == int(res.iterations[b])
        assert single.sigma == pytest.approx(float(res.sigma[b]), rel=1e-12)
        torch.testing.assert_close(single.u, res.u[b], rtol=1e-9, atol=1e-9)
        exact = _np_norm2(Ab.numpy())
        assert float(res.sigma[b]) <= exact * (1 + REL)
        assert float(res.sigma[b]) == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_pointwise_conv_bound_equals_exact_operator_norm(stride, groups):
    """1x1 convolutions take a one-SVD path; the operator matrix from impulse responses is the oracle."""
    from lipverify.graph.operator_norms import conv_norm2_fft

    g = torch.Generator().manual_seed(stride * 10 + groups)
    w = torch.randn(6, 6 // groups, 1, 1, generator=g, dtype=torch.float64)
    n_in = 6 * 5 * 5
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 6, 5, 5)
    mat = torch.nn.functional.conv2d(eye, w, stride=stride, groups=groups).reshape(n_in, -1).T
    exact = float(torch.linalg.matrix_norm(mat, ord=2))
    got = conv_norm2_fft(w, (5, 5), stride=stride, groups=groups)
    assert exact <= got <= exact * (1 + 1e-5)


@pytest.mark.parametrize("shape", [(256, 300), (600, 256), (257, 257)])
def test_gram_path_of_the_dense_norm_is_sound_and_tight(shape):
    """Large dense layers use lambda_max of the Gram matrix with an explicit rounding term: never below
    the SVD's value (an independent algorithm), at most the 1e-6 safety factor above it — also for
    rank-one-dominated and rank-deficient matrices."""
    from lipverify.graph.operator_norms import GRAM_MIN_SIDE, SOUND_FACTOR, dense_norm2, dense_norm2_gram

    assert min(shape) >= GRAM_MIN_SIDE
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.randn(shape[0], 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, shape[1], generator=g, dtype=torch.float64)
    low_rank = torch.randn(shape[0], 3, generator=g, dtype=torch.float64) @ torch.randn(3, shape[1], generator=g,
                                                                                       dtype=torch.float64)
    for W in (base, 1e3 * u @ v + 1e-3 * base, low_rank, base.float()):
        exact = float(torch.linalg.svdvals(W.double())[0])
        got = dense_norm2_gram(W)
        assert exact <= got <= exact * SOUND_FACTOR * (1 + 1e-7)
        assert dense_norm2(W) == got


def _with_spectrum(m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = len(s)
    return (U[:, :k] * torch.as_tensor(s, dtype=torch.float64)) @ V[:, :k].T


@pytest.mark.parametrize("case", ["tall", "wide", "tied_top", "low_rank", "tiny_scale", "huge_scale", "gapless"])
def test_certified_dense_norm_is_above_the_svd_and_tight(case):
    """The Cholesky certificate never falls below the float64 SVD (with its own error far below the
    1e-6 safety factor) and lands within 1e-2 of it, with or without the caller's seed, from a wrong
    (too small) seed, and on spectra that defeat power iteration (tied or gapless tops)."""
    from lipverify.graph.operator_norms import dense_norm2_certified

    g = torch.Generator().manual_seed(1)
    W = {"tall": lambda: torch.randn(300, 120, generator=g, dtype=torch.float64),
         "wide": lambda: torch.randn(90, 400, generator=g, dtype=torch.float64),
         "tied_top": lambda: _with_spectrum(150, 200, [5.0, 5.0, 5.0, 4.9999] + [1.0] * 60, 2),
         "low_rank": lambda: _with_spectrum(200, 150, [3.0, 2.0, 1e-3], 3),
         "tiny_scale": lambda: torch.randn(100, 130, generator=g, dtype=torch.float64) * 1e-200,
         "huge_scale": lambda: torch.randn(100, 130, generator=g, dtype=torch.float64) * 1e200,
         "gapless": lambda: _with_spectrum(120, 120, torch.linspace(1.0, 0.999, 120).tolist(), 4)}[case]()
    exact = float(torch.linalg.svdvals(W)[0])
    seeds = (None,) if exact > 1e150 else (None, exact ** 2 * (1 - 1e-9), exact ** 2 * 0.5)  # no float for sigma^2
    for lam in seeds:
        got = dense_norm2_certified(W, lam=lam)
        assert exact * (1 - 1e-12) <= got <= exact * (1 + 1e-2), (case, lam)
    assert dense_norm2_certified(torch.zeros(80, 90, dtype=torch.float64)) == 0.0
