"""Certified fine-tuning: differentiable bounds, losses, schedules, training loops."""
