"""Small networks and oracle helpers shared by several test modules (not a test module itself)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class Mixed(nn.Module):
    """Convolutions, max pooling with ceil mode, a residual sum and a concatenation, one activation kind."""

    def __init__(self, act):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.c3 = nn.Conv2d(4, 2, 3, stride=2)
        self.fc = nn.Linear(66, 5)
        self.act = act

    def forward(self, x):
        h = self.act(self.c1(x))
        h = h + self.act(self.c2(h))  # residual sum
        p = self.pool(h)
        z = self.act(self.c3(p))
        return self.fc(torch.cat([z.flatten(1), p.flatten(1)], 1))  # concatenation


def interval_inputs(lm, x, eps, p, rows=None):
    """Float64 interval bounds of every node on the balls (as lists by node), float64 ops and the margin
    directions ``(C, I, J)``: the inputs of the Jacobian bound functions."""
    from lipverify.bounds.jacobian import pair_directions
    from lipverify.bounds.local import preactivation_bounds
    from lipverify.bounds.crown import float64_ops

    g = lm.graph
    pb = preactivation_bounds(g, x, eps, p)
    n = len(g.nodes)
    lbs = [pb[i][0] if i in pb else None for i in range(n)]
    ubs = [pb[i][1] if i in pb else None for i in range(n)]
    m = int(np.prod(g.nodes[g.output].out_shape))
    return lbs, ubs, float64_ops(g, x.device, {}), pair_directions(m, rows, x.shape[0]), pb


def jacobian_spectral_lower_bound(m64, shape, n=2, seed=0):
    """max over ``n`` sampled x in [0,1]^d of ||J(x)||_2: exact SVD of the autograd Jacobian of the
    float64 module ``m64``."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(n):
        x = torch.rand((1,) + tuple(shape), generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda z: m64(z).reshape(-1), x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    return best


def one_hidden_layer(p):
    """``(lm, W1, b1, W2, x, eps)``: a 4-7-3 ReLU net (seed 3), its float64 weights as arrays, five
    centres and the radius used for norm ``p``."""
    import lipverify

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    lm = lipverify.load(net, input_shape=(4,))
    W1 = net[0].weight.detach().double().numpy()
    b1 = net[0].bias.detach().double().numpy()
    W2 = net[2].weight.detach().double().numpy()
    x = torch.rand(5, 4, dtype=torch.float64)
    return lm, W1, b1, W2, x, (0.25 if p == "2" else 0.12)
