"""Schedules for certified fine-tuning: training eps, the TRADES weight, and the learning rate.

All schedules are pure functions of the training progress ``t`` measured in (fractional) epochs,
``t = epoch + step / steps_per_epoch``, so a run resumed from a checkpoint sees exactly the same values.

eps schedules (SPEC section 7; ``target = eps_mult * eps``, ramp over ``ramp`` epochs, default half of
the run, then constant):

``constant``  ``target`` from the first step.
``linear``    ``target * min(t / ramp, 1)`` (GloRo's ``linear`` / ``linear_half`` schedules).
``log``       GloRo's ``logarithmic`` schedule: from ``0.01 * target`` to ``target`` with
              ``eps_t = log((exp(target) - exp(start)) * t / ramp + exp(start))``.
``liresnet``  LiResNet: ``eps_t = (min(t / ramp, 1) * 1.4 + 0.1) * eps`` (0.1 eps to 1.5 eps at the end
              of the ramp; ``eps_mult`` is not used).

TRADES weight: ``"x"`` (constant) or ``"start,end,epochs"`` (GloRo: ``lambda_t = start + (end - start) *
t / epochs`` while ``t < epochs``, then ``end``).

Learning rate: Adam's base rate times a linear warm-up over ``warmup`` epochs followed by a cosine
decay to ``min_factor * lr`` at the end of the run (Loshchilov and Hutter; LiResNet's recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lipverify.errors import UserInputError

EPS_SCHEDULES = ("constant", "linear", "log", "liresnet")


@dataclass(frozen=True)
class EpsSchedule:
    eps: float
    kind: str = "constant"
    mult: float = 1.0
    ramp: float = 0.0  # epochs

    def __post_init__(self):
        if self.kind not in EPS_SCHEDULES:
            raise UserInputError(f"--eps-schedule must be one of {', '.join(EPS_SCHEDULES)}, got {self.kind!r}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise UserInputError(f"--eps must be finite and >= 0, got {self.eps}")
        if not (self.mult > 0 and math.isfinite(self.mult)):
            raise UserInputError(f"--eps-mult must be positive, got {self.mult}")

    @property
    def target(self) -> float:
        return 1.5 * self.eps if self.kind == "liresnet" else self.mult * self.eps

    def __call__(self, t: float) -> float:
        frac = 1.0 if self.ramp <= 0 else min(max(t / self.ramp, 0.0), 1.0)
        if self.kind == "constant":
            return self.target
        if self.kind == "linear":
            return self.target * frac
        if self.kind == "liresnet":
            return (frac * 1.4 + 0.1) * self.eps
        # log (GloRo's _log_interp from 0.01 * target to target)
        start, end = 0.01 * self.target, self.target
        if end < 700:
            return math.log((math.exp(end) - math.exp(start)) * frac + math.exp(start))
        # the same in a form that does not overflow exp() for radii above ~709
        inner = frac * -math.expm1(start - end) + math.exp(start - end)
        return end + math.log(inner) if inner > 0 else start


@dataclass(frozen=True)
class LinearRamp:
    """``start`` to ``end`` linearly over ``epochs`` epochs, then ``end`` (GloRo's ``x,y,e``)."""

    start: float
    end: float
    epochs: float

    def __call__(self, t: float) -> float:
        if self.epochs <= 0 or t >= self.epochs:
            return self.end
        return self.start + (self.end - self.start) * max(t, 0.0) / self.epochs

    @classmethod
    def parse(cls, text: str | float | None, what: str = "--trades-lambda", default: float = 1.0) -> "LinearRamp":
        if text is None or text == "":
            return cls(default, default, 0.0)
        if isinstance(text, (int, float)):
            return cls(float(text), float(text), 0.0)
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise UserInputError(f"{what} must be a number or start,end,epochs; got {text!r}") from None
        if len(vals) == 1:
            return cls(vals[0], vals[0], 0.0)
        if len(vals) == 3:
            if vals[2] < 0:
                raise UserInputError(f"{what}: the number of epochs must be >= 0, got {vals[2]}")
            return cls(vals[0], vals[1], vals[2])
        raise UserInputError(f"{what} must be a number or start,end,epochs; got {text!r}")


def lr_factor(t: float, total: float, warmup: float, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at progress ``t`` (epochs): linear warm-up, cosine decay."""
    if total <= 0:
        return 1.0
    if warmup > 0 and t < warmup:
        return max(t, 0.0) / warmup + 1e-3 * (1 - max(t, 0.0) / warmup)
    span = max(total - warmup, 1e-12)
    p = min(max((t - warmup) / span, 0.0), 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
