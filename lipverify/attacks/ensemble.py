"""Fixed-eps robust accuracy with an AutoAttack-style ensemble, every broken point checked in float64.

For each input the attacks run in order on what is still unbroken (AutoAttack's protocol, Croce and
Hein, ICML 2020):

1. APGD on the cross-entropy (``apgd_ce_restarts`` runs; :mod:`lipverify.attacks.apgd`);
2. APGD on the targeted DLR loss, one run per target among the ``apgd_targets`` classes with the
   highest logits at ``x`` (``apgd-t``);
3. FAB-T on the ``ensemble_fab_targets`` nearest classes, kept when its point lies inside the ball
   (``fab-t``);
4. multi-targeted PGD on the margin loss (``pgd``), the attack of :func:`lipverify.attacks.pgd.pgd_attack`.

An input counts as broken at ``eps`` only when the returned point ``z`` satisfies, evaluated in float64
on the returned tensor (:class:`lipverify.attacks.verify.Judge`): ``||z - x||_p <= eps``,
``lo <= z <= hi`` and ``max_{i != y} f_i(z) - f_y(z) > tau``.  Points outside the ball by a rounding
error are moved back in first.  ``found_by`` names the attack that broke each input (``"clean"`` when
the input is misclassified: float64 margin ``<= 0``).

Warnings
--------
Robust accuracy under attack is an *upper* bound on the true robust accuracy; an unbroken input is not
proven robust (only a certificate proves that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lipverify.attacks.apgd import apgd_attack
from lipverify.attacks.core import (
    Forward,
    bcast,
    check_norm,
    clip_rows,
    logits_of,
    per_example,
    prepare,
    ranked_targets,
)
from lipverify.attacks.fab import fab_targeted
from lipverify.attacks.pgd import pgd_attack
from lipverify.attacks.strength import get_strength
from lipverify.attacks.verify import Judge

__all__ = ["EnsembleResult", "ensemble_attack"]


@dataclass
class EnsembleResult:
    """Outcome of :func:`ensemble_attack`.

    Attributes
    ----------
    broken:
        ``(B,)`` bool, checked in float64 (see the module docstring).
    x_adv:
        ``(B, *input_shape)``: the breaking point (``x`` where none).
    margin:
        ``(B,)`` float64 margin ``f_y - max_{i != y} f_i`` at ``x_adv`` (float64 model).
    found_by:
        Per input: ``"clean"``, ``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"``, ``"pgd"`` or ``"none"``.
    tried:
        The attacks that ran, with their effort.
    """

    broken: torch.Tensor
    x_adv: torch.Tensor
    margin: torch.Tensor
    found_by: list
    tried: list = field(default_factory=list)
    precision: str = "float64"


def ensemble_attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    *,
    norm: str = "2",
    clip=None,
    strength="standard",
    generator: torch.Generator | None = None,
    forward64: Forward | None = None,
    progress=None,
) -> EnsembleResult:
    """Break as many inputs as possible inside ``B_p(x, eps) ∩ clip`` (see the module docstring).

    Parameters
    ----------
    forward:
        The model's forward pass ``(B, *input_shape) -> (B, m)`` (eval mode, rows independent).
    x, y:
        Inputs and labels; the attacks run in ``x``'s dtype and device.
    eps:
        A float or a per-example ``(B,)`` tensor.
    norm, clip:
        ``"2"`` or ``"inf"``; the input box ``(lo, hi)`` or ``None``.
    strength:
        ``"fast"``, ``"standard"``, ``"thorough"`` or a :class:`lipverify.attacks.strength.Strength`.
    generator:
        ``torch.Generator`` for the random starts.
    forward64:
        The float64 model (default: a float64 copy of ``forward`` when it is an ``nn.Module``).
    progress:
        Optional callable ``progress(name)`` called before each attack stage.
    """
    norm = check_norm(norm)
    st = get_strength(strength)
    x, y, B, clip = prepare(x, y, clip)
    eps_t = per_example(eps, B, x, "eps")
    judge = Judge(forward, x, clip, forward64)

    m0 = judge.margin(x, y)
    broken = m0 <= 0
    found_by = ["clean" if b else "none" for b in broken.tolist()]
    x_adv = x.clone()
    tried: list[str] = []

    def offer(name, idx, z):
        if idx.numel() == 0:
            return
        sub = judge.rows(idx)
        z = sub.snap_into_ball(x[idx], z, eps_t[idx], norm)
        ok = sub.genuine(x[idx], y[idx], z, norm, eps=eps_t[idx])
        if ok.any():
            bi = idx[ok]
            broken[bi] = True
            x_adv[bi] = z[ok]
            for i in bi.tolist():
                found_by[i] = name

    def remaining():
        return ((~broken) & (eps_t > 0)).nonzero().reshape(-1)

    with torch.no_grad():
        m_cls = logits_of(forward, x[:1]).shape[1] if B else 2

    # 1. APGD-CE
    for r in range(st.apgd_ce_restarts):
        idx = remaining()
        if idx.numel() == 0:
            break
        if progress:
            progress("apgd-ce")
        z, _ = apgd_attack(forward, x[idx], y[idx], eps_t[idx], norm=norm, clip=clip_rows(clip, idx, x.dim()),
                           loss="ce",
                           steps=st.apgd_steps, generator=generator, random_start=r > 0)
        offer("apgd-ce", idx, z)
    tried.append(f"apgd-ce ({st.apgd_steps} steps x {st.apgd_ce_restarts})")

    # 2. APGD-T (DLR) on the classes with the highest logits
    k = min(st.apgd_targets, m_cls - 1)
    if k > 0:
        idx = remaining()
        if idx.numel():
            with torch.no_grad():
                lg = logits_of(forward, x[idx])
            order = lg.scatter(1, y[idx].reshape(-1, 1), float("-inf")).argsort(dim=1, descending=True)[:, :k]
            for j in range(k):
                for r in range(st.apgd_target_restarts):
                    keep = ~broken[idx]
                    sub, tgt = idx[keep], order[keep, j]
                    if sub.numel() == 0:
                        break
                    if progress:
                        progress("apgd-t")
                    z, _ = apgd_attack(forward, x[sub], y[sub], eps_t[sub], norm=norm,
                                       clip=clip_rows(clip, sub, x.dim()), loss="dlr-t",
                                       target=tgt, steps=st.apgd_steps, generator=generator, random_start=r > 0)
                    offer("apgd-t", sub, z)
        tried.append(f"apgd-t ({st.apgd_steps} steps, {k} targets x {st.apgd_target_restarts})")

    # 3. FAB-T: a minimum-norm point that falls inside the ball breaks the input
    kf = min(st.ensemble_fab_targets, m_cls - 1)
    if kf > 0 and st.fab_steps > 0:
        idx = remaining()
        if idx.numel():
            if progress:
                progress("fab-t")
            ranked = ranked_targets(forward, x[idx], y[idx], norm, max_candidates=max(kf, 10))[:, :kf]
            for j in range(kf):
                keep = ~broken[idx]
                sub = idx[keep]
                if sub.numel() == 0:
                    break
                r, z = fab_targeted(forward, x[sub], y[sub], ranked[keep, j], norm=norm,
                                    clip=clip_rows(clip, sub, x.dim()),
                                    steps=st.fab_steps, restarts=1, generator=generator)
                inside = torch.isfinite(r) & (r <= eps_t[sub] * (1 + 1e-6))
                offer("fab-t", sub[inside], z[inside])
        tried.append(f"fab-t ({st.fab_steps} steps, {kf} targets)")

    # 4. multi-targeted PGD on the margin loss
    idx = remaining()
    if idx.numel():
        if progress:
            progress("pgd")
        res = pgd_attack(forward, x[idx], y[idx], eps_t[idx], norm=norm, steps=st.apgd_steps,
                         restarts=max(2, st.bisect_restarts), clip=clip_rows(clip, idx, x.dim()),
                         generator=generator)
        offer("pgd", idx, res.x_adv)
    tried.append(f"pgd ({st.apgd_steps} steps x {max(2, st.bisect_restarts)} restarts)")

    x_adv = torch.where(bcast(broken, x_adv), x_adv, x)
    margin = judge.margin(x_adv, y)
    return EnsembleResult(broken=broken, x_adv=x_adv, margin=margin, found_by=found_by, tried=tried,
                          precision=judge.precision)
