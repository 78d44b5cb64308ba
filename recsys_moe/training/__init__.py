"""Losses, metrics, checkpoints and the training loop."""
