"""Lipschitz mathematics: operator norms, global and margin bounds, local bounds, LipSDP, lower bounds."""
