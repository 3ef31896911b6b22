"""Transposed convolutions of rows that are zero outside small windows (``lipverify.graph.conv_crop``).

Oracle: the vector-Jacobian product of the convolution's forward map by autograd
(``LinearOp.adjoint``, which never calls ``conv_transpose2d``), on batches of rows supported on
windows at random places, on the borders, and empty, for strides, asymmetric padding, dilation,
groups and 1-d convolutions; and the whole-map path where the windows are large.
"""

from __future__ import annotations

import pytest
import torch

import lipverify.graph.conv_crop as cc
from lipverify.graph.linear_ops import Conv, LinearOp

GEOMETRIES = [
    # (C_in, C_out, k, stride, padding (t, b, l, r), dilation, groups, H, W)
    (3, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 16, 16),
    (3, 8, 4, (2, 2), (1, 1, 1, 1), (1, 1), 1, 32, 32),
    (4, 6, 3, (2, 1), (0, 2, 1, 0), (1, 1), 2, 17, 15),
    (2, 4, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 20, 20),
    (4, 4, 3, (3, 3), (0, 0, 0, 0), (1, 1), 4, 25, 25),
]


def _windowed(R, shape, gen, span):
    """``(R, *shape)`` rows, each non-zero in one ``span x span`` window (some on the borders, one empty)."""
    C, H, W = shape
    y = torch.zeros(R, C, H, W, dtype=torch.float64)
    for r in range(R - 1):
        h = int(torch.randint(0, H, (1,), generator=gen)) if r % 3 else (0 if r % 2 else H - 1)
        w = int(torch.randint(0, W, (1,), generator=gen)) if r % 4 else (W - 1 if r % 2 else 0)
        h0, w0 = max(0, min(h, H - span)), max(0, min(w, W - span))
        y[r, :, h0:h0 + span, w0:w0 + span] = torch.randn(C, min(span, H), min(span, W), generator=gen,
                                                          dtype=torch.float64)
    return y  # the last row stays zero


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"k{g[2]}s{g[3][0]}g{g[6]}")
def test_cropped_adjoint_equals_the_vector_jacobian_product(geom, monkeypatch):
    Ci, Co, k, stride, padding, dilation, groups, H, W = geom
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(Co, Ci // groups, k, k, generator=gen, dtype=torch.float64)
    op = Conv(weight, (Ci, H, W), stride, padding, dilation, groups)
    calls = []
    real = cc.cropped_conv_transpose

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out
    monkeypatch.setattr("lipverify.graph.linear_ops.cropped_conv_transpose", spy)
    y = _windowed(24, op.out_shape, gen, span=2)
    got = op.adjoint(y)
    want = LinearOp.adjoint(op, y)
    assert calls and calls[-1], "the windows are small: the cropped path must run"
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # |W|^T |y| the same way (the absolute adjoint)
    assert torch.allclose(op.abs_adjoint(y.abs()), LinearOp.adjoint(Conv(weight.abs(), (Ci, H, W), stride, padding,
                                                                          dilation, groups), y.abs()),
                          rtol=1e-12, atol=1e-12)


def test_large_windows_take_the_whole_map_path_and_one_d_convolutions_crop():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    op = Conv(weight, (3, 12, 12), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    y = torch.randn(16, *op.out_shape, generator=gen, dtype=torch.float64)  # non-zero everywhere
    assert cc.cropped_conv_transpose(y, op.weight, op.stride, op.dilation, 1, (14, 14)) is None
    assert torch.allclose(op.adjoint(y), LinearOp.adjoint(op, y), rtol=1e-12, atol=1e-12)
    w1 = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64)
    op1 = Conv(w1, (2, 40), (2,), (2, 1), (1,), 1, one_d=True)
    y1 = torch.zeros(12, *op1.out_shape, dtype=torch.float64)
    for r in range(11):
        y1[r, :, (3 * r) % (op1.out_shape[1] - 1):(3 * r) % (op1.out_shape[1] - 1) + 2] = 1.0 + r
    assert torch.allclose(op1.adjoint(y1), LinearOp.adjoint(op1, y1), rtol=1e-12, atol=1e-12)
