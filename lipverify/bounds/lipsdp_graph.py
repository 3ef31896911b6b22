"""LipSDP on an imported model: extract ``x -> W_L phi(... phi(W_0 x))`` from the Lipschitz graph.

Applies to chains of affine operators and slope-restricted element-wise activations (ReLU, leaky ReLU,
tanh, sigmoid, ...): every affine operator (dense, or a convolution / merged chain small enough to
materialise) becomes a dense matrix; the activation slopes ``[alpha, beta]`` are the widest range over
all activations.  Anything else (max pooling, residual adds, MinMax, concatenation) is refused with a
message: LipSDP-Neuron as formulated by Fazlyab et al. (2019) does not cover it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lipverify.errors import UserInputError
from lipverify.results import BoundsReport, ValueWithMethod

#: largest operator materialised for LipSDP (entries)
MAX_MATRIX_ENTRIES = 4_000_000


def extract_weights(graph, what: str = "LipSDP") -> tuple[list[np.ndarray], float, float]:
    """Dense matrices and the slope range of the network, or UserInputError if not applicable
    (``what`` names the method in the message)."""
    nodes = graph.nodes
    order = []
    i = graph.output
    while i != 0:
        n = nodes[i]
        if len(n.inputs) != 1 or n.kind not in ("linear", "activation"):
            raise UserInputError(f"{what} needs a chain of affine layers and element-wise activations; node "
                                 f"{n.name} is {n.describe()}")
        order.append(n)
        i = n.inputs[0]
    order.reverse()
    weights, lo, hi = [], None, None
    pending = None
    for n in order:
        if n.kind == "linear":
            op = n.op.to_double_copy()
            if op.in_dim * op.out_dim > MAX_MATRIX_ENTRIES:
                raise UserInputError(f"{what}: layer {n.name} ({op.out_dim}x{op.in_dim}) is too large to "
                                     "materialise")
            with torch.no_grad():
                M = op.matrix().cpu().numpy()
            pending = M if pending is None else M @ pending
        else:
            if pending is None:
                raise UserInputError(f"{what}: the network must start with an affine layer")
            weights.append(pending)
            pending = None
            a = n.op
            lo = a.lo if lo is None else min(lo, a.lo)
            hi = a.hi if hi is None else max(hi, a.hi)
    if pending is None:
        raise UserInputError(f"{what}: the network must end with an affine layer")
    weights.append(pending)
    if lo is None:
        lo, hi = 0.0, 1.0
    return weights, float(lo), float(hi)


def chain_report(lm, norm: str = "2", method: str = "eclipse") -> BoundsReport:
    """``lipverify bounds --method eclipse-fast|eclipse``: the sound per-layer report with the
    compositional bound of :mod:`lipverify.bounds.eclipse` as the global bound (when smaller)."""
    if norm != "2":
        raise UserInputError(f"{method} bounds the l2 Lipschitz constant: use --norm 2")
    from lipverify.bounds.eclipse import eclipse, eclipse_fast

    t0 = time.perf_counter()
    rep = lm.bounds("2", "sound")
    weights, lo, hi = extract_weights(lm.graph, what=method)
    res = (eclipse_fast if method == "eclipse-fast" else eclipse)(weights, alpha=lo, beta=hi)
    product = rep.global_bound
    label = f"{res.method}; slopes in [{lo:g}, {hi:g}]"
    if res.sound and res.value < product.value:
        rep.global_bound = ValueWithMethod(res.value, label, True)
    else:
        rep.notes.append(f"{method} gave {res.value:.6g} ({label}); the product bound {product.value:.6g} is kept")
    rep.notes.append(f"product of layer norms: {product.value:.6g}; {method} time {res.time_s:.2f} s")
    rep.method = method
    rep.time_s = time.perf_counter() - t0
    return rep


def lipsdp_report(lm, norm: str = "2", form: str = "neuron") -> BoundsReport:
    """``lipverify bounds --method lipsdp``: the sound per-layer report with the LipSDP global bound."""
    if norm != "2":
        raise UserInputError("LipSDP bounds the l2 Lipschitz constant: use --norm 2")
    from lipverify.bounds.lipsdp import lipsdp

    t0 = time.perf_counter()
    rep = lm.bounds("2", "sound")
    weights, lo, hi = extract_weights(lm.graph)
    res = lipsdp(weights, form=form, alpha=lo, beta=hi)
    product = rep.global_bound
    method = f"{res.method}; slopes in [{lo:g}, {hi:g}]; {res.status}"
    if res.sound and res.value < product.value:
        rep.global_bound = ValueWithMethod(res.value, method, True)
    else:
        rep.notes.append(f"LipSDP gave {res.value:.6g} ({method}, sound={res.sound}); "
                         f"the product bound {product.value:.6g} is kept")
    rep.notes.append(f"product of layer norms: {product.value:.6g}; LipSDP solve time {res.solve_time:.2f} s")
    rep.method = "lipsdp"
    rep.time_s = time.perf_counter() - t0
    return rep
