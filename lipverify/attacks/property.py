"""Counterexample search for general output properties on an input box.

A property (``C``, ``d``, ``disjuncts``; see :class:`lipverify.data.properties.OutputProperty`) is
violated at ``z`` when some disjunct ``D`` has ``C_k . f(z) >= d_k`` for every ``k`` in ``D``.  For
each input and each of its ``max_disjuncts`` disjuncts with the smallest slack at the centre, this
minimises the disjunct's slack ``s_D(z) = max_{k in D} (d_k - C_k . f(z))`` over the box with signed
gradient steps (the steepest descent of the l-inf geometry of a box), a cosine step schedule from a
quarter of the box width, and restarts from the centre, the box corners the gradient points to, and
uniform points of the box.  Every step's point is projected onto the box, and the lowest slack seen is
kept (so a point that satisfies the disjunct keeps being deepened).  The slack is recomputed by the
float64 forward pass when given: ``slack <= 0`` there is what a counterexample needs.

Uses only the model's forward pass.

Warnings
--------
A gradient attack can miss counterexamples (a property with ``found = False`` is not proven); it
finds nothing on a model whose forward pass has no gradient except by the corner and uniform starts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lipverify.attacks.core import Forward, grad_of, logits_of

__all__ = ["PropertyAttackResult", "property_attack"]


class PropertyAttackResult:
    """``z`` (best point per input, same dtype as ``x``), ``slack`` (float64; ``<= 0``: counterexample),
    ``found`` (bool), ``disjunct`` (index of the disjunct the point satisfies best)."""

    def __init__(self, z, slack, found, disjunct):
        self.z, self.slack, self.found, self.disjunct = z, slack, found, disjunct


def _disjunct_slack(out: torch.Tensor, C: torch.Tensor, d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``max_{k valid} (d_k - C_k . out)`` per row; ``C`` (B, R, m), ``d``/``valid`` (B, R)."""
    gap = d - torch.einsum("brm,bm->br", C, out.reshape(len(out), -1).to(C.dtype))
    return torch.where(valid, gap, torch.full_like(gap, -math.inf)).amax(dim=1)


def property_attack(forward: Forward, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, properties: Sequence,
                    steps: int = 100, restarts: int = 2, max_disjuncts: int = 10, seed: int = 0,
                    forward64: Forward | None = None, batch_size: int = 128) -> PropertyAttackResult:
    """Search each box ``[lo[i], hi[i]]`` for a point violating ``properties[i]`` (see the module docstring)."""
    n = len(x)
    dev = x.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    f64 = forward64 or forward
    with torch.no_grad():
        out0 = logits_of(f64, x.to(torch.float64) if forward64 is not None else x).double().cpu()
    # (example, disjunct) pairs, the disjuncts nearest to satisfied first
    pairs = []
    for i, p in enumerate(properties):
        C = torch.as_tensor(p.C, dtype=torch.float64)
        d = torch.as_tensor(p.d, dtype=torch.float64)
        gap = d - C @ out0[i]
        order = sorted(range(len(p.disjuncts)), key=lambda j: float(gap[p.disjuncts[j]].max()))
        for j in order[:max_disjuncts]:
            pairs.append((i, j))
    R = max((len(properties[i].disjuncts[j]) for i, j in pairs), default=1)
    m = out0.shape[1]
    best_z = x.clone()
    best_s = torch.full((n,), math.inf, dtype=torch.float64)
    best_j = torch.full((n,), -1, dtype=torch.long)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        B = len(chunk)
        C = torch.zeros(B, R, m, dtype=torch.float64)
        d = torch.zeros(B, R, dtype=torch.float64)
        valid = torch.zeros(B, R, dtype=torch.bool)
        for b, (i, j) in enumerate(chunk):
            rows = properties[i].disjuncts[j]
            C[b, :len(rows)] = torch.as_tensor(properties[i].C[rows], dtype=torch.float64)
            d[b, :len(rows)] = torch.as_tensor(properties[i].d[rows], dtype=torch.float64)
            valid[b, :len(rows)] = True
        ex = torch.tensor([i for i, _ in chunk])
        xl, ll, hl = x[ex.to(dev)], lo[ex.to(dev)].to(x.dtype), hi[ex.to(dev)].to(x.dtype)
        Cd, dd, vd = C.to(dev, x.dtype), d.to(dev, x.dtype), valid.to(dev)
        width = (hl - ll)
        for r in range(restarts + 2):
            if r == 0:
                z = xl.clone()
            elif r == 1:  # the corner the gradient at the centre points to
                zg = xl.clone().requires_grad_(True)
                g = grad_of(_disjunct_slack(forward(zg), Cd, dd, vd), zg)
                z = torch.where(g < 0, hl, torch.where(g > 0, ll, xl)).detach()
            else:
                z = ll + torch.rand(xl.shape, generator=gen).to(dev, x.dtype) * width
            for t in range(steps + 1):
                z = z.detach().requires_grad_(True)
                sl = _disjunct_slack(forward(z), Cd, dd, vd)
                _keep(best_z, best_s, best_j, ex, [j for _, j in chunk], z.detach(), f64, forward64, C, d, valid)
                if t == steps:
                    break
                g = grad_of(sl, z)
                alpha = 0.25 * width * 0.5 * (1 + math.cos(math.pi * t / steps)) + 1e-3 * width
                z = torch.maximum(torch.minimum(z.detach() - alpha * g.sign(), hl), ll)
    found = best_s <= 0
    return PropertyAttackResult(best_z, best_s, found, best_j)


def _keep(best_z, best_s, best_j, ex, js, z, f64, forward64, C, d, valid):
    """Keep, per input, the point with the lowest float64 slack over all its (disjunct) rows."""
    with torch.no_grad():
        out = logits_of(f64, z.to(torch.float64) if forward64 is not None else z).double().cpu()
    s = _disjunct_slack(out, C, d, valid)
    for b in range(len(ex)):
        i = int(ex[b])
        if float(s[b]) < float(best_s[i]):
            best_s[i] = s[b]
            best_z[i] = z[b].to(best_z.dtype)
            best_j[i] = js[b]
