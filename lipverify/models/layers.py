"""Lipschitz-friendly building blocks used by the model zoo.

``MinMax``
    GroupSort with group size 2 (Anil, Lucas and Grosse, "Sorting out Lipschitz function
    approximation", ICML 2019), also called MaxMin.  Used as the activation of GloRo nets
    (Leino et al. 2021) and LiResNets (Hu et al. 2023).

``LastLayerNormalizedLinear`` ("LLN")
    A dense layer whose class rows are rescaled to unit l2 norm in the forward pass (Singla et al.
    2022; used as the head of LiResNet, Hu et al. 2023).

Both modules are written with plain tensor operations so that ``torch.fx.symbolic_trace`` sees
through them and ``torch.onnx.export(..., dynamo=False, opset_version=17)`` produces a graph made of
standard ONNX operators (Reshape, Gather, Max, Min, Concat / Gemm) that onnx2torch and onnxruntime
both read back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MinMax", "LastLayerNormalizedLinear"]


class MinMax(nn.Module):
    r"""GroupSort-2 ("MaxMin") activation over the channel dimension (dim 1).

    For an input of shape ``(B, C, *rest)`` with ``C`` even, channels are taken in consecutive
    pairs ``(2k, 2k+1)`` and each pair is sorted in decreasing order:

    .. math::
        y_{2k} = \max(x_{2k}, x_{2k+1}), \qquad y_{2k+1} = \min(x_{2k}, x_{2k+1}),

    independently at every batch element and spatial position.

    Lipschitz constant.  At every input the output is a *permutation* of the input entries (each
    pair is either kept or swapped), and the map is continuous and piecewise linear with pieces that
    are permutation matrices.  A continuous piecewise-linear map is Lipschitz with the largest
    operator norm of its pieces, and every permutation matrix is an isometry for every l_p norm, so
    ``Lip_2(MinMax) = Lip_inf(MinMax) = 1`` (Anil et al. 2019, Sec. 4).  Unlike ReLU, MinMax is
    also gradient-norm preserving almost everywhere, which is why it certifies better in Lipschitz-
    margin training (GloRo, Leino et al. 2021).

    Implementation: the even channels ``x[:, 0::2]`` and the odd channels ``x[:, 1::2]`` are
    compared element-wise (max and min), stacked on a new pair axis ``(B, C/2, 2, ...)`` and that
    axis is flattened back into the channels.  This exports to ONNX as
    Slice / Max / Min / Unsqueeze / Concat / Reshape (or Flatten for 2-D inputs).

    Raises ``ValueError`` when ``C`` is odd.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        # Under torch.fx symbolic tracing the size is a Proxy, and under torch.jit / ONNX tracing the
        # check would be recorded as graph ops; in both cases it is skipped (the ops below still fail
        # on an odd C, since the two slices then differ in length).
        if isinstance(channels, int) and not torch.jit.is_tracing() and channels % 2 != 0:
            raise ValueError(
                f"MinMax needs an even number of channels (dim 1), got {channels} "
                f"for an input of shape {tuple(x.shape)}"
            )
        first = x[:, 0::2]
        second = x[:, 1::2]
        hi = torch.maximum(first, second)
        lo = torch.minimum(first, second)
        # (B, C/2, 2, ...) -> (B, C, ...): channel 2k <- hi[k], channel 2k+1 <- lo[k].
        return torch.stack((hi, lo), dim=2).flatten(1, 2)

    def extra_repr(self) -> str:
        return "group_size=2, dim=1"


class LastLayerNormalizedLinear(nn.Linear):
    r"""Dense layer with last-layer normalisation ("LLN"), the head of LiResNet.

    The stored weight ``W`` (shape ``m x d``, one row per class) is used in the forward pass with
    every row divided by its l2 norm:

    .. math::
        f_i(h) = \frac{\langle W_i, h \rangle}{\lVert W_i \rVert_2} + b_i .

    Normalising each class row bounds the margin constants of the head by
    ``|| W_j/||W_j|| - W_i/||W_i|| ||_2 <= 2`` and removes the scale freedom of the last layer,
    which makes Lipschitz-margin training better conditioned (Singla, Singla and Feizi, "Improved
    deterministic l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022; used as the LiResNet head by
    Hu et al., "Unlocking deterministic robustness certification on ImageNet", NeurIPS 2023).

    ``normalized_weight()`` returns the effective weight; it is what a Lipschitz analysis must use.
    ``eps`` (added to each row norm) guards against a zero row.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-12,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = float(eps)

    def normalized_weight(self) -> torch.Tensor:
        """The weight with every row scaled to unit l2 norm (the operator actually applied)."""
        # ``norm + eps`` rather than a clamp: it keeps every row norm <= 1 (so bounds that assume
        # unit rows stay valid) and the ONNX exporter constant-folds the whole expression, so the
        # exported head is a single Gemm with the normalised weight.
        norms = self.weight.norm(p=2, dim=1, keepdim=True) + self.eps
        return self.weight / norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", row_normalized=True"
