"""Attacks that use only the model's forward pass (never the bound code)."""
