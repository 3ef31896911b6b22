"""l-inf distance nets (Zhang, Cai, Lu, He and Wang, "Towards certifying l-inf robustness using neural
networks with l-inf-dist neurons", ICML 2021; SPEC section 9).

A neuron computes ``u(x) = ||x - w||_p + b``.  For ``p = inf`` it is 1-Lipschitz in l-inf
(``| ||x - w||_inf - ||x' - w||_inf | <= ||x - x'||_inf`` by the triangle inequality), so a layer of
them maps l-inf balls into l-inf balls and the whole net is 1-Lipschitz from l-inf to l-inf; the
logits are the negated outputs of the last layer, and ``x`` is certified at radius ``eps`` iff it is
correctly classified and ``margin > 2 eps`` (``f_y - f_i`` changes by at most ``2 ||dx||_inf``).  For a
finite ``p`` (the lp relaxation used in training) the neuron is 1-Lipschitz from l-p, and from l-inf
only ``d^(1/p)``-Lipschitz (``||z||_p <= d^(1/p) ||z||_inf``), ``d`` the fan-in.

Hidden layers are followed by mean-shift normalisation (:class:`MeanShift`: subtract the batch mean in
training, the running mean in evaluation; no variance, no affine), a shift that keeps the constant 1.

Implementation (:class:`LinfDist`): the ``batch x out x in`` difference tensor is never materialised
whole.  For ``p = inf`` the pairwise distances come from ``torch.cdist`` (no difference tensor; the
gradient flows through the arg-max entry only, as for ``amax |x - w|``); for a finite ``p`` outputs are
processed in chunks of at most ``MAX_ELEMENTS`` entries and the norm is computed as
``m (sum (|z| / m)^p)^(1/p)`` with ``m = max |z|``, so large ``p`` never overflows.

Warnings
--------
Certificates are valid in l-inf only, with ``p = inf`` in every layer and the network in evaluation
mode (:meth:`LinfDistNet.eval`): lipverify refuses other norms and finite ``p``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LinfDist", "LinfDistNet", "MeanShift", "MAX_ELEMENTS"]

#: the largest difference tensor (entries) one chunk materialises
MAX_ELEMENTS = 1 << 22


def _lp_dist(z: torch.Tensor, p: float) -> torch.Tensor:
    """``||z||_p`` over the last axis; ``p = inf`` by the max, finite ``p`` normalised by the max."""
    a = z.abs()
    if math.isinf(p):
        return a.amax(dim=-1)
    m = a.amax(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(a.dtype).tiny)
    return m.squeeze(-1) * ((a / m) ** p).sum(dim=-1) ** (1.0 / p)


class LinfDist(nn.Module):
    """A layer of ``out_features`` l-p distance neurons ``||x - w_j||_p + b_j`` (``p = inf`` by default)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = math.inf):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        w = self.weight.to(x)
        if math.isinf(self.p):
            # torch.cdist computes the pairwise l-inf distances without the difference tensor, and its
            # gradient is the arg-max entry's (the same as the max of the differences)
            y = torch.cdist(x[None], w[None], p=math.inf)[0]
        else:
            chunk = max(1, MAX_ELEMENTS // max(1, x.shape[0] * self.in_features))
            outs = [_lp_dist(x[:, None, :] - w[None, s:s + chunk, :], self.p)
                    for s in range(0, self.out_features, chunk)]
            y = torch.cat(outs, dim=1)
        return y if self.bias is None else y + self.bias.to(y)

    def lipschitz_inf(self) -> float:
        """Constant from l-inf to l-inf: 1 for ``p = inf``, ``in_features^(1/p)`` otherwise."""
        return 1.0 if math.isinf(self.p) else float(self.in_features) ** (1.0 / self.p)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, p={self.p:g}"


class MeanShift(nn.Module):
    """Subtract the per-feature batch mean (training) or the running mean (evaluation)."""

    def __init__(self, features: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("running_mean", torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach().to(self.running_mean))
            return x - mean
        return x - self.running_mean.to(x.dtype)


class LinfDistNet(nn.Module):
    """``depth`` l-inf distance layers of ``width`` neurons (mean shift after each hidden one); logits are
    the negated outputs of the last layer (``n_classes`` neurons with a bias)."""

    def __init__(self, in_features: int, depth: int = 5, width: int = 128, n_classes: int = 10):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError("linf-dist nets need depth >= 1 and width >= 1")
        layers: list[nn.Module] = []
        d = int(in_features)
        for _ in range(depth - 1):
            layers += [LinfDist(d, width, bias=False), MeanShift(width)]
            d = width
        self.hidden = nn.Sequential(*layers)
        self.out = LinfDist(d, n_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.out(self.hidden(x.reshape(x.shape[0], -1)))

    def set_p(self, p: float) -> None:
        """The lp relaxation's exponent in every layer (``inf`` for certification)."""
        for m in self.modules():
            if isinstance(m, LinfDist):
                m.p = float(p)

    @property
    def p(self) -> float:
        return self.out.p
