"""Attack effort presets (``--strength fast|standard|thorough``).

One place says how much work each attack does, so that ``attack``, ``audit`` and the Python API mean
the same thing by "standard".  ``standard`` is sized like AutoAttack's standard version (APGD-CE,
APGD-T on 9 targets with 100 iterations each); ``thorough`` adds restarts and iterations for a final
word; ``fast`` is for a first look.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strength", "STRENGTHS", "get_strength"]


@dataclass(frozen=True)
class Strength:
    """Per-attack effort.  Every count is per input."""

    name: str
    # minimum-norm escalation
    fmn_steps: int
    fmn_targets: int
    fab_steps: int
    fab_targets: int
    fab_restarts: int
    ddn_steps: int
    bisect_steps: int
    bisect_restarts: int
    bisect_iters: int
    box_samples: int
    # fixed-eps ensemble
    apgd_steps: int
    apgd_ce_restarts: int
    apgd_targets: int
    apgd_target_restarts: int
    ensemble_fab_targets: int


STRENGTHS = {
    "fast": Strength("fast", fmn_steps=150, fmn_targets=1, fab_steps=0, fab_targets=0, fab_restarts=0, ddn_steps=0,
                     bisect_steps=20, bisect_restarts=2, bisect_iters=4, box_samples=32,
                     apgd_steps=50, apgd_ce_restarts=1, apgd_targets=3, apgd_target_restarts=1,
                     ensemble_fab_targets=0),
    "standard": Strength("standard", fmn_steps=300, fmn_targets=3, fab_steps=100, fab_targets=9, fab_restarts=1,
                         ddn_steps=300, bisect_steps=50, bisect_restarts=2, bisect_iters=6, box_samples=128,
                         apgd_steps=100, apgd_ce_restarts=1, apgd_targets=9, apgd_target_restarts=1,
                         ensemble_fab_targets=3),
    "thorough": Strength("thorough", fmn_steps=1000, fmn_targets=9, fab_steps=300, fab_targets=9, fab_restarts=3,
                         ddn_steps=1000, bisect_steps=100, bisect_restarts=4, bisect_iters=10, box_samples=512,
                         apgd_steps=250, apgd_ce_restarts=5, apgd_targets=9, apgd_target_restarts=3,
                         ensemble_fab_targets=9),
}


def get_strength(strength) -> Strength:
    """A :class:`Strength` from a preset name or a :class:`Strength` itself."""
    if isinstance(strength, Strength):
        return strength
    try:
        return STRENGTHS[str(strength)]
    except KeyError:
        raise ValueError(f"strength must be one of {', '.join(STRENGTHS)}, got {strength!r}") from None
