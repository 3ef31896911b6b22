"""Result dataclasses returned by the Python API; ``to_dict()`` gives the documented JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def json_safe(v: Any) -> Any:
    """``v`` with every number strict JSON can hold: a float that is not finite becomes ``None``
    (``null``: an infinite radius or constant, e.g. of a model whose decision cannot change; or NaN),
    numpy scalars and arrays and torch tensors become Python numbers and lists, tuples and sets lists."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [json_safe(x) for x in v]
    tolist = getattr(v, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return json_safe(tolist())
    return str(v)


def dumps(v: Any, **kw) -> str:
    """Strict JSON (``allow_nan=False``) of ``v`` after :func:`json_safe`: ``Infinity`` and ``NaN``
    never appear."""
    import json

    return json.dumps(json_safe(v), allow_nan=False, **kw)


@dataclass
class LayerRow:
    name: str
    op: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    lipschitz: float | None
    method: str
    sound: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "kind": self.kind, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "lipschitz": _num(self.lipschitz),
                "method": self.method, "sound": self.sound}


@dataclass
class ValueWithMethod:
    value: float
    method: str
    sound: bool

    def to_dict(self) -> dict:
        return {"value": _num(self.value), "method": self.method, "sound": self.sound}


@dataclass
class MarginSummary:
    K: list[list[float]]
    method: str
    sound: bool

    @property
    def off_diagonal(self) -> list[float]:
        return [v for i, row in enumerate(self.K) for j, v in enumerate(row) if i != j]

    @property
    def max(self) -> float:
        return max(self.off_diagonal) if self.off_diagonal else 0.0

    @property
    def min(self) -> float:
        return min(self.off_diagonal) if self.off_diagonal else 0.0

    def to_dict(self) -> dict:
        return {"K": [[float(v) for v in row] for row in self.K], "max": self.max, "min": self.min,
                "method": self.method, "sound": self.sound}


@dataclass
class BoundsReport:
    """Everything ``lipverify bounds`` reports."""

    model: str
    norm: str
    method: str
    input_shape: tuple
    n_classes: int
    layers: list[LayerRow]
    global_bound: ValueWithMethod
    margin: MarginSummary
    fidelity: Any = None
    notes: list[str] = field(default_factory=list)
    time_s: float = 0.0
    domain: list | None = None  # [lo, hi] the bounds hold on (None: every input)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "norm": self.norm,
            "method": self.method,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "layers": [r.to_dict() for r in self.layers],
            "global": self.global_bound.to_dict(),
            "margin": self.margin.to_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "notes": list(self.notes),
            "time_s": self.time_s,
            "domain": self.domain,
        }
