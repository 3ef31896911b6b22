"""Output properties of a specification: which outputs ``y = f(x)`` make ``x`` a counterexample.

A VNN-LIB specification states the output condition of a *counterexample* as a disjunction of
conjunctions of linear constraints::

    counterexample(y)  <=>  OR_D  AND_{k in D}  C_k . y >= d_k

(``>`` is read as ``>=``: a certificate must prove ``C_k . y < d_k`` strictly, so a tie is never
certified).  The usual forms are special cases:

* untargeted robustness with label ``l``: one disjunct ``{y_t - y_l >= 0}`` per other class ``t``;
* targeted robustness (label ``l``, target ``t``): the single disjunct ``{y_t - y_l >= 0}``;
* targeted conjunction ("the network does not pick ``t``"): one disjunct ``{y_t - y_j >= 0 : j != t}``.

The property *holds* on an input set ``S`` when no ``x`` in ``S`` is a counterexample: for every
disjunct ``D`` some ``k`` in ``D`` has ``sup_{x in S} C_k . f(x) < d_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["OutputProperty"]


@dataclass
class OutputProperty:
    """``C`` float64 ``(m, n_y)``, ``d`` float64 ``(m,)``; ``disjuncts``: row indices of each conjunction.

    ``label``/``targets``: set when every disjunct is one constraint ``y_t - y_l >= 0`` with the same
    ``l`` (the robustness forms); ``None`` otherwise.  ``kind`` names the form for reports.
    """

    C: np.ndarray
    d: np.ndarray
    disjuncts: list[list[int]]
    label: int | None = None
    targets: list[int] | None = None
    kind: str = "linear"

    @classmethod
    def robustness(cls, label: int, targets, n_y: int) -> "OutputProperty":
        """Counterexample: some class in ``targets`` scores at least ``label``."""
        targets = sorted(int(t) for t in targets)
        C = np.zeros((len(targets), n_y))
        for k, t in enumerate(targets):
            C[k, t] += 1.0
            C[k, label] -= 1.0
        kind = "targeted" if len(targets) == 1 else "untargeted"
        return cls(C, np.zeros(len(targets)), [[k] for k in range(len(targets))], int(label), targets, kind)

    @classmethod
    def from_dnf(cls, dnf: list[list[tuple[np.ndarray, float]]]) -> "OutputProperty":
        """Build from disjuncts of ``(c, d)`` rows; detects the robustness and targeted-conjunction forms."""
        rows: list[tuple[np.ndarray, float]] = []
        index: dict[tuple, int] = {}
        disjuncts = []
        for conj in dnf:
            ids = set()
            for c, d in conj:
                key = (tuple(float(v) for v in c), float(d))
                if key not in index:
                    index[key] = len(rows)
                    rows.append((np.asarray(c, dtype=np.float64), float(d)))
                ids.add(index[key])
            disjuncts.append(sorted(ids))
        n_y = len(rows[0][0])
        C = np.stack([c for c, _ in rows]) if rows else np.zeros((0, n_y))
        d = np.asarray([v for _, v in rows], dtype=np.float64)
        return cls.from_rows(C, d, disjuncts)

    @classmethod
    def from_rows(cls, C: np.ndarray, d: np.ndarray, disjuncts: list[list[int]]) -> "OutputProperty":
        """Build from distinct rows ``C``/``d`` and the sorted row indices of each disjunct; detects
        the robustness and targeted-conjunction forms (vectorised: linear in the size of ``C``)."""
        prop = cls(C, d, disjuncts)
        if not len(d):
            return prop
        ones, minus = C == 1.0, C == -1.0
        pair = (d == 0) & ((C != 0).sum(axis=1) == 2) & (ones.sum(axis=1) == 1) & (minus.sum(axis=1) == 1)
        if pair.all():
            bigs_of = np.argmax(ones, axis=1)
            smalls = set(np.argmax(minus, axis=1).tolist())
            bigs = set(bigs_of.tolist())
            if len(smalls) == 1 and all(len(D) == 1 for D in disjuncts):
                prop.label = smalls.pop()
                prop.targets = sorted({int(bigs_of[D[0]]) for D in disjuncts})
                prop.kind = "targeted" if len(prop.targets) == 1 else "untargeted"
            elif len(disjuncts) == 1 and len(bigs) == 1:
                prop.kind = "targeted conjunction"
        return prop

    @property
    def n_outputs(self) -> int:
        return int(self.C.shape[1])

    def slack(self, out: torch.Tensor) -> torch.Tensor:
        """``min_D max_{k in D} (d_k - C_k . y)`` per row of ``out`` (B, n_y): ``<= 0`` exactly when ``y``
        is a counterexample; positive values say by how much the closest disjunct misses."""
        C = torch.as_tensor(self.C, dtype=out.dtype, device=out.device)
        d = torch.as_tensor(self.d, dtype=out.dtype, device=out.device)
        gap = d - out.reshape(len(out), -1) @ C.T  # (B, m)
        per = torch.stack([gap[:, D].amax(dim=1) for D in self.disjuncts], dim=1)
        return per.amin(dim=1)

    def is_counterexample(self, out: torch.Tensor) -> torch.Tensor:
        return self.slack(out) <= 0

    def describe(self) -> str:
        if self.label is not None:
            return f"{self.kind} (label {self.label}, targets {self.targets})"
        return f"{self.kind} ({len(self.disjuncts)} disjunct(s), {len(self.d)} linear constraint(s))"

