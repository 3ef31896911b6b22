"""Certificates for general output properties on an input box (VNN-LIB specifications).

A specification gives a box ``[lo, hi]`` and a counterexample condition
``OR_D AND_{k in D} C_k . f(x) >= d_k`` (:class:`lipverify.data.properties.OutputProperty`).  With
``K_k`` a bound on the Lipschitz constant of ``x -> C_k . f(x)`` (the affine tail's row ``C_k^T T``
times the bound of the rest, :func:`lipverify.bounds.global_bound.property_constants`) and ``x`` the
point the specification is centred on::

    sup_{z in box} C_k . f(z) <= C_k . f(x) + r K_k,     r = || max(x - lo, hi - x) ||

(the distance from ``x`` to the farthest corner of the box in the certified norm; computed from the
float32 ``x`` the model is evaluated on and the float64 box, so the ball of radius ``r`` contains the
box exactly).  The property is certified iff every disjunct has a row with
``C_k . f(x) + r K_k < d_k`` (strict: a tie is never certified).  The certified radius reported per
input is ``min_D max_{k in D} (d_k - C_k . f(x)) / K_k`` (0 when the clean point already satisfies a
disjunct).

``method="crown"`` (or ``"alpha-crown"``) bounds every row ``C_k . f`` over the box itself by linear
bound propagation (:mod:`lipverify.bounds.crown`) for the specifications the global constants leave
open; the radius reported stays the global one.

For the robustness forms (a label ``l`` against targets) ``method="local"`` additionally tries the
IBP-masked local constants ``K_lt(x, r)`` of :mod:`lipverify.certify.local` on the inputs the global
constants leave uncertified; general linear properties use the global constants only.

Warnings
--------
Certificates hold on the box only.  A model evaluated outside float64 (a float32 runtime) can differ
from the float64 logits this module uses by rounding; counterexample checks in
:mod:`lipverify.data.counterexamples` check both.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from lipverify.arguments import parse_norm
from lipverify.bounds.global_bound import describe_domain
from lipverify.certify.rules import CertifyResult, InputCertificate, check_certifiable, inside_domain

__all__ = ["box_radius", "certify_properties"]


def box_radius(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example distance (float64) from ``x`` to the farthest point of its box, slightly inflated
    (relative 1e-12) to cover the rounding of the subtraction."""
    x64 = x.to(torch.float64).reshape(len(x), -1)
    far = torch.maximum(x64 - lo.to(torch.float64).reshape(len(x), -1),
                        hi.to(torch.float64).reshape(len(x), -1) - x64).clamp_min(0.0)
    r = far.amax(dim=1) if norm == "inf" else torch.linalg.vector_norm(far, dim=1)
    return r * (1.0 + 1e-12)


def certify_properties(model, x: torch.Tensor, properties: Sequence, lower: torch.Tensor, upper: torch.Tensor,
                       norm: str = "inf", method: str = "global", batch_size: int = 256,
                       progress: Callable | None = None, names: Sequence[str] | None = None,
                       local_options: dict | None = None) -> CertifyResult:
    """Certify each ``properties[i]`` on the box ``[lower[i], upper[i]]`` around ``x[i]`` (units of ``x``).

    Returns a :class:`~lipverify.certify.rules.CertifyResult` with per-example eps: ``certified``
    means the property is proven on the whole box; ``margin`` is the property's slack at ``x``
    (``min_D max_k d_k - C_k . f(x)``; ``<= 0`` means ``x`` itself is a counterexample); ``vra`` is
    the fraction of specifications proven.
    """
    t0 = time.perf_counter()
    norm = parse_norm(norm)
    if method not in ("global", "local", "crown", "crown-ibp", "alpha-crown", "best"):
        from lipverify.errors import UserInputError

        raise UserInputError(f"method must be global, local, crown, crown-ibp, alpha-crown or best, got {method!r}")
    check_certifiable(model, norm)
    n = len(x)
    if len(properties) != n or len(lower) != n or len(upper) != n:
        raise ValueError("one property and one box per input are needed")
    r = box_radius(x, lower, upper, norm)
    module64 = model.module_double()
    outs = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].to(model.device, torch.float64)
            outs.append(module64(xb).reshape(len(xb), -1).cpu())
            if progress:
                progress(len(xb))
    out = torch.cat(outs)

    # one Lipschitz constant per distinct row over all specifications
    keys: dict[tuple, int] = {}
    rows = []
    where = []
    for p in properties:
        ids = []
        for c in p.C:
            key = tuple(float(v) for v in c)
            if key not in keys:
                keys[key] = len(rows)
                rows.append(np.asarray(c, dtype=np.float64))
            ids.append(keys[key])
        where.append(ids)
    pc = model.property_constants(torch.from_numpy(np.stack(rows)), norm)
    K_all = pc.K.cpu()

    pred = out.argmax(1)
    inputs = []
    certified = torch.zeros(n, dtype=torch.bool)
    radius = torch.zeros(n, dtype=torch.float64)
    slack0 = torch.zeros(n, dtype=torch.float64)
    for i, p in enumerate(properties):
        C = torch.from_numpy(p.C)
        d = torch.from_numpy(p.d)
        K = K_all[where[i]]
        gap = d - C @ out[i]  # d_k - C_k f(x)
        ok_rows = gap > r[i] * K
        certified[i] = all(bool(ok_rows[D].any()) for D in p.disjuncts)
        with torch.no_grad():
            ratio = torch.where(gap > 0, torch.where(K > 0, gap / K, torch.full_like(gap, math.inf)),
                                torch.full_like(gap, -math.inf))
        radius[i] = max(0.0, min(float(ratio[D].max()) for D in p.disjuncts))
        slack0[i] = min(float(gap[D].max()) for D in p.disjuncts)
    sound = [bool(pc.sound)] * n
    methods = ["global"] * n
    certified &= torch.tensor(sound)

    notes = [f"output properties certified on each box with {pc.method}"]
    dom = model.effective_domain()
    if dom is not None:
        inside = inside_domain(lower, dom, x) & inside_domain(upper, dom, x)
        certified &= inside
        notes.append(f"the model's constants hold on the input domain {describe_domain(dom)}: "
                     f"{int((~inside).sum())} box(es) reaching outside it are not certified")
    if method in ("local", "best"):
        certified, radius, methods, sound, note = _local(model, x, out, properties, r, certified, radius, methods,
                                                         sound, norm, local_options)
        notes.append(note)
    if method in ("crown", "crown-ibp", "alpha-crown", "best"):  # crown-ibp: CROWN itself on boxes
        t_c = time.perf_counter()
        k = _crown(model, x, properties, lower, upper, certified, methods, sound, 20 if method == "alpha-crown" else 0)
        notes.append(f"linear bound propagation ({'alpha-CROWN' if method == 'alpha-crown' else 'CROWN'}) over each "
                     f"box for {k} specifications the global constants left open ({time.perf_counter() - t_c:.3g} s)")

    cert_l, rad_l, slack_l, pred_l = certified.tolist(), radius.tolist(), slack0.tolist(), pred.tolist()
    for i, p in enumerate(properties):
        inputs.append(InputCertificate(i, -1 if p.label is None else int(p.label), pred_l[i], slack_l[i], rad_l[i],
                                       bool(cert_l[i]), methods[i], sound[i], {-1.0: bool(cert_l[i])},
                                       names[i] if names is not None else str(i)))
    counts: dict[str, int] = {}
    for c in inputs:
        if c.certified:
            counts[c.method] = counts.get(c.method, 0) + 1
    holds = slack0 > 0
    med = float(radius[holds].median()) if bool(holds.any()) else 0.0
    res = CertifyResult(n, norm, method, [], float(holds.double().mean()), {"per-example": float(certified.double().mean())},
                        inputs, counts, med, time.perf_counter() - t0, True, notes)
    notes.append("clean_accuracy is the fraction of specifications whose property holds at the centre point")
    return res


