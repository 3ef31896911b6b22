"""Attacks that use only the model's forward pass (never the bound code)."""

from lipverify.attacks.minnorm import MinNormResult, min_norm_radius
from lipverify.attacks.pgd import AttackResult, margin_loss, pgd_attack

__all__ = ["AttackResult", "MinNormResult", "margin_loss", "min_norm_radius", "pgd_attack"]
