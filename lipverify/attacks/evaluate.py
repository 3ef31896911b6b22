"""Empirical robustness of a data set: one adversarial radius per input, robust accuracy per eps.

:func:`evaluate_robustness` runs, in batches,

1. the minimum-norm escalation (:func:`lipverify.attacks.minnorm.min_norm_radius`) for ``r_adv(x)``;
2. for every requested ``eps``, the AutoAttack-style ensemble
   (:func:`lipverify.attacks.ensemble.ensemble_attack`) on the inputs with ``r_adv(x) > eps``.

A point the ensemble finds lies in the eps-ball, so its norm is a smaller adversarial radius:
``r_adv`` becomes the minimum of both.  After that, by construction,

    broken at eps  <=>  r_adv(x) <= eps,

so the robust accuracy (``correct and r_adv > eps``) and the radii in one result never contradict each
other, and the single point ``x_adv`` per input is the witness for every eps it breaks.  Every point has
passed the float64 judge (:mod:`lipverify.attacks.verify`).

Warnings
--------
Attacks give upper bounds: robust accuracy under attack is at least the true robust accuracy, and
``r_adv`` at least the true robust radius.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lipverify.arguments import eps_key, parse_eps, parse_norm
from lipverify.attacks.core import Forward, clip_rows
from lipverify.attacks.ensemble import ensemble_attack
from lipverify.attacks.minnorm import min_norm_radius
from lipverify.attacks.strength import get_strength
from lipverify.attacks.verify import Judge

__all__ = ["RobustnessReport", "evaluate_robustness"]


#: share of a batch's progress for the minimum-norm stage and the ensemble stages (per eps): the
#: fraction of the work done after each sub-stage (:func:`evaluate_robustness`, ``progress``)
MINNORM_DONE = {"fmn": 0.3, "fab-t": 0.5, "ddn": 0.65, "pgd-bisection": 0.95, "box-search": 1.0}
ENSEMBLE_DONE = {"apgd-ce": 0.0, "apgd-t": 0.3, "fab-t": 0.8, "pgd": 0.9}


@dataclass
class RobustnessReport:
    """Result of :func:`evaluate_robustness`; ``to_dict()`` is the ``lipverify attack --json`` object.

    ``robust_accuracy`` is keyed by the float radii (``rep.robust_accuracy[0.5]``), the JSON by
    :func:`lipverify.arguments.eps_key` strings (``"0.5"``).  ``repr()`` is one line of summary.
    """

    n: int
    norm: str
    clip: object
    strength: str
    eps: list
    labels: torch.Tensor
    pred: torch.Tensor
    radius: torch.Tensor          # float64 (N,), inf where nothing was found, 0 for misclassified inputs
    x_adv: torch.Tensor           # (N, *input_shape), x where nothing was found
    margin: torch.Tensor          # float64 margin at x_adv (float64 model)
    found_by: list
    tried: list
    precision: str
    time_s: float
    names: list | None = None
    notes: list = field(default_factory=list)
    #: seconds including loading the model and data (set by the command line; None from the API)
    total_time_s: float | None = None
    #: the labelled time line of the command (``time 250 s (load 3.1 s, attack 247 s)``)
    time_label: str | None = None

    def __repr__(self) -> str:
        ra = ", ".join(f"{_eps_short(k)}: {v:.4g}" for k, v in list(self.robust_accuracy.items())[:4])
        more = ", ..." if len(self.eps) > 4 else ""
        clip = self.clip if not isinstance(self.clip, tuple) or not isinstance(self.clip[0], torch.Tensor) \
            else "per-coordinate box"
        return (f"RobustnessReport(n={self.n}, norm={self.norm!r}, clip={clip}, strength={self.strength!r}, "
                f"clean_accuracy={self.clean_accuracy:.4g}, robust_accuracy={{{ra}{more}}}, "
                f"median_radius={self.median_radius:.6g}, time_s={self.time_s:.3g})")

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.labels

    def broken_at(self, eps: float) -> torch.Tensor:
        return self.radius <= eps

    @property
    def robust_accuracy(self) -> dict:
        """eps (float) -> fraction of inputs correctly classified and not broken at eps."""
        c = self.correct
        return {float(e): float((c & ~self.broken_at(e)).double().mean()) if self.n else 0.0 for e in self.eps}

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.double().mean()) if self.n else 0.0

    @property
    def median_radius(self) -> float:
        c = self.correct
        return float(self.radius[c].median()) if bool(c.any()) else 0.0

    def found_by_counts(self) -> dict:
        out: dict = {}
        for s in self.found_by:
            out[s] = out.get(s, 0) + 1
        return out

    def inputs(self) -> list:
        r = self.radius.tolist()
        lab, pr = self.labels.tolist(), self.pred.tolist()
        rows = []
        for i in range(self.n):
            row = {"index": i, "label": lab[i], "pred": pr[i], "r_adv": r[i] if math.isfinite(r[i]) else "inf",
                   "found_by": self.found_by[i],
                   "broken": {eps_key(e): r[i] <= e for e in self.eps}}
            if self.names is not None:
                row["name"] = self.names[i]
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"n": self.n, "norm": self.norm, "clip": self.clip if not isinstance(self.clip, tuple) or
                not isinstance(self.clip[0], torch.Tensor) else "per-coordinate box",
                "strength": self.strength, "eps": list(self.eps), "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": {eps_key(k): v for k, v in self.robust_accuracy.items()},
                "median_adversarial_radius": self.median_radius,
                "found_by": self.found_by_counts(), "tried": list(self.tried), "precision": self.precision,
                "time_s": self.time_s,
                **({} if self.total_time_s is None else {"total_time_s": self.total_time_s}),
                **({} if self.time_label is None else {"time_label": self.time_label}),
                "inputs": self.inputs(), "notes": list(self.notes)}


class _Share:
    """A batch of ``k`` inputs' share of a progress bar, advanced in whole inputs to a fraction done
    (never back; all ``k`` once at 1.0)."""

    def __init__(self, progress, k: int):
        self.progress, self.k, self.done = progress, k, 0

    def to(self, frac: float) -> None:
        want = self.k if frac >= 1.0 else min(self.k - 1, int(self.k * frac))
        if self.progress and want > self.done:
            self.progress(want - self.done)
        self.done = max(self.done, want)


def evaluate_robustness(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    eps=(),
    *,
    norm: str = "2",
    clip=None,
    strength="standard",
    batch_size: int = 256,
    seed: int = 0,
    forward64: Forward | None = None,
    max_eps=None,
    progress=None,
    names=None,
    index_offset: int = 0,
) -> RobustnessReport:
    """Adversarial radius per input and robust accuracy per eps (see the module docstring).

    Parameters
    ----------
    forward, forward64:
        The model (rows independent, eval mode) and optionally its float64 copy.
    x, y:
        Inputs ``(N, *input_shape)`` on the model's device and integer labels.
    eps:
        Radii for the robust accuracy (may be empty).
    clip:
        ``None``, ``(lo, hi)`` floats, or ``(lo, hi)`` tensors of shape ``(N, *input_shape)`` (a
        per-input box, e.g. a VNN-LIB specification's): sliced with the batches.
    strength:
        Effort preset (:mod:`lipverify.attacks.strength`).
    progress:
        Optional callable ``progress(k)``, advanced by ``N * (1 + len(eps))`` in all (one share per
        input for the minimum-norm stage and one per eps), within each batch in whole inputs after each
        sub-attack (:data:`MINNORM_DONE`, :data:`ENSEMBLE_DONE`); it reaches its total when the last
        batch is done.
    index_offset:
        The index of ``x[0]`` in the whole data set.  Every batch draws its random numbers from its own
        generator seeded with ``seed`` and the index of its first input, so a shard of the data that
        starts at a multiple of ``batch_size`` (``torchrun``, :mod:`lipverify.attacks.sharded`) gets the
        same results as the same inputs in one process.
    """
    norm = parse_norm(norm)
    st = get_strength(strength)
    t0 = time.perf_counter()
    eps = sorted(set(parse_eps(eps)))
    N = x.shape[0]
    y = y.to(device=x.device, dtype=torch.long).reshape(-1)
    if forward64 is None:
        forward64 = Judge(forward, x[:1], None).forward64

    def box(s, e):
        return clip_rows(clip, torch.arange(s, e, device=x.device), x.dim())

    def gen(start: int, stage: int) -> torch.Generator:
        """The generator of the batch starting at global index ``start`` in stage ``stage``."""
        return torch.Generator(device=x.device if x.device.type != "mps" else "cpu").manual_seed(
            (seed * 1_000_003 + (index_offset + start) * 1_009 + stage) % (2 ** 63))

    radius = torch.full((N,), math.inf, dtype=torch.float64, device=x.device)
    x_adv = x.clone()
    found_by = ["none"] * N
    tried: list = []
    precision = "float64"
    with torch.no_grad():
        pred = torch.cat([forward(x[s:s + batch_size]).reshape(min(batch_size, N - s), -1).argmax(1)
                          for s in range(0, N, batch_size)]) if N else torch.zeros(0, dtype=torch.long)
    for s in range(0, N, batch_size):
        e_ = min(s + batch_size, N)
        share = _Share(progress, e_ - s)
        res = min_norm_radius(forward, x[s:e_], y[s:e_], norm=norm, clip=box(s, e_), strength=st,
                              generator=gen(s, 0), forward64=forward64, max_eps=max_eps,
                              progress=lambda name, sh=share: sh.to(MINNORM_DONE.get(name, 0.0)))
        radius[s:e_] = res.radius
        x_adv[s:e_] = res.x_adv
        found_by[s:e_] = res.found_by
        tried = res.tried or tried
        precision = res.precision
        share.to(1.0)
    ens_tried: list = []
    for stage, e in enumerate(eps, start=1):
        for s in range(0, N, batch_size):
            e_ = min(s + batch_size, N)
            need = (radius[s:e_] > e).nonzero().reshape(-1)
            share = _Share(progress, e_ - s)
            if need.numel():
                idx = need + s
                res = ensemble_attack(forward, x[idx], y[idx], e, norm=norm, clip=clip_rows(clip, idx, x.dim()),
                                      strength=st, generator=gen(s, stage), forward64=forward64,
                                      progress=lambda name, sh=share: sh.to(ENSEMBLE_DONE.get(name, 0.0)))
                ens_tried = res.tried or ens_tried
                hit = res.broken.nonzero().reshape(-1)
                if hit.numel():
                    d = Judge.dist(res.x_adv[hit], x[idx[hit]], norm)
                    better = d < radius[idx[hit]]
                    bi = idx[hit][better]
                    radius[bi] = d[better]
                    x_adv[bi] = res.x_adv[hit][better]
                    for j, i in zip(hit[better].tolist(), bi.tolist()):
                        found_by[i] = res.found_by[j]
            share.to(1.0)
    judge = Judge(forward, x[:1], None, forward64)
    margin = torch.cat([judge.margin(x_adv[s:s + batch_size], y[s:s + batch_size]) for s in range(0, N, batch_size)]) \
        if N else torch.zeros(0, dtype=torch.float64)
    return RobustnessReport(n=N, norm=norm, clip=clip, strength=st.name, eps=eps, labels=y.cpu(), pred=pred.cpu(),
                            radius=radius.cpu(), x_adv=x_adv.cpu(), margin=margin.cpu(), found_by=found_by,
                            tried=tried + [t for t in ens_tried if eps], precision=precision,
                            time_s=time.perf_counter() - t0, names=names)


def _eps_short(k) -> str:
    """A radius in a one-line ``repr`` (4 significant digits; the keys stay exact floats)."""
    return k if isinstance(k, str) else f"{k:.4g}"
