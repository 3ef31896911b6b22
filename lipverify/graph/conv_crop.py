"""Transposed convolutions of batches whose rows are zero outside a small window.

The coefficient rows of a bound propagation that starts at one unit (a CROWN refinement walk) are
zero outside that unit's receptive field.  ``conv_transpose2d`` over the whole map spends most of its
time on those zeros.  :func:`cropped_conv_transpose` finds each row's bounding box of non-zeros,
cuts every row to a window of the largest box's size (at that row's own offset), applies the
transposed convolution to the windows, and adds each result back at its offset:

.. math::
    (W^T y)[p] = \\sum_{o} W[o, p - s o] \\, y[o] = \\sum_{o \\in \\text{window}} W[o, p - s o] \\, y[o]

because ``y[o] = 0`` outside the window: the same products as the full transposed convolution (in
another order of summation, so equal up to float64 rounding of the same terms).

Warnings
--------
* Only batches whose windows cover at most half of the map are cropped; otherwise the caller's
  whole-map path runs (``None`` is returned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: crop only when the window covers at most this fraction of the map
MAX_FRACTION = 0.5
#: rows looked at before the whole batch
PROBE_ROWS = 4


def _span(any_: torch.Tensor):
    """First and last index of ``True`` per row of ``any_`` ``(R, n)`` (0, 0 for an all-False row)."""
    n = any_.shape[1]
    first = any_.to(torch.int8).argmax(1)
    last = n - 1 - any_.flip(1).to(torch.int8).argmax(1)
    empty = ~any_.any(1)
    return torch.where(empty, 0, first), torch.where(empty, 0, last)


def cropped_conv_transpose(y: torch.Tensor, weight: torch.Tensor, stride, dilation, groups: int,
                           full_hw: tuple[int, int]) -> torch.Tensor | None:
    """``conv_transpose2d(y, weight, stride, dilation, groups)`` without padding, laid out on a map of
    ``full_hw`` (at least the transposed convolution's own size; the caller crops its padding), for a
    batch ``y`` ``(R, C_out, H_o, W_o)`` whose rows are non-zero in small windows; None when the
    windows are not small (see the module docstring)."""
    R, _, Ho, Wo = y.shape
    for part in (y[:PROBE_ROWS], y):  # a few rows first: a batch with wide windows costs one small pass
        nz = part.detach().abs().amax(1) > 0  # (rows, Ho, Wo)
        h0, h1 = _span(nz.any(2))
        w0, w1 = _span(nz.any(1))
        Kh, Kw = int((h1 - h0).max()) + 1, int((w1 - w0).max()) + 1
        if Kh * Kw > MAX_FRACTION * Ho * Wo:
            return None
    h0 = torch.clamp(h0, max=Ho - Kh)
    w0 = torch.clamp(w0, max=Wo - Kw)
    ar = torch.arange(R, device=y.device)
    ih = h0[:, None] + torch.arange(Kh, device=y.device)  # (R, Kh)
    iw = w0[:, None] + torch.arange(Kw, device=y.device)  # (R, Kw)
    crop = y[ar[:, None, None], :, ih[:, :, None], iw[:, None, :]].permute(0, 3, 1, 2)  # (R, C_out, Kh, Kw)
    out = F.conv_transpose2d(crop, weight.to(y.dtype), stride=stride, dilation=dilation, groups=groups)
    _, Ci, OH, OW = out.shape
    HB, WB = full_hw
    # each row's window starts at (h0 * stride, w0 * stride) of the padded input map
    ph = h0[:, None] * stride[0] + torch.arange(OH, device=y.device)  # (R, OH)
    pw = w0[:, None] * stride[1] + torch.arange(OW, device=y.device)  # (R, OW)
    flat = (ph[:, :, None] * WB + pw[:, None, :]).reshape(R, 1, OH * OW).expand(R, Ci, OH * OW)
    buf = torch.zeros(R, Ci, HB * WB, dtype=y.dtype, device=y.device)
    buf.scatter_add_(2, flat, out.reshape(R, Ci, OH * OW))
    return buf.reshape(R, Ci, HB, WB)
