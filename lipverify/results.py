"""Result dataclasses returned by the Python API; ``to_dict()`` gives the documented JSON.

* :class:`BoundsReport` (``LipModel.bounds``) with its :class:`LayerRow` per node;
* :class:`CertifyResult` and :class:`InputCertificate` (``LipModel.certify``, defined in
  :mod:`lipverify.certify.rules`, importable from here too);
* :class:`RobustnessReport` (``LipModel.attack``, defined in :mod:`lipverify.attacks.evaluate`).

Radii (eps) are float keys in every Python result (``res.vra[0.5]``) and strings of
:func:`lipverify.arguments.eps_key` in the JSON (``"0.5"``; ``float(key) == eps``).  ``repr()`` of a
result is one line of summary (never whole tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _inf(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isinf(float(v))


def short_number(v) -> str:
    """``v`` with 6 significant digits for a one-line ``repr`` (``None`` as ``None``)."""
    try:
        return f"{float(v):.6g}"
    except (TypeError, ValueError):
        return repr(v)


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


_LAZY = {"CertifyResult": "lipverify.certify.rules", "InputCertificate": "lipverify.certify.rules",
         "RobustnessReport": "lipverify.attacks.evaluate"}


def __getattr__(name):
    """``CertifyResult``, ``InputCertificate`` and ``RobustnessReport`` on first use (their modules
    import torch and the analyses; this one stays light)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipverify.results' has no attribute {name!r}")


@dataclass
class LayerRow:
    """One node of the graph.  ``lipschitz``: the node's own constant (None for nodes that combine
    branches); ``cumulative``: the graph's sound bound on the Lipschitz constant from the input to this
    node's output (the propagation's running product, sums over residual branches; None where the
    propagation has none)."""

    name: str
    op: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    lipschitz: float | None
    method: str
    sound: bool
    cumulative: float | None = None

    @property
    def overflow(self) -> bool:
        """The node's constant or the running bound up to it overflowed float64 (is infinite)."""
        return _inf(self.lipschitz) or _inf(self.cumulative)

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "kind": self.kind, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "lipschitz": _num(self.lipschitz),
                "method": self.method, "sound": self.sound, "cumulative": _num(self.cumulative),
                "overflow": self.overflow}


@dataclass
class ValueWithMethod:
    value: float
    method: str
    sound: bool

    def to_dict(self) -> dict:
        return {"value": _num(self.value), "infinite": _inf(self.value), "method": self.method, "sound": self.sound}


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
        return {"K": [[_num(v) for v in row] for row in self.K], "max": _num(self.max), "min": _num(self.min),
                "infinite": any(_inf(v) for v in self.off_diagonal), "method": self.method, "sound": self.sound}


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
    #: seconds including loading the model (the command's whole run; None from the API)
    total_time_s: float | None = None
    #: the command's labelled time line (``time 5.5 s (load 0.1 s, bounds 5.4 s)``; None from the API)
    time_label: str | None = None

    @property
    def overflow_index(self) -> int | None:
        """Index in ``layers`` of the first layer (graph order) whose constant or running bound
        overflowed float64; None if none did."""
        return next((i for i, r in enumerate(self.layers) if r.overflow), None)

    @property
    def overflow_at(self) -> str | None:
        """Name of the layer at :attr:`overflow_index` (None if nothing overflowed)."""
        k = self.overflow_index
        return None if k is None else self.layers[k].name

    def __repr__(self) -> str:
        name = self.model if len(str(self.model)) <= 60 else "..." + str(self.model)[-57:]
        return (f"BoundsReport(model={name!r}, norm={self.norm!r}, method={self.method!r}, "
                f"layers={len(self.layers)}, global_bound={short_number(self.global_bound.value)}, "
                f"margin_max={short_number(self.margin.max)}, "
                f"sound={self.global_bound.sound})")

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
            "overflow": None if self.overflow_index is None else {"layer": self.overflow_at,
                                                                  "index": self.overflow_index},
            **({} if self.total_time_s is None else {"total_time_s": self.total_time_s}),
            **({} if self.time_label is None else {"time_label": self.time_label}),
        }


def time_label(total_s: float, load_s: float, what: str, analysis_s: float) -> str:
    """The labelled time line of a command: ``time 19.9 s (load 15.2 s, certify 4.7 s)``.  ``total_s``
    runs from the start of the command (loading included); ``analysis_s`` is the result's ``time_s``."""
    return f"time {total_s:.3g} s (load {load_s:.3g} s, {what} {analysis_s:.3g} s)"
