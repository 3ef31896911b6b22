"""Attacks that use only the model's forward pass (never the bound code): the empirical side.

* :mod:`~lipverify.attacks.core` — norms, projections, the input box, margins;
* :mod:`~lipverify.attacks.verify` — the float64 judge every reported point passes;
* :mod:`~lipverify.attacks.pgd`, :mod:`~lipverify.attacks.apgd`, :mod:`~lipverify.attacks.fab` — PGD,
  Auto-PGD (CE, targeted DLR), targeted FAB;
* :mod:`~lipverify.attacks.minnorm` — minimum-norm radii (FMN, FAB-T, PGD bisection, box search);
* :mod:`~lipverify.attacks.ensemble` — fixed-eps robust accuracy (AutoAttack-style ensemble);
* :mod:`~lipverify.attacks.strength` — effort presets; :mod:`~lipverify.attacks.evaluate` — a data set's
  radii and robust accuracy;
* :mod:`~lipverify.attacks.lower` — optimised Lipschitz lower bounds (witness pairs): empirical too.

This package may import torch, :mod:`lipverify.errors` and itself; it never imports :mod:`lipverify.bounds`,
:mod:`lipverify.certify` or the graph: attacks use only the model's forward pass.
"""

from lipverify.attacks.core import margin_loss
from lipverify.attacks.ensemble import EnsembleResult, ensemble_attack
from lipverify.attacks.minnorm import MinNormResult, min_norm_radius
from lipverify.attacks.pgd import AttackResult, pgd_attack
from lipverify.attacks.strength import STRENGTHS, Strength

__all__ = ["AttackResult", "EnsembleResult", "MinNormResult", "STRENGTHS", "Strength", "ensemble_attack",
           "margin_loss", "min_norm_radius", "pgd_attack"]
