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

from lipverify.attacks.core import Forward, check_norm, clip_rows
from lipverify.attacks.ensemble import ensemble_attack
from lipverify.attacks.minnorm import min_norm_radius
from lipverify.attacks.strength import get_strength
from lipverify.attacks.verify import Judge

__all__ = ["RobustnessReport", "evaluate_robustness"]


def _eps_key(e: float) -> str:
    return f"{e:.6g}"


@dataclass
class RobustnessReport:
    """Result of :func:`evaluate_robustness`; ``to_dict()`` is the ``lipverify attack --json`` object."""

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

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.labels

    def broken_at(self, eps: float) -> torch.Tensor:
        return self.radius <= eps

    @property
    def robust_accuracy(self) -> dict:
        c = self.correct
        return {_eps_key(e): float((c & ~self.broken_at(e)).double().mean()) if self.n else 0.0 for e in self.eps}

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
                   "broken": {_eps_key(e): r[i] <= e for e in self.eps}}
            if self.names is not None:
                row["name"] = self.names[i]
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"n": self.n, "norm": self.norm, "clip": self.clip if not isinstance(self.clip, tuple) or
                not isinstance(self.clip[0], torch.Tensor) else "per-coordinate box",
                "strength": self.strength, "eps": list(self.eps), "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": self.robust_accuracy, "median_adversarial_radius": self.median_radius,
                "found_by": self.found_by_counts(), "tried": list(self.tried), "precision": self.precision,
                "time_s": self.time_s, "inputs": self.inputs(), "notes": list(self.notes)}


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
        Optional callable ``progress(k)`` advanced by the number of inputs done per stage.
    index_offset:
        The index of ``x[0]`` in the whole data set.  Every batch draws its random numbers from its own
        generator seeded with ``seed`` and the index of its first input, so a shard of the data that
        starts at a multiple of ``batch_size`` (``torchrun``, :mod:`lipverify.attacks.sharded`) gets the
        same results as the same inputs in one process.
    """
    norm = check_norm(norm)
    st = get_strength(strength)
    t0 = time.perf_counter()
    eps = sorted({float(e) for e in eps})
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
        res = min_norm_radius(forward, x[s:e_], y[s:e_], norm=norm, clip=box(s, e_), strength=st,
                              generator=gen(s, 0), forward64=forward64, max_eps=max_eps)
        radius[s:e_] = res.radius
        x_adv[s:e_] = res.x_adv
        found_by[s:e_] = res.found_by
        tried = res.tried or tried
        precision = res.precision
        if progress:
            progress(e_ - s)
    ens_tried: list = []
    for stage, e in enumerate(eps, start=1):
        for s in range(0, N, batch_size):
            e_ = min(s + batch_size, N)
            need = (radius[s:e_] > e).nonzero().reshape(-1)
            if need.numel():
                idx = need + s
                res = ensemble_attack(forward, x[idx], y[idx], e, norm=norm, clip=clip_rows(clip, idx, x.dim()),
                                      strength=st, generator=gen(s, stage), forward64=forward64)
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
            if progress:
                progress(e_ - s)
    judge = Judge(forward, x[:1], None, forward64)
    margin = torch.cat([judge.margin(x_adv[s:s + batch_size], y[s:s + batch_size]) for s in range(0, N, batch_size)]) \
        if N else torch.zeros(0, dtype=torch.float64)
    return RobustnessReport(n=N, norm=norm, clip=clip, strength=st.name, eps=eps, labels=y.cpu(), pred=pred.cpu(),
                            radius=radius.cpu(), x_adv=x_adv.cpu(), margin=margin.cpu(), found_by=found_by,
                            tried=tried + [t for t in ens_tried if eps], precision=precision,
                            time_s=time.perf_counter() - t0, names=names)
