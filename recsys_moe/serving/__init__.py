"""Batch and online scoring of registered models (see the registry/serving issue)."""