def _crown(model, x, properties, lower, upper, certified, methods, sound, alpha_steps: int) -> int:
    """CROWN upper bounds of every row ``C_k . f`` over the box itself; a disjunct is ruled out when some
    row's bound is below ``d_k``.  Updates ``certified``/``methods``/``sound``; returns how many
    specifications it examined."""
    from lipverify.bounds.crown import crown_bounds

    todo = [i for i in range(len(properties)) if not bool(certified[i])]
    for i in todo:
        p = properties[i]
        lo = lower[i:i + 1].to(torch.float64).reshape(1, *model.input_shape)
        hi = upper[i:i + 1].to(torch.float64).reshape(1, *model.input_shape)
        centre = (lo + hi) / 2
        half = float((hi - lo).max()) / 2
        C = -torch.from_numpy(np.asarray(p.C, dtype=np.float64))[None]  # lower bounds of -C f = -upper of C f
        neg_up, _, _ = crown_bounds(model.graph, centre, half, "inf", domain=(lo, hi), C=C, upper=False,
                                    alpha_steps=alpha_steps)
        up = -neg_up[0]
        d = torch.from_numpy(np.asarray(p.d, dtype=np.float64))
        ok = up < d
        if all(bool(ok[D].any()) for D in p.disjuncts):
            certified[i] = True
            methods[i] = "crown"
            sound[i] = True
    return len(todo)


def _local(model, x, out, properties, r, certified, radius, methods, sound, norm, options):
    """IBP-masked local constants for the robustness forms the global constants left uncertified."""
    from lipverify.certify.local import local_certify

    todo = [i for i, p in enumerate(properties) if p.label is not None and not bool(certified[i])]
    if not todo:
        return certified, radius, methods, sound, "local bounds: nothing left to certify"
    idx = torch.tensor(todo)
    m = out.shape[1]
    label = torch.tensor([int(properties[i].label) for i in todo])
    diffs = out[idx].gather(1, label[:, None]) - out[idx]
    mask = torch.zeros(len(todo), m, dtype=torch.bool)
    for k, i in enumerate(todo):
        mask[k, properties[i].targets] = True
    cert_at = {-1.0: torch.zeros(len(todo), dtype=torch.bool)}
    loc = local_certify(model, x[idx], label, diffs, mask, radius[idx].clone(), r[idx], norm, cert_at, [], True,
                        **(options or {}))
    for k, (r_loc, snd, at) in loc.items():
        i = todo[k]
        if r_loc > radius[i]:
            radius[i] = r_loc
            methods[i] = "local" if snd else "local (estimate)"
            sound[i] = snd
        if at.get(-1.0) and snd:
            certified[i] = True
            methods[i] = "local"
            sound[i] = True
    return certified, radius, methods, sound, f"local bounds computed for {len(loc)} specifications"
